//! Write a card image to a removable disk, refusing anything that is mounted or not removable,
//! then read it back and compare SHA-256.

use crate::tools;
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Where to look for system information (real: `/sys`, `/proc`; tests: fake trees).
#[derive(Debug, Clone)]
pub struct SysInfo {
    pub sys: PathBuf,
    pub proc_: PathBuf,
}

impl Default for SysInfo {
    fn default() -> Self {
        SysInfo {
            sys: PathBuf::from("/sys"),
            proc_: PathBuf::from("/proc"),
        }
    }
}

/// The block device name (`sdb`, `mmcblk0`) of a device path, following symlinks such as
/// `/dev/disk/by-id/...`.
pub fn block_name(device: &Path) -> Result<String> {
    let real = fs::canonicalize(device)
        .with_context(|| format!("device {} does not exist", device.display()))?;
    real.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{} is not a device path", device.display()))
}

/// Checks that `name` is a whole, removable, unmounted disk at least `needed` bytes large.
/// Returns its size in bytes.
pub fn check_target(info: &SysInfo, name: &str, needed: u64) -> Result<u64> {
    let dir = info.sys.join("block").join(name);
    if !dir.is_dir() {
        if partition_parent(info, name).is_some() {
            bail!("/dev/{name} is a partition; give the whole disk (e.g. /dev/sdX, /dev/mmcblkN)");
        }
        bail!(
            "/dev/{name} is not a block device known to the kernel ({} missing)",
            dir.display()
        );
    }
    let removable = read_trim(&dir.join("removable")).unwrap_or_default() == "1";
    // Built-in SD slots often report removable=0; they are SD cards all the same.
    let sd_card = name.starts_with("mmcblk")
        && read_trim(&dir.join("device/type")).is_some_and(|t| t == "SD");
    if !removable && !sd_card {
        bail!(
            "refusing to write /dev/{name}: it is not a removable disk (/sys/block/{name}/removable \
             is not 1). Use the SD card reader's device."
        );
    }
    if read_trim(&dir.join("ro")).is_some_and(|r| r == "1") {
        bail!("/dev/{name} is read-only (write-protect switch on the card?)");
    }
    let mounted = mounted_parts(info, name)?;
    if !mounted.is_empty() {
        bail!(
            "refusing to write /dev/{name}: mounted ({}). Unmount first, e.g. `udisksctl unmount -b {}`",
            mounted.join(", "),
            mounted[0].split(' ').next().unwrap_or("")
        );
    }
    let sectors: u64 = read_trim(&dir.join("size"))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("cannot read the size of /dev/{name}"))?;
    let size = sectors * 512;
    if size == 0 {
        bail!("/dev/{name} has size 0: no card in the reader?");
    }
    if size < needed {
        bail!("the image ({needed} bytes) does not fit on /dev/{name} ({size} bytes)");
    }
    Ok(size)
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn partition_parent(info: &SysInfo, name: &str) -> Option<String> {
    fs::read_dir(info.sys.join("block"))
        .ok()?
        .flatten()
        .find(|e| e.path().join(name).join("partition").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

/// Entries of /proc/mounts (as "device on mountpoint") that are this disk or its partitions,
/// including partitions listed in /sys/block/<name>/ and holders (e.g. LVM/dm-crypt).
pub fn mounted_parts(info: &SysInfo, name: &str) -> Result<Vec<String>> {
    let mut names = vec![name.to_string()];
    let dir = info.sys.join("block").join(name);
    for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
        if e.path().join("partition").is_file() {
            let p = e.file_name().to_string_lossy().into_owned();
            for h in fs::read_dir(e.path().join("holders"))
                .into_iter()
                .flatten()
                .flatten()
            {
                names.push(h.file_name().to_string_lossy().into_owned());
            }
            names.push(p);
        }
    }
    for h in fs::read_dir(dir.join("holders"))
        .into_iter()
        .flatten()
        .flatten()
    {
        names.push(h.file_name().to_string_lossy().into_owned());
    }
    let mounts = fs::read_to_string(info.proc_.join("mounts"))
        .with_context(|| format!("cannot read {}", info.proc_.join("mounts").display()))?;
    let mut hits = Vec::new();
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(dev), Some(mnt)) = (f.next(), f.next()) else {
            continue;
        };
        let base = dev.rsplit('/').next().unwrap_or(dev);
        // Partition names are the disk name plus digits, with a `p` for mmcblk/nvme/loop.
        let same_disk = names.iter().any(|n| base == n)
            || base
                .strip_prefix(name)
                .map(|rest| {
                    let rest = rest.strip_prefix('p').unwrap_or(rest);
                    !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit())
                })
                .unwrap_or(false);
        if dev.starts_with("/dev/") && same_disk {
            hits.push(format!("{dev} on {mnt}"));
        }
    }
    Ok(hits)
}

