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
//! GPIO: Debian's kernels are built without `gpio-sim` (and without the interrupt simulator it
//! needs), so the command builds it as an out-of-tree module from the same release's
//! `linux-source` and `linux-headers` packages (irq_sim.c compiled into the module). In the VM a
//! simulated chip stands in for the board's header: `sgps gpio-check` runs the real character-
//! device path while the script drives the button lines from the simulator side (a glitch
//! shorter than the debounce, short and long presses) and reads the LED lines back.

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

# GPIO: a simulated chip, buttons active low on lines 1 (capture) and 2 (next), LEDs on 3-5;
# a 0-length glitch (below the 20 ms debounce) must not count; four presses must
load_gpio_sim
mount -t configfs none /sys/kernel/config
g=/sys/kernel/config/gpio-sim/sgps
mkdir $g $g/bank0
echo 8 > $g/bank0/num_lines
echo 1 > $g/live
chip=$(cat $g/bank0/chip_name)
sim=/sys/devices/platform/$(cat $g/dev_name)/$chip
check gpio_chip test -e /dev/$chip
pull() { echo pull-$2 > $sim/sim_gpio$1/pull; }
leds() { echo "$(cat $sim/sim_gpio3/value)$(cat $sim/sim_gpio4/value)$(cat $sim/sim_gpio5/value)"; }
pull 1 up; pull 2 up
sed "s/gpiochip0/$chip/" /vm-board.toml > /tmp/board.toml
$SGPS gpio-check --board /tmp/board.toml --events 4 --timeout-s 120 --led-ms 400 > /tmp/g 2>&1 &
pid=$!
i=0; while ! grep -q READY /tmp/g && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
check gpio_led_test_ran grep -q "LED Off" /tmp/g
check gpio_leds_off test "$(leds)" = 000
pull 1 down; pull 1 up
sleep 0.5
pull 1 down; sleep 0.2; pull 1 up; sleep 1
check gpio_short_capture_green test "$(leds)" = 100
pull 1 down; sleep 1.5; pull 1 up; sleep 1
check gpio_long_capture_red test "$(leds)" = 001
pull 2 down; sleep 0.2; pull 2 up; sleep 1
check gpio_short_next_amber test "$(leds)" = 010
pull 2 down; sleep 1.5; pull 2 up
wait $pid
rc=$?
cat /tmp/g
check gpio_exit test $rc = 0
gpio_events() { grep -q "BUTTON capture short" /tmp/g && grep -q "BUTTON capture long" /tmp/g && grep -q "BUTTON next short" /tmp/g && grep -q "BUTTON next long" /tmp/g && grep -q "GPIO 4 events" /tmp/g; }
check gpio_events_debounced gpio_events
echo "CHECKS DONE"
"#;

/// A package file in `dir` whose name starts with `prefix`, downloaded with apt-get if absent.
fn package(dir: &Path, pkg: &str) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let find = || -> Option<PathBuf> {
        fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let n = p.file_name().unwrap_or_default().to_string_lossy();
                n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb")
            })
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    log::info!("downloading {pkg} into {}", dir.display());
    tools::run(
        Command::new("apt-get")
            .arg("download")
            .arg(pkg)
            .current_dir(dir),
    )?;
    find().with_context(|| format!("apt-get download left no {pkg} package"))
}

fn kernel_deb(root: &Path, args: &DriversArgs) -> Result<PathBuf> {
    if let Some(p) = &args.kernel_deb {
        return Ok(p.clone());
    }
    let deps = tools::output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    let pkg = deps
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
        .map(|v| format!("linux-image-{v}"))
        .context("apt-cache does not name the kernel package behind linux-image-amd64")?;
    package(&root.join("target/drivers"), &pkg)
}

