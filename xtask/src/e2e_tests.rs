//! End-to-end tests of the release path on this machine: bundle → verify/tamper, deploy into a
//! local root (with roll-back), and baking into a disk image the test creates itself.

use crate::build::Board;
use crate::deploy::{self, DeployPlan, LocalExecutor};
use crate::dist::{self, DistInputs, DistOutput};
use crate::image;
use crate::sign;
use crate::tools;
use ed25519_dalek::SigningKey;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Fixture {
    dir: tempfile::TempDir,
    board: Board,
    key: SigningKey,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn sha(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let models = p.join("models");
    fs::create_dir_all(&models).unwrap();
    let files = [
        ("image_encoder.onnx", b"fp32-model".as_slice()),
        ("image_encoder.int8.onnx", b"int8-model".as_slice()),
        ("text_encoder.f16w.onnx", b"text-model".as_slice()),
        ("tokenizer.json", b"{}".as_slice()),
        ("synthesizer.onnx", b"synth".as_slice()),
        ("text_words.json", b"words".as_slice()),
    ];
    for (f, b) in files {
        fs::write(models.join(f), b).unwrap();
    }
    // the shipped manifest (so the runtime's typed reader accepts it) pointing at these files
    let mut manifest: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(repo_root().join("models/manifest.json")).unwrap(),
    )
    .unwrap();
    manifest["image_encoder"]["variants"] = serde_json::json!({
        "fp32": {"file": "image_encoder.onnx", "sha256": sha(b"fp32-model"), "bytes": 10},
        "int8": {"file": "image_encoder.int8.onnx", "sha256": sha(b"int8-model"), "bytes": 10}});
    manifest["image_encoder"]["default_variant"] = "fp32".into();
    // as shipped: one text file, run as stored (f16w) or in float16 arithmetic (f16, rpi5's)
    manifest["text_encoder"]["variants"] = serde_json::json!({
        "f16w": {"file": "text_encoder.f16w.onnx", "sha256": sha(b"text-model"), "bytes": 10},
        "f16": {"file": "text_encoder.f16w.onnx", "sha256": sha(b"text-model"), "bytes": 10, "precision": "f16"}});
    manifest["text_encoder"]["default_variant"] = "f16w".into();
    manifest["text_encoder"]["tokenizer"] =
        serde_json::json!({"file": "tokenizer.json", "sha256": sha(b"{}")});
    manifest["synthesizer"]["file"] = "synthesizer.onnx".into();
    manifest["synthesizer"]["sha256"] = sha(b"synth").into();
    // G reads both text features here, so every model file travels
    manifest["synthesizer"]["text_features"] = serde_json::json!({"minilm": true,
        "words": {"file": "text_words.json", "sha256": sha(b"words"), "bytes": 5, "dim": 2}, "dim": 386});
    fs::write(models.join("manifest.json"), manifest.to_string()).unwrap();
    fs::create_dir_all(p.join("board")).unwrap();
    // the shipped profile, asking for the int8 image encoder
    let rpi5 = fs::read_to_string(repo_root().join("board/rpi5.toml")).unwrap();
    fs::write(
        p.join("board/rpi5.toml"),
        dist::set_top_level_key(&rpi5, "image_variant", "int8"),
    )
    .unwrap();
    fs::create_dir_all(p.join("board/tasks")).unwrap();
    fs::write(p.join("board/tasks/demo.toml"), "name = \"demo\"\n").unwrap();
    fs::write(
        p.join("board/sgps.service"),
        "[Unit]\nDescription=sgps\n[Service]\nExecStart=/opt/sgps/current/bin/sgps run\n[Install]\nWantedBy=multi-user.target\n",
    )
    .unwrap();
    fs::write(
        p.join("board/sgps-kiosk.service"),
        "[Unit]\nDescription=kiosk\n[Service]\nExecStart=/usr/bin/cage\n[Install]\nWantedBy=graphical.target\n",
    )
    .unwrap();
    let board = Board::load(p, "rpi5").unwrap();
    Fixture {
        dir,
        board,
        key: SigningKey::from_bytes(&[42; 32]),
    }
}

