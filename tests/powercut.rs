//! Power cuts, modelled: a real store workload (class records, classifiers and the active
//! pointer, audit appends, thumbnails, a class removal, a restart) runs over `store::powercut::Recorder`,
//! which records every write, append, truncate, fsync, rename, removal and directory fsync. For
//! every point of the recording, `Model::crash_states` lists what a power loss there could leave
//! (unsynced data dropped or torn at 512-byte sectors, directory changes not yet made durable
//! undone); each state is written to a directory and reopened by the real store code, as the
//! device does at start. Checked in every state:
//! - the store opens, the audit log opens, every class record and the active pointer load, and
//!   the classifier it points to loads (the store's part of the device's start);
//! - every acknowledged write is there and intact: audit records (with an intact hash chain),
//!   class records, removals and the active classifier, each equal to the last acknowledged
//!   version or to the write in flight at the cut, never older, never anything else;
//! - every thumbnail file is intact and matches the SHA-256 its audit record holds (the record
//!   is appended before the file is written);
//! - the device can carry on: one more audit record is appended and reads back.
//!
//! A control runs the same check on the recording with the file (or directory) fsyncs taken
//! out and must find violations, so the check can fail.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use common::fixtures::{ENCODER, class_record, classifier};
use sgps::classifier::Classifier;
use sgps::store::powercut::{Model, Op, Recorder};
use sgps::store::{self, ActiveRecord, AuditEvent, ClassRecord, Store};

/// A small audit segment, so that the workload rotates the log several times.
const SEGMENT: u64 = 1200;

/// What a keyed object (a class record, the active pointer) holds.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Absent,
    Class(ClassRecord),
    Active(Box<ActiveRecord>),
}

/// One store call of the workload: the recording's positions before and after it (it is
/// acknowledged once every one of its operations is done).
#[derive(Debug, Clone)]
struct Call {
    start: usize,
    end: usize,
    what: What,
}

#[derive(Debug, Clone)]
enum What {
    Set(String, Val),
    Audit(u64, AuditEvent),
    Other,
}

struct Workload {
    rec: Arc<Recorder>,
    calls: Vec<Call>,
}

impl Workload {
    /// An audit append: its sequence number is the one the log returns (a rotation record
    /// may come first).
    fn audit(&mut self, log: &mut store::AuditLog, ev: AuditEvent) {
        let start = self.rec.len();
        let seq = log.append(ev.clone()).unwrap();
        let end = self.rec.len();
        self.calls.push(Call {
            start,
            end,
            what: What::Audit(seq, ev),
        });
    }

    fn call<T>(&mut self, what: What, f: impl FnOnce() -> T) -> T {
        let start = self.rec.len();
        let out = f();
        let end = self.rec.len();
        assert!(end > start, "{what:?} wrote nothing");
        self.calls.push(Call { start, end, what });
        out
    }
}

