#![allow(unused_imports)]
use super::*;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::disk::{Disk, RealDisk};
use crate::store::StoreError;
use crate::store::record::{self, FrameError, MAGIC, RecordKind};

fn note(i: u32) -> AuditEvent {
    AuditEvent::Note(format!("event {i}"))
}

#[test]
fn append_reopen_continue_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("audit.log");
    let (mut log, rep) = AuditLog::open(&p).unwrap();
    assert_eq!(rep.records, 0);
    for i in 0..5 {
        assert_eq!(log.append(note(i)).unwrap(), i as u64);
    }
    drop(log);
    let (mut log, rep) = AuditLog::open(&p).unwrap();
    assert_eq!(rep.records, 5);
    assert_eq!(log.append(note(5)).unwrap(), 5);
    let (recs, rep) = read_log(&p).unwrap();
    assert_eq!(recs.len(), 6);
    assert!(rep.damaged.is_empty());
    assert_eq!(recs[3].event, note(3));
}

#[test]
fn second_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("audit.log");
    let (log, _) = AuditLog::open(&p).unwrap();
    let e = AuditLog::open(&p).err().unwrap();
    assert!(e.to_string().contains("another sgps process"), "{e}");
    drop(log);
    AuditLog::open(&p).unwrap();
}

#[test]
fn damaged_record_costs_only_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("audit.log");
    let (mut log, _) = AuditLog::open(&p).unwrap();
    let mut offsets = vec![];
    for i in 0..10 {
        offsets.push(fs::metadata(&p).unwrap().len() as usize);
        log.append(note(i)).unwrap();
    }
    drop(log);
    let mut b = fs::read(&p).unwrap();
    // damage payload of record 3, the length field of record 6 and the magic of record 8
    b[offsets[3] + 20] ^= 0xff;
    b[offsets[6] + 9] ^= 0x7f;
    b[offsets[8]] = b'X';
    fs::write(&p, &b).unwrap();
    let (recs, rep) = read_log(&p).unwrap();
    let seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![0, 1, 2, 4, 5, 7, 9]);
    assert_eq!(rep.damaged.len(), 3, "{rep:?}");
    // appending after damage still works and is readable
    let (mut log, _) = AuditLog::open(&p).unwrap();
    assert_eq!(log.append(note(10)).unwrap(), 10);
    let (recs, _) = read_log(&p).unwrap();
    assert_eq!(recs.last().unwrap().seq, 10);
}

#[test]
fn torn_tail_is_cut_on_open_and_earlier_records_survive() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("audit.log");
    let (mut log, _) = AuditLog::open(&p).unwrap();
    for i in 0..4 {
        log.append(note(i)).unwrap();
    }
    drop(log);
    let full = fs::read(&p).unwrap();
    let rec_len = full.len() / 4;
    for cut in 1..rec_len {
        fs::write(&p, &full[..full.len() - cut]).unwrap();
        let (recs, rep) = read_log(&p).unwrap();
        assert_eq!(recs.len(), 3, "cut {cut}");
        assert!(rep.damaged.is_empty(), "cut {cut}: {rep:?}");
        assert_eq!(rep.torn_tail_bytes as usize, rec_len - cut);
        let (mut log, _) = AuditLog::open(&p).unwrap();
        assert_eq!(log.append(note(99)).unwrap(), 3);
        let (recs, rep) = read_log(&p).unwrap();
        assert_eq!(recs.len(), 4);
        assert_eq!(rep.records, 4);
        assert_eq!(rep.torn_tail_bytes, 0);
        assert!(rep.is_intact(), "cut {cut}: {rep:?}");
    }
}

/// Frames of a log: (offset, length).
fn frames(b: &[u8]) -> Vec<(usize, usize)> {
    let mut out = vec![];
    let mut pos = 0;
    while pos < b.len() {
        let (_, _, n) = record::check_frame(&b[pos..]).unwrap();
        out.push((pos, n));
        pos += n;
    }
    out
}

fn log_of(n: u32) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("audit.log");
    let (mut log, _) = AuditLog::open(&p).unwrap();
    for i in 0..n {
        log.append(note(i)).unwrap();
    }
    drop(log);
    let b = fs::read(&p).unwrap();
    (dir, p, b)
}

