//! Audit logs, torn tails and damage included: the scan never fails, its report adds up, and a
//! record appended after the part the device keeps reads back intact and chained.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sgps::store::RecordKind;
use sgps::store::audit::{AUDIT_VERSION, AuditEvent, AuditRecord, scan};
use sgps::store::record::encode;

fuzz_target!(|data: &[u8]| {
    let (recs, rep) = scan(data);
    assert_eq!(recs.len(), rep.records);
    assert!(rep.valid_len as usize <= data.len());
    assert_eq!(rep.valid_len + rep.torn_tail_bytes, data.len() as u64);
    // what the device does on open: cut the torn tail, append one record chained to the head
    let mut kept = data[..rep.valid_len as usize].to_vec();
    let next = recs.iter().map(|r| r.seq + 1).max().unwrap_or(0);
    let rec = AuditRecord {
        seq: next,
        time_unix_ms: 1,
        prev_sha256: Some(rep.head_sha256.unwrap_or([0; 32])),
        event: AuditEvent::Note("fuzz".into()),
    };
    kept.extend(encode(RecordKind::Audit, AUDIT_VERSION, &rec).unwrap());
    let (recs2, rep2) = scan(&kept);
    assert_eq!(
        recs2.last(),
        Some(&rec),
        "the appended record must read back last"
    );
    assert_eq!(rep2.torn_tail_bytes, 0);
    assert!(rep2.chain_breaks.len() <= rep.chain_breaks.len() + 1);
});
