//! Bad input gets a clear error and loses nothing: broken/tiny/huge images, gray/RGBA conversion,
//! invalid support sets, missing/tampered model files, corrupt or foreign classifier artifacts.

mod common;
use common::{models_dir, pipeline};

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, GrayImage, ImageFormat, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use sgps::classifier::{Classifier, FORMAT_VERSION};
use sgps::error::Error;
use sgps::pipeline::{ClassSupport, LoadOptions, Pipeline, SynthMode};

fn textured(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 5 % 256) as u8,
            (y * 3 % 256) as u8,
            ((x + y) % 256) as u8,
        ])
    })
}

fn encode(img: DynamicImage, fmt: ImageFormat) -> Vec<u8> {
    let mut c = Cursor::new(Vec::new());
    img.write_to(&mut c, fmt).unwrap();
    c.into_inner()
}

/// A PNG whose header claims `w` x `h` pixels (with an empty IDAT: no real pixel data).
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    v.extend_from_slice(&13u32.to_be_bytes());
    v.extend_from_slice(&ihdr);
    v.extend_from_slice(&crc32fast::hash(&ihdr).to_be_bytes());
    let mut idat = b"IDAT".to_vec();
    idat.extend_from_slice(&[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    v.extend_from_slice(&8u32.to_be_bytes());
    v.extend_from_slice(&idat);
    v.extend_from_slice(&crc32fast::hash(&idat).to_be_bytes());
    v.extend_from_slice(&0u32.to_be_bytes());
    v.extend_from_slice(b"IEND");
    v.extend_from_slice(&crc32fast::hash(b"IEND").to_be_bytes());
    v
}

#[test]
fn broken_images_are_named_and_the_rest_of_the_batch_is_processed() {
    let p = pipeline();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good_jpg = encode(textured(120, 90).into(), ImageFormat::Jpeg);
    std::fs::write(d.join("good.jpg"), &good_jpg).unwrap();
    std::fs::write(d.join("truncated.jpg"), &good_jpg[..good_jpg.len() / 2]).unwrap();
    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(d.join("random.png"), &random).unwrap();
    std::fs::write(
        d.join("tiny.png"),
        encode(textured(20, 20).into(), ImageFormat::Png),
    )
    .unwrap();
    std::fs::write(d.join("huge.png"), png_header_only(100_000, 100_000)).unwrap();
    std::fs::write(d.join("empty.bmp"), b"").unwrap();
    let good_png = encode(textured(64, 64).into(), ImageFormat::Png);
    std::fs::write(d.join("good.png"), &good_png).unwrap();

    let names = [
        "good.jpg",
        "truncated.jpg",
        "random.png",
        "tiny.png",
        "huge.png",
        "empty.bmp",
        "missing.jpg",
        "good.png",
    ];
    let paths: Vec<PathBuf> = names.iter().map(|n| d.join(n)).collect();
    let results = p.embed_image_files(&paths);
    assert_eq!(results.len(), names.len());
    for (name, r) in names.iter().zip(&results) {
        match (name.starts_with("good"), r) {
            (true, Ok(e)) => assert_eq!(e.len(), p.manifest().image_encoder.embedding_dim),
            (false, Err(e)) => {
                let msg = e.to_string();
                assert!(msg.contains(name), "error must name the file: {msg}");
                println!("{name}: {msg}");
            }
            (true, Err(e)) => panic!("{name} should embed: {e}"),
            (false, Ok(_)) => panic!("{name} should be rejected"),
        }
    }
    let msg = |i: usize| results[i].as_ref().unwrap_err().to_string();
    assert!(msg(1).contains("truncated"), "{}", msg(1));
    assert!(msg(3).contains("too small"), "{}", msg(3));
    assert!(msg(4).contains("too large"), "{}", msg(4));

    // single-file API: same errors
    let e = p.embed_image_file(&d.join("truncated.jpg")).unwrap_err();
    assert!(matches!(e, Error::Image { .. }));
}

#[test]
fn grayscale_and_rgba_inputs_are_converted_to_rgb() {
    let p = pipeline();
    let dir = tempfile::tempdir().unwrap();
    let gray = GrayImage::from_fn(80, 80, |x, y| Luma([((x * 3 + y) % 256) as u8]));
    let gray_as_rgb = DynamicImage::ImageLuma8(gray.clone()).to_rgb8();
    std::fs::write(
        dir.path().join("gray.png"),
        encode(gray.into(), ImageFormat::Png),
    )
    .unwrap();
    let rgb = textured(72, 96);
    let rgba = RgbaImage::from_fn(72, 96, |x, y| {
        let p = rgb.get_pixel(x, y).0;
        Rgba([p[0], p[1], p[2], 200])
    });
    std::fs::write(
        dir.path().join("rgba.png"),
        encode(rgba.into(), ImageFormat::Png),
    )
    .unwrap();
    let from_files = p
        .embed_image_files(&[dir.path().join("gray.png"), dir.path().join("rgba.png")])
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let direct = p.embed_images(&[gray_as_rgb, rgb]).unwrap();
    for (a, b) in from_files.iter().zip(&direct) {
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(
            d < 1e-5,
            "converted file differs from RGB equivalent by {d}"
        );
    }
}

fn emb(p: &Pipeline, seed: u32) -> Vec<f32> {
    p.embed_images(&[RgbImage::from_fn(48, 48, |x, y| {
        Rgb([(x * seed % 256) as u8, (y * 7 % 256) as u8, seed as u8])
    })])
    .unwrap()
    .remove(0)
}

#[test]
fn a_class_with_neither_images_nor_text_is_refused_by_name() {
    let p = pipeline();
    let classes = vec![
        ClassSupport {
            name: "lesion_a".into(),
            shots: vec![emb(p, 3)],
            ..Default::default()
        },
        ClassSupport {
            name: "empty_class".into(),
            ..Default::default()
        },
    ];
    let e = p
        .synthesize(&classes, SynthMode::ImagesAndText)
        .unwrap_err();
    assert!(matches!(e, Error::Support(_)));
    assert!(e.to_string().contains("empty_class"), "{e}");
    // text-only synthesis needs a description for every class
    let e = p
        .synthesize(&classes[..1], SynthMode::TextOnly)
        .unwrap_err();
    assert!(e.to_string().contains("2 to 16"), "{e}");
}

/// Copy the manifest and the files it names into a temp dir.
fn copy_models(to: &Path) {
    let m = p_manifest();
    std::fs::copy(models_dir().join("manifest.json"), to.join("manifest.json")).unwrap();
    for f in m.files() {
        std::fs::copy(models_dir().join(f), to.join(f)).unwrap();
    }
}

fn p_manifest() -> sgps::manifest::Manifest {
    sgps::manifest::Manifest::load(&models_dir()).unwrap()
}

#[test]
fn tampered_or_missing_model_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    copy_models(dir.path());
    let synth = dir.path().join(&p_manifest().synthesizer.file);
    let mut bytes = std::fs::read(&synth).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&synth, &bytes).unwrap();
    let e = Pipeline::load(dir.path(), &LoadOptions::default())
        .err()
        .expect("tampered model must be refused");
    assert!(matches!(e, Error::ModelTampered { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("synthesizer.onnx") && msg.contains("cargo xtask train"),
        "{msg}"
    );

    // the word features G reads are verified like the models
    if let Some(w) = p_manifest().words_spec().cloned() {
        let path = dir.path().join(&w.file);
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        bad[good.len() / 2] ^= 0x01;
        std::fs::write(&path, &bad).unwrap();
        let e = Pipeline::load(dir.path(), &LoadOptions::default())
            .err()
            .expect("tampered word features must be refused");
        assert!(matches!(e, Error::ModelTampered { .. }), "{e}");
        assert!(e.to_string().contains(&w.file), "{e}");
        std::fs::write(&path, &good).unwrap();
    }

    std::fs::remove_file(&synth).unwrap();
    let e = Pipeline::load(dir.path(), &LoadOptions::default())
        .err()
        .expect("missing model must be refused");
    assert!(matches!(e, Error::ModelMissing { .. }), "{e}");

    let e = Pipeline::load(&dir.path().join("nowhere"), &LoadOptions::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("manifest.json"), "{e}");
}

#[test]
fn corrupt_foreign_version_and_foreign_encoder_classifiers_are_refused() {
    let p = pipeline();
    let classes = vec![
        ClassSupport {
            name: "a".into(),
            shots: vec![emb(p, 3)],
            ..Default::default()
        },
        ClassSupport {
            name: "b".into(),
            shots: vec![emb(p, 11)],
            ..Default::default()
        },
    ];
    let clf = p.synthesize(&classes, SynthMode::ImagesOnly).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.sgpc");
    clf.save(&good).unwrap();
    assert_eq!(p.load_classifier(&good).unwrap(), clf);
    let bytes = std::fs::read(&good).unwrap();

    let corrupt = dir.path().join("corrupt.sgpc");
    let mut b = bytes.clone();
    let i = b.len() - 10;
    b[i] ^= 0xFF;
    std::fs::write(&corrupt, &b).unwrap();
    let e = p.load_classifier(&corrupt).unwrap_err();
    assert!(matches!(e, Error::ClassifierCorrupt { .. }), "{e}");
    assert!(e.to_string().contains("sgps synth"), "{e}");

    let truncated = dir.path().join("truncated.sgpc");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = p.load_classifier(&truncated).unwrap_err();
    assert!(matches!(e, Error::ClassifierCorrupt { .. }), "{e}");

    let other_version = dir.path().join("v99.sgpc");
    let mut b = bytes.clone();
    b[8..10].copy_from_slice(&(FORMAT_VERSION + 98).to_le_bytes());
    std::fs::write(&other_version, &b).unwrap();
    let e = p.load_classifier(&other_version).unwrap_err();
    assert!(matches!(e, Error::ClassifierVersion { .. }), "{e}");

    let mut foreign = clf.clone();
    foreign.encoder_sha256 = "ab".repeat(32);
    let foreign_path = dir.path().join("foreign.sgpc");
    foreign.save(&foreign_path).unwrap();
    let e = p.load_classifier(&foreign_path).unwrap_err();
    assert!(matches!(e, Error::ClassifierEncoder { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&"ab".repeat(32)) && msg.contains(p.encoder_sha256()),
        "{msg}"
    );

    // Classifier::load directly, same checks
    assert!(Classifier::load(&good, "0000").is_err());
}

/// A board's NNEF archive that is not the model the manifest describes (here the image encoder's
/// archive under the synthesizer's name, with a matching SHA-256) is refused by name, saying
/// which inputs it has and which the manifest expects.
#[test]
#[cfg(feature = "onnx")] // translates the ONNX files
fn an_nnef_archive_of_another_model_is_refused_with_its_inputs() {
    let m = p_manifest();
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(models_dir().join("manifest.json")).unwrap();
    let (image_variant, _) = m.image_variant(None).unwrap();
    let out =
        sgps::encoders::nnef::translate_models(&m, &text, image_variant, None, dir.path()).unwrap();
    let mut doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let image = doc["image_encoder"]["variants"][image_variant].clone();
    let synth = doc["synthesizer"]["file"].as_str().unwrap().to_string();
    std::fs::copy(
        dir.path().join(image["file"].as_str().unwrap()),
        dir.path().join(&synth),
    )
    .unwrap();
    doc["synthesizer"]["sha256"] = image["sha256"].clone();
    std::fs::write(dir.path().join("manifest.json"), doc.to_string()).unwrap();
    let n = sgps::manifest::Manifest::load(dir.path()).unwrap();
    let e = sgps::synthesizer::Synthesizer::load(&n)
        .err()
        .expect("a foreign archive must be refused");
    let msg = e.to_string();
    assert!(matches!(e, Error::ModelLoad { .. }), "{msg}");
    assert!(
        msg.contains(&synth) && msg.contains("inputs are") && msg.contains("support"),
        "{msg}"
    );
}
