//! Task files (TOML): accepted tasks have 2-16 distinct classes with storable names.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(t) = sgps::board::TaskFile::parse(s)
    {
        assert!((2..=sgps::store::MAX_CLASSES).contains(&t.classes.len()));
        for c in &t.classes {
            assert!(sgps::store::label(&c.name).is_ok());
        }
    }
});
