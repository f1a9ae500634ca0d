//! Card image: bake a verified bundle into a copy of a Raspberry Pi OS image without root or loop
//! mounts. The partition table is read with `sfdisk --json`; the bundle is installed (same layout
//! as `install.sh`) into the ext4 root partition with `debugfs -w` (unit enabled via its
//! `WantedBy` symlink, release key pinned), and the bundle tarball is also copied into the FAT boot
//! partition (`mcopy`) under `sgps/`, so the card carries the signed original for re-installs.

use crate::dist;
use crate::sign;
use crate::tools::{self, Requirement, need_tool};
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// One partition of a disk image.
#[derive(Debug, Clone, Deserialize)]
pub struct Partition {
    pub start: u64,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Deserialize)]
struct SfdiskJson {
    partitiontable: Table,
}

#[derive(Debug, Deserialize)]
struct Table {
    #[serde(default = "default_sector")]
    sectorsize: u64,
    #[serde(default)]
    partitions: Vec<Partition>,
}

fn default_sector() -> u64 {
    512
}

/// Byte offsets of the boot (FAT) and root (ext4) partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub boot_offset: u64,
    pub root_offset: u64,
}

const FAT_TYPES: &[&str] = &[
    "b",
    "c",
    "e",
    "ef",
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b", // EFI system
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7", // basic data
];
const LINUX_TYPES: &[&str] = &["83", "0fc63daf-8483-4772-8e79-3d69d8477de4"];

/// Finds the boot and root partitions in `sfdisk --json` output.
pub fn parse_layout(json: &str) -> Result<Layout> {
    let t: SfdiskJson =
        serde_json::from_str(json).context("cannot parse `sfdisk --json` output")?;
    let ss = t.partitiontable.sectorsize;
    let find = |types: &[&str]| {
        t.partitiontable
            .partitions
            .iter()
            .find(|p| types.contains(&p.kind.to_ascii_lowercase().as_str()))
    };
    let boot = find(FAT_TYPES).context(
        "the image has no FAT boot partition (type c/b/e/ef); is it a Raspberry Pi OS image?",
    )?;
    let root = find(LINUX_TYPES).context(
        "the image has no Linux (type 83) root partition; is it a Raspberry Pi OS image?",
    )?;
    Ok(Layout {
        boot_offset: boot.start * ss,
        root_offset: root.start * ss,
    })
}

/// Tools `image` needs.
pub fn requirements() -> Vec<Requirement> {
    let mut v = Vec::new();
    v.extend(need_tool("sfdisk", "apt-get install fdisk"));
    v.extend(need_tool("mcopy", "apt-get install mtools"));
    v.extend(need_tool("mmd", "apt-get install mtools"));
    v.extend(need_tool("debugfs", "apt-get install e2fsprogs"));
    v
}

/// Reads the partition layout of a disk image.
pub fn read_layout(img: &Path) -> Result<Layout> {
    let out = tools::output(
        Command::new(tools::which("sfdisk").unwrap_or("sfdisk".into()))
            .arg("--json")
            .arg(img),
    )
    .with_context(|| format!("cannot read the partition table of {}", img.display()))?;
    parse_layout(&out)
}

/// `debugfs` device spec for a partition at a byte offset.
pub fn ext4_spec(img: &Path, offset: u64) -> String {
    format!("{}?offset={offset}", img.display())
}

/// `mtools` image spec for a partition at a byte offset.
pub fn fat_spec(img: &Path, offset: u64) -> String {
    format!("{}@@{offset}", img.display())
}

/// Runs a debugfs command file against the ext4 partition, failing on any reported error.
fn debugfs_script(img: &Path, offset: u64, script: &str) -> Result<()> {
    let mut f = tempfile::NamedTempFile::new()?;
    f.write_all(script.as_bytes())?;
    f.flush()?;
    let out = Command::new(tools::which("debugfs").unwrap_or("debugfs".into()))
        .arg("-w")
        .arg("-f")
        .arg(f.path())
        .arg(ext4_spec(img, offset))
        .output()
        .context("cannot run debugfs")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // debugfs keeps going after a failed command and reports it on stderr only.
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        // Expected: creating directories that exist, removing files that do not.
        .filter(|l| !l.contains("directory already exists"))
        .filter(|l| !l.starts_with("rm: File not found by ext2_lookup"))
        .collect();
    if !out.status.success() || !errors.is_empty() {
        bail!(
            "debugfs failed on the root partition of {}:\n{}",
            img.display(),
            errors.join("\n")
        );
    }
    Ok(())
}

/// Reads a file from the ext4 partition (for checks and tests).
#[cfg(test)]
pub fn ext4_read(img: &Path, offset: u64, path: &str, to: &Path) -> Result<()> {
    let mut c = Command::new(tools::which("debugfs").unwrap_or("debugfs".into()));
    c.arg("-R")
        .arg(format!("dump -p {path} {}", to.display()))
        .arg(ext4_spec(img, offset));
    tools::output(&mut c)?;
    if !to.is_file() {
        bail!("{path} is not in the root partition of {}", img.display());
    }
    Ok(())
}

