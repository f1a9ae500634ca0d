//! Button scripts of simulated boards.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = sgps::gpio::sim::parse_script(s, "fuzz");
    }
});
