//! `cargo xtask …`: developer and deployment tooling for sgps (cross-build, ARM tests under qemu,
//! signed release bundles, deploy over SSH, card images, flashing, training and benchmarks).

mod armcount;
mod bench;
mod build;
mod deploy;
mod dist;
mod drivers;
#[cfg(test)]
mod e2e_tests;
mod flash;
mod image;
mod sign;
mod soak;
mod tools;
mod train;

use anyhow::{Context, Result, bail};
use build::{Board, BuildOptions};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "sgps build, release and deployment tooling"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Release build of `sgps` for a board's target (aarch64 for rpi4/rpi5/jetson, host for sim).
    Build {
        #[arg(long)]
        board: String,
        /// Build without the V4L2 camera.
        #[arg(long)]
        no_camera: bool,
    },
    /// Build the sgps tests for aarch64 and run them under qemu with the board's CPU.
    TestArm {
        /// rpi4 (Cortex-A72) or rpi5 (Cortex-A76).
        #[arg(long, default_value = "rpi5")]
        board: String,
        /// Only these integration test targets (e.g. `--test parity`); default: all.
        #[arg(long = "test")]
        tests: Vec<String>,
        #[arg(long)]
        no_camera: bool,
        /// Arguments for the test harness (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the board's release binary under qemu (e.g. `-- --version`).
    Qemu {
        #[arg(long, default_value = "rpi5")]
        board: String,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Signed release bundle (directory, .tar.gz and .deb) in target/dist/.
    Dist {
        #[arg(long)]
        board: String,
        /// Secret signing key (default: ~/.config/sgps/release.key.pem or $SGPS_SIGNING_KEY).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Bundle version (default: workspace version + git commit).
        #[arg(long)]
        version: Option<String>,
        /// Use this binary instead of building one.
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Ship this image-encoder variant instead of the profile's (the shipped profile copy is
        /// changed to match).
        #[arg(long)]
        image_variant: Option<String>,
        #[arg(long)]
        no_deb: bool,
        #[arg(long)]
        no_camera: bool,
        /// Output directory (default target/dist).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write the models a board's bundle carries into a directory: the board's variants, translated
    /// to NNEF (what the board binary, built without the ONNX reader, loads), with their manifest.
    BoardModels {
        #[arg(long, default_value = "sim")]
        board: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate the ed25519 release signing key pair.
    Keygen {
        /// Secret key path (written with mode 0600).
        #[arg(long)]
        secret: Option<PathBuf>,
        /// Public key path (shipped in every bundle; default next to the secret).
        #[arg(long)]
        public: Option<PathBuf>,
        /// Replace an existing key.
        #[arg(long)]
        force: bool,
    },
    /// Verify a bundle directory or .tar.gz (signature, checksums, no extra files).
    Verify {
        bundle: PathBuf,
        /// Public key to trust (default: ~/.config/sgps/release.pub.pem).
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Copy a bundle to a board over SSH, install, restart, health-check, roll back on failure.
    Deploy {
        #[arg(long)]
        board: String,
        /// user@address of the board.
        #[arg(long, required_unless_present = "root")]
        host: Option<String>,
        #[arg(long)]
        port: Option<u16>,
        /// Deploy into a local directory root instead (staging, tests).
        #[arg(long, conflicts_with = "host")]
        root: Option<PathBuf>,
        /// Print every command instead of running it.
        #[arg(long)]
        dry_run: bool,
        /// Deploy this bundle .tar.gz instead of building one.
        #[arg(long)]
        bundle: Option<PathBuf>,
        #[arg(long)]
        key: Option<PathBuf>,
        /// Seconds between restart and health check.
        #[arg(long, default_value_t = 5)]
        settle: u64,
    },
    /// Bake the board's bundle into a copy of a Raspberry Pi OS image.
    Image {
        #[arg(long)]
        board: String,
        /// The OS image to start from (not modified).
        #[arg(long)]
        base: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Use this bundle .tar.gz instead of building one.
        #[arg(long)]
        bundle: Option<PathBuf>,
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Write a card image to a removable disk and verify it.
    Flash {
        #[arg(long)]
        image: PathBuf,
        /// Whole disk, e.g. /dev/sdX or /dev/mmcblk0.
        #[arg(long)]
        device: PathBuf,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// List every tool this machine lacks for building, testing and flashing, with install commands.
    Doctor {
        #[arg(long, default_value = "rpi5")]
        board: String,
    },
    /// Run the training recipe (creates models/train/.venv on first use).
    Train {
        /// Image collection (default $SGPS_DATA or ../shared/data).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Where the models go (default models/).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        quick: bool,
        /// More arguments for run.py (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Guest instructions per inference of every model variant on each ARM board's CPU (qemu
    /// user mode with a counting plugin), and each board's fewest-instruction default.
    ArmCount(armcount::ArmCountArgs),
    /// Release build for the host, then `sgps bench` (arguments after `--`).
    Bench {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Long run of the sim device loop: memory, time per decision and storage, sampled.
    Soak(soak::SoakArgs),
    /// The camera code against the kernel's virtual V4L2 camera (vivid) in a qemu VM.
    Drivers(drivers::DriversArgs),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp(None)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = tools::workspace_root();
    match cli.cmd {
        Cmd::Build { board, no_camera } => {
            let b = Board::load(&root, &board)?;
            let bin = build::build(
                &root,
                &b,
                &BuildOptions {
                    no_camera,
                    ..BuildOptions::default()
                },
            )?;
            println!("{}", bin.display());
        }
        Cmd::ArmCount(a) => armcount::arm_count(&root, &a)?,
        Cmd::BoardModels { board, out } => {
            let b = Board::load(&root, &board)?;
            dist::board_models(&root.join("models"), &out, &b, true)?;
            println!("{}", out.display());
        }
        Cmd::TestArm {
            board,
            tests,
            no_camera,
            args,
        } => {
            let b = Board::load(&root, &board)?;
            build::test_arm(
                &root,
                &b,
                &tests,
                &args,
                &BuildOptions {
                    no_camera,
                    ..BuildOptions::default()
                },
            )?;
        }
        Cmd::Qemu { board, args } => {
            let b = Board::load(&root, &board)?;
            let bin = build::build(&root, &b, &BuildOptions::onnx_reader())?;
            let q = build::qemu_command(&root, &b)?;
            let status = std::process::Command::new(&q[0])
                .args(&q[1..])
                .arg(bin)
                .args(args)
                .status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::Dist {
            board,
            key,
            version,
            binary,
            image_variant,
            no_deb,
            no_camera,
            out,
        } => {
            let mut b = Board::load(&root, &board)?;
            if image_variant.is_some() {
                b.image_variant = image_variant;
            }
            let o = dist_for(&root, &b, key, version, binary, !no_deb, no_camera, out)?;
            println!("bundle:  {}", o.dir.display());
            println!("tarball: {}", o.tarball.display());
            if let Some(d) = o.deb {
                println!("deb:     {}", d.display());
            }
        }
        Cmd::Keygen {
            secret,
            public,
            force,
        } => {
            let secret = secret.unwrap_or_else(sign::default_secret_path);
            let public = public.unwrap_or_else(|| sign::public_path_for(&secret));
            sign::keygen(&secret, &public, force)?;
            println!(
                "secret key (keep private, back it up): {}",
                secret.display()
            );
            println!(
                "public key (shipped in bundles):       {}",
                public.display()
            );
        }
        Cmd::Verify { bundle, key } => {
            let work = tempfile::tempdir()?;
            let dir = if bundle.is_dir() {
                bundle.clone()
            } else {
                dist::unpack_tarball(&bundle, work.path())?
            };
            let key = key.unwrap_or_else(|| sign::public_path_for(&sign::default_secret_path()));
            sign::verify_dir(&dir, &sign::load_public(&key)?)?;
            println!("{}: signature and checksums OK", bundle.display());
        }
        Cmd::Deploy {
            board,
            host,
            port,
            root: target_root,
            dry_run,
            bundle,
            key,
            settle,
        } => {
            let b = Board::load(&root, &board)?;
            let tarball = match bundle {
                Some(t) => t,
                None if dry_run => {
                    let name = dist::bundle_name(&tools::release_version(), &b.name);
                    println!("cargo xtask dist --board {}", b.name);
                    build::target_dir(&root).join(format!("dist/{name}.tar.gz"))
                }
                None => dist_for(&root, &b, key, None, None, false, false, None)?.tarball,
            };
            let plan = deploy::DeployPlan {
                tarball,
                settle_secs: settle,
            };
            if let Some(r) = target_root {
                std::fs::create_dir_all(&r)?;
                let r = std::fs::canonicalize(&r)?;
                if dry_run {
                    bail!("--dry-run is for SSH targets; a --root target is already a local copy");
                }
                deploy::deploy(&mut deploy::LocalExecutor { root: r }, &plan)?;
            } else {
                let host = host.context("--host user@addr is required")?;
                deploy::deploy(&mut deploy::SshExecutor::new(&host, port, dry_run), &plan)?;
            }
        }
        Cmd::Image {
            board,
            base,
            out,
            bundle,
            key,
        } => {
            tools::ensure("image", image::requirements())?;
            let b = Board::load(&root, &board)?;
            let tarball = match bundle {
                Some(t) => t,
                None => dist_for(&root, &b, key, None, None, false, false, None)?.tarball,
            };
            let trusted = sign::public_path_for(&sign::default_secret_path());
            let version = image::bake(&image::ImageInputs {
                base: &base,
                out: &out,
                tarball: &tarball,
                trusted_key: trusted.is_file().then_some(trusted.as_path()),
            })?;
            println!(
                "{}: sgps {version} installed, sgps.service enabled",
                out.display()
            );
        }
        Cmd::Flash { image, device, yes } => {
            let info = flash::SysInfo::default();
            let name = flash::block_name(&device)?;
            let len = std::fs::metadata(&image)
                .with_context(|| format!("cannot read {}", image.display()))?
                .len();
            let size = flash::check_target(&info, &name, len)?;
            if !yes && !confirm(&image, &device, size)? {
                bail!("not confirmed; nothing written");
            }
            if let Err(e) = std::fs::OpenOptions::new().write(true).open(&device)
                && e.kind() == std::io::ErrorKind::PermissionDenied
                && tools::which("sudo").is_some()
            {
                // Writing a disk needs root: re-run just this step through sudo.
                println!(
                    "{} needs root; running the write through sudo",
                    device.display()
                );
                let me = std::env::current_exe()?;
                let st = std::process::Command::new("sudo")
                    .arg(me)
                    .args(["flash", "--yes", "--image"])
                    .arg(std::fs::canonicalize(&image)?)
                    .arg("--device")
                    .arg(&device)
                    .status()?;
                std::process::exit(st.code().unwrap_or(1));
            }
            let sha = flash::flash(&info, &image, &device)?;
            println!(
                "{} written to {} and verified (sha256 {sha})",
                image.display(),
                device.display()
            );
        }
        Cmd::Train {
            data,
            out,
            quick,
            args,
        } => {
            let data = data
                .or_else(|| std::env::var_os("SGPS_DATA").map(PathBuf::from))
                .unwrap_or_else(|| root.join("../shared/data"));
            train::train(
                &root,
                &train::TrainArgs {
                    data,
                    out: out.unwrap_or_else(|| root.join("models")),
                    quick,
                    extra: args,
                },
            )?;
        }
        Cmd::Bench { args } => bench::bench(&root, &args)?,
        Cmd::Soak(args) => soak::soak(&root, &args)?,
        Cmd::Drivers(args) => drivers::drivers(&root, &args)?,
        Cmd::Doctor { board } => doctor(&root, &board)?,
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn dist_for(
    root: &Path,
    board: &Board,
    key: Option<PathBuf>,
    version: Option<String>,
    binary: Option<PathBuf>,
    deb: bool,
    no_camera: bool,
    out: Option<PathBuf>,
) -> Result<dist::DistOutput> {
    // Check the key before spending minutes on a build.
    let key = sign::load_secret(&key.unwrap_or_else(sign::default_secret_path))?;
    let binary = match binary {
        Some(b) => b,
        None => build::build(
            root,
            board,
            &BuildOptions {
                no_camera,
                ..BuildOptions::default()
            },
        )?,
    };
    let out = out.unwrap_or_else(|| build::target_dir(root).join("dist"));
    std::fs::create_dir_all(&out)?;
    dist::make_bundle(&dist::DistInputs {
        board,
        binary: &binary,
        models_dir: &root.join("models"),
        unit: &root.join("board/sgps.service"),
        version: &version.unwrap_or_else(tools::release_version),
        key: &key,
        out_dir: &out,
        deb,
        nnef: true,
    })
}

fn doctor(root: &Path, board: &str) -> Result<()> {
    let b = Board::load(root, board)?;
    let mut missing = build::cross_requirements(&b);
    missing.extend(build::qemu_requirement());
    missing.extend(armcount::requirements());
    missing.extend(image::requirements());
    for (tool, pkg) in [
        ("openssl", "openssl"),
        ("dpkg-deb", "dpkg"),
        ("mkfs.vfat", "dosfstools"),
        ("mkfs.ext4", "e2fsprogs"),
        ("xz", "xz-utils"),
        ("ssh", "openssh-client"),
        ("python3", "python3 python3-venv"),
    ] {
        missing.extend(tools::need_tool(tool, &format!("apt-get install {pkg}")));
    }
    let mut seen = std::collections::BTreeSet::new();
    missing.retain(|r| seen.insert(r.what.clone()));
    if missing.is_empty() {
        println!("everything needed for board {board} is installed");
        return Ok(());
    }
    let apt: std::collections::BTreeSet<&str> = missing
        .iter()
        .filter_map(|r| r.install.strip_prefix("apt-get install "))
        .flat_map(|p| p.split_whitespace())
        .collect();
    for r in &missing {
        println!("missing: {}\n    {}", r.what, r.install);
    }
    if !apt.is_empty() {
        println!(
            "\nall apt packages at once:\n    apt-get install -y {}",
            apt.into_iter().collect::<Vec<_>>().join(" ")
        );
    }
    bail!("{} requirement(s) missing", missing.len())
}

fn confirm(image: &Path, device: &Path, size: u64) -> Result<bool> {
    use std::io::Write;
    print!(
        "Write {} to {} ({:.1} GB)? Everything on it is lost. Type 'yes': ",
        image.display(),
        device.display(),
        size as f64 / 1e9
    );
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim() == "yes")
}
