//! `sgps audit`: verify the hash chain, export the log.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use clap::Subcommand;

/// Arguments of `sgps audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify every record and the chain; exit status 0 when intact, 1 when not.
    Verify {
        /// The device's storage directory (storage_dir of its board profile) or its audit.log.
        #[arg(value_name = "PATH", required_unless_present = "board")]
        path: Option<PathBuf>,
        /// Take the storage directory from this board profile instead.
        #[arg(long, value_name = "FILE", conflicts_with = "path")]
        board: Option<PathBuf>,
        /// A head hash printed by an earlier check: fail unless that record is still in the log
        /// (shows records removed from the end, which the chain alone cannot).
        #[arg(long, value_name = "SHA256")]
        expect_head: Option<String>,
    },
    /// Copy the whole log (every segment and audit.log) to a directory, e.g. a USB stick, with
    /// an index of SHA-256 sums; the copied segments may then be deleted by the device when the
    /// log reaches its size limit (never before).
    Export {
        /// The device's storage directory (storage_dir of its board profile).
        #[arg(value_name = "DIR", required_unless_present = "board")]
        path: Option<PathBuf>,
        /// Take the storage directory from this board profile instead.
        #[arg(long, value_name = "FILE", conflicts_with = "path")]
        board: Option<PathBuf>,
        /// Where the copies go.
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
    },
}

/// The storage directory (or log file) named by `path` or by the board profile `board`.
pub(super) fn audit_target(
    path: &Option<PathBuf>,
    board: &Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    Ok(match (path, board) {
        (Some(p), _) => p.clone(),
        (None, Some(b)) => sgps::board::BoardProfile::load(b)?.storage_dir,
        (None, None) => anyhow::bail!("give the storage directory, the audit.log or --board FILE"),
    })
}

/// `sgps audit verify`.
pub fn audit(a: &AuditArgs) -> anyhow::Result<ExitCode> {
    let (path, board, expect_head) = match &a.command {
        AuditCommand::Verify {
            path,
            board,
            expect_head,
        } => (path, board, expect_head),
        AuditCommand::Export { path, board, to } => {
            let dir = audit_target(path, board)?;
            if !dir.is_dir() {
                anyhow::bail!(
                    "{} is not a storage directory: give the device's storage_dir (or --board FILE)",
                    dir.display()
                );
            }
            let x = sgps::store::audit::export(&dir, to)?;
            for (f, sha) in &x.files {
                println!("{sha}  {}", f.display());
            }
            println!(
                "exported {} records in {} files to {}; index {}; {}",
                x.verification.records,
                x.files.len(),
                to.display(),
                x.index.display(),
                if x.verification.is_intact() {
                    "the log is intact"
                } else {
                    "the log is NOT intact: run sgps audit verify"
                }
            );
            return Ok(if x.verification.is_intact() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
    };
    let expect = match expect_head {
        None => None,
        Some(h) => Some(
            hex::decode(h.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    anyhow::anyhow!("--expect-head {h:?}: expected 64 hex digits (a SHA-256)")
                })?,
        ),
    };
    let target = audit_target(path, board)?;
    let v = sgps::store::audit::verify(&target, expect)?;
    let rep = &v.report;
    let time = |ms: u64| {
        jiff::Timestamp::from_millisecond(ms as i64)
            .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_else(|_| format!("{ms} ms"))
    };
    println!(
        "audit log {} ({} file{})",
        v.path.display(),
        rep.files.len(),
        if rep.files.len() == 1 { "" } else { "s" }
    );
    match (v.first, v.last) {
        (Some((s0, t0)), Some((s1, t1))) => println!(
            "  {} records, #{s0} ({}) .. #{s1} ({})",
            v.records,
            time(t0),
            time(t1)
        ),
        _ => println!("  no records"),
    }
    for (what, n) in v.counts.iter().filter(|(_, n)| *n > 0) {
        println!("  {n:>8}  {what}");
    }
    let (mut damaged, mut breaks) = (0, 0);
    for (file, r) in &rep.files {
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        if r.unchained > 0 {
            println!(
                "  {name}: {} records of format 1 were written before the hash chain: their checksums are checked, their order is not",
                r.unchained
            );
        }
        if r.torn_tail_bytes > 0 {
            println!(
                "  {name}: torn last append, {} bytes after byte {} (power lost while writing; never acknowledged; the device cuts it at its next start)",
                r.torn_tail_bytes, r.valid_len
            );
        }
        for d in &r.damaged {
            println!(
                "  {name}: DAMAGED record at byte {}: {}",
                d.offset, d.reason
            );
        }
        for b in &r.chain_breaks {
            println!(
                "  {name}: CHAIN BROKEN at record #{} (byte {}): {}",
                b.seq, b.offset, b.reason
            );
        }
        damaged += r.damaged.len();
        breaks += r.chain_breaks.len();
    }
    for b in &rep.links {
        println!("  CHAIN BROKEN at record #{}: {}", b.seq, b.reason);
    }
    if let Some(t) = &v.thumbnails {
        println!(
            "  thumbnails: {} as recorded, {} not checkable (stored before the log recorded thumbnails, or of captures no longer in the log), {} recorded but no longer kept",
            t.matching, t.unchecked, t.missing
        );
        for (capture, why) in &t.altered {
            println!("  THUMBNAIL NOT AS RECORDED for capture {capture}: {why}");
        }
        for (capture, why) in &t.damaged {
            println!(
                "  thumbnail of capture {capture} damaged ({why}): not shown; the decision is unaffected"
            );
        }
        for name in &t.strays {
            println!(
                "  thumbs/{name}: not a thumbnail name (left over from an interrupted write?)"
            );
        }
    }
    match v.anchor {
        Some(Some(seq)) => {
            println!("  the expected head is record #{seq}: nothing before it was removed")
        }
        Some(None) => println!(
            "  EXPECTED HEAD NOT FOUND: no record has that hash (records were removed from the end, or this is another log)"
        ),
        None => {}
    }
    if v.is_intact() {
        println!(
            "  intact: every record checks and links to the one before it; head sha256 {}",
            hex::encode(rep.head_sha256().unwrap_or([0; 32]))
        );
        println!(
            "  (note the head hash elsewhere: a later `sgps audit verify --expect-head <hash>` also shows records removed from the end)"
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "  NOT INTACT: {} damaged, {} chain breaks{}{}. Keep this file as it is (copy it off the device) and report it; the device keeps working and appends after the damage",
            damaged,
            breaks + rep.links.len(),
            if matches!(v.anchor, Some(None)) {
                ", expected head missing"
            } else {
                ""
            },
            match v.thumbnails.as_ref().map_or(0, |t| t.altered.len()) {
                0 => String::new(),
                n => format!(", {n} thumbnails not as recorded"),
            }
        );
        Ok(ExitCode::from(1))
    }
}
