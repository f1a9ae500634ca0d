//! Crash safety of the device store: a child process (this test binary re-run in child mode,
//! `SGPS_CRASH_CHILD=<dir>`) writes class records,
//! classifiers + the active pointer and audit records in a loop and acknowledges each durable
//! write on stdout; it is SIGKILLed at many points (varying delays) and restarted on the same
//! directory. After every kill: every acknowledged record is present and intact, nothing stored
//! is corrupt, and the store opens cleanly.
//!
//! Note: SIGKILL stops the process between or inside system calls; it does not model power loss
//! (page cache lost). Torn writes are covered by the truncation tests in `src/store`.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixtures::{ENCODER, class_record, classifier};
use sgps::classifier::Classifier;
use sgps::store::{self, ActiveRecord, AuditEvent, Store};

/// Child mode: write records in a loop and acknowledge each durable write on stdout, until
/// killed. Lines: `audit <seq>`, `class <name> <v>`, `clf <id> <v>`. Versions continue from the
/// audit log's next sequence number, so every restart writes new content.
#[test]
fn crash_child() {
    if let Some(dir) = std::env::var_os("SGPS_CRASH_CHILD") {
        child_main(PathBuf::from(dir));
    }
}

fn child_main(dir: PathBuf) -> ! {
    let store = Store::open(&dir).expect("open store");
    let (mut audit, _) = store.open_audit().expect("open audit log");
    let out = std::io::stdout();
    let mut out = out.lock();
    let mut v = audit.next_seq();
    loop {
        let note = format!("crash-test {}", audit.next_seq());
        let seq = audit.append(AuditEvent::Note(note)).expect("append");
        writeln!(out, "audit {seq}").unwrap();
        out.flush().unwrap();
        let name = format!("c{}", v % 3);
        store
            .save_class(&class_record(&name, v))
            .expect("save class");
        writeln!(out, "class {name} {v}").unwrap();
        out.flush().unwrap();
        if v % 3 == 0 {
            let c = classifier(v);
            let file = store.save_classifier(&c).expect("save classifier");
            store
                .set_active(&ActiveRecord {
                    classifier_id: c.id.clone(),
                    file,
                    encoder_sha256: ENCODER.into(),
                    classes: heapless::Vec::new(),
                    created_unix_ms: v,
                })
                .expect("set active");
            writeln!(out, "clf {} {v}", c.id).unwrap();
            out.flush().unwrap();
        }
        v += 1;
    }
}

const KILL_POINTS: usize = 60;

#[derive(Default)]
struct Acked {
    audit: Vec<u64>,
    class: BTreeMap<String, u64>,
    clf: Vec<(String, u64)>,
}

fn check_class(rec: &store::ClassRecord, name: &str, min_v: u64) -> u64 {
    let desc = rec.description.as_deref().unwrap();
    let v: u64 = desc
        .strip_prefix(&format!("{name} v"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        v >= min_v,
        "class {name}: stored version {v} is older than acknowledged {min_v}"
    );
    assert_eq!(
        rec.shots.len() as u64,
        v % 7 + 1,
        "class {name} v{v}: shot count"
    );
    for (k, s) in rec.shots.iter().enumerate() {
        assert!(
            s.embedding.iter().all(|&x| x == (v * 10 + k as u64) as f32),
            "class {name} v{v}: embedding"
        );
    }
    v
}

fn verify(dir: &Path, acked: &Acked) {
    // reopen like the device does after a restart
    let st = Store::open(dir).expect("store opens after kill");
    let (log, rep) = st.open_audit().expect("audit log opens after kill");
    drop(log);
    assert!(
        rep.damaged.is_empty(),
        "damaged audit records after SIGKILL: {:?}",
        rep.damaged
    );
    let (recs, _) = store::audit::read_log(&st.audit_path()).unwrap();
    let by_seq: BTreeMap<u64, &store::AuditRecord> = recs.iter().map(|r| (r.seq, r)).collect();
    for s in &acked.audit {
        let r = by_seq
            .get(s)
            .unwrap_or_else(|| panic!("acknowledged audit record {s} lost"));
        assert_eq!(r.event, AuditEvent::Note(format!("crash-test {s}")));
    }
    let seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "audit sequence has gaps or repeats"
    );

    let (classes, bad) = st.load_classes();
    assert!(bad.is_empty(), "corrupt class records: {bad:?}");
    for (name, &v) in &acked.class {
        let rec = classes
            .iter()
            .find(|c| c.name.as_str() == name)
            .unwrap_or_else(|| panic!("class {name} lost"));
        check_class(rec, name, v);
    }
    for rec in &classes {
        check_class(rec, rec.name.as_str(), 0);
    }

    for (id, v) in &acked.clf {
        let c = Classifier::load(&st.classifier_path(id), ENCODER)
            .unwrap_or_else(|e| panic!("acknowledged classifier {id} (v{v}): {e}"));
        assert_eq!(c.weight[1][0], (v + 1) as f32);
    }
    if let Some((_, last_v)) = acked.clf.last() {
        let a = st
            .active()
            .expect("active pointer intact")
            .expect("active pointer present");
        let c = Classifier::load(&st.classifier_dir().join(&a.file), ENCODER)
            .expect("active classifier loads");
        assert!(
            a.created_unix_ms >= *last_v,
            "active pointer went back in time"
        );
        assert_eq!(c.id, a.classifier_id);
    }
}

