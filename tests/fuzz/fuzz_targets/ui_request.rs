//! The screen's request parsing: method, target, content type and body from the bytes (split at
//! the first three newlines). Never panics; a request it accepts is well-formed (a thumbnail
//! name is a SHA-256, a POST body was JSON), a refusal carries a 4xx status and a message.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sgps::ui::{Route, parse_request};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(4, |&b| b == b'\n');
    let method = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let url = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let ctype = parts.next().map(String::from_utf8_lossy);
    let body = parts.next().unwrap_or_default();
    match parse_request(&method, &url, ctype.as_deref(), body) {
        Ok(Route::Command(_) | Route::Export(_)) => {
            assert_eq!(method, "POST");
            assert!(serde_json::from_slice::<serde_json::Value>(body).is_ok());
        }
        Ok(_) => assert_eq!(method, "GET"),
        Err(r) => {
            assert!((400..500).contains(&r.status), "{r:?}");
            assert!(!r.message.is_empty());
        }
    }
});
