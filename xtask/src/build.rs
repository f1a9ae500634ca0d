//! Boards as tooling needs them (read through the runtime's `BoardProfile`) and the release build for a board's target,
//! including the cross-compilation environment for aarch64.

use crate::tools::{self, Requirement, need_tool};
use anyhow::{Context, Result, anyhow, bail};
use sgps::board::BoardProfile;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The aarch64 Linux target used by every supported ARM board.
pub const AARCH64: &str = "aarch64-unknown-linux-gnu";
/// Sysroot of Debian's aarch64 cross toolchain (`libc6-dev-arm64-cross`).
pub const CROSS_SYSROOT: &str = "/usr/aarch64-linux-gnu";
/// glibc of the cross toolchain's sysroot (Debian 12); boards with an older glibc need zigbuild.
const CROSS_GLIBC: (u32, u32) = (2, 36);

/// What tooling needs to know about a board: its target, CPU, model variants and glibc, read
/// from the profile through the runtime's own type (`sgps::board::BoardProfile`).
#[derive(Debug, Clone)]
pub struct Board {
    pub name: String,
    /// `board/<name>.toml`.
    pub profile: PathBuf,
    /// Rust target triple; `None` = the host (profile key `target` absent or `host`).
    pub target: Option<String>,
    /// CPU to emulate with qemu (`-cpu`; profile key `qemu_cpu`, else `max`).
    pub qemu_cpu: String,
    /// Image encoder variant to ship (key `image_variant` in the profile); `None` = manifest default.
    pub image_variant: Option<String>,
    /// Text encoder variant to ship (key `text_variant`); `None` = manifest default.
    pub text_variant: Option<String>,
    /// Oldest glibc on the board's OS (key `glibc`, e.g. "2.31"); older than the cross sysroot's
    /// means the build goes through `cargo zigbuild`.
    pub glibc: Option<(u32, u32)>,
}

impl Board {
    /// Loads `board/<name>.toml` under `root`.
    pub fn load(root: &Path, name: &str) -> Result<Board> {
        let dir = root.join("board");
        let profile = dir.join(format!("{name}.toml"));
        if !profile.is_file() {
            bail!(
                "unknown board `{name}`: {} does not exist (available: {})",
                profile.display(),
                available_boards(&dir).join(", ")
            );
        }
        let text = fs::read_to_string(&profile)
            .with_context(|| format!("cannot read board profile {}", profile.display()))?;
        Board::from_toml(name, &profile, &text)
    }

    /// This machine, built natively (for `cargo xtask bench` and `soak`).
    pub fn host(root: &Path) -> Board {
        Board {
            name: "host".into(),
            profile: root.join("board/sim.toml"),
            target: None,
            qemu_cpu: "max".into(),
            image_variant: None,
            text_variant: None,
            glibc: None,
        }
    }

    /// A board from its profile's text, checked as the runtime checks it.
    pub fn from_toml(name: &str, profile: &Path, text: &str) -> Result<Board> {
        let p = BoardProfile::parse(text)
            .map_err(|e| anyhow!("invalid board profile {}: {e}", profile.display()))?;
        let glibc = p
            .glibc_version()
            .map_err(|e| anyhow!("board profile {}: {e}", profile.display()))?;
        Ok(Board {
            name: name.to_string(),
            profile: profile.to_path_buf(),
            target: p.target.filter(|t| t != "host"),
            qemu_cpu: p.qemu_cpu.unwrap_or_else(|| "max".into()),
            image_variant: p.image_variant,
            text_variant: p.text_variant,
            glibc,
        })
    }

    /// True when the glibc on the board is older than the cross sysroot's.
    pub fn needs_zigbuild(&self) -> bool {
        self.target.is_some() && self.glibc.is_some_and(|g| g < CROSS_GLIBC)
    }

    /// The Debian architecture name of the board (for `.deb`).
    pub fn deb_arch(&self) -> &'static str {
        match self.target.as_deref() {
            Some(t) if t.starts_with("aarch64") => "arm64",
            Some(t) if t.starts_with("armv7") => "armhf",
            _ => host_deb_arch(),
        }
    }
}

fn host_deb_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => {
            log::warn!("unknown host architecture {other}; labelling the .deb `all`");
            "all"
        }
    }
}

