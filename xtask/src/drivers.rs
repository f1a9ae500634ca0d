//! `cargo xtask drivers`: the real camera code against a real kernel driver, without hardware.
//!
//! Boots the Debian kernel (`linux-image-*-amd64` from the OS packages) under `qemu-system-x86_64`
//! with a small initramfs (busybox, the host-built `sgps` and its shared libraries, the `vivid`
//! module and its dependencies). `vivid` is the kernel's virtual V4L2 test camera. Inside the VM
//! `sgps capture` runs the real V4L2 path: format negotiation (auto, YUYV, an odd size the driver
//! adjusts, MJPEG which vivid does not offer), frames decoded, the time-out, and the camera
//! removed and re-added while capturing (driver unbound, module unloaded and loaded again). Each
//! check prints `CHECK <name> ok|FAILED`; the command fails unless every check passes.
//!
//! GPIO is not covered: Debian's kernels (bookworm 6.1 and bookworm-backports 6.12) are built
//! without `gpio-sim` and `gpio-mockup`.

use anyhow::{Context, Result, bail};
use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::build::{self, Board, BuildOptions};
use crate::tools;

/// Arguments of `cargo xtask drivers`.
#[derive(Debug, Clone, clap::Args)]
pub struct DriversArgs {
    /// A Debian kernel package (`linux-image-<version>-amd64_*.deb`); default: download the
    /// one `linux-image-amd64` depends on (apt-get download) into target/drivers/.
    #[arg(long)]
    pub kernel_deb: Option<PathBuf>,
    /// Use this sgps binary instead of building one.
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Give up after this long (the VM without KVM boots in well under a minute).
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
}

/// The checks the VM runs (busybox sh). `$SGPS` is the binary, modules are insmod-ed in
/// dependency order by `load_vivid`.
const CHECKS: &str = r#"
check() { name=$1; shift; if "$@"; then echo "CHECK $name ok"; else echo "CHECK $name FAILED"; fi; }
cap() { $SGPS capture --device /dev/video0 "$@" > /tmp/out 2>&1; rc=$?; cat /tmp/out; return $rc; }
has() { grep -q "$1" /tmp/out; }

load_vivid
i=0; while [ ! -e /dev/video0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
check device_appears test -e /dev/video0

# format negotiation and decoding (vivid's webcam input offers discrete sizes: 320x180,
# 640x360, 640x480, 1280x720, ...; an unsupported request is adjusted by the driver)
check auto_format cap --format auto --count 3 --out /tmp/frames
check auto_three_frames has "CAPTURE 3 of 3"
check auto_640x480 has "FRAME 3 640x480"
check frames_saved test -s /tmp/frames/frame-003.png
check yuyv cap --format yuyv --width 1280 --height 720 --count 2
check yuyv_size has "FRAME 2 1280x720"
odd() { cap --format yuyv --width 1000 --height 700 --count 1 && has "asked for 1000x700, driver gave" && has "CAPTURE 1 of 1"; }
check odd_size_adjusted odd
mjpeg() { ! cap --format mjpeg --count 1 && has "cannot be configured" && has "MJPEG"; }
check mjpeg_refused_clearly mjpeg

# time-out: no frame can arrive within 1 ms at vivid's frame rate
timeout_() { ! cap --format yuyv --timeout-ms 1 --count 1 --attempts 2 && has "no frame within 1ms"; }
check timeout timeout_

# removal and return while capturing: unbind the driver, unload and load the module again
( sleep 2; echo vivid.0 > /sys/bus/platform/drivers/vivid/unbind; sleep 1; rmmod vivid; echo "MODULE unloaded"; sleep 1; load_vivid; echo "MODULE loaded" ) &
cap --format yuyv --width 320 --height 240 --count 40 --interval-ms 200 --attempts 30
rc=$?
wait
check replug_frames_before_and_after test $rc = 0
check replug_saw_disconnect has "is disconnected"
check replug_all_frames has "CAPTURE 40 of 40"
echo "CHECKS DONE"
"#;

fn kernel_deb(root: &Path, args: &DriversArgs) -> Result<PathBuf> {
    if let Some(p) = &args.kernel_deb {
        return Ok(p.clone());
    }
    let dir = root.join("target/drivers");
    fs::create_dir_all(&dir)?;
    let existing = |dir: &Path| -> Option<PathBuf> {
        fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let n = p.file_name().unwrap_or_default().to_string_lossy();
                n.starts_with("linux-image-") && n.ends_with("_amd64.deb")
            })
    };
    if let Some(p) = existing(&dir) {
        return Ok(p);
    }
    let deps = tools::output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    let pkg = deps
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
        .map(|v| format!("linux-image-{v}"))
        .context("apt-cache does not name the kernel package behind linux-image-amd64")?;
    log::info!("downloading {pkg} (about 70 MB) into {}", dir.display());
    tools::run(
        Command::new("apt-get")
            .arg("download")
            .arg(&pkg)
            .current_dir(&dir),
    )?;
    existing(&dir).context("apt-get download left no kernel package")
}

