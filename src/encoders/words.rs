//! Word features of a description: TF-IDF over the vocabulary the recipe learned from the base
//! descriptions (`models/text_words.json`, written by `models/train/sgps_train/words.py`).
//!
//! The definition matches the recipe's exactly (checked against `models/reference/words.json`):
//! the text is lower-cased and split into maximal runs of alphanumeric characters (a hyphen,
//! slash or apostrophe splits), runs shorter than 2 characters are dropped; each vocabulary word
//! present gets `(1 + ln count) * idf`, and the vector is L2-normalised (all zero when no word of
//! the text is known).

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::manifest::Manifest;

/// The vocabulary and inverse document frequencies of the word features.
#[derive(Debug, Clone)]
pub struct WordFeatures {
    index: HashMap<String, usize>,
    idf: Vec<f64>,
    pub sha256: String,
}

#[derive(Deserialize)]
struct WordsFile {
    format: u32,
    vocabulary: Vec<String>,
    idf: Vec<f64>,
}

/// Lower-case runs of alphanumeric characters, 2 or more characters long.
pub fn tokens(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|t| t.chars().count() >= 2)
        .map(str::to_string)
        .collect()
}

impl WordFeatures {
    /// The word features the manifest names (verified by SHA-256), or `None` when the shipped
    /// synthesizer reads no word features.
    pub fn load(manifest: &Manifest) -> Result<Option<WordFeatures>> {
        let Some(spec) = manifest.words_spec() else {
            return Ok(None);
        };
        let path = manifest.verified_path(&spec.file, &spec.sha256)?;
        let w = Self::read(&path)?;
        if w.dim() != spec.dim {
            return Err(Error::Manifest {
                path: manifest.dir.join("manifest.json"),
                reason: format!(
                    "{} has {} words, the manifest says {}; regenerate the models with `cargo xtask train`",
                    spec.file,
                    w.dim(),
                    spec.dim
                ),
            });
        }
        Ok(Some(WordFeatures {
            sha256: spec.sha256.clone(),
            ..w
        }))
    }

    /// Read a word-feature file.
    pub fn read(path: &Path) -> Result<WordFeatures> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|reason| Error::Manifest {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parse and check the JSON of a word-feature file.
    pub fn from_json(text: &str) -> std::result::Result<WordFeatures, String> {
        let f: WordsFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if f.format != 1 {
            return Err(format!(
                "word features format {} is not supported (this sgps reads format 1)",
                f.format
            ));
        }
        if f.vocabulary.is_empty() || f.vocabulary.len() != f.idf.len() {
            return Err(format!(
                "word features: {} words but {} idf values (both must be equal and non-zero)",
                f.vocabulary.len(),
                f.idf.len()
            ));
        }
        if let Some(x) = f.idf.iter().find(|x| !x.is_finite() || **x <= 0.0) {
            return Err(format!("word features: idf value {x} is not positive"));
        }
        let mut index = HashMap::with_capacity(f.vocabulary.len());
        for (i, w) in f.vocabulary.into_iter().enumerate() {
            if index.contains_key(&w) {
                return Err(format!("word features: {w:?} appears twice"));
            }
            index.insert(w, i);
        }
        Ok(WordFeatures {
            index,
            idf: f.idf,
            sha256: String::new(),
        })
    }

    /// Number of words (the length of every vector).
    pub fn dim(&self) -> usize {
        self.idf.len()
    }

    /// The L2-normalised TF-IDF vector of `text`.
    pub fn vector(&self, text: &str) -> Vec<f32> {
        let mut counts: HashMap<usize, u32> = HashMap::new();
        for t in tokens(text) {
            if let Some(&i) = self.index.get(&t) {
                *counts.entry(i).or_default() += 1;
            }
        }
        let mut v = vec![0f64; self.dim()];
        for (i, c) in counts {
            v[i] = (1.0 + f64::from(c).ln()) * self.idf[i];
        }
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter()
            .map(|x| if n > 0.0 { (x / n) as f32 } else { 0.0 })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str =
        r#"{"format": 1, "vocabulary": ["blue", "network", "veil"], "idf": [1.5, 2.0, 3.0]}"#;

    #[test]
    fn tokens_are_lower_case_alphanumeric_runs_of_two_or_more() {
        assert_eq!(
            tokens("Blue-white VEIL; a 2x naevus's"),
            ["blue", "white", "veil", "2x", "naevus"]
        );
        assert_eq!(tokens("Café au lait"), ["café", "au", "lait"]);
        assert!(tokens("").is_empty());
    }

    #[test]
    fn vector_is_sublinear_tf_idf_normalised() {
        let w = WordFeatures::from_json(FILE).unwrap();
        let v = w.vector("veil, veil and a blue NETWORK; unknown words");
        let raw = [1.5, 2.0, (1.0 + 2f64.ln()) * 3.0];
        let n = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
        for (a, b) in v.iter().zip(raw) {
            assert!((f64::from(*a) - b / n).abs() < 1e-6, "{v:?}");
        }
        assert_eq!(w.vector("nothing known here"), vec![0.0; 3]);
    }

    #[test]
    fn malformed_files_are_refused_with_the_reason() {
        for (bad, why) in [
            (
                r#"{"format": 2, "vocabulary": ["a"], "idf": [1]}"#,
                "format 2",
            ),
            (
                r#"{"format": 1, "vocabulary": ["ab"], "idf": []}"#,
                "idf values",
            ),
            (
                r#"{"format": 1, "vocabulary": ["ab"], "idf": [-1]}"#,
                "not positive",
            ),
            (
                r#"{"format": 1, "vocabulary": ["ab", "ab"], "idf": [1, 1]}"#,
                "twice",
            ),
            (r#"{"format": 1, "vocab"#, "EOF"),
        ] {
            let e = WordFeatures::from_json(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