#[test]
fn records_chain_and_a_rewritten_removed_or_reordered_record_breaks_it() {
    let (_d, _p, b) = log_of(6);
    let (recs, rep) = scan(&b);
    assert!(rep.is_intact(), "{rep:?}");
    assert_eq!(rep.unchained, 0);
    assert_eq!(recs[0].prev_sha256, Some([0; 32]));
    let f = frames(&b);
    let h2: [u8; 32] = Sha256::digest(&b[f[2].0..f[2].0 + f[2].1]).into();
    assert_eq!(recs[3].prev_sha256, Some(h2));

    // a record rewritten with a valid checksum (what someone editing the log would do)
    let mut edited = recs[2].clone();
    edited.event = AuditEvent::Note("nothing happened".into());
    let frame = record::encode(RecordKind::Audit, AUDIT_VERSION, &edited).unwrap();
    let mut t = b[..f[2].0].to_vec();
    t.extend_from_slice(&frame);
    t.extend_from_slice(&b[f[2].0 + f[2].1..]);
    let (recs2, rep) = scan(&t);
    assert_eq!(recs2.len(), 6);
    assert!(rep.damaged.is_empty());
    assert_eq!(rep.chain_breaks.len(), 1, "{rep:?}");
    assert_eq!(rep.chain_breaks[0].seq, 3);
    assert!(
        rep.chain_breaks[0]
            .reason
            .contains("changed, removed or reordered")
    );

    // a record cut out of the middle
    let mut t = b[..f[2].0].to_vec();
    t.extend_from_slice(&b[f[3].0..]);
    let (_, rep) = scan(&t);
    assert_eq!(rep.chain_breaks.len(), 1, "{rep:?}");
    assert!(
        rep.chain_breaks[0]
            .reason
            .contains("sequence number 3 follows 1")
    );

    // two records swapped
    let mut t = b[..f[1].0].to_vec();
    t.extend_from_slice(&b[f[2].0..f[3].0]);
    t.extend_from_slice(&b[f[1].0..f[2].0]);
    t.extend_from_slice(&b[f[3].0..]);
    let (_, rep) = scan(&t);
    assert!(rep.chain_breaks.len() >= 2, "{rep:?}");

    // the first records removed
    let (_, rep) = scan(&b[f[2].0..]);
    assert_eq!(rep.chain_breaks.len(), 1);
    assert!(rep.chain_breaks[0].reason.contains("does not start"));
}

#[test]
fn appends_after_reopen_continue_the_chain() {
    let (_d, p, _) = log_of(3);
    let (mut log, rep) = AuditLog::open(&p).unwrap();
    assert_eq!(Some(log.head_sha256()), rep.head_sha256);
    log.append(note(3)).unwrap();
    drop(log);
    let (recs, rep) = read_log(&p).unwrap();
    assert_eq!(recs.len(), 4);
    assert!(rep.is_intact(), "{rep:?}");
}