/// `depends=` of a kernel module, read from its `.modinfo` strings.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    ko.windows(key.len())
        .position(|w| w == key)
        .map(|i| {
            let rest = &ko[i + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// `name` and every module it needs, dependencies first.
fn module_order(modules: &Path, name: &str) -> Result<Vec<PathBuf>> {
    let mut index = std::collections::HashMap::new();
    let mut stack = vec![modules.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(stem) = p.file_name().and_then(|n| n.to_str()) {
                if let Some(m) = stem.strip_suffix(".ko") {
                    index.insert(m.replace('-', "_"), p.clone());
                } else if stem.ends_with(".ko.xz") || stem.ends_with(".ko.zst") {
                    bail!(
                        "{}: compressed modules are not supported; use a kernel package with plain .ko files (Debian bookworm's 6.1)",
                        p.display()
                    );
                }
            }
        }
    }
    fn visit(
        m: &str,
        index: &std::collections::HashMap<String, PathBuf>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<PathBuf>,
    ) -> Result<()> {
        let key = m.replace('-', "_");
        if !seen.insert(key.clone()) {
            return Ok(());
        }
        let p = index
            .get(&key)
            .with_context(|| format!("module {m} not in the kernel package"))?;
        for d in module_depends(&fs::read(p)?) {
            visit(&d, index, seen, out)?;
        }
        out.push(p.clone());
        Ok(())
    }
    let mut out = Vec::new();
    visit(name, &index, &mut BTreeSet::new(), &mut out)?;
    Ok(out)
}

/// Shared libraries of a dynamic executable (`ldd`), including the loader.
fn shared_libs(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = tools::output(Command::new("ldd").arg(bin))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let p = l
                .split("=>")
                .nth(1)
                .unwrap_or(l)
                .split_whitespace()
                .next()?;
            p.starts_with('/').then(|| PathBuf::from(p))
        })
        .collect())
}

/// A `newc` cpio archive (what the kernel unpacks as its initramfs).
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let hdr = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(hdr.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        self.out.resize(self.out.len().next_multiple_of(4), 0);
    }
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, b"");
    }
    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | mode, data);
    }
    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, target.as_bytes());
    }
    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, b"");
        self.out
    }
}

fn build_initramfs(
    sgps: &Path,
    busybox: &Path,
    kernel_root: &Path,
    version: &str,
) -> Result<Vec<u8>> {
    let mut c = Cpio {
        out: Vec::new(),
        ino: 0,
    };
    let mut dirs = BTreeSet::new();
    let mut add_dirs = |c: &mut Cpio, path: &str| {
        let mut acc = String::new();
        for part in path
            .trim_start_matches('/')
            .split('/')
            .collect::<Vec<_>>()
            .iter()
            .rev()
            .skip(1)
            .rev()
        {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            if dirs.insert(acc.clone()) {
                c.dir(&acc);
            }
        }
    };
    for d in ["bin", "dev", "proc", "sys", "tmp"] {
        add_dirs(&mut c, &format!("{d}/x"));
    }
    c.file("bin/busybox", 0o755, &fs::read(busybox)?);
    for applet in [
        "sh", "mount", "insmod", "rmmod", "sleep", "echo", "cat", "grep", "test", "poweroff",
        "mkdir", "ls", "[",
    ] {
        c.symlink(&format!("bin/{applet}"), "busybox");
    }
    c.file("bin/sgps", 0o755, &fs::read(sgps)?);
    for lib in shared_libs(sgps)? {
        let real = fs::canonicalize(&lib)?;
        let name = lib.to_string_lossy().trim_start_matches('/').to_string();
        add_dirs(&mut c, &name);
        c.file(&name, 0o755, &fs::read(&real)?);
    }
    let modules = kernel_root.join("lib/modules").join(version);
    let order = module_order(&modules, "vivid")?;
    let mut load = String::from("load_vivid() {\n");
    for (i, m) in order.iter().enumerate() {
        let name = format!("mod/{i:02}-{}", m.file_name().unwrap().to_string_lossy());
        add_dirs(&mut c, &name);
        c.file(&name, 0o644, &fs::read(m)?);
        let args = if m.file_name().is_some_and(|n| n == "vivid.ko") {
            // one capture-only instance
            " n_devs=1 node_types=0x1"
        } else {
            ""
        };
        load.push_str(&format!("  insmod /{name}{args} 2>/dev/null\n"));
    }
    load.push_str("}\n");
    let init = format!(
        "#!/bin/sh\nexport PATH=/bin SGPS=/bin/sgps\nmount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n{load}{CHECKS}poweroff -f\n"
    );
    c.file("init", 0o755, init.as_bytes());
    Ok(c.finish())
}

