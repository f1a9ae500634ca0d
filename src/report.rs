//! Session reports: the audit log of a storage directory as one self-contained HTML page
//! (thumbnails inline) and a CSV, with the SHA-256 of every capture and the chain head, for a
//! USB stick (`Export` on the screen) or a PC (`sgps report`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Serialize;

use crate::store::{self, AuditEvent, AuditRecord, StoreError};

/// Which records a report covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Since the device last started.
    Session,
    /// Since midnight UTC.
    Today,
    All,
}

impl Scope {
    pub fn parse(s: &str) -> Result<Scope, String> {
        match s {
            "session" => Ok(Scope::Session),
            "today" => Ok(Scope::Today),
            "all" => Ok(Scope::All),
            _ => Err(format!("scope {s:?}: use session, today or all")),
        }
    }
}

/// One row of the history / report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub seq: u64,
    pub time_unix_ms: u64,
    /// "decision", "rejected", "enrolled", "synthesized", "note", "rotated".
    pub kind: &'static str,
    pub capture_sha256: Option<String>,
    /// Top class (decision) or enrolled class.
    pub class: Option<String>,
    pub verdict: Option<&'static str>,
    pub confidence: Option<f32>,
    pub probabilities: Vec<f32>,
    /// Class names of the classifier of a decision, in the order of `probabilities`.
    pub classes: Vec<String>,
    pub classifier_id: Option<String>,
    /// Reason of a rejection, text of a note.
    pub detail: Option<String>,
    /// What the log recorded of the capture's thumbnail (checked when it is shown).
    #[serde(skip)]
    pub thumbnail: store::Recorded,
}

/// Turn audit records into rows (class names of decisions from the synthesis before them).
pub fn rows(records: &[AuditRecord]) -> Vec<Row> {
    let mut names: HashMap<String, Vec<String>> = HashMap::new();
    let thumbs = store::ThumbnailIndex::from_records(records);
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        let mut row = Row {
            seq: r.seq,
            time_unix_ms: r.time_unix_ms,
            kind: "note",
            capture_sha256: None,
            class: None,
            verdict: None,
            confidence: None,
            probabilities: Vec::new(),
            classes: Vec::new(),
            classifier_id: None,
            detail: None,
            thumbnail: store::Recorded::Unchecked,
        };
        match &r.event {
            AuditEvent::Decision {
                capture_sha256,
                classifier_id,
                probabilities,
                top,
                label,
                verdict,
            } => {
                row.kind = "decision";
                row.capture_sha256 = Some(hex::encode(capture_sha256));
                row.class = Some(label.clone());
                row.verdict = Some(verdict.as_str());
                row.confidence = probabilities.get(*top as usize).copied();
                row.probabilities = probabilities.clone();
                row.classes = names.get(classifier_id).cloned().unwrap_or_default();
                row.classifier_id = Some(classifier_id.clone());
            }
            AuditEvent::Rejected {
                capture_sha256,
                reason,
            } => {
                row.kind = "rejected";
                row.capture_sha256 = Some(hex::encode(capture_sha256));
                row.detail = Some(reason.clone());
            }
            AuditEvent::Enrolled {
                class,
                shot,
                capture_sha256,
            } => {
                row.kind = "enrolled";
                row.capture_sha256 = Some(hex::encode(capture_sha256));
                row.class = Some(class.clone());
                row.detail = Some(format!("shot {shot}"));
            }
            AuditEvent::Synthesized {
                classifier_id,
                classes,
                shots,
            } => {
                names.insert(classifier_id.clone(), classes.clone());
                row.kind = "synthesized";
                row.classifier_id = Some(classifier_id.clone());
                row.classes = classes.clone();
                row.detail = Some(format!("shots per class {shots:?}"));
            }
            AuditEvent::Note(t) => row.detail = Some(t.clone()),
            AuditEvent::Rotated { previous, .. } => {
                row.kind = "rotated";
                row.detail = Some(format!("continues {previous}"));
            }
            // bookkeeping for the capture's row, not a row of its own
            AuditEvent::Thumbnail { .. } => continue,
        }
        if let Some(capture) = r.event.capture() {
            row.thumbnail = thumbs.recorded(capture);
        }
        out.push(row);
    }
    out
}

