//! Shared helpers: locating the workspace, checking that external tools exist (and saying how to
//! install them when they do not), and running commands with logging.

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Root of the workspace (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or(manifest_dir)
}

/// `cargo` to use for nested builds (the one that runs us, if known).
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

/// Finds an executable on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
        .or_else(|| {
            // sbin directories are often missing from a normal user's PATH.
            ["/usr/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| is_executable(p))
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A requirement on the host machine, with the command that satisfies it.
#[derive(Debug, Clone)]
pub struct Requirement {
    pub what: String,
    pub install: String,
}

/// A tool that must be on `PATH`, installed by `install` (e.g. an apt command).
pub fn need_tool(name: &str, install: &str) -> Option<Requirement> {
    which(name).is_none().then(|| Requirement {
        what: format!("`{name}` (not found on PATH)"),
        install: install.to_string(),
    })
}

/// Fails with one message listing everything missing and how to install it.
pub fn ensure(task: &str, missing: Vec<Requirement>) -> Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    let mut msg = format!("`cargo xtask {task}` needs tools that are missing on this machine:\n");
    for r in &missing {
        msg.push_str(&format!("  - {}\n      install: {}\n", r.what, r.install));
    }
    msg.push_str("Install them and run the command again.");
    bail!(msg)
}

/// First available name among `names` (e.g. `qemu-aarch64` / `qemu-aarch64-static`).
pub fn first_available(names: &[&str]) -> Option<PathBuf> {
    names.iter().find_map(|n| which(n))
}

/// Renders a command line for logs and `--dry-run` output.
pub fn render(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            s.push_str(&format!(
                "{}={} ",
                k.to_string_lossy(),
                shell_quote(&v.to_string_lossy())
            ));
        }
    }
    s.push_str(&shell_quote(&cmd.get_program().to_string_lossy()));
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&shell_quote(&a.to_string_lossy()));
    }
    s
}

/// Quotes a word for POSIX sh if needed.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@+,%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Runs a command, inheriting stdio; fails with the rendered command line on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = render(cmd);
    log::info!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("command failed ({status}): {line}");
    }
    Ok(())
}

/// Runs a command and returns its stdout; stderr is included in the error on failure.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = render(cmd);
    log::debug!("$ {line}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "command failed ({}): {line}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Version string for bundles: the workspace version plus the git commit (and `-dirty`).
pub fn release_version() -> String {
    let base = env!("CARGO_PKG_VERSION").to_string();
    let root = workspace_root();
    let rev = Command::new("git")
        .args(["rev-parse", "--short=10", "HEAD"])
        .current_dir(&root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match rev {
        Some(rev) if !rev.is_empty() => {
            let dirty = Command::new("git")
                .args(["status", "--porcelain", "--untracked-files=no"])
                .current_dir(&root)
                .output()
                .map(|o| !o.stdout.is_empty())
                .unwrap_or(false);
            format!("{base}-g{rev}{}", if dirty { "-dirty" } else { "" })
        }
        _ => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_is_sh_safe() {
        assert_eq!(shell_quote("abc/def-1.2"), "abc/def-1.2");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn ensure_lists_every_missing_tool_with_install_command() {
        let err = ensure(
            "image",
            vec![
                Requirement {
                    what: "`mcopy`".into(),
                    install: "apt-get install mtools".into(),
                },
                Requirement {
                    what: "`debugfs`".into(),
                    install: "apt-get install e2fsprogs".into(),
                },
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("mcopy") && err.contains("apt-get install mtools"));
        assert!(err.contains("debugfs") && err.contains("apt-get install e2fsprogs"));
        assert!(ensure("image", vec![]).is_ok());
    }
}