impl Fixture {
    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A stand-in `sgps` binary: `--version` succeeds when `healthy`.
    fn binary(&self, version: &str, healthy: bool) -> PathBuf {
        let p = self.path().join(format!("sgps-{version}"));
        let code = if healthy { 0 } else { 1 };
        fs::write(
            &p,
            format!("#!/bin/sh\necho \"sgps {version}\"\nexit {code}\n"),
        )
        .unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn dist(&self, version: &str, healthy: bool, deb: bool) -> DistOutput {
        let bin = self.binary(version, healthy);
        let out = self.path().join("dist");
        fs::create_dir_all(&out).unwrap();
        dist::make_bundle(&DistInputs {
            board: &self.board,
            binary: &bin,
            models_dir: &self.path().join("models"),
            unit: &self.path().join("board/sgps.service"),
            version,
            key: &self.key,
            out_dir: &out,
            deb,
            // stand-in model files: copied as they are, not translated
            nnef: false,
        })
        .unwrap()
    }
}

fn have(tools_needed: &[&str], test: &str) -> bool {
    let missing: Vec<&&str> = tools_needed
        .iter()
        .filter(|t| tools::which(t).is_none())
        .collect();
    if missing.is_empty() {
        true
    } else if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!(
            "{test}: missing tools {missing:?} (CI=true: a missing requirement fails instead of skipping; .ci/run installs them)"
        );
    } else {
        eprintln!("SKIP {test}: missing tools {missing:?} (.ci/run installs them)");
        false
    }
}

fn install_sh(bundle: &Path, root: &Path, action: &str) -> std::process::Output {
    Command::new("sh")
        .arg(bundle.join("install.sh"))
        .arg(action)
        .env("SGPS_ROOT", root)
        .output()
        .unwrap()
}