/// The workload: enrol, synthesize, screen, remove a class, restart, carry on.
fn run_workload(base: &Path) -> (Vec<Op>, Vec<Call>) {
    let rec = Arc::new(Recorder::new(base));
    let mut w = Workload {
        rec: rec.clone(),
        calls: vec![],
    };
    let root = base.join("store");
    let st = w.call(What::Other, || Store::open_on(rec.clone(), &root).unwrap());
    let (audit, _) = w.call(What::Other, || st.open_audit().unwrap());
    let mut audit = audit.with_segment_bytes(SEGMENT);
    for v in 0..9u64 {
        let name = format!("c{}", v % 3);
        let r = class_record(&name, v);
        w.call(What::Set(name.clone(), Val::Class(r.clone())), || {
            st.save_class(&r).unwrap()
        });
        let ev = AuditEvent::Enrolled {
            class: name.clone(),
            shot: v as u16,
            capture_sha256: [v as u8; 32],
        };
        w.audit(&mut audit, ev);
        if v % 3 == 2 {
            let c = classifier(v);
            let file = w.call(What::Other, || st.save_classifier(&c).unwrap());
            let a = ActiveRecord {
                classifier_id: c.id.clone(),
                file,
                encoder_sha256: ENCODER.into(),
                classes: heapless::Vec::new(),
                created_unix_ms: v,
            };
            w.call(
                What::Set("active".into(), Val::Active(Box::new(a.clone()))),
                || st.set_active(&a).unwrap(),
            );
            let ev = AuditEvent::Synthesized {
                classifier_id: c.id.clone(),
                classes: vec!["c0".into(), "c1".into(), "c2".into()],
                shots: vec![1, 1, 1],
            };
            w.audit(&mut audit, ev);
        }
        if v == 4 {
            w.call(What::Set("c1".into(), Val::Absent), || {
                st.remove_class("c1").unwrap()
            });
        }
        if v == 5 {
            // a restart: the log is reopened (nothing to cut, nothing written) and goes on
            drop(audit);
            audit = st.open_audit().unwrap().0.with_segment_bytes(SEGMENT);
        }
        let ev = AuditEvent::Decision {
            capture_sha256: [v as u8 ^ 0xff; 32],
            classifier_id: "x".into(),
            probabilities: vec![0.25; 4],
            top: (v % 4) as u16,
            label: format!("c{}", v % 3),
            verdict: store::Verdict::Refer,
        };
        w.audit(&mut audit, ev);
        if v % 2 == 0 {
            // the decision's thumbnail, kept as the device keeps it: record first, then file
            let capture = [v as u8 ^ 0xff; 32];
            let img =
                image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, v as u8]));
            let start = w.rec.len();
            let (seq, jpeg_sha256) = st.keep_thumbnail(&mut audit, &capture, &img).unwrap();
            let ev = AuditEvent::Thumbnail {
                capture_sha256: capture,
                jpeg_sha256,
            };
            let end = w.rec.len();
            w.calls.push(Call {
                start,
                end,
                what: What::Audit(seq, ev),
            });
        }
    }
    (rec.ops(), w.calls)
}

/// What the check covered.
#[derive(Debug, Default)]
struct Stats {
    cut_points: usize,
    states: usize,
    /// States whose audit log ended in a torn append (cut when reopened).
    torn_tails: usize,
    /// States holding the temporary of an interrupted atomic write (removed when reopened).
    temporaries: usize,
    /// States whose audit log spans rotated segments.
    rotated_states: usize,
}

fn scratch_dir() -> tempfile::TempDir {
    // tmpfs where there is one: thousands of states are materialised and fsynced
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::Builder::new()
            .prefix("sgps-powercut")
            .tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().unwrap()
}