/// Filter for the history screen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub verdict: Option<String>,
    pub class: Option<String>,
    /// "YYYY-MM-DD" (UTC).
    pub day: Option<String>,
    /// Only captures (decisions, rejections, enrollments).
    pub captures_only: bool,
}

impl Filter {
    pub fn keep(&self, r: &Row) -> bool {
        (!self.captures_only || r.capture_sha256.is_some())
            && self
                .verdict
                .as_deref()
                .is_none_or(|v| r.verdict == Some(v) || (v == r.kind))
            && self
                .class
                .as_deref()
                .is_none_or(|c| r.class.as_deref() == Some(c))
            && self.day.as_deref().is_none_or(|d| day(r.time_unix_ms) == d)
    }
}

/// UTC date of a time, "YYYY-MM-DD".
pub fn day(ms: u64) -> String {
    time(ms).get(..10).unwrap_or("").to_owned()
}

/// UTC time, RFC 3339 to the second.
pub fn time(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(ms as i64)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| format!("{ms} ms"))
}

/// Rows of a storage directory's whole log (every segment), oldest first, and the chain head.
pub fn read_rows(storage_dir: &Path) -> Result<(Vec<Row>, Option<[u8; 32]>), StoreError> {
    let (records, rep) = store::audit::read_all(storage_dir, |_, _| {})?;
    Ok((rows(&records), rep.head_sha256()))
}

/// [`read_rows`], scanning only what changed since the last call with the same `cache` (the
/// screen's history, on every request).
pub fn read_rows_cached(
    storage_dir: &Path,
    cache: &mut store::audit::SegmentCache,
) -> Result<(Vec<Row>, Option<[u8; 32]>), StoreError> {
    let (records, rep) = store::audit::read_all_cached(storage_dir, cache)?;
    Ok((rows(&records), rep.head_sha256()))
}

/// Rows in a scope: the last device start (a `start:` note) onwards, today, or all.
pub fn in_scope(rows: &[Row], scope: Scope, now_ms: u64) -> &[Row] {
    let from = match scope {
        Scope::All => 0,
        Scope::Session => rows
            .iter()
            .rposition(|r| {
                r.kind == "note" && r.detail.as_deref().is_some_and(|d| d.starts_with("start:"))
            })
            .unwrap_or(0),
        Scope::Today => {
            let today = day(now_ms);
            rows.iter()
                .position(|r| day(r.time_unix_ms) == today)
                .unwrap_or(rows.len())
        }
    };
    &rows[from..]
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// The CSV: one line per record.
pub fn csv(rows: &[Row]) -> String {
    let mut out = String::from(
        "seq,time_utc,event,capture_sha256,class,verdict,confidence,probabilities,classifier_id,detail\n",
    );
    for r in rows {
        let probs = r
            .classes
            .iter()
            .map(String::as_str)
            .chain(std::iter::repeat("?"))
            .zip(&r.probabilities)
            .map(|(c, p)| format!("{c}={p:.4}"))
            .collect::<Vec<_>>()
            .join(";");
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{}",
            r.seq,
            time(r.time_unix_ms),
            r.kind,
            r.capture_sha256.as_deref().unwrap_or(""),
            csv_field(r.class.as_deref().unwrap_or("")),
            r.verdict.unwrap_or(""),
            r.confidence.map(|c| format!("{c:.4}")).unwrap_or_default(),
            csv_field(&probs),
            r.classifier_id.as_deref().unwrap_or(""),
            csv_field(r.detail.as_deref().unwrap_or("")),
        );
    }
    out
}

