//! Support-set specifications: which images and descriptions make up each class.
//!
//! Two sources: a folder per class (`<dir>/<class>/*.jpg|png|bmp`, optional `<dir>/descriptions.json`
//! mapping class name → description) or command-line lists (`name=img1,img2`, `name=text`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::image_io::has_image_extension;

/// File name of the optional descriptions map inside a support folder.
pub const DESCRIPTIONS_FILE: &str = "descriptions.json";

/// One class: its name, support image files and optional description.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClassSpec {
    pub name: String,
    pub images: Vec<PathBuf>,
    pub description: Option<String>,
}

/// A support set before embedding.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SupportSpec {
    pub classes: Vec<ClassSpec>,
}

impl SupportSpec {
    /// Read `<dir>/<class>/*.{jpg,jpeg,png,bmp}` (classes and files sorted by name) and
    /// `<dir>/descriptions.json` when present. An empty class folder is a text-only class.
    pub fn from_dir(dir: &Path) -> Result<SupportSpec> {
        let entries = read_dir_sorted(dir)?;
        let mut classes = Vec::new();
        for p in entries {
            let name = file_name(&p);
            if !p.is_dir() || name.starts_with('.') {
                continue;
            }
            let mut images = Vec::new();
            for f in read_dir_sorted(&p)? {
                if f.is_file() && has_image_extension(&f) {
                    images.push(f);
                } else {
                    log::debug!("ignoring {} (not a .jpg/.jpeg/.png/.bmp file)", f.display());
                }
            }
            classes.push(ClassSpec {
                name,
                images,
                description: None,
            });
        }
        if classes.is_empty() {
            return Err(Error::Support(format!(
                "{} has no class folders; expected <dir>/<class>/*.jpg|png|bmp",
                dir.display()
            )));
        }
        let mut spec = SupportSpec { classes };
        let desc = dir.join(DESCRIPTIONS_FILE);
        if desc.exists() {
            spec.apply_descriptions(read_descriptions(&desc)?)?;
        }
        Ok(spec)
    }

    /// Build from `--class name=img1,img2` (empty list allowed: text-only class) and
    /// `--describe name=text` arguments. Class order follows the `--class` arguments.
    pub fn from_args(classes: &[String], describe: &[String]) -> Result<SupportSpec> {
        let mut spec = SupportSpec::default();
        for arg in classes {
            let (name, list) = split_kv(arg, "--class", "name=img1.jpg,img2.jpg")?;
            if spec.classes.iter().any(|c| c.name == name) {
                return Err(Error::Support(format!(
                    "class {name:?} is given twice with --class"
                )));
            }
            let images = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect();
            spec.classes.push(ClassSpec {
                name: name.to_string(),
                images,
                description: None,
            });
        }
        let mut map = BTreeMap::new();
        for arg in describe {
            let (name, text) = split_kv(arg, "--describe", "name=\"clinical description\"")?;
            map.insert(name.to_string(), text.to_string());
        }
        spec.apply_descriptions(map)?;
        Ok(spec)
    }

    /// Attach descriptions by class name; a name that is not a class is an error.
    /// Blank descriptions count as none.
    pub fn apply_descriptions(&mut self, map: BTreeMap<String, String>) -> Result<()> {
        for (name, text) in map {
            let Some(c) = self.classes.iter_mut().find(|c| c.name == name) else {
                return Err(Error::Support(format!(
                    "a description is given for {name:?}, which is not a class (classes: {}); \
                     for a text-only class add an empty folder / `--class {name}=`",
                    self.class_names().join(", ")
                )));
            };
            let text = text.trim();
            c.description = (!text.is_empty()).then(|| text.to_string());
        }
        Ok(())
    }

    /// Class names in order.
    pub fn class_names(&self) -> Vec<String> {
        self.classes.iter().map(|c| c.name.clone()).collect()
    }
}

/// Read a `{"class": "description", ...}` JSON file.
pub fn read_descriptions(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::Support(format!(
            "{} is not a JSON object of class name -> description: {e}",
            path.display()
        ))
    })
}

fn split_kv<'a>(arg: &'a str, flag: &str, example: &str) -> Result<(&'a str, &'a str)> {
    match arg.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim(), v)),
        _ => Err(Error::Support(format!(
            "{flag} {arg:?} is not of the form {example}"
        ))),
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::io(dir, e))?;
    v.sort();
    Ok(v)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_dir_reads_classes_images_and_descriptions() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("b_class")).unwrap();
        std::fs::create_dir_all(d.path().join("a_class")).unwrap();
        std::fs::create_dir_all(d.path().join("c_text_only")).unwrap();
        std::fs::write(d.path().join("a_class/2.PNG"), b"x").unwrap();
        std::fs::write(d.path().join("a_class/1.jpg"), b"x").unwrap();
        std::fs::write(d.path().join("a_class/notes.txt"), b"x").unwrap();
        std::fs::write(d.path().join("b_class/x.bmp"), b"x").unwrap();
        std::fs::write(
            d.path().join(DESCRIPTIONS_FILE),
            r#"{"c_text_only": "a red papule", "a_class": "  "}"#,
        )
        .unwrap();
        let s = SupportSpec::from_dir(d.path()).unwrap();
        assert_eq!(s.class_names(), ["a_class", "b_class", "c_text_only"]);
        let names: Vec<_> = s.classes[0].images.iter().map(|p| file_name(p)).collect();
        assert_eq!(names, ["1.jpg", "2.PNG"]);
        assert_eq!(s.classes[0].description, None);
        assert_eq!(s.classes[2].description.as_deref(), Some("a red papule"));
        assert!(s.classes[2].images.is_empty());
    }

    #[test]
    fn unknown_description_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a")).unwrap();
        std::fs::write(d.path().join(DESCRIPTIONS_FILE), r#"{"zz": "t"}"#).unwrap();
        let e = SupportSpec::from_dir(d.path()).unwrap_err().to_string();
        assert!(e.contains("\"zz\""), "{e}");
    }

    #[test]
    fn from_args() {
        let s = SupportSpec::from_args(
            &["mel=a.jpg, b.jpg".into(), "ak=".into()],
            &["ak=rough scaly patch".into()],
        )
        .unwrap();
        assert_eq!(
            s.classes[0].images,
            [PathBuf::from("a.jpg"), PathBuf::from("b.jpg")]
        );
        assert!(s.classes[1].images.is_empty());
        assert_eq!(
            s.classes[1].description.as_deref(),
            Some("rough scaly patch")
        );
        assert!(SupportSpec::from_args(&["noequals".into()], &[]).is_err());
        assert!(SupportSpec::from_args(&["a=x".into(), "a=y".into()], &[]).is_err());
        assert!(SupportSpec::from_args(&["a=x".into()], &["b=t".into()]).is_err());
    }
}