/// Check one materialised state; returns what is wrong with it.
fn check_state(dir: &Path, cut: usize, calls: &[Call], stats: &mut Stats) -> Result<(), String> {
    let root = dir.join("store");
    let temporaries = ["", "classes", "classifiers", "thumbs"].iter().any(|d| {
        std::fs::read_dir(root.join(d)).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        })
    });
    stats.temporaries += temporaries as usize;
    let st = Store::open(&root).map_err(|e| format!("store does not open: {e}"))?;
    let (mut audit, opened) = st
        .open_audit()
        .map_err(|e| format!("audit log does not open: {e}"))?;
    stats.torn_tails += (opened.torn_tail_bytes > 0) as usize;
    let (recs, rep) = store::audit::read_all(&root, |_, _| {}).map_err(|e| e.to_string())?;
    if !rep.is_intact() {
        return Err(format!("audit log not intact after reopening: {rep:?}"));
    }
    stats.rotated_states += (rep.files.len() > 1) as usize;
    // the log's own bookkeeping (rotation records) aside
    let recs: Vec<store::AuditRecord> = recs
        .into_iter()
        .filter(|r| !matches!(r.event, AuditEvent::Rotated { .. }))
        .collect();
    // audit records: every acknowledged one, at most the one in flight, nothing else
    let mut want: BTreeMap<u64, (&AuditEvent, bool)> = BTreeMap::new();
    for c in calls {
        if let What::Audit(seq, ev) = &c.what {
            if c.end <= cut {
                want.insert(*seq, (ev, true));
            } else if c.start < cut {
                want.insert(*seq, (ev, false));
            }
        }
    }
    for r in &recs {
        match want.get(&r.seq) {
            Some((ev, _)) if **ev == r.event => {}
            _ => return Err(format!("audit record #{} was never written: {r:?}", r.seq)),
        }
    }
    for (seq, (_, acked)) in &want {
        if *acked && !recs.iter().any(|r| r.seq == *seq) {
            return Err(format!("acknowledged audit record #{seq} is missing"));
        }
    }
    // keyed objects: the last acknowledged value or the one in flight
    let (classes, bad) = st.load_classes();
    if !bad.is_empty() {
        return Err(format!("class records do not load: {bad:?}"));
    }
    let active = st
        .active()
        .map_err(|e| format!("active pointer does not load: {e}"))?;
    let mut keys: BTreeMap<&str, Vec<&Call>> = BTreeMap::new();
    for c in calls {
        if let What::Set(k, _) = &c.what {
            keys.entry(k.as_str()).or_default().push(c);
        }
    }
    for (key, cs) in keys {
        let mut allowed = vec![Val::Absent];
        for c in cs {
            let What::Set(_, v) = &c.what else {
                unreachable!()
            };
            if c.end <= cut {
                allowed = vec![v.clone()];
            } else if c.start < cut {
                allowed.push(v.clone());
            }
        }
        let found = if key == "active" {
            active
                .clone()
                .map_or(Val::Absent, |a| Val::Active(Box::new(a)))
        } else {
            classes
                .iter()
                .find(|r| r.name.as_str() == key)
                .cloned()
                .map_or(Val::Absent, Val::Class)
        };
        if !allowed.contains(&found) {
            return Err(format!(
                "{key} holds {found:?}, allowed only {allowed:?} (an acknowledged write was lost or an old one came back)"
            ));
        }
    }
    if let Some(a) = &active {
        let c = Classifier::load(&st.classifier_dir().join(&a.file), ENCODER)
            .map_err(|e| format!("the active classifier does not load: {e}"))?;
        if c.id != a.classifier_id {
            return Err(format!(
                "active points to {}, file holds {}",
                a.classifier_id, c.id
            ));
        }
    }
    // thumbnails: every file there is one the log vouches for (its record was appended first)
    let index = store::ThumbnailIndex::from_records(&recs);
    for e in std::fs::read_dir(root.join("thumbs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(sha) = name
            .strip_suffix(".jpg")
            .and_then(|h| <[u8; 32]>::try_from(hex::decode(h).ok()?).ok())
        else {
            continue; // an interrupted write's temporary, counted above
        };
        match store::read_thumbnail(&root, &sha, index.recorded(&sha)) {
            store::StoredThumbnail::Intact(_)
                if matches!(index.recorded(&sha), store::Recorded::Hash(_)) => {}
            t => {
                let what = match t {
                    store::StoredThumbnail::Intact(_) => "intact, but the log has no hash for it",
                    store::StoredThumbnail::Missing => "gone while read",
                    store::StoredThumbnail::Damaged(_) => "damaged",
                    store::StoredThumbnail::Altered(_) => "not the JPEG the log recorded",
                };
                return Err(format!("thumbs/{name} is {what}"));
            }
        }
    }
    // carry on: one more record, readable, chained
    let seq = audit
        .append(AuditEvent::Note("after the power cut".into()))
        .map_err(|e| format!("cannot append after the power cut: {e}"))?;
    drop(audit);
    let (after, rep) = store::audit::read_all(&root, |_, _| {}).map_err(|e| e.to_string())?;
    let kept = after
        .iter()
        .filter(|r| !matches!(r.event, AuditEvent::Rotated { .. }))
        .count();
    if kept != recs.len() + 1 || after.last().map(|r| r.seq) != Some(seq) || !rep.is_intact() {
        return Err(format!(
            "the record appended after the cut does not read back: {rep:?}"
        ));
    }
    Ok(())
}