/// Recursively copies a directory out of the ext4 partition.
#[cfg(test)]
pub fn ext4_rdump(img: &Path, offset: u64, path: &str, to_dir: &Path) -> Result<()> {
    let mut c = Command::new(tools::which("debugfs").unwrap_or("debugfs".into()));
    c.arg("-R")
        .arg(format!("rdump {path} {}", to_dir.display()))
        .arg(ext4_spec(img, offset));
    tools::output(&mut c)?;
    Ok(())
}

/// Target of a symlink in the ext4 partition.
#[cfg(test)]
pub fn ext4_readlink(img: &Path, offset: u64, path: &str) -> Result<String> {
    let mut c = Command::new(tools::which("debugfs").unwrap_or("debugfs".into()));
    c.arg("-R")
        .arg(format!("stat {path}"))
        .arg(ext4_spec(img, offset));
    let out = tools::output(&mut c)?;
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Fast link dest: "))
        .map(|s| s.trim().trim_matches('"').to_string())
        .with_context(|| format!("{path} is not a symlink in {}", img.display()))
}

/// First-boot unit baked into images: verifies the baked release and creates the `sgps` user
/// (which a card image cannot get without running the OS), once.
pub const SETUP_UNIT: &str = "[Unit]
Description=sgps first-boot setup (verify the baked release, create the sgps user)
Before=sgps.service
ConditionPathExists=!/var/lib/sgps-setup.done

[Service]
Type=oneshot
ExecStart=/bin/sh /opt/sgps/current/install.sh setup
ExecStartPost=/usr/bin/touch /var/lib/sgps-setup.done
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
";

/// Options for baking an image.
pub struct ImageInputs<'a> {
    pub base: &'a Path,
    pub out: &'a Path,
    /// Bundle `.tar.gz` from `dist`.
    pub tarball: &'a Path,
    /// Key the bundle must be signed by (`None`: the bundle's own key).
    pub trusted_key: Option<&'a Path>,
}

/// Copies `base` to `out` and installs the bundle into it. Returns the installed version.
pub fn bake(i: &ImageInputs) -> Result<String> {
    tools::ensure("image", requirements())?;
    if i.out.exists() && same_file(i.base, i.out) {
        bail!("--out must differ from --base (the base image is never modified)");
    }
    let work = tempfile::tempdir()?;
    let bundle = dist::unpack_tarball(i.tarball, work.path())?;
    let key_path = i
        .trusted_key
        .map(Path::to_path_buf)
        .unwrap_or_else(|| bundle.join(sign::BUNDLE_PUBKEY));
    let key = sign::load_public(&key_path)?;
    sign::verify_dir(&bundle, &key)
        .with_context(|| format!("refusing to bake {}", i.tarball.display()))?;
    let version = fs::read_to_string(bundle.join("VERSION"))?
        .trim()
        .to_string();

    let tmp_out = i.out.with_extension("img.partial");
    copy_base(i.base, &tmp_out)?;
    let layout = read_layout(&tmp_out)?;
    log::info!("partitions: {layout:?}");

    // FAT boot partition: the signed tarball for re-installs / inspection.
    let fat = fat_spec(&tmp_out, layout.boot_offset);
    let _ = Command::new("mmd").args(["-i", &fat, "::/sgps"]).output();
    let tar_name = i.tarball.file_name().context("bundle has no file name")?;
    tools::output(
        Command::new("mcopy")
            .args(["-o", "-i", &fat])
            .arg(i.tarball)
            .arg(format!("::/sgps/{}", tar_name.to_string_lossy())),
    )
    .context("cannot copy the bundle into the FAT boot partition")?;

    // ext4 root: install exactly as install.sh would.
    let setup_unit = work.path().join("sgps-setup.service");
    fs::write(&setup_unit, SETUP_UNIT)?;
    let script = install_script(&bundle, &version, &key_path, &setup_unit)?;
    debugfs_script(&tmp_out, layout.root_offset, &script)?;
    fs::rename(&tmp_out, i.out)?;
    Ok(version)
}

