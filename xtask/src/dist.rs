//! Release bundle for a board: a versioned directory, a `.tar.gz` of it and a `.deb`.
//!
//! Bundle layout (`sgps-<version>-<board>/`):
//! `bin/sgps`, `models/` (manifest, tokenizer, the board's encoder variants, synthesizer),
//! `board/<board>.toml`, `board/tasks/*.toml`, `sgps.service`, `sgps-kiosk.service`, `install.sh`, `VERSION`, `BOARD`, `release.pub.pem`,
//! `SHA256SUMS` (every other file) and `SHA256SUMS.sig` (ed25519 over `SHA256SUMS`).

use crate::build::Board;
use crate::sign;
use crate::tools;
use anyhow::{Context, Result, anyhow, bail};
use ed25519_dalek::SigningKey;
use flate2::Compression;
use flate2::write::GzEncoder;
use sgps::manifest::Manifest;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The installer shipped in every bundle.
pub const INSTALL_SH: &str = include_str!("install.sh");

/// Everything a bundle is made of.
pub struct DistInputs<'a> {
    pub board: &'a Board,
    /// The `sgps` binary built for the board.
    pub binary: &'a Path,
    /// `models/` with `manifest.json`.
    pub models_dir: &'a Path,
    /// The systemd unit (`board/sgps.service`).
    pub unit: &'a Path,
    pub version: &'a str,
    pub key: &'a SigningKey,
    /// Where bundles are written (`target/dist`).
    pub out_dir: &'a Path,
    /// Also build a `.deb` (needs `dpkg-deb`).
    pub deb: bool,
    /// Ship the models as NNEF archives (what a board binary without the ONNX reader loads);
    /// false copies the ONNX files as they are.
    pub nnef: bool,
}

/// What `dist` produced.
#[derive(Debug, Clone)]
pub struct DistOutput {
    pub dir: PathBuf,
    pub tarball: PathBuf,
    pub deb: Option<PathBuf>,
}

/// Bundle directory name for a version and board.
pub fn bundle_name(version: &str, board: &str) -> String {
    format!("sgps-{version}-{board}")
}

/// Creates the bundle directory, tarball and (optionally) `.deb`.
pub fn make_bundle(i: &DistInputs) -> Result<DistOutput> {
    let name = bundle_name(i.version, &i.board.name);
    let dir = i.out_dir.join(&name);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    fs::create_dir_all(dir.join("bin"))?;
    copy_exec(i.binary, &dir.join("bin/sgps"))?;
    strip(i.board, &dir.join("bin/sgps"));
    board_models(i.models_dir, &dir.join("models"), i.board, i.nnef)?;
    fs::create_dir_all(dir.join("board"))?;
    let profile_name = format!("{}.toml", i.board.name);
    let profile_text = fs::read_to_string(&i.board.profile)
        .with_context(|| format!("cannot read {}", i.board.profile.display()))?;
    // `dist --image-variant` overrides the profile: make the shipped copy say so.
    let as_written = Board::from_toml(&i.board.name, &i.board.profile, &profile_text)?;
    let profile_text = match &i.board.image_variant {
        Some(v) if as_written.image_variant.as_ref() != Some(v) => {
            set_top_level_key(&profile_text, "image_variant", v)
        }
        _ => profile_text,
    };
    fs::write(dir.join("board").join(&profile_name), profile_text)?;
    // Task definitions the profiles refer to (installed to /etc/sgps/tasks/).
    if let Some(tasks) = i.board.profile.parent().map(|d| d.join("tasks"))
        && tasks.is_dir()
    {
        fs::create_dir_all(dir.join("board/tasks"))?;
        for e in fs::read_dir(&tasks)?.flatten() {
            let p = e.path();
            if p.is_file() && p.extension().is_some_and(|x| x == "toml") {
                copy(&p, &dir.join("board/tasks").join(e.file_name()))?;
            }
        }
    }
    if !i.unit.is_file() {
        bail!(
            "systemd unit {} is missing (it belongs in board/sgps.service)",
            i.unit.display()
        );
    }
    copy(i.unit, &dir.join("sgps.service"))?;
    // the kiosk screen's unit lives next to it (board/sgps-kiosk.service)
    let kiosk = i.unit.with_file_name("sgps-kiosk.service");
    if kiosk.is_file() {
        copy(&kiosk, &dir.join("sgps-kiosk.service"))?;
    }
    fs::write(dir.join("install.sh"), INSTALL_SH)?;
    fs::set_permissions(dir.join("install.sh"), fs::Permissions::from_mode(0o755))?;
    fs::write(dir.join("VERSION"), format!("{}\n", i.version))?;
    fs::write(dir.join("BOARD"), format!("{}\n", i.board.name))?;
    fs::write(dir.join(sign::BUNDLE_PUBKEY), sign::public_pem(i.key)?)?;
    sign::write_sums_and_sign(&dir, i.key)?;
    sign::verify_dir(&dir, &i.key.verifying_key())
        .context("the bundle just written fails its own verification")?;

    let tarball = i.out_dir.join(format!("{name}.tar.gz"));
    write_tarball(&dir, &name, &tarball)?;
    let deb = if i.deb {
        if tools::which("dpkg-deb").is_some() {
            Some(make_deb(i, &dir, &name)?)
        } else {
            log::warn!("`dpkg-deb` not found: skipping the .deb (apt-get install dpkg)");
            None
        }
    } else {
        None
    };
    Ok(DistOutput { dir, tarball, deb })
}