#[test]
fn dist_bundle_layout_checksums_and_signature() {
    let f = fixture();
    let out = f.dist("1.2.3", true, true);
    assert_eq!(out.dir.file_name().unwrap(), "sgps-1.2.3-rpi5");
    let files = sign::list_files(&out.dir).unwrap();
    assert_eq!(
        files,
        [
            "BOARD",
            "SHA256SUMS",
            "SHA256SUMS.sig",
            "VERSION",
            "bin/sgps",
            "board/rpi5.toml",
            "board/tasks/demo.toml",
            "install.sh",
            "models/image_encoder.int8.onnx",
            "models/manifest.json",
            "models/synthesizer.onnx",
            "models/text_encoder.f16w.onnx",
            "models/text_words.json",
            "models/tokenizer.json",
            "release.pub.pem",
            "sgps-kiosk.service",
            "sgps.service",
        ],
        "the board's int8 variant only, no fp32 encoder"
    );
    let mode = fs::metadata(out.dir.join("bin/sgps"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111);
    let sums = fs::read_to_string(out.dir.join("SHA256SUMS")).unwrap();
    assert_eq!(sums.lines().count(), files.len() - 2);
    assert!(sums.contains(&format!("{}  models/synthesizer.onnx", sha(b"synth"))));
    sign::verify_dir(&out.dir, &f.key.verifying_key()).unwrap();

    // The tarball holds the same verified bundle.
    let un = tempfile::tempdir().unwrap();
    let b = dist::unpack_tarball(&out.tarball, un.path()).unwrap();
    sign::verify_dir(&b, &f.key.verifying_key()).unwrap();
    assert!(
        fs::metadata(b.join("install.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o111
            != 0
    );

    // The on-device installer accepts it (openssl + sha256sum) and rejects tampering.
    if have(&["openssl", "sha256sum"], "install.sh verification") {
        let root = tempfile::tempdir().unwrap();
        let o = install_sh(&b, root.path(), "verify");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        fs::write(b.join("models/synthesizer.onnx"), b"evil").unwrap();
        let o = install_sh(&b, root.path(), "install");
        assert!(!o.status.success());
        assert!(String::from_utf8_lossy(&o.stderr).contains("checksum check FAILED"));
        assert!(
            !root.path().join("opt/sgps/current").exists(),
            "nothing installed"
        );
        assert!(sign::verify_dir(&b, &f.key.verifying_key()).is_err());
        fs::write(b.join("models/synthesizer.onnx"), b"synth").unwrap();
        // An added file is rejected too.
        fs::write(b.join("models/extra.onnx"), b"x").unwrap();
        let o = install_sh(&b, root.path(), "verify");
        assert!(String::from_utf8_lossy(&o.stderr).contains("not listed"));
        fs::remove_file(b.join("models/extra.onnx")).unwrap();
        // A device that already trusts another key refuses a bundle signed by this one, even
        // though the bundle carries a matching public key of its own.
        let other = SigningKey::from_bytes(&[1; 32]);
        fs::create_dir_all(root.path().join("etc/sgps")).unwrap();
        fs::write(
            root.path().join("etc/sgps/release.pub.pem"),
            sign::public_pem(&other).unwrap(),
        )
        .unwrap();
        let o = install_sh(&b, root.path(), "install");
        assert!(String::from_utf8_lossy(&o.stderr).contains("signature check FAILED"));
    }

    if have(&["dpkg-deb"], ".deb check") {
        let deb = out.deb.expect("dpkg-deb is here, so a .deb is built");
        assert!(deb.ends_with("sgps_1.2.3_arm64.deb"));
        let listing = tools::output(Command::new("dpkg-deb").arg("-c").arg(&deb)).unwrap();
        assert!(listing.contains("./opt/sgps/bundles/sgps-1.2.3-rpi5/bin/sgps"));
        let info = tools::output(Command::new("dpkg-deb").arg("-I").arg(&deb)).unwrap();
        assert!(info.contains("Architecture: arm64") && info.contains("postinst"));
    }
}

fn link(p: &Path) -> String {
    fs::read_link(p).unwrap().to_string_lossy().into_owned()
}

#[test]
fn deploy_to_local_root_installs_and_rolls_back() {
    if !have(&["openssl", "sha256sum", "tar"], "deploy") {
        return;
    }
    let f = fixture();
    let target = tempfile::tempdir().unwrap();
    let root = target.path().to_path_buf();
    let mut exec = LocalExecutor { root: root.clone() };
    let plan = |o: &DistOutput| DeployPlan {
        tarball: o.tarball.clone(),
        settle_secs: 0,
    };

    let v1 = f.dist("1.0.0", true, false);
    deploy::deploy(&mut exec, &plan(&v1)).unwrap();
    let sgps = root.join("opt/sgps");
    assert_eq!(link(&sgps.join("current")), "releases/1.0.0");
    assert!(root.join("etc/systemd/system/sgps.service").is_file());
    assert_eq!(
        link(&root.join("etc/systemd/system/multi-user.target.wants/sgps.service")),
        "/etc/systemd/system/sgps.service"
    );
    // the screen's kiosk unit travels with the bundle and is enabled
    assert_eq!(
        link(&root.join("etc/systemd/system/graphical.target.wants/sgps-kiosk.service")),
        "/etc/systemd/system/sgps-kiosk.service"
    );
    assert!(root.join("etc/sgps/release.pub.pem").is_file());
    assert!(!root.join("tmp/sgps-deploy").exists(), "staging cleaned up");
    // What board/sgps.service expects: /opt/sgps/bin/sgps, /opt/sgps/models, /etc/sgps/board.toml.
    assert_eq!(link(&sgps.join("bin")), "current/bin");
    assert_eq!(link(&sgps.join("models")), "current/models");
    assert!(sgps.join("bin/sgps").is_file() && sgps.join("models/manifest.json").is_file());
    let shipped = fs::read_to_string(f.path().join("board/rpi5.toml")).unwrap();
    assert_eq!(
        fs::read_to_string(root.join("etc/sgps/board.toml")).unwrap(),
        shipped
    );
    assert!(root.join("etc/sgps/tasks/demo.toml").is_file());
    // The user adjusts the GPIO lines; later installs keep that.
    let edited = format!("{shipped}# capture_line = 5\n");
    fs::write(root.join("etc/sgps/board.toml"), &edited).unwrap();

    // v2's binary fails its health check: the deploy fails and v1 is current again.
    let v2 = f.dist("2.0.0", false, false);
    let err = deploy::deploy(&mut exec, &plan(&v2))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rolled back") && err.contains("healthy"),
        "{err}"
    );
    assert_eq!(link(&sgps.join("current")), "releases/1.0.0");
    assert_eq!(link(&sgps.join("failed")), "releases/2.0.0");
    let out = Command::new(sgps.join("current/bin/sgps"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "sgps 1.0.0");

    // A good v3 goes in, with v1 kept as the previous install.
    let v3 = f.dist("3.0.0", true, false);
    deploy::deploy(&mut exec, &plan(&v3)).unwrap();
    assert_eq!(link(&sgps.join("current")), "releases/3.0.0");
    assert_eq!(link(&sgps.join("previous")), "releases/1.0.0");
    assert_eq!(
        fs::read_to_string(root.join("etc/sgps/board.toml")).unwrap(),
        edited
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/sgps/board.toml.new")).unwrap(),
        shipped
    );

    // First-boot `setup` (used by card images) re-verifies the installed release.
    let cur = sgps.join("current");
    let o = install_sh(&cur, &root, "setup");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    fs::write(cur.join("models/synthesizer.onnx"), b"corrupted").unwrap();
    let o = install_sh(&cur, &root, "setup");
    assert!(!o.status.success());
    fs::write(cur.join("models/synthesizer.onnx"), b"synth").unwrap();

    // A bundle signed by another key is refused before anything changes.
    let mut g = fixture();
    g.key = SigningKey::from_bytes(&[9; 32]);
    let evil = g.dist("4.0.0", true, false);
    let err = deploy::deploy(&mut exec, &plan(&evil))
        .unwrap_err()
        .to_string();
    assert!(err.contains("installing"), "{err}");
    assert_eq!(link(&sgps.join("current")), "releases/3.0.0");
    assert!(!sgps.join("releases/4.0.0").exists());
}

#[test]
fn deploy_first_install_failure_reports_no_rollback() {
    if !have(&["openssl", "sha256sum", "tar"], "deploy first install") {
        return;
    }
    let f = fixture();
    let target = tempfile::tempdir().unwrap();
    let mut exec = LocalExecutor {
        root: target.path().to_path_buf(),
    };
    let bad = f.dist("1.0.0", false, false);
    let err = deploy::deploy(
        &mut exec,
        &DeployPlan {
            tarball: bad.tarball,
            settle_secs: 0,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no previous install"), "{err}");
}

/// Creates a small MBR disk image: FAT32-ish boot partition + ext4 root with an /etc tree.
fn make_disk(dir: &Path) -> PathBuf {
    let img = dir.join("base.img");
    let f = fs::File::create(&img).unwrap();
    f.set_len(48 << 20).unwrap();
    drop(f);
    let table = "label: dos\nstart=2048, size=32768, type=c\nstart=34816, type=83\n";
    let mut c = Command::new(tools::which("sfdisk").unwrap());
    c.arg("-q").arg(&img).stdin(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(table.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    tools::output(
        Command::new(tools::which("mkfs.vfat").unwrap())
            .args(["--offset", "2048", "-n", "BOOTFS"])
            .arg(&img)
            .arg("16384"),
    )
    .unwrap();
    let rootfs = dir.join("rootfs");
    fs::create_dir_all(rootfs.join("etc/systemd/system/multi-user.target.wants")).unwrap();
    fs::write(rootfs.join("etc/hostname"), "raspberrypi\n").unwrap();
    tools::output(
        Command::new(tools::which("mkfs.ext4").unwrap())
            .args(["-q", "-F", "-d"])
            .arg(&rootfs)
            .args(["-E", &format!("offset={}", 34816 * 512)])
            .arg(&img)
            .arg("28M"),
    )
    .unwrap();
    img
}

#[test]
fn image_bakes_bundle_into_a_disk_image_and_reads_back() {
    if !have(
        &[
            "sfdisk",
            "mkfs.vfat",
            "mkfs.ext4",
            "mcopy",
            "mmd",
            "debugfs",
        ],
        "image",
    ) {
        return;
    }
    let f = fixture();
    let out = f.dist("1.2.3", true, false);
    let work = tempfile::tempdir().unwrap();
    let base = make_disk(work.path());
    let base_sha = tools::sha256_file(&base).unwrap();
    let card = work.path().join("card.img");
    let pubkey = work.path().join("release.pub.pem");
    fs::write(&pubkey, sign::public_pem(&f.key).unwrap()).unwrap();
    let v = image::bake(&image::ImageInputs {
        base: &base,
        out: &card,
        tarball: &out.tarball,
        trusted_key: Some(&pubkey),
    })
    .unwrap();
    assert_eq!(v, "1.2.3");
    assert_eq!(
        tools::sha256_file(&base).unwrap(),
        base_sha,
        "base untouched"
    );

    let layout = image::read_layout(&card).unwrap();
    // ext4 root: the installed release reads back and verifies.
    let back = work.path().join("back");
    fs::create_dir_all(&back).unwrap();
    image::ext4_rdump(&card, layout.root_offset, "/opt/sgps/releases/1.2.3", &back).unwrap();
    let rel = back.join("1.2.3");
    sign::verify_dir(&rel, &f.key.verifying_key()).unwrap();
    assert!(
        fs::metadata(rel.join("bin/sgps"))
            .unwrap()
            .permissions()
            .mode()
            & 0o111
            != 0
    );
    assert_eq!(
        image::ext4_readlink(&card, layout.root_offset, "/opt/sgps/current").unwrap(),
        "releases/1.2.3"
    );
    assert_eq!(
        image::ext4_readlink(
            &card,
            layout.root_offset,
            "/etc/systemd/system/multi-user.target.wants/sgps.service"
        )
        .unwrap(),
        "/etc/systemd/system/sgps.service"
    );
    for (l, t) in [
        ("/opt/sgps/bin", "current/bin"),
        ("/opt/sgps/models", "current/models"),
        (
            "/etc/systemd/system/multi-user.target.wants/sgps-setup.service",
            "/etc/systemd/system/sgps-setup.service",
        ),
        (
            "/etc/systemd/system/graphical.target.wants/sgps-kiosk.service",
            "/etc/systemd/system/sgps-kiosk.service",
        ),
    ] {
        assert_eq!(
            image::ext4_readlink(&card, layout.root_offset, l).unwrap(),
            t
        );
    }
    let cfg = work.path().join("board.toml");
    image::ext4_read(&card, layout.root_offset, "/etc/sgps/board.toml", &cfg).unwrap();
    assert_eq!(
        fs::read(&cfg).unwrap(),
        fs::read(out.dir.join("board/rpi5.toml")).unwrap()
    );
    let task = work.path().join("task.toml");
    image::ext4_read(
        &card,
        layout.root_offset,
        "/etc/sgps/tasks/demo.toml",
        &task,
    )
    .unwrap();
    let setup = work.path().join("setup.service");
    image::ext4_read(
        &card,
        layout.root_offset,
        "/etc/systemd/system/sgps-setup.service",
        &setup,
    )
    .unwrap();
    assert!(
        fs::read_to_string(&setup)
            .unwrap()
            .contains("install.sh setup")
    );
    let unit = work.path().join("unit");
    image::ext4_read(
        &card,
        layout.root_offset,
        "/etc/systemd/system/sgps.service",
        &unit,
    )
    .unwrap();
    assert_eq!(
        fs::read(&unit).unwrap(),
        fs::read(out.dir.join("sgps.service")).unwrap()
    );
    let hostname = work.path().join("hostname");
    image::ext4_read(&card, layout.root_offset, "/etc/hostname", &hostname).unwrap();
    assert_eq!(fs::read_to_string(&hostname).unwrap(), "raspberrypi\n");
    // e2fsck finds the root filesystem consistent.
    if let Some(fsck) = tools::which("e2fsck") {
        let root_img = work.path().join("root.ext4");
        let data = fs::read(&card).unwrap();
        fs::write(&root_img, &data[layout.root_offset as usize..]).unwrap();
        let st = Command::new(fsck)
            .args(["-fn"])
            .arg(&root_img)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stdout)
        );
    }

    // FAT boot partition: the signed tarball, byte-identical.
    let tb = work.path().join("from-fat.tar.gz");
    tools::output(
        Command::new("mcopy")
            .args(["-i", &image::fat_spec(&card, layout.boot_offset)])
            .arg(format!(
                "::/sgps/{}",
                out.tarball.file_name().unwrap().to_string_lossy()
            ))
            .arg(&tb),
    )
    .unwrap();
    assert_eq!(
        tools::sha256_file(&tb).unwrap(),
        tools::sha256_file(&out.tarball).unwrap()
    );

    // A tampered bundle is refused.
    let bad_key = work.path().join("other.pub.pem");
    fs::write(
        &bad_key,
        sign::public_pem(&SigningKey::from_bytes(&[3; 32])).unwrap(),
    )
    .unwrap();
    let card2 = work.path().join("card2.img");
    assert!(
        image::bake(&image::ImageInputs {
            base: &base,
            out: &card2,
            tarball: &out.tarball,
            trusted_key: Some(&bad_key),
        })
        .is_err()
    );
    assert!(!card2.exists());
}

#[test]
fn dist_image_variant_override_ships_that_variant_and_says_so_in_the_profile() {
    let mut f = fixture();
    f.board.image_variant = Some("fp32".into());
    let out = f.dist("1.0.0", true, false);
    let files = sign::list_files(&out.dir).unwrap();
    assert!(files.contains(&"models/image_encoder.onnx".to_string()));
    assert!(!files.contains(&"models/image_encoder.int8.onnx".to_string()));
    let shipped = fs::read_to_string(out.dir.join("board/rpi5.toml")).unwrap();
    let b = Board::from_toml("rpi5", Path::new("x"), &shipped).unwrap();
    assert_eq!(b.image_variant.as_deref(), Some("fp32"));
    sign::verify_dir(&out.dir, &f.key.verifying_key()).unwrap();
}