#[test]
fn format_1_records_are_read_unchained_and_new_records_chain_after_them() {
    #[derive(Serialize)]
    struct V1 {
        seq: u64,
        time_unix_ms: u64,
        event: AuditEvent,
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("audit.log");
    let mut b = vec![];
    for i in 0..2u32 {
        let r = V1 {
            seq: i as u64,
            time_unix_ms: 5,
            event: note(i),
        };
        b.extend(record::encode(RecordKind::Audit, 1, &r).unwrap());
    }
    fs::write(&p, &b).unwrap();
    let (mut log, rep) = AuditLog::open(&p).unwrap();
    assert_eq!((rep.records, rep.unchained), (2, 2));
    assert_eq!(log.append(note(2)).unwrap(), 2);
    drop(log);
    let (recs, rep) = read_log(&p).unwrap();
    assert_eq!(recs[1].event, note(1));
    assert_eq!(recs[1].prev_sha256, None);
    assert!(rep.is_intact(), "{rep:?}");
}

#[test]
fn sectors_that_never_got_their_data_are_a_torn_tail() {
    let (_d, p, _) = log_of(39);
    let (mut log, _) = AuditLog::open(&p).unwrap();
    log.append(AuditEvent::Note("x".repeat(1500))).unwrap();
    drop(log);
    let b = fs::read(&p).unwrap();
    let f = frames(&b);
    let last = f[f.len() - 1];
    // the last record's sectors from a sector boundary inside it read as zeros
    let boundary = (last.0 + 1).next_multiple_of(SECTOR);
    assert!(
        boundary < b.len(),
        "the last record must cross a sector boundary"
    );
    let mut t = b.clone();
    t[boundary..].fill(0);
    let (recs, rep) = scan(&t);
    assert_eq!(recs.len(), 39);
    assert!(rep.is_intact(), "{rep:?}");
    assert_eq!(rep.valid_len as usize, last.0);
    // all of it zeros (size updated, no data)
    let mut t = b.clone();
    t[last.0..].fill(0);
    let (recs, rep) = scan(&t);
    assert_eq!((recs.len(), rep.valid_len as usize), (39, last.0));
    // an earlier sector missing but the last one written
    let mut t = b.clone();
    t[last.0 + 20] ^= 0x55;
    fs::write(&p, &t).unwrap();
    let (mut log, rep) = AuditLog::open(&p).unwrap();
    assert_eq!((rep.records, rep.torn_tail_bytes as usize), (39, last.1));
    assert_eq!(log.append(note(99)).unwrap(), 39);
    drop(log);
    let (_, rep) = read_log(&p).unwrap();
    assert!(rep.is_intact(), "{rep:?}");
    // damage followed by an intact record is damage, not a torn tail
    let mut t = b.clone();
    t[f[5].0 + 20] ^= 0x55;
    let (recs, rep) = scan(&t);
    assert_eq!((recs.len(), rep.damaged.len()), (39, 1));
    assert_eq!(rep.chain_breaks.len(), 1);
    assert!(rep.chain_breaks[0].reason.contains("damaged"));
}

fn names(dir: &Path) -> Vec<String> {
    log_files(dir)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// A log of `n` notes in 1500-byte segments: (its directory, the path of audit.log, the open log).
fn rotated_log(n: u32) -> (tempfile::TempDir, PathBuf, AuditLog) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("audit.log");
    let (log, _) = AuditLog::open(&p).unwrap();
    let mut log = log.with_segment_bytes(1500);
    for i in 0..n {
        log.append(note(i)).unwrap();
    }
    (dir, p, log)
}

#[test]
fn rotation_keeps_one_chain_across_segments_and_verify_sees_a_missing_one() {
    let (dir, p, log) = rotated_log(60);
    drop(log);
    let files = names(dir.path());
    assert!(files.len() >= 3, "{files:?}");
    assert_eq!(files.last().unwrap(), "audit.log");
    let (recs, rep) = read_all(dir.path(), |_, _| {}).unwrap();
    assert!(rep.is_intact(), "{rep:?}");
    // sequence numbers run on without a gap; the notes are all there, in order
    assert!(recs.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    let notes: Vec<&AuditEvent> = recs
        .iter()
        .map(|r| &r.event)
        .filter(|e| !matches!(e, AuditEvent::Rotated { .. }))
        .collect();
    assert_eq!(notes.len(), 60);
    assert_eq!(*notes[59], note(59));
    for f in &files {
        assert!(
            fs::metadata(dir.path().join(f)).unwrap().len() <= 1500,
            "{f}"
        );
    }
    assert!(verify(dir.path(), None).unwrap().is_intact());
    // reopen and carry on: the chain still links
    let (mut log, _) = AuditLog::open(&p).unwrap();
    log.append(note(60)).unwrap();
    drop(log);
    assert!(read_all(dir.path(), |_, _| {}).unwrap().1.is_intact());
    // a segment removed from the middle breaks the link between the files around it
    fs::remove_file(dir.path().join(&files[1])).unwrap();
    let v = verify(dir.path(), None).unwrap();
    assert!(!v.is_intact());
    assert_eq!(v.report.links.len(), 1, "{:?}", v.report.links);
    assert!(
        v.report.links[0].reason.contains(&files[1]),
        "{:?}",
        v.report.links
    );
}

#[test]
fn power_lost_between_rotation_and_the_next_record_continues_the_segment_chain() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("audit.log");
    let (mut log, _) = AuditLog::open(&p).unwrap();
    for i in 0..5 {
        log.append(note(i)).unwrap();
    }
    drop(log);
    // the rename happened; the new audit.log was not created yet
    fs::rename(&p, dir.path().join("audit-000000000000-000000000004.log")).unwrap();
    let (mut log, rep) = AuditLog::open(&p).unwrap();
    assert_eq!(rep.records, 0);
    assert_eq!(log.append(note(5)).unwrap(), 6, "5 is the rotation record");
    drop(log);
    let (recs, rep) = read_all(dir.path(), |_, _| {}).unwrap();
    assert!(rep.is_intact(), "{rep:?}");
    assert_eq!(recs.len(), 7);
    assert!(matches!(
        &recs[5].event,
        AuditEvent::Rotated {
            previous_last_seq: 4,
            ..
        }
    ));
}

#[test]
fn exported_segments_are_deleted_at_the_size_limit_and_unexported_ones_never() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("audit.log");
    let total = |d: &Path| -> u64 {
        log_files(d)
            .iter()
            .map(|f| fs::metadata(f).unwrap().len())
            .sum()
    };
    let open = || {
        let (log, _) = AuditLog::open(&p).unwrap();
        log.with_segment_bytes(1000).with_max_bytes(3000)
    };
    let mut log = open();
    for i in 0..80 {
        log.append(note(i)).unwrap();
    }
    drop(log);
    // nothing exported: nothing deleted, past the limit
    let before = log_files(dir.path()).len();
    assert!(total(dir.path()) > 3000);
    let (recs, _) = read_all(dir.path(), |_, _| {}).unwrap();
    assert_eq!(recs.first().unwrap().seq, 0);

    let usb = tempfile::tempdir().unwrap();
    let x = export(dir.path(), usb.path()).unwrap();
    assert!(x.verification.is_intact());
    assert_eq!(x.files.len(), before);
    let index = fs::read_to_string(&x.index).unwrap();
    assert!(
        index.contains("audit.log") && index.contains("intact"),
        "{index}"
    );
    // the copy verifies on its own
    assert!(verify(usb.path(), None).unwrap().is_intact());

    // the next rotation deletes exported segments down to the limit
    let mut log = open();
    for i in 80..100 {
        log.append(note(i)).unwrap();
    }
    drop(log);
    let after = log_files(dir.path());
    assert!(after.len() < before, "{after:?}");
    assert!(total(dir.path()) <= 3000 + 1000, "{}", total(dir.path()));
    // what remains still verifies: it starts at a rotation record after the deleted ones
    let v = verify(dir.path(), None).unwrap();
    assert!(v.is_intact(), "{:?}", v.report);
    assert!(v.first.unwrap().0 > 0);
    let (recs, _) = read_all(dir.path(), |_, _| {}).unwrap();
    assert_eq!(recs.last().unwrap().event, note(99));
    // and every record is in the export or still on the device
    let (old, _) = read_all(usb.path(), |_, _| {}).unwrap();
    assert!(old.last().unwrap().seq + 1 >= recs.first().unwrap().seq);
}

