//! Task files (`board/tasks/<name>.toml`): the classes a device screens for, their clinical
//! descriptions and urgent flags.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::BoardError;

/// One class of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskClass {
    pub name: String,
    /// Clinical description fed to the text encoder.
    #[serde(default)]
    pub description: Option<String>,
    /// A confident prediction of this class lights the red LED.
    #[serde(default)]
    pub urgent: bool,
}

/// A task file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskFile {
    pub name: String,
    pub classes: Vec<TaskClass>,
}

impl TaskFile {
    pub fn load(path: &Path) -> Result<TaskFile, BoardError> {
        let text = std::fs::read_to_string(path).map_err(|source| BoardError::Read {
            path: path.to_owned(),
            source,
        })?;
        TaskFile::parse(&text).map_err(|reason| BoardError::Invalid {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parse and check the text of a task file.
    pub fn parse(text: &str) -> Result<TaskFile, String> {
        let t: TaskFile = toml::from_str(text).map_err(|e| e.to_string())?;
        t.validate()?;
        Ok(t)
    }

    /// Check the classes: 2..=16 of them, names usable as labels and distinct, descriptions at
    /// most [`MAX_DESCRIPTION`] bytes.
    pub fn validate(&self) -> Result<(), String> {
        if self.classes.len() < 2 || self.classes.len() > crate::store::MAX_CLASSES {
            return Err(format!(
                "a task needs 2..={} classes, this one has {}",
                crate::store::MAX_CLASSES,
                self.classes.len()
            ));
        }
        for (i, c) in self.classes.iter().enumerate() {
            crate::store::check_class_name(&c.name).map_err(|e| e.to_string())?;
            if self.classes[..i].iter().any(|o| o.name == c.name) {
                return Err(format!("class {:?} appears twice", c.name));
            }
            if let Some(d) = &c.description {
                check_description(d)?;
            }
        }
        Ok(())
    }

    /// SHA-256 of the task's content (names, descriptions, urgent flags, in order).
    pub fn sha256(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        Sha256::digest(serde_json::to_vec(self).expect("a task serializes")).into()
    }
}

/// Longest clinical description accepted (bytes); the text encoder reads its first 128 tokens.
pub const MAX_DESCRIPTION: usize = 1000;

/// Check a clinical description: at most [`MAX_DESCRIPTION`] bytes, no control characters.
pub fn check_description(d: &str) -> Result<(), String> {
    if d.len() > MAX_DESCRIPTION {
        return Err(format!(
            "the description is {} bytes; at most {MAX_DESCRIPTION} are accepted (one or two sentences on colour, shape, scale and structures)",
            d.len()
        ));
    }
    if d.chars().any(char::is_control) {
        return Err("the description contains a control character (e.g. a line break); write it on one line".into());
    }
    Ok(())
}