#[test]
fn sigkill_during_writes_loses_no_acknowledged_record() {
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut acked = Acked::default();
    let start = Instant::now();
    let mut class_acks = 0usize;
    let mut kills_mid_write = 0usize;
    for k in 0..KILL_POINTS {
        let mut child = common::command(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env("SGPS_CRASH_CHILD", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the crash child");
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        // delays from 0 to ~150 ms (start-up included), in a scrambled order, plus sub-millisecond
        // offsets; stretched by the slowdown under emulation, where start-up alone takes longer
        let delay_us = (((k * 37) % 151) as u64 * 1000 + ((k * 173) % 1000) as u64)
            * u64::from(common::slowdown());
        std::thread::sleep(Duration::from_micros(delay_us));
        child.kill().expect("SIGKILL child"); // std sends SIGKILL on Unix
        let status = child.wait().unwrap();
        let lines = reader.join().unwrap();
        if status.code().is_none() {
            kills_mid_write += 1;
        }
        for l in &lines {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["audit", s] => acked.audit.push(s.parse().unwrap()),
                ["class", n, v] => {
                    class_acks += 1;
                    acked.class.insert(n.to_string(), v.parse().unwrap());
                }
                ["clf", id, v] => acked.clf.push((id.to_string(), v.parse().unwrap())),
                _ => {} // test-harness output
            }
        }
        verify(dir.path(), &acked);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "crash test: {KILL_POINTS} kill points ({kills_mid_write} killed by signal), {} acknowledged writes ({} audit records, {} classifiers), {secs:.1} s",
        acked.audit.len() + class_acks + acked.clf.len(),
        acked.audit.len(),
        acked.clf.len()
    );
    const { assert!(KILL_POINTS >= 50) };
    // a loaded machine slows the child down; a handful of acknowledged writes still exercises
    // kills at different points, so only require some progress
    assert!(
        acked.audit.len() >= 10 && !acked.clf.is_empty(),
        "the child made too little progress to test anything"
    );
}

/// A full filesystem (a 64 KiB tmpfs; needs root, skipped otherwise): writes fail with a clear
/// "storage full" error, everything stored before stays intact, and writing works again once
/// space is freed.
#[test]
fn full_disk_keeps_previous_records() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&mnt)
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !common::require(
        ok,
        "full-disk test",
        "cannot mount a tmpfs here (needs root); the injected ENOSPC unit tests in src/store still run",
    ) {
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());

    let st = Store::open(&mnt).unwrap();
    let (mut log, _) = st.open_audit().unwrap();
    let rec = |name: &str, n: usize| store::ClassRecord {
        name: store::label(name).unwrap(),
        description: None,
        urgent: false,
        encoder_sha256: "e".into(),
        shots: (0..n)
            .map(|k| store::ShotRecord {
                capture_sha256: [k as u8; 32],
                time_unix_ms: 0,
                width: 1,
                height: 1,
                quality: sgps::quality::measure(&image::RgbImage::new(4, 4)),
                embedding: vec![k as f32; 1280],
            })
            .collect(),
    };
    // fill: class records of growing size until the filesystem is full
    let mut saved = vec![];
    let mut err = None;
    for i in 0..100 {
        let r = rec(&format!("c{i}"), 2);
        match st.save_class(&r) {
            Ok(()) => saved.push(r),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let e = err.expect("a 64 KiB filesystem must fill up");
    assert!(e.is_no_space(), "{e}");
    assert!(
        e.to_string().contains("storage full")
            && e.to_string().contains("nothing stored before was lost"),
        "{e}"
    );
    // replacing an existing record with a bigger one fails too, and keeps the old content
    let e = st.save_class(&rec("c0", 6)).unwrap_err();
    assert!(e.is_no_space(), "{e}");
    // audit appends until full: earlier records intact, no damage, no partial frame left
    let mut appended = 0u64;
    loop {
        match log.append(AuditEvent::Note(format!("n{appended}"))) {
            Ok(_) => appended += 1,
            Err(e) => {
                assert!(e.is_no_space(), "{e}");
                break;
            }
        }
        assert!(appended < 100_000);
    }
    let (classes, bad) = st.load_classes();
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(classes.len(), saved.len());
    for r in &saved {
        assert_eq!(&st.load_class(r.name.as_str()).unwrap().unwrap(), r);
    }
    let (recs, rep) = store::audit::read_log(&st.audit_path()).unwrap();
    assert_eq!(recs.len() as u64, appended);
    assert!(
        rep.damaged.is_empty() && rep.torn_tail_bytes == 0,
        "{rep:?}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(mnt.join("classes"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left on a full disk");
    // free space: writing works again
    st.remove_class("c1").unwrap();
    st.save_class(&rec("c1", 1)).unwrap();
    log.append(AuditEvent::Note("after".into())).unwrap();
    println!(
        "full disk: {} class records and {appended} audit records kept intact; writes resumed after freeing space",
        saved.len()
    );
}