/// Strips debug symbols from the shipped binary (a third of its size); keeps it as is when the
/// strip tool is missing or fails.
fn strip(board: &Board, bin: &Path) {
    let tool = match board.target.as_deref() {
        Some(t) if t.starts_with("aarch64") => "aarch64-linux-gnu-strip",
        Some(_) => return,
        None => "strip",
    };
    let Some(tool) = tools::which(tool) else {
        log::warn!("{tool} not found: shipping an unstripped binary");
        return;
    };
    if let Err(e) = tools::output(Command::new(tool).arg(bin)) {
        log::warn!("could not strip {}: {e:#}", bin.display());
    }
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn copy_exec(from: &Path, to: &Path) -> Result<()> {
    copy(from, to)?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Model files a board needs, as (file, expected sha256): the variants its profile names, else
/// the manifest's defaults, chosen by the runtime's own `Manifest` (as the device will load them);
/// the text encoder and tokenizer only where the synthesizer reads the MiniLM embedding, the word
/// features where it reads them.
pub fn model_files(manifest: &Manifest, board: &Board) -> Result<Vec<(String, String)>> {
    let on_board = |e: sgps::error::Error| anyhow!("board {}: {e}", board.name);
    let (_, image) = manifest
        .image_variant(board.image_variant.as_deref())
        .map_err(on_board)?;
    let (_, text) = manifest
        .text_variant(board.text_variant.as_deref())
        .map_err(on_board)?;
    let tok = &manifest.text_encoder.tokenizer;
    let synth = &manifest.synthesizer;
    let mut files = vec![("image encoder", &image.file, &image.sha256)];
    if manifest.uses_minilm() {
        files.push(("text encoder", &text.file, &text.sha256));
        files.push(("tokenizer", &tok.file, &tok.sha256));
    }
    if let Some(w) = manifest.words_spec() {
        files.push(("word features", &w.file, &w.sha256));
    }
    files.push(("synthesizer", &synth.file, &synth.sha256));
    files
        .into_iter()
        .map(|(what, file, sha)| {
            if file.contains("..") || file.starts_with('/') {
                bail!("manifest.json: the {what} file {file} points outside models/");
            }
            Ok((file.clone(), sha.clone()))
        })
        .collect()
}

/// Writes the models `board` needs into `out`: the manifest and the files [`model_files`] names,
/// each checked against its SHA-256. With `nnef`, the image encoder, the text encoder (where the
/// synthesizer reads MiniLM) and the synthesizer are translated to NNEF archives first and the
/// manifest written names them (`sgps::encoders::nnef`); tokenizer and word features are copied.
pub fn board_models(models: &Path, out: &Path, board: &Board, nnef: bool) -> Result<()> {
    let manifest_path = models.join("manifest.json");
    let text = fs::read_to_string(&manifest_path).with_context(|| {
        format!(
            "cannot read {}: the models have not been exported yet (run `cargo xtask train`)",
            manifest_path.display()
        )
    })?;
    let manifest =
        Manifest::load(models).map_err(|e| anyhow!("{}: {e}", manifest_path.display()))?;
    fs::create_dir_all(out)?;
    let shipped = if nnef {
        let on_board = |e: sgps::error::Error| anyhow!("board {}: {e}", board.name);
        let (image, _) = manifest
            .image_variant(board.image_variant.as_deref())
            .map_err(on_board)?;
        let text_variant = if manifest.uses_minilm() {
            Some(
                manifest
                    .text_variant(board.text_variant.as_deref())
                    .map_err(on_board)?
                    .0,
            )
        } else {
            None
        };
        let translated =
            sgps::encoders::nnef::translate_models(&manifest, &text, image, text_variant, out)
                .map_err(|e| {
                    anyhow!(
                        "translating the models to NNEF for board {}: {e}",
                        board.name
                    )
                })?;
        fs::write(out.join("manifest.json"), &translated)?;
        Manifest::from_json(&translated).map_err(|e| anyhow!("translated manifest: {e}"))?
    } else {
        copy(&manifest_path, &out.join("manifest.json"))?;
        manifest
    };
    for (file, sha) in model_files(&shipped, board)? {
        let dst = out.join(&file);
        let src = if nnef && dst.is_file() {
            dst.clone() // translated above
        } else {
            models.join(&file)
        };
        if !src.is_file() {
            bail!(
                "{} (listed in manifest.json) is missing; export the models first (`cargo xtask train`)",
                src.display()
            );
        }
        let actual = tools::sha256_file(&src)?;
        if !actual.eq_ignore_ascii_case(&sha) {
            bail!(
                "{} does not match the SHA-256 in manifest.json (has {actual}, manifest says \
                 {sha}); re-export the models or fix the manifest",
                src.display()
            );
        }
        if src != dst {
            if let Some(d) = dst.parent() {
                fs::create_dir_all(d)?;
            }
            copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// Writes `dir` as `<name>/...` into a deterministic gzip'd tarball.
pub fn write_tarball(dir: &Path, name: &str, out: &Path) -> Result<()> {
    let tmp = out.with_extension("tmp");
    {
        let f =
            fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut b = tar::Builder::new(GzEncoder::new(f, Compression::default()));
        b.mode(tar::HeaderMode::Deterministic);
        b.follow_symlinks(false);
        b.append_dir_all(name, dir)?;
        b.into_inner()?.finish()?.sync_all()?;
    }
    fs::rename(&tmp, out)?;
    Ok(())
}

/// Unpacks a bundle tarball into `into`, returning the bundle directory.
pub fn unpack_tarball(tarball: &Path, into: &Path) -> Result<PathBuf> {
    let f =
        fs::File::open(tarball).with_context(|| format!("cannot open {}", tarball.display()))?;
    let mut a = tar::Archive::new(flate2::read::GzDecoder::new(f));
    a.set_preserve_permissions(true);
    a.unpack(into)
        .with_context(|| format!("cannot unpack {}", tarball.display()))?;
    let mut dirs = fs::read_dir(into)?
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.path());
    match (dirs.next(), dirs.next()) {
        (Some(d), None) => Ok(d),
        _ => bail!(
            "{} does not hold exactly one bundle directory",
            tarball.display()
        ),
    }
}

/// Debian package: the bundle under `/opt/sgps/bundles/<name>/`; `postinst` runs its verifying
/// installer.
fn make_deb(i: &DistInputs, bundle: &Path, name: &str) -> Result<PathBuf> {
    let work = tempfile::tempdir()?;
    let root = work.path().join("pkg");
    let inside = root.join("opt/sgps/bundles").join(name);
    fs::create_dir_all(&inside)?;
    for rel in sign::list_files(bundle)? {
        let dst = inside.join(&rel);
        if let Some(d) = dst.parent() {
            fs::create_dir_all(d)?;
        }
        fs::copy(bundle.join(&rel), &dst)?;
    }
    let debian = root.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    let version = deb_version(i.version);
    let control = format!(
        "Package: sgps\nVersion: {version}\nArchitecture: {arch}\nMaintainer: sgps maintainers <sgps@localhost>\n\
         Depends: openssl, coreutils\nSection: science\nPriority: optional\n\
         Description: offline few-shot medical image classification runtime ({board})\n \
         Installs the signed sgps release bundle for the {board} board and enables sgps.service.\n",
        arch = i.board.deb_arch(),
        board = i.board.name,
    );
    fs::write(debian.join("control"), control)?;
    let postinst = format!(
        "#!/bin/sh\nset -e\nif [ \"$1\" = configure ]; then\n    sh /opt/sgps/bundles/{name}/install.sh install\nfi\n"
    );
    fs::write(debian.join("postinst"), postinst)?;
    fs::set_permissions(debian.join("postinst"), fs::Permissions::from_mode(0o755))?;
    fs::set_permissions(&debian, fs::Permissions::from_mode(0o755))?;
    let out = i
        .out_dir
        .join(format!("sgps_{version}_{}.deb", i.board.deb_arch()));
    let mut c = Command::new("dpkg-deb");
    c.args(["--root-owner-group", "--build"])
        .arg(&root)
        .arg(&out);
    tools::output(&mut c).context("dpkg-deb failed")?;
    Ok(out)
}

/// Sets a top-level string key of a TOML profile (before the first table), keeping everything
/// else (comments included) as written. Used when `dist --image-variant` overrides the profile,
/// so that the shipped profile names the variant the bundle actually contains.
pub fn set_top_level_key(text: &str, key: &str, value: &str) -> String {
    let line = format!("{key} = \"{value}\"");
    let mut out: Vec<String> = Vec::new();
    let mut done = false;
    let mut in_table = false;
    for l in text.lines() {
        let t = l.trim_start();
        if t.starts_with('[') {
            if !done {
                // above the comment block that introduces the table, not inside it
                let mut at = out.len();
                while at > 0 && out[at - 1].trim_start().starts_with('#') {
                    at -= 1;
                }
                out.insert(at, line.clone());
                done = true;
            }
            in_table = true;
        }
        let is_key = t
            .strip_prefix(key)
            .is_some_and(|r| r.trim_start().starts_with('='));
        if !in_table && is_key {
            if !done {
                out.push(line.clone());
                done = true;
            }
            continue;
        }
        out.push(l.to_string());
    }
    if !done {
        out.push(line);
    }
    out.join("\n") + "\n"
}

/// Debian-compatible version (no `-`, which would mean a Debian revision).
pub fn deb_version(v: &str) -> String {
    v.replace('-', "+")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bundle's models: the shipped ONNX models translated to NNEF for the board, with a
    /// manifest that names and verifies the archives; the runtime loads them (with or without
    /// the ONNX reader) and a tampered source file is refused before any translation.
    #[test]
    fn board_models_are_nnef_archives_the_runtime_loads() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let rpi5 = fs::read_to_string(root.join("board/rpi5.toml")).unwrap();
        let b = Board::from_toml("rpi5", Path::new("x"), &rpi5).unwrap();
        let out = tempfile::tempdir().unwrap();
        board_models(&root.join("models"), out.path(), &b, true).unwrap();
        let m = Manifest::load(out.path()).unwrap();
        let shipped = model_files(&m, &b).unwrap();
        assert!(
            shipped.iter().any(|(f, _)| f.ends_with(".nnef.tar")),
            "{shipped:?}"
        );
        for (f, sha) in &shipped {
            let on_disk = tools::sha256_file(&out.path().join(f)).unwrap();
            assert!(on_disk.eq_ignore_ascii_case(sha), "{f}");
            assert!(!f.ends_with(".onnx"), "{f} shipped untranslated");
        }
        let enc = sgps::encoders::ImageEncoder::load(&m, b.image_variant.as_deref()).unwrap();
        assert_eq!(enc.embedding_dim, m.image_encoder.embedding_dim);
        sgps::synthesizer::Synthesizer::load(&m).unwrap();

        // a changed model file is refused before it is translated
        let bad = tempfile::tempdir().unwrap();
        for f in fs::read_dir(root.join("models")).unwrap() {
            let f = f.unwrap().path();
            if f.is_file() {
                fs::copy(&f, bad.path().join(f.file_name().unwrap())).unwrap();
            }
        }
        let synth = bad
            .path()
            .join(m.synthesizer.file.replace(".nnef.tar", ".onnx"));
        let mut bytes = fs::read(&synth).unwrap();
        bytes[100] ^= 1;
        fs::write(&synth, bytes).unwrap();
        let e = board_models(bad.path(), &bad.path().join("out"), &b, true).unwrap_err();
        assert!(format!("{e:#}").contains("synthesizer"), "{e:#}");
    }

    #[test]
    fn model_files_follow_board_variant_and_reject_unknown() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut m =
            Manifest::from_json(&fs::read_to_string(root.join("models/manifest.json")).unwrap())
                .unwrap();
        // the shipped manifest, plus a second image-encoder variant a board may ask for
        // G reads MiniLM and the word features: both travel
        m.synthesizer.text_features = Some(sgps::manifest::TextFeaturesSpec {
            minilm: true,
            words: Some(sgps::manifest::WordsSpec {
                file: "text_words.json".into(),
                sha256: "00".into(),
                bytes: 1,
                dim: 2,
            }),
            dim: m.text_encoder.embedding_dim + 2,
        });
        let mut int8 = m.image_encoder.variants["fp32"].clone();
        int8.file = "image_encoder.int8.onnx".into();
        m.image_encoder.variants.insert("int8".into(), int8);
        let text_file = m.text_encoder.variants[&m.text_encoder.default_variant]
            .file
            .clone();
        let rpi5 = fs::read_to_string(root.join("board/rpi5.toml")).unwrap();
        let text = set_top_level_key(&rpi5, "image_variant", "int8");
        let mut b = Board::from_toml("rpi5", Path::new("x"), &text).unwrap();
        let names = |m: &Manifest, b: &Board| -> Vec<String> {
            model_files(m, b)
                .unwrap()
                .into_iter()
                .map(|x| x.0)
                .collect()
        };
        assert_eq!(
            names(&m, &b),
            [
                "image_encoder.int8.onnx",
                text_file.as_str(),
                "tokenizer.json",
                "text_words.json",
                "synthesizer.onnx"
            ]
        );
        // G reads the word features alone: the text encoder and tokenizer stay behind
        let tf = m.synthesizer.text_features.as_mut().unwrap();
        (tf.minilm, tf.dim) = (false, 2);
        assert_eq!(
            names(&m, &b),
            [
                "image_encoder.int8.onnx",
                "text_words.json",
                "synthesizer.onnx"
            ]
        );
        b.image_variant = None;
        assert_eq!(model_files(&m, &b).unwrap()[0].0, "image_encoder.onnx");
        b.image_variant = Some("fp16".into());
        let e = model_files(&m, &b).unwrap_err().to_string();
        assert!(e.contains("fp16") && e.contains("int8"), "{e}");
    }

    #[test]
    fn override_image_variant_in_profile_text() {
        let p = "# c\nname = \"rpi5\"\nimage_variant = \"int8\"\n[gpio]\nimage_variant = \"x\"\n";
        let o = set_top_level_key(p, "image_variant", "fp32");
        assert_eq!(
            o,
            "# c\nname = \"rpi5\"\nimage_variant = \"fp32\"\n[gpio]\nimage_variant = \"x\"\n"
        );
        let t: toml::Table = toml::from_str(&set_top_level_key(
            "a = 1\n[t]\nb = 2\n",
            "image_variant",
            "fp32",
        ))
        .unwrap();
        assert_eq!(t["image_variant"].as_str(), Some("fp32"));
        assert_eq!(t["t"]["b"].as_integer(), Some(2));
        // a new key goes above the comments that introduce the first table
        assert_eq!(
            set_top_level_key("a = 1\n\n# the screen\n[ui]\n", "text_variant", "f16"),
            "a = 1\n\ntext_variant = \"f16\"\n# the screen\n[ui]\n"
        );
    }

    #[test]
    fn deb_versions_have_no_dash() {
        assert_eq!(deb_version("0.1.0-gabc-dirty"), "0.1.0+gabc+dirty");
    }
}