/// Escape text for HTML.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// The HTML page: a header (board, scope, time range, counts, chain head) and one table row per
/// capture, with its thumbnail inline when the device still has it.
pub fn html(rows: &[Row], title: &str, head: Option<[u8; 32]>, storage_dir: &Path) -> String {
    let mut h = String::new();
    let decisions = rows.iter().filter(|r| r.kind == "decision").count();
    let referred = rows.iter().filter(|r| r.verdict == Some("refer")).count();
    let urgent = rows.iter().filter(|r| r.verdict == Some("urgent")).count();
    let _ = write!(
        h,
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>{t}</title><style>\
         body{{font:14px sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #999;padding:4px 8px;vertical-align:top}}\
         .refer{{background:#fff3cd}}.urgent{{background:#f8d7da}}code{{font-size:11px}}\
         </style></head><body><h1>{t}</h1><p>Records {first} to {last} ({from} to {to}); \
         {decisions} decisions, {referred} referred, {urgent} urgent. Audit chain head at export: \
         <code>{head}</code> (check the device with <code>sgps audit verify --expect-head</code>).</p>\
         <table><tr><th>#</th><th>time (UTC)</th><th>event</th><th>capture</th><th>result</th>\
         <th>capture SHA-256</th></tr>",
        t = esc(title),
        first = rows.first().map(|r| r.seq).unwrap_or(0),
        last = rows.last().map(|r| r.seq).unwrap_or(0),
        from = rows
            .first()
            .map(|r| time(r.time_unix_ms))
            .unwrap_or_default(),
        to = rows
            .last()
            .map(|r| time(r.time_unix_ms))
            .unwrap_or_default(),
        head = head.map(hex::encode).unwrap_or_else(|| "-".into()),
    );
    for r in rows {
        let thumb = r
            .capture_sha256
            .as_deref()
            .and_then(|s| {
                let mut sha = [0u8; 32];
                hex::decode_to_slice(s, &mut sha).ok()?;
                Some(store::read_thumbnail(storage_dir, &sha, r.thumbnail))
            })
            .map(|t| match t {
                store::StoredThumbnail::Intact(b) => format!(
                    "<img alt=capture width=96 src=\"data:image/jpeg;base64,{}\">",
                    base64::engine::general_purpose::STANDARD.encode(b)
                ),
                // a damaged thumbnail is never shown as the capture
                store::StoredThumbnail::Damaged(_) => "<em>thumbnail damaged</em>".to_string(),
                store::StoredThumbnail::Altered(_) => {
                    "<em>thumbnail not as recorded: not shown</em>".to_string()
                }
                store::StoredThumbnail::Missing => String::new(),
            })
            .unwrap_or_default();
        let result = match r.kind {
            "decision" => {
                let bars = r
                    .classes
                    .iter()
                    .zip(&r.probabilities)
                    .map(|(c, p)| format!("{}&nbsp;{:.0}%", esc(c), p * 100.0))
                    .collect::<Vec<_>>()
                    .join("<br>");
                format!(
                    "<b>{}</b> {} ({:.0}%)<br><small>{bars}</small>",
                    esc(r.verdict.unwrap_or("").to_uppercase().as_str()),
                    esc(r.class.as_deref().unwrap_or("")),
                    r.confidence.unwrap_or(0.0) * 100.0
                )
            }
            _ => format!(
                "{} {}",
                esc(r.class.as_deref().unwrap_or("")),
                esc(r.detail.as_deref().unwrap_or(""))
            ),
        };
        let _ = write!(
            h,
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{thumb}</td><td>{result}</td><td><code>{}</code></td></tr>",
            r.verdict.unwrap_or(""),
            r.seq,
            time(r.time_unix_ms),
            r.kind,
            r.capture_sha256.as_deref().unwrap_or("")
        );
    }
    h.push_str("</table></body></html>\n");
    h
}

/// Files a report wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Written {
    pub html: PathBuf,
    pub csv: PathBuf,
    pub records: usize,
}

/// Write the HTML and CSV report of `storage_dir` into `out_dir` (atomically, fsynced: a stick
/// pulled mid-write leaves no half file under the final name).
pub fn write(
    storage_dir: &Path,
    out_dir: &Path,
    scope: Scope,
    board: &str,
    now_ms: u64,
) -> Result<Written, String> {
    if !out_dir.is_dir() {
        return Err(format!(
            "{} is not there: insert the USB stick (or mount it there) and try again",
            out_dir.display()
        ));
    }
    let (all, head) = read_rows(storage_dir).map_err(|e| e.to_string())?;
    let rows = in_scope(&all, scope, now_ms);
    let stamp = time(now_ms).replace(':', "");
    let safe: String = board
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let base = format!("sgps-report-{safe}-{stamp}");
    let title = format!(
        "sgps session report — board {board}, {scope:?} as of {}",
        time(now_ms)
    );
    let html_path = out_dir.join(format!("{base}.html"));
    let csv_path = out_dir.join(format!("{base}.csv"));
    let put = |p: &Path, b: &[u8]| {
        crate::atomic_file::write(p, b).map_err(|e| {
            format!(
                "writing {}: {e}; check the stick (full or read-only?) and try again",
                p.display()
            )
        })
    };
    put(&csv_path, csv(rows).as_bytes())?;
    put(&html_path, html(rows, &title, head, storage_dir).as_bytes())?;
    Ok(Written {
        html: html_path,
        csv: csv_path,
        records: rows.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Verdict;

    fn rec(seq: u64, event: AuditEvent) -> AuditRecord {
        AuditRecord {
            seq,
            time_unix_ms: 1_764_806_400_000 + seq * 1000,
            prev_sha256: None,
            event,
        }
    }

    #[test]
    fn the_report_inlines_intact_thumbnails_and_never_a_damaged_one() {
        let d = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(d.path()).unwrap();
        let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 3]));
        let (good, bad) = ([1u8; 32], [2u8; 32]);
        store.save_thumbnail(&good, &img).unwrap();
        store.save_thumbnail(&bad, &img).unwrap();
        let p = store::thumbnail_path(d.path(), &bad);
        let mut b = std::fs::read(&p).unwrap();
        b[20] ^= 1;
        std::fs::write(&p, b).unwrap();
        let decision = |seq, sha| {
            rec(
                seq,
                AuditEvent::Rejected {
                    capture_sha256: sha,
                    reason: "blurred".into(),
                },
            )
        };
        let rows = rows(&[decision(1, good), decision(2, bad), decision(3, [3; 32])]);
        let h = html(&rows, "t", None, d.path());
        assert_eq!(h.matches("data:image/jpeg;base64,").count(), 1, "{h}");
        assert_eq!(h.matches("<em>thumbnail damaged</em>").count(), 1, "{h}");
    }

    #[test]
    fn decisions_carry_class_names_and_scopes_cut_at_the_last_start() {
        let recs = vec![
            rec(1, AuditEvent::Note("start: board a, task t".into())),
            rec(
                2,
                AuditEvent::Synthesized {
                    classifier_id: "c1".into(),
                    classes: vec!["x".into(), "y, z".into()],
                    shots: vec![1, 1],
                },
            ),
            rec(3, AuditEvent::Note("start: board a, task t".into())),
            rec(
                4,
                AuditEvent::Decision {
                    capture_sha256: [7; 32],
                    classifier_id: "c1".into(),
                    probabilities: vec![0.25, 0.75],
                    top: 1,
                    label: "y, z".into(),
                    verdict: Verdict::Refer,
                },
            ),
        ];
        let rows = rows(&recs);
        assert_eq!(rows[3].classes, vec!["x", "y, z"]);
        assert_eq!(rows[3].confidence, Some(0.75));
        let s = in_scope(&rows, Scope::Session, 0);
        assert_eq!(s.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(in_scope(&rows, Scope::All, 0).len(), 4);
        let c = csv(s);
        let line = c.lines().nth(2).unwrap();
        assert!(
            line.starts_with("4,2025-12-04T00:00:04Z,decision,0707"),
            "{line}"
        );
        assert!(
            line.contains(",\"y, z\",refer,0.7500,\"x=0.2500;y, z=0.7500\",c1,"),
            "{line}"
        );
        let f = Filter {
            verdict: Some("refer".into()),
            ..Default::default()
        };
        assert_eq!(rows.iter().filter(|r| f.keep(r)).count(), 1);
        let h = html(s, "<t>", None, Path::new("/nonexistent"));
        assert!(h.contains("&lt;t&gt;") && h.contains("y, z&nbsp;75%"));
    }
}
