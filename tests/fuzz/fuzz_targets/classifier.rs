//! Classifier artifacts (`.sgpc`): anything that decodes must be valid, predict without panicking
//! and re-encode to a file that decodes to the same classifier.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sgps::classifier::Classifier;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Classifier::from_bytes(data, Path::new("fuzz.sgpc")) {
        let dim = c.weight[0].len();
        let p = c.predict(&vec![0.5; dim]);
        assert_eq!(p.probabilities.len(), c.num_classes());
        let again =
            Classifier::from_bytes(&c.to_bytes().unwrap(), Path::new("again.sgpc")).unwrap();
        assert_eq!(again.id, c.id);
    }
});