/// Writes `image` to `device` after the checks, syncs, reads back and verifies SHA-256.
pub fn flash(info: &SysInfo, image: &Path, device: &Path) -> Result<String> {
    let img_len = fs::metadata(image)
        .with_context(|| format!("cannot read image {}", image.display()))?
        .len();
    let name = block_name(device)?;
    check_target(info, &name, img_len)?;
    let want = tools::sha256_file(image)?;
    log::info!(
        "writing {} ({img_len} bytes) to {}",
        image.display(),
        device.display()
    );
    {
        let mut src = fs::File::open(image)?;
        let mut dst = fs::OpenOptions::new()
            .write(true)
            .open(device)
            .with_context(|| {
                format!(
                    "cannot open {} for writing (need root? try sudo)",
                    device.display()
                )
            })?;
        let mut buf = vec![0u8; 4 << 20];
        let mut done = 0u64;
        loop {
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            dst.write_all(&buf[..n])
                .with_context(|| format!("write to {} failed at byte {done}", device.display()))?;
            done += n as u64;
        }
        dst.flush()?;
        dst.sync_all()
            .with_context(|| format!("sync of {} failed", device.display()))?;
    }
    log::info!("verifying");
    let mut rd = fs::File::open(device)?.take(img_len);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut total = 0u64;
    loop {
        let n = rd.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    let got = hex::encode(h.finalize());
    if total != img_len || got != want {
        bail!(
            "verification FAILED: {} does not read back as written (sha256 {got}, expected {want}); \
             the card may be faulty",
            device.display()
        );
    }
    Ok(want)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(removable: &str, mounts: &str) -> (tempfile::TempDir, SysInfo) {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        let proc_ = d.path().join("proc");
        let sdb = sys.join("block/sdb");
        fs::create_dir_all(sdb.join("sdb1")).unwrap();
        fs::write(sdb.join("sdb1/partition"), "1\n").unwrap();
        fs::write(sdb.join("removable"), removable).unwrap();
        fs::write(sdb.join("size"), "2048\n").unwrap(); // 1 MiB
        fs::write(sdb.join("ro"), "0\n").unwrap();
        let sda = sys.join("block/sda");
        fs::create_dir_all(&sda).unwrap();
        fs::write(sda.join("removable"), "0\n").unwrap();
        fs::write(sda.join("size"), "100000\n").unwrap();
        fs::create_dir_all(&proc_).unwrap();
        fs::write(proc_.join("mounts"), mounts).unwrap();
        (d, SysInfo { sys, proc_ })
    }

    const ROOT_MOUNTS: &str = "/dev/sda2 / ext4 rw 0 0\nproc /proc proc rw 0 0\n";

    #[test]
    fn refuses_non_removable_mounted_partition_and_too_small() {
        let (_d, info) = fake("1\n", ROOT_MOUNTS);
        assert_eq!(check_target(&info, "sdb", 4096).unwrap(), 1 << 20);
        let e = check_target(&info, "sda", 1).unwrap_err().to_string();
        assert!(e.contains("not a removable"), "{e}");
        let e = check_target(&info, "sdb1", 1).unwrap_err().to_string();
        assert!(e.contains("partition"), "{e}");
        let e = check_target(&info, "sdb", 2 << 20).unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");

        let (_d, info) = fake("1\n", "/dev/sdb1 /media/u/boot vfat rw 0 0\n");
        let e = check_target(&info, "sdb", 1).unwrap_err().to_string();
        assert!(e.contains("mounted") && e.contains("/dev/sdb1"), "{e}");

        let (_d, info) = fake("0\n", "");
        assert!(check_target(&info, "sdb", 1).is_err());
    }

    #[test]
    fn mmc_partitions_and_sd_slots() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        let m = sys.join("block/mmcblk0");
        fs::create_dir_all(m.join("device")).unwrap();
        fs::write(m.join("removable"), "0").unwrap();
        fs::write(m.join("device/type"), "SD\n").unwrap();
        fs::write(m.join("size"), "4096").unwrap();
        fs::create_dir_all(d.path().join("proc")).unwrap();
        let info = SysInfo {
            sys,
            proc_: d.path().join("proc"),
        };
        fs::write(info.proc_.join("mounts"), "").unwrap();
        check_target(&info, "mmcblk0", 1).unwrap();
        fs::write(
            info.proc_.join("mounts"),
            "/dev/mmcblk0p2 /mnt ext4 rw 0 0\n",
        )
        .unwrap();
        assert!(check_target(&info, "mmcblk0", 1).is_err());
    }

    #[test]
    fn writes_and_verifies_a_fake_removable_disk() {
        let (d, info) = fake("1\n", ROOT_MOUNTS);
        let dev = d.path().join("sdb");
        fs::write(&dev, vec![0u8; 1 << 20]).unwrap();
        let img = d.path().join("card.img");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(&img, &data).unwrap();
        let sha = flash(&info, &img, &dev).unwrap();
        assert_eq!(sha, tools::sha256_file(&img).unwrap());
        assert_eq!(&fs::read(&dev).unwrap()[..data.len()], &data[..]);
        // A mounted device is refused before anything is written.
        fs::write(info.proc_.join("mounts"), "/dev/sdb1 /media vfat rw 0 0\n").unwrap();
        fs::write(&dev, vec![0u8; 1 << 20]).unwrap();
        assert!(flash(&info, &img, &dev).is_err());
        assert!(fs::read(&dev).unwrap().iter().all(|&b| b == 0));
    }
}