/// `cargo xtask drivers`.
pub fn drivers(root: &Path, args: &DriversArgs) -> Result<()> {
    let qemu = "qemu-system-x86_64";
    tools::ensure(
        "drivers",
        [
            tools::need_tool(qemu, "apt-get install qemu-system-x86"),
            tools::need_tool("busybox", "apt-get install busybox-static"),
            tools::need_tool("dpkg-deb", "apt-get install dpkg"),
            tools::need_tool("ldd", "apt-get install libc-bin"),
        ]
        .into_iter()
        .flatten()
        .collect(),
    )?;
    let busybox = tools::which("busybox").expect("checked");
    let deb = kernel_deb(root, args)?;
    let work = root.join("target/drivers/vm");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    tools::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&work))?;
    let vmlinuz = fs::read_dir(work.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the kernel package")?;
    let version = vmlinuz
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    let bin = match &args.binary {
        Some(b) => b.clone(),
        None => build::build(root, &Board::host(root), &BuildOptions::default())?,
    };
    let initrd = work.join("initramfs.cpio");
    fs::write(&initrd, build_initramfs(&bin, &busybox, &work, &version)?)?;
    // KVM only when asked: nested KVM on cloud machines often cannot run this guest
    let kvm = std::env::var("SGPS_VM_KVM").is_ok_and(|v| v == "1");
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-m",
        "1024",
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
    ])
    .arg("-kernel")
    .arg(&vmlinuz)
    .arg("-initrd")
    .arg(&initrd)
    .args(["-append", "console=ttyS0 panic=-1 loglevel=3"]);
    if kvm {
        cmd.args(["-enable-kvm"]);
    }
    println!(
        "drivers: kernel {version}, {} KVM; booting {}",
        if kvm { "with" } else { "without" },
        tools::render(&cmd)
    );
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu")?;
    let start = Instant::now();
    let deadline = Duration::from_secs(args.timeout_s);
    let out = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let log_path = root.join("target/drivers/vm.log");
    let mut log = fs::File::create(&log_path)?;
    let (mut ok, mut failed, mut done) = (Vec::new(), Vec::new(), false);
    while start.elapsed() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => {
                writeln!(log, "{l}")?;
                let l = l.trim_end_matches('\r');
                if let Some(c) = l.strip_prefix("CHECK ") {
                    println!("  {c}");
                    match c.rsplit_once(' ') {
                        Some((name, "ok")) => ok.push(name.to_string()),
                        Some((name, _)) => failed.push(name.to_string()),
                        None => {}
                    }
                } else if l == "CHECKS DONE" {
                    done = true;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if child.try_wait()?.is_some() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "drivers: {} checks passed, {} failed in {:.0} s (serial console: {})",
        ok.len(),
        failed.len(),
        start.elapsed().as_secs_f64(),
        log_path.display()
    );
    if !done {
        bail!(
            "the VM did not finish its checks within {} s; see {}",
            args.timeout_s,
            log_path.display()
        );
    }
    if !failed.is_empty() {
        bail!("failed: {}; see {}", failed.join(", "), log_path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends_and_cpio_layout() {
        let ko = b"\x7fELF....name=vivid\0depends=videobuf2-v4l2,v4l2-tpg\0vermagic=6.1\0";
        assert_eq!(module_depends(ko), vec!["videobuf2-v4l2", "v4l2-tpg"]);
        assert!(module_depends(b"depends=\0").is_empty());
        let mut c = Cpio {
            out: Vec::new(),
            ino: 0,
        };
        c.file("init", 0o755, b"#!/bin/sh\n");
        let a = c.finish();
        assert!(a.starts_with(b"070701"));
        assert_eq!(a.len() % 4, 0);
        assert!(a.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
