//! One fixed clinical description per class, as a user would type it.
//!
//! Source, in order: an explicit JSON file (`--descriptions`), the model recipe's
//! `models/train/descriptions.json` (`{"base"|"novel": {"dataset/class": ["text", ...]}}` or a flat
//! `{"class": "text" | ["text", ...]}`), then a built-in text for the ISIC novel classes.
//! Only the *first* text of a class is used.

use std::path::Path;

use anyhow::Context;
use serde_json::Value;

/// Built-in fallback descriptions of the ISIC novel classes.
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "actinic_keratosis",
        "Actinic keratosis: rough scaly erythematous patch on sun-damaged skin with a strawberry pattern.",
    ),
    (
        "dermatofibroma",
        "Dermatofibroma: firm small papule with a central white scar-like patch and a delicate peripheral brown network.",
    ),
    (
        "squamous_cell_carcinoma",
        "Squamous cell carcinoma: keratotic pink nodule with white circles, central keratin and hairpin or glomerular vessels.",
    ),
    (
        "vascular_lesion",
        "Vascular lesion: haemangioma or angioma with red, purple or blue lagoons separated by whitish septa.",
    ),
];

/// A class description and where it came from.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Description {
    pub class: String,
    pub text: Option<String>,
    pub source: String,
}

fn first_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => a.iter().find_map(|x| x.as_str().map(str::to_string)),
        _ => None,
    }
}

/// Look `rel` (`dataset/class`) or `name` (`class`) up in a parsed descriptions file.
fn lookup(doc: &Value, rel: &str, name: &str) -> Option<String> {
    let obj = doc.as_object()?;
    for key in [rel, name] {
        if let Some(t) = obj.get(key).and_then(first_text) {
            return Some(t);
        }
    }
    // Nested groups ("base", "novel", ...), in file order.
    for (k, v) in obj {
        if k.starts_with('_') {
            continue;
        }
        if let Some(inner) = v.as_object() {
            for key in [rel, name] {
                if let Some(t) = inner.get(key).and_then(first_text) {
                    return Some(t);
                }
            }
        }
    }
    None
}

/// Descriptions for classes given as (`dataset/class`, `class`) pairs.
///
/// `explicit` (a user file) must exist when given; otherwise `recipe` is used when present.
pub fn resolve(
    classes: &[(String, String)],
    explicit: Option<&Path>,
    recipe: &Path,
) -> anyhow::Result<Vec<Description>> {
    let (doc, source) = match explicit {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read descriptions file {}", p.display()))?;
            let doc: Value = serde_json::from_str(&text).with_context(|| {
                format!(
                    "descriptions file {} is not valid JSON (expected {{\"class\": \"text\"}})",
                    p.display()
                )
            })?;
            (Some(doc), p.display().to_string())
        }
        None => match std::fs::read_to_string(recipe) {
            Ok(text) => match serde_json::from_str::<Value>(&text) {
                Ok(doc) => (Some(doc), recipe.display().to_string()),
                Err(e) => {
                    log::warn!("ignoring {}: {e}", recipe.display());
                    (None, String::new())
                }
            },
            Err(_) => (None, String::new()),
        },
    };
    Ok(classes
        .iter()
        .map(|(rel, name)| {
            if let Some(t) = doc.as_ref().and_then(|d| lookup(d, rel, name)) {
                return Description {
                    class: rel.clone(),
                    text: Some(t),
                    source: source.clone(),
                };
            }
            match BUILTIN.iter().find(|(n, _)| n == name) {
                Some((_, t)) => Description {
                    class: rel.clone(),
                    text: Some(t.to_string()),
                    source: "built-in".into(),
                },
                None => Description {
                    class: rel.clone(),
                    text: None,
                    source: "none".into(),
                },
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cls(rel: &str) -> (String, String) {
        (rel.to_string(), rel.rsplit('/').next().unwrap().to_string())
    }

    #[test]
    fn reads_nested_recipe_file_first_text() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d.json");
        std::fs::write(
            &f,
            r#"{"_comment": "x", "novel": {"isic/dermatofibroma": ["first", "second"]}, "base": {"nevus": "mole"}}"#,
        )
        .unwrap();
        let d = resolve(
            &[
                cls("isic/dermatofibroma"),
                cls("isic/nevus"),
                cls("isic/vascular_lesion"),
                cls("x/y"),
            ],
            None,
            &f,
        )
        .unwrap();
        assert_eq!(d[0].text.as_deref(), Some("first"));
        assert_eq!(d[1].text.as_deref(), Some("mole"));
        assert_eq!(d[2].source, "built-in");
        assert_eq!(d[3].text, None);
    }

    #[test]
    fn explicit_file_must_exist_and_parse() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        assert!(resolve(&[cls("a/b")], Some(&missing), &missing).is_err());
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{").unwrap();
        let err = resolve(&[cls("a/b")], Some(&bad), &missing).unwrap_err();
        assert!(format!("{err:#}").contains("not valid JSON"));
        // A missing recipe file is fine: built-ins or none.
        let d = resolve(&[cls("isic/actinic_keratosis")], None, &missing).unwrap();
        assert_eq!(d[0].source, "built-in");
    }
}