#[test]
fn cached_reads_equal_full_reads_and_notice_changed_or_removed_segments() {
    let (dir, _p, mut log) = rotated_log(60);
    let mut cache = SegmentCache::default();
    let full = |d: &Path| read_all(d, |_, _| {}).unwrap();
    let (recs, rep) = read_all_cached(dir.path(), &mut cache).unwrap();
    let (want, want_rep) = full(dir.path());
    assert_eq!(recs, want);
    assert_eq!(rep.head_sha256(), want_rep.head_sha256());
    let segments = names(dir.path()).len() - 1;
    assert!(segments >= 2);
    assert_eq!(cache.len(), segments, "closed segments only, not audit.log");

    // new records in audit.log are seen at once; the segments come from the cache
    log.append(note(60)).unwrap();
    let (recs, _) = read_all_cached(dir.path(), &mut cache).unwrap();
    assert_eq!(recs, full(dir.path()).0);
    assert_eq!(*recs.last().map(|r| &r.event).unwrap(), note(60));

    // a segment changed behind the cache's back (here: a flipped byte, as tampering or bit rot
    // would) is scanned again, so the damage shows exactly as in a full read
    let first = dir.path().join(&names(dir.path())[0]);
    let mut b = fs::read(&first).unwrap();
    b[40] ^= 0x01;
    fs::write(&first, &b).unwrap();
    let when = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    File::options()
        .write(true)
        .open(&first)
        .unwrap()
        .set_modified(when)
        .unwrap();
    let (recs, rep) = read_all_cached(dir.path(), &mut cache).unwrap();
    let (want, want_rep) = full(dir.path());
    assert_eq!(recs, want);
    assert!(!rep.is_intact() && !want_rep.is_intact());
    assert_eq!(rep.files[0].1, want_rep.files[0].1);

    // a removed segment leaves the cache, and the broken link is reported as in a full read
    drop(log);
    fs::remove_file(&first).unwrap();
    let (recs, rep) = read_all_cached(dir.path(), &mut cache).unwrap();
    assert_eq!(recs, full(dir.path()).0);
    assert_eq!(cache.len(), segments - 1);
    assert_eq!(rep.links.len(), full(dir.path()).1.links.len());
}