/// Every cut point of `ops`, every state the model lists there; the first violations found.
fn check_recording(ops: &[Op], calls: &[Call]) -> (Stats, Vec<String>) {
    let scratch = scratch_dir();
    let mut stats = Stats::default();
    let mut errors = Vec::new();
    let mut model = Model::new();
    let mut n = 0usize;
    for cut in 0..=ops.len() {
        if cut > 0 {
            model.apply(&ops[cut - 1]).unwrap();
        }
        stats.cut_points += 1;
        for state in model.crash_states() {
            stats.states += 1;
            n += 1;
            let dir = scratch.path().join(n.to_string());
            std::fs::create_dir(&dir).unwrap();
            state.materialise(&dir).unwrap();
            if let Err(e) = check_state(&dir, cut, calls, &mut stats) {
                errors.push(format!(
                    "cut {cut} (after {:?}): {e}",
                    ops.get(cut.wrapping_sub(1))
                ));
            }
            std::fs::remove_dir_all(&dir).unwrap();
            if errors.len() >= 5 {
                return (stats, errors);
            }
        }
    }
    (stats, errors)
}

/// The recording without the operations `drop` selects, with the calls' positions moved.
fn without(ops: &[Op], calls: &[Call], drop: impl Fn(&Op) -> bool) -> (Vec<Op>, Vec<Call>) {
    let mut pos = Vec::with_capacity(ops.len() + 1);
    let mut kept = Vec::new();
    for op in ops {
        pos.push(kept.len());
        if !drop(op) {
            kept.push(op.clone());
        }
    }
    pos.push(kept.len());
    let calls = calls
        .iter()
        .map(|c| Call {
            start: pos[c.start],
            end: pos[c.end],
            what: c.what.clone(),
        })
        .collect();
    (kept, calls)
}

#[test]
fn every_power_cut_keeps_acknowledged_records_and_the_device_starts() {
    let base = scratch_dir();
    let (ops, calls) = run_workload(base.path());
    let syncs = ops
        .iter()
        .filter(|o| matches!(o, Op::SyncFile(_) | Op::SyncDir(_)))
        .count();
    let (stats, errors) = check_recording(&ops, &calls);
    println!(
        "power-cut model: {} store calls, {} operations ({} fsyncs), {} cut points, {} crash states \
         ({} with a torn audit append, {} with an interrupted atomic write's temporary, \
         {} with rotated audit segments)",
        calls.len(),
        ops.len(),
        syncs,
        stats.cut_points,
        stats.states,
        stats.torn_tails,
        stats.temporaries,
        stats.rotated_states,
    );
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    // the model tried the hard cases, not only clean states
    assert!(
        stats.torn_tails > 0 && stats.temporaries > 0 && stats.rotated_states > 0,
        "{stats:?}"
    );
}

#[test]
fn the_check_finds_a_store_that_skips_its_fsyncs() {
    let base = scratch_dir();
    let (ops, calls) = run_workload(base.path());
    let (ops_nf, calls_nf) = without(&ops, &calls, |o| matches!(o, Op::SyncFile(_)));
    let (_, errors) = check_recording(&ops_nf, &calls_nf);
    assert!(!errors.is_empty(), "no file fsync, and no loss found");
    let (ops_nd, calls_nd) = without(&ops, &calls, |o| matches!(o, Op::SyncDir(_)));
    let (_, errors) = check_recording(&ops_nd, &calls_nd);
    assert!(!errors.is_empty(), "no directory fsync, and no loss found");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("missing") || e.contains("lost")),
        "{errors:?}"
    );
}
