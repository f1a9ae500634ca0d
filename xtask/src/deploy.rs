//! Deploy a signed bundle to a board: upload, verify + install (the bundle's own `install.sh`),
//! enable and restart the unit, health-check, and roll back to the previous install when the new
//! one does not come up. The target is reached through an [`Executor`]: SSH for boards, a local
//! directory root for tests and staging (`--root`).

use crate::tools::{self, shell_quote};
use anyhow::{Context, Result, bail};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where uploads are staged on the target.
pub const STAGING: &str = "/tmp/sgps-deploy";

/// Runs commands on a deploy target.
pub trait Executor {
    /// Copies a local file to the absolute path `remote` on the target (its directory exists).
    fn upload(&mut self, local: &Path, remote: &str) -> Result<()>;
    /// Runs a POSIX sh script on the target. `Ok(true)` = exit 0, `Ok(false)` = non-zero exit;
    /// `Err` only when the command could not be run at all. In scripts, `$SGPS_ROOT` is the root
    /// of the target's filesystem ("" on a real board).
    fn sh(&mut self, script: &str, privileged: bool) -> Result<bool>;
    /// Pause between restarting the unit and checking its health.
    fn settle(&mut self, secs: u64);
    /// True when commands are only printed.
    fn dry_run(&self) -> bool {
        false
    }
}

/// A board reached over SSH (`user@addr`); `dry_run` only prints the commands.
pub struct SshExecutor {
    pub host: String,
    pub port: Option<u16>,
    /// Prefix privileged commands with `sudo` (not needed when logging in as root).
    pub sudo: bool,
    pub dry_run: bool,
}

impl SshExecutor {
    pub fn new(host: &str, port: Option<u16>, dry_run: bool) -> SshExecutor {
        let sudo = !host.starts_with("root@");
        SshExecutor {
            host: host.to_string(),
            port,
            sudo,
            dry_run,
        }
    }

    fn exec(&self, mut c: Command) -> Result<bool> {
        if self.dry_run {
            println!("{}", tools::render(&c));
            return Ok(true);
        }
        log::info!("$ {}", tools::render(&c));
        let st = c.status().with_context(|| {
            format!(
                "cannot run `{}` (is openssh-client installed?)",
                tools::render(&c)
            )
        })?;
        if st.code() == Some(255) {
            bail!(
                "ssh to {} failed (exit 255): check the address, that the board is up, and that \
                 key-based login works (`ssh-copy-id {}`)",
                self.host,
                self.host
            );
        }
        Ok(st.success())
    }
}

impl Executor for SshExecutor {
    fn upload(&mut self, local: &Path, remote: &str) -> Result<()> {
        let mut c = Command::new("scp");
        c.arg("-q").args(["-o", "BatchMode=yes"]);
        if let Some(p) = self.port {
            c.args(["-P", &p.to_string()]);
        }
        c.arg(local).arg(format!("{}:{remote}", self.host));
        if !self.exec(c)? {
            bail!(
                "scp of {} to {}:{remote} failed",
                local.display(),
                self.host
            );
        }
        Ok(())
    }

    fn sh(&mut self, script: &str, privileged: bool) -> Result<bool> {
        let mut c = Command::new("ssh");
        c.args(["-o", "BatchMode=yes"]);
        if let Some(p) = self.port {
            c.args(["-p", &p.to_string()]);
        }
        let sudo = if privileged && self.sudo { "sudo " } else { "" };
        c.arg(&self.host)
            .arg(format!("{sudo}sh -c {}", shell_quote(script)));
        self.exec(c)
    }

    fn dry_run(&self) -> bool {
        self.dry_run
    }

    fn settle(&mut self, secs: u64) {
        if self.dry_run {
            println!("sleep {secs}");
        } else {
            std::thread::sleep(std::time::Duration::from_secs(secs));
        }
    }
}

/// A target that is a directory on this machine (`--root DIR`): remote paths live under `root`,
/// scripts run locally with `SGPS_ROOT=root`, and systemd is not touched.
pub struct LocalExecutor {
    pub root: PathBuf,
}

impl LocalExecutor {
    fn path(&self, remote: &str) -> PathBuf {
        self.root.join(remote.trim_start_matches('/'))
    }
}

