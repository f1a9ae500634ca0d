//! Test helper for `tests/crash.rs` (not part of the product): writes store records in a loop
//! and prints an acknowledgement line after each write is durable, until it is killed.
//!
//! Usage: `sgps_crash_child <storage_dir>`. Lines printed (stdout, flushed):
//! - `audit <seq>`: audit record `seq` (event `Note("crash-test <seq>")`) appended and synced;
//! - `class <name> <v>`: class record `name` replaced by version `v` (see [`class_record`]);
//! - `clf <id> <v>`: classifier version `v` saved and made active.
//!
//! Versions continue from the audit log's next sequence number, so every restart writes new
//! content.

use std::io::Write;
use std::path::PathBuf;

use sgps::classifier::{ClassInfo, Classifier};
use sgps::store::{self, ActiveRecord, AuditEvent, ClassRecord, ShotRecord, Store};

const ENCODER: &str = "crash-test-encoder";

/// The content of class record `name` at version `v` (tests/crash.rs checks this formula).
fn class_record(name: &str, v: u64) -> ClassRecord {
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

fn classifier(v: u64) -> Classifier {
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

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: sgps_crash_child <storage_dir>"),
    );
    let store = Store::open(&dir).expect("open store");
    let (mut audit, _) = store.open_audit().expect("open audit log");
    let out = std::io::stdout();
    let mut out = out.lock();
    let mut v = audit.next_seq();
    loop {
        let note = format!("crash-test {}", audit.next_seq());
        let seq = audit.append(AuditEvent::Note(note)).expect("append");
        writeln!(out, "audit {seq}").unwrap();
        out.flush().unwrap();
        let name = format!("c{}", v % 3);
        store
            .save_class(&class_record(&name, v))
            .expect("save class");
        writeln!(out, "class {name} {v}").unwrap();
        out.flush().unwrap();
        if v % 3 == 0 {
            let c = classifier(v);
            let file = format!("{}.sgpc", c.id);
            c.save(&store.classifier_path(&c.id))
                .expect("save classifier");
            store
                .set_active(&ActiveRecord {
                    classifier_id: c.id.clone(),
                    file,
                    encoder_sha256: ENCODER.into(),
                    classes: heapless::Vec::new(),
                    created_unix_ms: v,
                })
                .expect("set active");
            writeln!(out, "clf {} {v}", c.id).unwrap();
            out.flush().unwrap();
        }
        v += 1;
    }
}
