//! Store records for the crash and power-cut tests: the content of each is a function of a
//! version number, so a test can tell which write it is looking at.

use sgps::classifier::{ClassInfo, Classifier};
use sgps::store::{self, ClassRecord, ShotRecord};

/// The image encoder the fixtures claim.
pub const ENCODER: &str = "store-test-encoder";

/// Class record `name` at version `v`: 1-7 shots of 256 floats (a record spans several
/// 512-byte sectors).
pub fn class_record(name: &str, v: u64) -> ClassRecord {
    ClassRecord {
        name: store::label(name).unwrap(),
        description: Some(format!("{name} v{v}")),
        urgent: false,
        encoder_sha256: ENCODER.into(),
        shots: (0..(v % 7 + 1))
            .map(|k| ShotRecord {
                capture_sha256: [(v % 251) as u8; 32],
                time_unix_ms: v,
                width: 180,
                height: 180,
                quality: sgps::quality::measure(&image::RgbImage::new(4, 4)),
                embedding: vec![(v * 10 + k) as f32; 256],
            })
            .collect(),
    }
}

/// A valid 3-class classifier at version `v`.
pub fn classifier(v: u64) -> Classifier {
    let mut c = Classifier {
        classes: (0..3)
            .map(|i| ClassInfo {
                name: format!("c{i}"),
                description: None,
            })
            .collect(),
        weight: (0..3).map(|i| vec![(v + i) as f32; 128]).collect(),
        bias: vec![0.0; 3],
        scale: 10.0,
        refer_threshold: 0.5,
        encoder_sha256: ENCODER.into(),
        text_encoder_sha256: String::new(),
        synthesizer_sha256: String::new(),
        manifest_format: 1,
        mode: "images".into(),
        shots: vec![1; 3],
        created_at_unix: v,
        id: String::new(),
    };
    c.refresh_id();
    c
}