/// Names of the profiles in `board/`.
pub fn available_boards(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            (p.extension().is_some_and(|x| x == "toml"))
                .then(|| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .flatten()
        })
        .collect();
    v.sort();
    v
}

/// Environment for cross-compiling to aarch64 with Debian's toolchain. The same values are used
/// by `build`, `dist` and `test-arm` so that they share one set of compiled dependencies.
pub fn cross_env() -> Vec<(String, String)> {
    let t = AARCH64.replace('-', "_");
    vec![
        (
            format!("CARGO_TARGET_{}_LINKER", t.to_uppercase()),
            "aarch64-linux-gnu-gcc".into(),
        ),
        (format!("CC_{t}"), "aarch64-linux-gnu-gcc".into()),
        (format!("CXX_{t}"), "aarch64-linux-gnu-g++".into()),
        (format!("AR_{t}"), "aarch64-linux-gnu-ar".into()),
    ]
}

/// Everything needed to cross-build for aarch64 that is missing here.
pub fn cross_requirements(board: &Board) -> Vec<Requirement> {
    let mut missing = Vec::new();
    let Some(target) = board.target.as_deref() else {
        return missing;
    };
    if !rust_target_installed(target) {
        missing.push(Requirement {
            what: format!("Rust standard library for {target}"),
            install: format!("rustup target add {target}"),
        });
    }
    missing.extend(need_tool(
        "aarch64-linux-gnu-gcc",
        "apt-get install gcc-aarch64-linux-gnu",
    ));
    if !Path::new(CROSS_SYSROOT).join("include/stdio.h").is_file() {
        missing.push(Requirement {
            what: format!("aarch64 C library headers in {CROSS_SYSROOT}"),
            install: "apt-get install libc6-dev-arm64-cross".into(),
        });
    }
    if board.needs_zigbuild() {
        if tools::which("cargo-zigbuild").is_none() {
            missing.push(Requirement {
                what: format!(
                    "cargo-zigbuild (board {} has glibc older than {}.{})",
                    board.name, CROSS_GLIBC.0, CROSS_GLIBC.1
                ),
                install: "cargo install --locked cargo-zigbuild".into(),
            });
        }
        if tools::which("zig").is_none() && !python_ziglang_present() {
            missing.push(Requirement {
                what: "the zig compiler (used by cargo-zigbuild as linker)".into(),
                install: "pip install ziglang".into(),
            });
        }
    }
    missing
}

fn rust_target_installed(target: &str) -> bool {
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match sysroot {
        Some(s) => Path::new(&s)
            .join("lib/rustlib")
            .join(target)
            .join("lib")
            .is_dir(),
        None => false,
    }
}