impl Executor for LocalExecutor {
    fn upload(&mut self, local: &Path, remote: &str) -> Result<()> {
        let dst = self.path(remote);
        fs::copy(local, &dst)
            .with_context(|| format!("cannot copy {} to {}", local.display(), dst.display()))?;
        Ok(())
    }

    fn sh(&mut self, script: &str, _privileged: bool) -> Result<bool> {
        let st = Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("SGPS_ROOT", &self.root)
            .env("SGPS_NO_SYSTEMD", "1")
            .status()
            .context("cannot run sh")?;
        Ok(st.success())
    }

    fn settle(&mut self, _secs: u64) {}
}

/// What to deploy.
pub struct DeployPlan {
    /// The bundle `.tar.gz` from `dist`.
    pub tarball: PathBuf,
    /// Seconds to wait after a restart before the health check.
    pub settle_secs: u64,
}

/// Health check: the installed binary runs, and (on a real board) the unit is active and has
/// not restarted since.
pub const HEALTH_SCRIPT: &str = r#"set -e
R="${SGPS_ROOT:-}"
"$R/opt/sgps/current/bin/sgps" --version
if [ -z "$R" ] && command -v systemctl >/dev/null 2>&1; then
    systemctl is-active --quiet sgps.service || { systemctl status --no-pager sgps.service | tail -n 20; exit 1; }
    n=$(systemctl show -p NRestarts --value sgps.service 2>/dev/null || echo 0)
    [ "${n:-0}" = 0 ] || { echo "sgps.service restarted $n times"; exit 1; }
fi"#;

/// Deploys `plan.tarball`; on a failed health check rolls back and returns an error that says so.
pub fn deploy(exec: &mut dyn Executor, plan: &DeployPlan) -> Result<()> {
    let file = plan
        .tarball
        .file_name()
        .and_then(|n| n.to_str())
        .context("bundle path has no file name")?
        .to_string();
    let name = file
        .strip_suffix(".tar.gz")
        .with_context(|| format!("{file} is not a bundle .tar.gz from `cargo xtask dist`"))?
        .to_string();

    let prepare = format!(r#"R="${{SGPS_ROOT:-}}"; mkdir -p "$R{STAGING}""#);
    if !exec.sh(&prepare, false)? {
        bail!("cannot create {STAGING} on the target");
    }
    exec.upload(&plan.tarball, &format!("{STAGING}/{file}"))?;

    let unpack = format!(
        r#"set -e
R="${{SGPS_ROOT:-}}"
cd "$R{STAGING}"
rm -rf unpack && mkdir unpack
tar -xzf {file} -C unpack
test -f unpack/{name}/install.sh"#,
        file = shell_quote(&file),
        name = shell_quote(&name),
    );
    if !exec.sh(&unpack, false)? {
        bail!("unpacking {file} on the target failed");
    }
    // Verifies signature + checksums before touching the install, then installs and restarts.
    let install = format!(
        r#"sh "${{SGPS_ROOT:-}}{STAGING}/unpack/{name}/install.sh" install"#,
        name = name
    );
    if !exec.sh(&install, true)? {
        bail!(
            "installing {name} failed on the target (see the installer's message above); the \
             previous install was left in place"
        );
    }
    exec.settle(plan.settle_secs);
    if exec.sh(HEALTH_SCRIPT, true)? {
        if exec.dry_run() {
            println!("# dry run: nothing was changed on the target");
        } else {
            log::info!("{name} is installed and healthy");
        }
        let _ = exec.sh(&format!(r#"rm -rf "${{SGPS_ROOT:-}}{STAGING}""#), false);
        return Ok(());
    }
    log::error!("{name} failed its health check; rolling back");
    let rollback = r#"sh "${SGPS_ROOT:-}/opt/sgps/current/install.sh" rollback"#;
    if !exec.sh(rollback, true)? {
        bail!(
            "{name} failed its health check and there is no previous install to roll back to; \
             the board needs attention (`journalctl -u sgps`)"
        );
    }
    exec.settle(plan.settle_secs);
    let healthy = exec.sh(HEALTH_SCRIPT, true)?;
    bail!(
        "{name} failed its health check; rolled back to the previous install ({})",
        if healthy {
            "which is healthy"
        } else {
            "which is ALSO unhealthy: check `journalctl -u sgps`"
        }
    )
}