/// Build `gpio-sim.ko` for kernel `version` (e.g. 6.1.0-57-amd64) from the release's
/// `linux-source` and `linux-headers` packages; `irq_sim.c` is compiled into the module because
/// Debian's kernels do not have it built in.
fn build_gpio_sim(root: &Path, version: &str) -> Result<PathBuf> {
    let dl = root.join("target/drivers");
    let out = dl.join(format!("gpio-sim-{version}"));
    let ko = out.join("gpio-sim.ko");
    if ko.is_file() {
        return Ok(ko);
    }
    let abi = version.trim_end_matches("-amd64");
    let series: String = version.split('.').take(2).collect::<Vec<_>>().join(".");
    let tree = dl.join("headers");
    let _ = fs::remove_dir_all(&tree);
    for pkg in [
        format!("linux-headers-{version}"),
        format!("linux-headers-{abi}-common"),
        format!("linux-kbuild-{series}"),
    ] {
        let deb = package(&dl, &pkg)?;
        tools::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    }
    let src = package(&dl, &format!("linux-source-{series}"))?;
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    // the two source files from the source tarball inside the package
    let top = format!("linux-source-{series}");
    let script = format!(
        "dpkg-deb --fsys-tarfile {deb} | tar -xO ./usr/src/{top}.tar.xz | tar -xJ -C {out} --strip-components=3 {top}/drivers/gpio/gpio-sim.c {top}/drivers/gpio/gpiolib.h {top}/kernel/irq/irq_sim.c",
        deb = tools::shell_quote(&src.to_string_lossy()),
        out = tools::shell_quote(&out.to_string_lossy()),
    );
    let _ = Command::new("sh").arg("-c").arg(&script).status();
    for f in ["gpio-sim.c", "gpiolib.h", "irq_sim.c"] {
        if !out.join(f).is_file() {
            bail!("{f} not found in {}", src.display());
        }
    }
    fs::rename(out.join("gpio-sim.c"), out.join("gpio-sim-core.c"))?;
    // irq_to_desc is not exported to modules; generic_handle_irq does the same lookup
    let irq = fs::read_to_string(out.join("irq_sim.c"))?;
    let patched = irq.replace(
        "handle_simple_irq(irq_to_desc(irqnum));",
        "generic_handle_irq(irqnum);",
    );
    if patched == irq {
        bail!(
            "irq_sim.c of this kernel differs from what the build expects; update build_gpio_sim"
        );
    }
    fs::write(out.join("irq_sim.c"), patched)?;
    fs::write(
        out.join("Kbuild"),
        "obj-m := gpio-sim.o\ngpio-sim-y := gpio-sim-core.o irq_sim.o\n",
    )?;
    let kdir = tree
        .join("usr/src")
        .join(format!("linux-headers-{version}"));
    // The flavour's Makefile includes the common one by its installed path
    // (`include /usr/src/linux-headers-<abi>-common/Makefile`); point it into the extracted tree.
    let makefile = kdir.join("Makefile");
    let text =
        fs::read_to_string(&makefile).with_context(|| format!("reading {}", makefile.display()))?;
    let local = format!("include {}/", tree.join("usr/src").display());
    fs::write(&makefile, text.replace("include /usr/src/", &local))?;
    tools::run(
        Command::new("make")
            .arg("-C")
            .arg(&kdir)
            .arg(format!("M={}", out.display()))
            .arg("modules"),
    )?;
    if !ko.is_file() {
        bail!("building gpio-sim.ko failed; see the output above");
    }
    Ok(ko)
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

/// The board profile `sgps gpio-check` reads in the VM (chip name replaced at run time).
const VM_BOARD: &str = r#"name = "vm"
storage_dir = "/tmp/store"
models_dir = "/nonexistent"
task_file = "/nonexistent"
[camera]
kind = "v4l2"
device = "/dev/video0"
width = 640
height = 480
[gpio]
kind = "cdev"
chip = "/dev/gpiochip0"
capture_line = 1
next_line = 2
green_line = 3
amber_line = 4
red_line = 5
buttons_active_low = true
leds_active_low = false
timing = { debounce_ms = 20, long_press_ms = 800 }
"#;

fn build_initramfs(
    sgps: &Path,
    busybox: &Path,
    kernel_root: &Path,
    version: &str,
    gpio_sim: &Path,
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
        "mkdir", "ls", "[", "sed",
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
    load.push_str("}\nload_gpio_sim() {\n");
    let mut gpio_mods = module_order(&modules, "configfs")?;
    gpio_mods.push(gpio_sim.to_owned());
    for (i, m) in gpio_mods.iter().enumerate() {
        let name = format!(
            "mod/gpio-{i:02}-{}",
            m.file_name().unwrap().to_string_lossy()
        );
        c.file(&name, 0o644, &fs::read(m)?);
        load.push_str(&format!("  insmod /{name} 2>/dev/null\n"));
    }
    load.push_str("}\n");
    c.file("vm-board.toml", 0o644, VM_BOARD.as_bytes());
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
            tools::need_tool("make", "apt-get install make gcc"),
            tools::need_tool("xz", "apt-get install xz-utils"),
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
        None => build::build(root, &Board::host(root), &BuildOptions::onnx_reader())?,
    };
    let gpio_sim = build_gpio_sim(root, &version)?;
    let initrd = work.join("initramfs.cpio");
    fs::write(
        &initrd,
        build_initramfs(&bin, &busybox, &work, &version, &gpio_sim)?,
    )?;
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