fn python_ziglang_present() -> bool {
    Command::new("python3")
        .args(["-c", "import ziglang"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Options for a release build.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Build without the V4L2 camera feature.
    pub no_camera: bool,
    /// Keep the ONNX reader (cargo feature `onnx`). The binary a bundle ships (`dist`, `build`)
    /// has none: its models are NNEF archives translated by `dist` (~6 MB less code). The tools
    /// that run the board binary on the repository's ONNX models (bench, soak, arm-count, drivers,
    /// qemu) keep it.
    pub onnx: bool,
}

impl BuildOptions {
    /// A board binary that reads the repository's ONNX models (for the measuring tools).
    pub fn onnx_reader() -> BuildOptions {
        BuildOptions {
            onnx: true,
            ..BuildOptions::default()
        }
    }
}

/// Cargo features of a board binary: `v4l2` unless `no_camera`, `minilm` where the models need it,
/// `onnx` only where asked.
pub fn device_features(opts: &BuildOptions, minilm: bool) -> Vec<&'static str> {
    let mut f = Vec::new();
    if !opts.no_camera {
        f.push("v4l2");
    }
    if minilm {
        f.push("minilm");
    }
    if opts.onnx {
        f.push("onnx");
    }
    f
}

/// Whether the shipped synthesizer reads the MiniLM embedding (`models/manifest.json`); true when
/// the manifest cannot be read, so that a build never lacks what the models might need.
pub fn models_use_minilm(root: &Path) -> bool {
    sgps::manifest::Manifest::load(&root.join("models")).map_or(true, |m| m.uses_minilm())
}

/// Cargo profile of board binaries (`[profile.device]` in Cargo.toml: release + fat LTO, one
/// codegen unit, abort on panic, stripped).
pub const DEVICE_PROFILE: &str = "device";

/// Builds the `sgps` binary for `board` (profile [`DEVICE_PROFILE`]) and returns its path.
pub fn build(root: &Path, board: &Board, opts: &BuildOptions) -> Result<PathBuf> {
    tools::ensure("build", cross_requirements(board))?;
    let mut c = Command::new(tools::cargo());
    c.current_dir(root);
    let zig = board.needs_zigbuild();
    c.arg(if zig { "zigbuild" } else { "build" });
    c.args([
        "--profile",
        DEVICE_PROFILE,
        "--package",
        "sgps",
        "--bin",
        "sgps",
    ]);
    // only the features the board needs: the camera unless asked not to, the MiniLM tokenizer only
    // where the shipped synthesizer reads the MiniLM embedding
    c.arg("--no-default-features");
    let features = device_features(opts, models_use_minilm(root));
    if !features.is_empty() {
        c.args(["--features", &features.join(",")]);
    }
    let target_dir = target_dir(root);
    let bin = match board.target.as_deref() {
        None => target_dir.join(DEVICE_PROFILE).join("sgps"),
        Some(t) => {
            if zig {
                let (a, b) = board.glibc.unwrap_or(CROSS_GLIBC);
                c.args(["--target", &format!("{t}.{a}.{b}")]);
                // zig brings its own linker and C library: no cross environment.
            } else {
                c.args(["--target", t]);
                c.envs(cross_env());
            }
            target_dir.join(t).join(DEVICE_PROFILE).join("sgps")
        }
    };
    tools::run(&mut c).with_context(|| format!("release build for board {} failed", board.name))?;
    if !bin.is_file() {
        bail!("build succeeded but {} is missing", bin.display());
    }
    log::info!("built {}", bin.display());
    Ok(bin)
}

/// The cargo target directory (honours `CARGO_TARGET_DIR`).
pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// qemu user-mode emulator command for a board: `[qemu, -cpu, CPU, -L, sysroot]`, with the
/// sysroot of [`emulated_sysroot`] (the cross C library plus the board CPU's `/proc/cpuinfo`).
pub fn qemu_command(root: &Path, board: &Board) -> Result<Vec<String>> {
    let qemu = tools::first_available(&["qemu-aarch64", "qemu-aarch64-static"]);
    let Some(qemu) = qemu else {
        tools::ensure(
            "test-arm",
            vec![Requirement {
                what: "qemu-aarch64 (user-mode emulation)".into(),
                install: "apt-get install qemu-user-static".into(),
            }],
        )?;
        unreachable!("ensure fails on a non-empty list");
    };
    let sysroot = emulated_sysroot(root, &board.qemu_cpu)?;
    Ok(vec![
        qemu.to_string_lossy().into_owned(),
        "-cpu".into(),
        board.qemu_cpu.clone(),
        "-L".into(),
        sysroot.to_string_lossy().into_owned(),
    ])
}

/// `/proc/cpuinfo` fields of the emulated CPUs: (qemu `-cpu` name, `CPU part`, `CPU variant`,
/// `Features`), as the kernel reports them on the real cores (Raspberry Pi 4: Cortex-A72, Pi 5:
/// Cortex-A76).
const CPUINFO: &[(&str, &str, &str, &str)] = &[
    ("cortex-a53", "0xd03", "0x0", "fp asimd evtstrm crc32 cpuid"),
    (
        "cortex-a55",
        "0xd05",
        "0x1",
        "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp",
    ),
    ("cortex-a72", "0xd08", "0x0", "fp asimd evtstrm crc32 cpuid"),
    (
        "cortex-a76",
        "0xd0b",
        "0x4",
        "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp",
    ),
];

/// What `/proc/cpuinfo` says on a board with `cpu` (qemu's `-cpu` name).
pub fn cpuinfo(cpu: &str) -> Result<String> {
    let Some((_, part, variant, features)) = CPUINFO.iter().find(|(c, ..)| *c == cpu) else {
        bail!(
            "no /proc/cpuinfo description for qemu cpu `{cpu}` (known: {}); add one to CPUINFO in xtask/src/build.rs",
            CPUINFO.iter().map(|c| c.0).collect::<Vec<_>>().join(", ")
        );
    };
    Ok(format!(
        "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n\
         CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: 1\n\n"
    ))
}

/// The `-L` sysroot for emulating `cpu`: links to everything in the cross C library's sysroot,
/// plus `proc/cpuinfo` describing the board's core. qemu user mode looks every absolute path up
/// under `-L` first, and it does not emulate `/proc/cpuinfo` for aarch64 (the process would read
/// the host's), while tract chooses its kernels from that file (float16 arithmetic from
/// `asimdhp`, the core type from `CPU part`). Kept in `target/qemu-sysroot/<cpu>/`.
pub fn emulated_sysroot(root: &Path, cpu: &str) -> Result<PathBuf> {
    let info = cpuinfo(cpu)?;
    let dir = target_dir(root).join("qemu-sysroot").join(cpu);
    fs::create_dir_all(dir.join("proc"))?;
    for e in fs::read_dir(CROSS_SYSROOT)
        .with_context(|| format!("cannot read the cross sysroot {CROSS_SYSROOT}"))?
    {
        let e = e?;
        let link = dir.join(e.file_name());
        if e.file_name() == "proc" || link.symlink_metadata().is_ok() {
            continue;
        }
        std::os::unix::fs::symlink(e.path(), &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }
    let path = dir.join("proc/cpuinfo");
    if fs::read_to_string(&path).ok().as_deref() != Some(info.as_str()) {
        fs::write(&path, info).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(dir)
}

/// Builds the `sgps` test suite for aarch64 (release profile, sharing the compiled dependencies
/// with `dist`) and runs it under qemu with the board's CPU. `tests` selects integration test
/// targets (`--test NAME`); `args` go to the test harness.
pub fn test_arm(
    root: &Path,
    board: &Board,
    tests: &[String],
    args: &[String],
    opts: &BuildOptions,
) -> Result<()> {
    let Some(target) = board.target.as_deref() else {
        bail!("board {} runs on the host; use `cargo test`", board.name);
    };
    let mut missing = cross_requirements(board);
    missing.extend(need_tool_any(
        &["qemu-aarch64", "qemu-aarch64-static"],
        "apt-get install qemu-user-static",
    ));
    tools::ensure("test-arm", missing)?;
    let runner = qemu_command(root, board)?.join(" ");
    let mut c = Command::new(tools::cargo());
    c.current_dir(root)
        .args(["test", "--release", "--package", "sgps", "--target", target])
        .envs(cross_env())
        .envs(emulated_test_env(target, &runner));
    if opts.no_camera {
        // the tests check every shipped model (ONNX), the MiniLM text encoder included
        c.args(["--no-default-features", "--features", "minilm,onnx"]);
    }
    for t in tests {
        c.args(["--test", t]);
    }
    if !args.is_empty() {
        c.arg("--").args(args);
    }
    tools::run(&mut c).with_context(|| format!("tests under qemu ({}) failed", board.qemu_cpu))
}

/// How much slower than native the tests run under qemu user-mode emulation: the integration
/// tests that spawn and kill processes stretch their timing windows by this factor.
const EMULATION_SLOWDOWN: u32 = 10;

/// The environment of `cargo test` under emulation: cargo runs the test binaries through
/// `runner`, and the tests run the executables they spawn themselves (`sgps`, or their own binary
/// in child mode) through it too (`SGPS_TEST_RUNNER`, see `tests/common/mod.rs`); an aarch64
/// executable cannot be exec'd directly on the host.
fn emulated_test_env(target: &str, runner: &str) -> Vec<(String, String)> {
    vec![
        (
            format!(
                "CARGO_TARGET_{}_RUNNER",
                target.replace('-', "_").to_uppercase()
            ),
            runner.to_string(),
        ),
        ("SGPS_TEST_RUNNER".into(), runner.to_string()),
        ("SGPS_TEST_SLOWDOWN".into(), EMULATION_SLOWDOWN.to_string()),
    ]
}

/// qemu user-mode emulation for aarch64, if missing.
pub fn qemu_requirement() -> Option<Requirement> {
    need_tool_any(
        &["qemu-aarch64", "qemu-aarch64-static"],
        "apt-get install qemu-user-static",
    )
}

fn need_tool_any(names: &[&str], install: &str) -> Option<Requirement> {
    tools::first_available(names)
        .is_none()
        .then(|| Requirement {
            what: format!("`{}` (not found on PATH)", names.join("` or `")),
            install: install.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(name: &str) -> (PathBuf, String) {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .join(format!("board/{name}.toml"));
        let text = fs::read_to_string(&p).unwrap();
        (p, text)
    }

    #[test]
    fn board_builds_carry_only_the_features_their_models_need() {
        let cam = BuildOptions::default();
        let nocam = BuildOptions {
            no_camera: true,
            ..BuildOptions::default()
        };
        assert_eq!(device_features(&cam, true), ["v4l2", "minilm"]);
        assert_eq!(device_features(&cam, false), ["v4l2"]);
        assert!(device_features(&nocam, false).is_empty());
        // the measuring tools run the board binary on the repository's ONNX models
        assert_eq!(
            device_features(&BuildOptions::onnx_reader(), false),
            ["v4l2", "onnx"]
        );
        // the shipped models decide; an unreadable manifest keeps the tokenizer
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let m = sgps::manifest::Manifest::load(&root.join("models")).unwrap();
        assert_eq!(models_use_minilm(root), m.uses_minilm());
        assert!(models_use_minilm(Path::new("/nonexistent")));
    }

    #[test]
    fn profiles_give_target_cpu_and_variants() {
        let (p, text) = shipped("rpi5");
        let b = Board::from_toml("rpi5", &p, &text).unwrap();
        assert_eq!(b.target.as_deref(), Some(AARCH64));
        assert_eq!(b.qemu_cpu, "cortex-a76");
        assert!(!b.needs_zigbuild());
        assert_eq!(b.deb_arch(), "arm64");
        let int8 = crate::dist::set_top_level_key(&text, "image_variant", "int8");
        let b = Board::from_toml("rpi5", &p, &int8).unwrap();
        assert_eq!(b.image_variant.as_deref(), Some("int8"));

        let (p, text) = shipped("sim");
        let sim = Board::from_toml("sim", &p, &text).unwrap();
        assert!(sim.target.is_none());

        let (p, text) = shipped("rpi4");
        assert_eq!(
            Board::from_toml("rpi4", &p, &text).unwrap().qemu_cpu,
            "cortex-a72"
        );
    }

    #[test]
    fn xtask_rejects_what_the_runtime_rejects() {
        // a key the runtime does not know (variants are top-level keys), named in the error
        let (p, text) = shipped("rpi5");
        let nested = format!("{text}\n[models]\nimage_variant = \"int8\"\n");
        let e = Board::from_toml("rpi5", &p, &nested)
            .unwrap_err()
            .to_string();
        assert!(e.contains("models") && e.contains("rpi5.toml"), "{e}");
        let e = Board::from_toml("rpi5", &p, "name = \"rpi5\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field"), "{e}");
    }

    #[test]
    fn emulated_tests_spawn_children_through_the_runner() {
        let runner = "/usr/bin/qemu-aarch64-static -cpu cortex-a76 -L /usr/aarch64-linux-gnu";
        let env: std::collections::HashMap<_, _> =
            emulated_test_env(AARCH64, runner).into_iter().collect();
        assert_eq!(env["CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER"], runner);
        assert_eq!(env["SGPS_TEST_RUNNER"], runner);
        assert!(env["SGPS_TEST_SLOWDOWN"].parse::<u32>().unwrap() > 1);
    }

    #[test]
    fn old_glibc_boards_go_through_zigbuild() {
        let (p, text) = shipped("jetson-orin-nano");
        let j = Board::from_toml("jetson-orin-nano", &p, &text).unwrap();
        assert_eq!(j.glibc, Some((2, 31)));
        assert!(j.needs_zigbuild());
        let newer = crate::dist::set_top_level_key(&text, "glibc", "2.39");
        let j = Board::from_toml("jetson-orin-nano", &p, &newer).unwrap();
        assert!(!j.needs_zigbuild());
        let (p, text) = shipped("rpi5");
        let bad = crate::dist::set_top_level_key(&text, "glibc", "two");
        let e = Board::from_toml("rpi5", &p, &bad).unwrap_err().to_string();
        assert!(e.contains("MAJOR.MINOR"), "{e}");
    }

    #[test]
    fn unknown_board_names_the_available_ones() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("board")).unwrap();
        fs::write(dir.path().join("board/rpi5.toml"), "").unwrap();
        let err = Board::load(dir.path(), "rpi9").unwrap_err().to_string();
        assert!(err.contains("rpi9") && err.contains("rpi5"), "{err}");
    }
}
