//! Image decoding with its size bounds (JPEG, PNG, BMP): an error or an image within the bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = sgps::image_io::decode_rgb(data, Path::new("fuzz.img")) {
        assert!(sgps::image_io::check_dimensions(img.width(), img.height()).is_ok());
    }
});
