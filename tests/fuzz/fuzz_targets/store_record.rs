//! Store records: class records and the active-classifier pointer.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sgps::store::record::decode;
use sgps::store::{ACTIVE_VERSION, ActiveRecord, CLASS_VERSION, ClassRecord, RecordKind};

fuzz_target!(|data: &[u8]| {
    if let Ok((r, n)) = decode::<ClassRecord>(RecordKind::Class, CLASS_VERSION, data) {
        assert!(n <= data.len());
        let _ = r.shots.iter().map(|s| s.embedding.len()).sum::<usize>();
    }
    if let Ok((_, n)) = decode::<ActiveRecord>(RecordKind::Active, ACTIVE_VERSION, data) {
        assert!(n <= data.len());
    }
});