/// Copies the base image, decompressing `.xz` (how Raspberry Pi OS images are published).
fn copy_base(base: &Path, to: &Path) -> Result<()> {
    if base.extension().is_some_and(|e| e == "xz") {
        let xz = tools::which("xz").context(
            "the base image is .xz-compressed and `xz` is missing (apt-get install xz-utils)",
        )?;
        let out = fs::File::create(to)?;
        let st = Command::new(xz)
            .arg("-dc")
            .arg(base)
            .stdout(out)
            .status()
            .context("cannot run xz")?;
        if !st.success() {
            bail!("cannot decompress {}", base.display());
        }
    } else {
        fs::copy(base, to)
            .with_context(|| format!("cannot copy {} to {}", base.display(), to.display()))?;
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn q(p: &str) -> String {
    // debugfs accepts double-quoted arguments.
    format!("\"{p}\"")
}

/// debugfs commands that install `bundle` as release `version` with the unit enabled.
fn install_script(
    bundle: &Path,
    version: &str,
    trusted_key: &Path,
    setup_unit: &Path,
) -> Result<String> {
    let mut s = String::new();
    let mkdir = |s: &mut String, p: &str| {
        s.push_str(&format!(
            "mkdir {}\nsif {} uid 0\nsif {} gid 0\n",
            q(p),
            q(p),
            q(p)
        ));
    };
    for d in [
        "/opt",
        "/opt/sgps",
        "/opt/sgps/releases",
        "/etc",
        "/etc/sgps",
        "/etc/systemd",
        "/etc/systemd/system",
    ] {
        mkdir(&mut s, d);
    }
    let dest = format!("/opt/sgps/releases/{version}");
    mkdir(&mut s, &dest);
    let files = sign::list_files(bundle)?;
    let mut dirs: Vec<String> = files
        .iter()
        .filter_map(|f| {
            Path::new(f)
                .parent()
                .map(|p| p.to_string_lossy().into_owned())
        })
        .filter(|p| !p.is_empty())
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        // Create each ancestor too (sorted order puts parents first).
        let mut acc = String::new();
        for part in d.split('/') {
            acc = if acc.is_empty() {
                part.to_string()
            } else {
                format!("{acc}/{part}")
            };
            mkdir(&mut s, &format!("{dest}/{acc}"));
        }
    }
    let write = |s: &mut String, local: &Path, remote: &str, mode: u32| {
        s.push_str(&format!(
            "rm {r}\nwrite {l} {r}\nsif {r} mode 0{m:o}\nsif {r} uid 0\nsif {r} gid 0\n",
            l = q(&local.to_string_lossy()),
            r = q(remote),
            m = 0o100000 | mode
        ));
    };
    for f in &files {
        let local = bundle.join(f);
        let exec = fs::metadata(&local)?.permissions().mode() & 0o111 != 0;
        write(
            &mut s,
            &local,
            &format!("{dest}/{f}"),
            if exec { 0o755 } else { 0o644 },
        );
    }
    write(
        &mut s,
        &bundle.join("sgps.service"),
        "/etc/systemd/system/sgps.service",
        0o644,
    );
    let kiosk = bundle.join("sgps-kiosk.service");
    if kiosk.is_file() {
        write(
            &mut s,
            &kiosk,
            "/etc/systemd/system/sgps-kiosk.service",
            0o644,
        );
    }
    write(&mut s, trusted_key, "/etc/sgps/release.pub.pem", 0o644);
    let board = fs::read_to_string(bundle.join("BOARD"))?.trim().to_string();
    mkdir(&mut s, "/etc/sgps/tasks");
    write(
        &mut s,
        &bundle.join(format!("board/{board}.toml")),
        "/etc/sgps/board.toml",
        0o644,
    );
    for f in files.iter().filter(|f| f.starts_with("board/tasks/")) {
        let name = f.trim_start_matches("board/tasks/");
        write(
            &mut s,
            &bundle.join(f),
            &format!("/etc/sgps/tasks/{name}"),
            0o644,
        );
    }
    write(
        &mut s,
        setup_unit,
        "/etc/systemd/system/sgps-setup.service",
        0o644,
    );
    for (link, target) in [
        ("/opt/sgps/current", format!("releases/{version}")),
        ("/opt/sgps/bin", "current/bin".to_string()),
        ("/opt/sgps/models", "current/models".to_string()),
    ] {
        s.push_str(&format!("rm {link}\nsymlink {link} {target}\n"));
    }
    let unit = fs::read_to_string(bundle.join("sgps.service"))?;
    let wanted = unit
        .lines()
        .find_map(|l| l.trim().strip_prefix("WantedBy="))
        .and_then(|w| w.split_whitespace().next())
        .unwrap_or("multi-user.target")
        .to_string();
    let mut units = vec![
        ("sgps.service", wanted.as_str()),
        ("sgps-setup.service", "multi-user.target"),
    ];
    if kiosk.is_file() {
        units.push(("sgps-kiosk.service", "graphical.target"));
    }
    for (unit, wanted) in units {
        let wants = format!("/etc/systemd/system/{wanted}.wants");
        mkdir(&mut s, &wants);
        s.push_str(&format!(
            "rm {wants}/{unit}\nsymlink {wants}/{unit} /etc/systemd/system/{unit}\n"
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_from_sfdisk_json() {
        let json = r#"{"partitiontable":{"label":"dos","unit":"sectors","sectorsize":512,
            "partitions":[{"node":"a1","start":8192,"size":1048576,"type":"c"},
                          {"node":"a2","start":1056768,"size":9000000,"type":"83"}]}}"#;
        assert_eq!(
            parse_layout(json).unwrap(),
            Layout {
                boot_offset: 8192 * 512,
                root_offset: 1056768 * 512
            }
        );
        let no_root = r#"{"partitiontable":{"partitions":[{"start":1,"size":2,"type":"c"}]}}"#;
        assert!(
            parse_layout(no_root)
                .unwrap_err()
                .to_string()
                .contains("root")
        );
    }
}
