//! Few-shot episode sampling over an ImageFolder tree.
//!
//! Episodes are drawn with a seeded ChaCha RNG from *sorted* file lists, so the same
//! arguments always give the same episodes on every machine. Each (shot count, episode index)
//! pair has its own RNG stream, so adding episodes or shot counts never changes existing ones.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::image_io::has_image_extension;

/// One class of the pool: its display name, its folder relative to the data dir and its images.
#[derive(Debug, Clone)]
pub struct ClassSource {
    /// Short class name (the folder name), e.g. `actinic_keratosis`.
    pub name: String,
    /// Folder relative to the data dir, e.g. `isic/actinic_keratosis`.
    pub rel: String,
    /// Global image ids (indices into [`ImagePool::images`]) of this class, in sorted path order.
    pub images: Vec<usize>,
}

/// All images of the classes under evaluation.
#[derive(Debug, Clone)]
pub struct ImagePool {
    pub data_dir: PathBuf,
    pub classes: Vec<ClassSource>,
    /// Paths relative to `data_dir`, one per global image id.
    pub images: Vec<PathBuf>,
}

impl ImagePool {
    /// Resolve class specs (`class` or `dataset/class`) under `data_dir` and list their images.
    ///
    /// A bare name is looked up as `data_dir/<name>` first, then as `data_dir/*/<name>`
    /// (it must be unique).
    pub fn open(data_dir: &Path, specs: &[String]) -> anyhow::Result<ImagePool> {
        if !data_dir.is_dir() {
            bail!(
                "data directory {} does not exist; point --data or SGPS_DATA at an ImageFolder tree (<dataset>/<class>/<image>)",
                data_dir.display()
            );
        }
        if specs.is_empty() {
            bail!("no classes given; pass --classes a,b,c");
        }
        let mut classes = Vec::new();
        let mut images = Vec::new();
        for spec in specs {
            let rel = resolve_class(data_dir, spec)?;
            if classes.iter().any(|c: &ClassSource| c.rel == rel) {
                bail!("class {spec:?} is listed twice");
            }
            let files = list_images(&data_dir.join(&rel))?;
            if files.is_empty() {
                bail!(
                    "class folder {} holds no images (.jpg/.jpeg/.png/.bmp)",
                    data_dir.join(&rel).display()
                );
            }
            let start = images.len();
            for f in files {
                images.push(Path::new(&rel).join(f));
            }
            let name = Path::new(&rel)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| rel.clone());
            classes.push(ClassSource {
                name,
                rel,
                images: (start..images.len()).collect(),
            });
        }
        Ok(ImagePool {
            data_dir: data_dir.to_path_buf(),
            classes,
            images,
        })
    }

    /// Absolute (data-dir-joined) path of an image.
    pub fn path(&self, id: usize) -> PathBuf {
        self.data_dir.join(&self.images[id])
    }
}

fn resolve_class(data_dir: &Path, spec: &str) -> anyhow::Result<String> {
    let spec = spec.trim().trim_matches('/');
    if spec.is_empty() || spec.split('/').any(|p| p == ".." || p.is_empty()) {
        bail!("invalid class name {spec:?}; use `class` or `dataset/class`");
    }
    if data_dir.join(spec).is_dir() {
        return Ok(spec.to_string());
    }
    if !spec.contains('/') {
        let mut found = Vec::new();
        let mut entries: Vec<_> = std::fs::read_dir(data_dir)
            .with_context(|| format!("cannot read data directory {}", data_dir.display()))?
            .filter_map(|e| e.ok())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            if e.path().join(spec).is_dir() {
                found.push(format!("{}/{spec}", e.file_name().to_string_lossy()));
            }
        }
        match found.len() {
            1 => return Ok(found.remove(0)),
            0 => {}
            _ => bail!(
                "class {spec:?} is ambiguous: found {}; write it as dataset/class",
                found.join(", ")
            ),
        }
    }
    bail!(
        "class {spec:?} not found under {} (expected a folder {0}/{spec} or {0}/<dataset>/{spec})",
        data_dir.display()
    )
}

/// Image file names in `dir` (not recursive), sorted by name.
pub fn list_images(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot read {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if has_image_extension(Path::new(&name)) && e.path().is_file() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// One N-way K-shot episode. `classes[w]` is the pool class index of way `w`; `support[w]` and
/// `queries[w]` are global image ids of that way (disjoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Episode {
    pub classes: Vec<usize>,
    pub support: Vec<Vec<usize>>,
    pub queries: Vec<Vec<usize>>,
}

/// Sampling parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpisodeSpec {
    pub ways: usize,
    pub shots: usize,
    pub queries: usize,
    pub episodes: usize,
    pub seed: u64,
}

/// Draw `spec.episodes` episodes from `pool`.
pub fn sample_episodes(pool: &ImagePool, spec: &EpisodeSpec) -> anyhow::Result<Vec<Episode>> {
    let n_classes = pool.classes.len();
    if spec.ways < 2 || spec.ways > n_classes {
        bail!(
            "--ways {} is not possible with {} classes (need 2 <= ways <= number of classes)",
            spec.ways,
            n_classes
        );
    }
    if spec.queries == 0 {
        bail!("--queries must be at least 1");
    }
    let need = spec.shots + spec.queries;
    for c in &pool.classes {
        if c.images.len() < need {
            bail!(
                "class {} has only {} images but {} shots + {} queries per episode need {need}; lower --shots or --queries",
                c.rel,
                c.images.len(),
                spec.shots,
                spec.queries
            );
        }
    }
    let mut out = Vec::with_capacity(spec.episodes);
    for e in 0..spec.episodes {
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        rng.set_stream(((spec.shots as u64) << 40) | e as u64);
        let mut classes: Vec<usize> = if spec.ways == n_classes {
            (0..n_classes).collect()
        } else {
            sample(&mut rng, n_classes, spec.ways).into_vec()
        };
        classes.sort_unstable();
        let mut support = Vec::with_capacity(spec.ways);
        let mut queries = Vec::with_capacity(spec.ways);
        for &c in &classes {
            let imgs = &pool.classes[c].images;
            let picked = sample(&mut rng, imgs.len(), need).into_vec();
            support.push(picked[..spec.shots].iter().map(|&i| imgs[i]).collect());
            queries.push(picked[spec.shots..].iter().map(|&i| imgs[i]).collect());
        }
        out.push(Episode {
            classes,
            support,
            queries,
        });
    }
    Ok(out)
}

/// SHA-256 (hex) of the episode list: class folders and relative image paths, in order.
/// Identical episodes on any machine give the same hash.
pub fn episodes_hash(pool: &ImagePool, episodes: &[Episode]) -> String {
    let mut h = Sha256::new();
    for (i, ep) in episodes.iter().enumerate() {
        h.update(format!("episode {i}\n"));
        for (w, &c) in ep.classes.iter().enumerate() {
            h.update(format!("class {}\n", pool.classes[c].rel));
            for &s in &ep.support[w] {
                h.update(format!("s {}\n", pool.images[s].to_string_lossy()));
            }
            for &q in &ep.queries[w] {
                h.update(format!("q {}\n", pool.images[q].to_string_lossy()));
            }
        }
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn fake_pool(sizes: &[usize]) -> ImagePool {
        let mut classes = Vec::new();
        let mut images = Vec::new();
        for (c, &n) in sizes.iter().enumerate() {
            let start = images.len();
            for i in 0..n {
                images.push(PathBuf::from(format!("d/c{c}/{i:04}.jpg")));
            }
            classes.push(ClassSource {
                name: format!("c{c}"),
                rel: format!("d/c{c}"),
                images: (start..images.len()).collect(),
            });
        }
        ImagePool {
            data_dir: PathBuf::from("/nonexistent"),
            classes,
            images,
        }
    }

    fn spec(ways: usize, shots: usize, episodes: usize, seed: u64) -> EpisodeSpec {
        EpisodeSpec {
            ways,
            shots,
            queries: 3,
            episodes,
            seed,
        }
    }

    #[test]
    fn support_and_queries_are_disjoint_and_from_the_right_class() {
        let pool = fake_pool(&[10, 12, 9, 30]);
        let eps = sample_episodes(&pool, &spec(3, 5, 50, 0)).unwrap();
        assert_eq!(eps.len(), 50);
        for ep in &eps {
            assert_eq!(ep.classes.len(), 3);
            let mut seen = HashSet::new();
            for (w, &c) in ep.classes.iter().enumerate() {
                assert_eq!(ep.support[w].len(), 5);
                assert_eq!(ep.queries[w].len(), 3);
                for &i in ep.support[w].iter().chain(&ep.queries[w]) {
                    assert!(pool.classes[c].images.contains(&i));
                    assert!(seen.insert(i), "image {i} used twice in one episode");
                }
            }
        }
    }

    #[test]
    fn same_seed_same_episodes_other_seed_differs() {
        let pool = fake_pool(&[20, 20, 20, 20]);
        let a = sample_episodes(&pool, &spec(4, 1, 20, 0)).unwrap();
        let b = sample_episodes(&pool, &spec(4, 1, 20, 0)).unwrap();
        let c = sample_episodes(&pool, &spec(4, 1, 20, 1)).unwrap();
        assert_eq!(a, b);
        assert_eq!(episodes_hash(&pool, &a), episodes_hash(&pool, &b));
        assert_ne!(a, c);
        assert_ne!(episodes_hash(&pool, &a), episodes_hash(&pool, &c));
        // Asking for more episodes keeps the first ones.
        let longer = sample_episodes(&pool, &spec(4, 1, 30, 0)).unwrap();
        assert_eq!(&longer[..20], &a[..]);
    }

    #[test]
    fn episodes_vary_and_cover_the_classes() {
        let pool = fake_pool(&[20, 20, 20, 20, 20]);
        let eps = sample_episodes(&pool, &spec(2, 1, 200, 3)).unwrap();
        let distinct: HashSet<_> = eps.iter().map(|e| e.support.clone()).collect();
        assert!(distinct.len() > 150);
        let mut used = [0usize; 5];
        for e in &eps {
            for &c in &e.classes {
                used[c] += 1;
            }
        }
        assert!(used.iter().all(|&u| u > 40), "{used:?}");
    }

    #[test]
    fn too_small_class_is_a_clear_error() {
        let pool = fake_pool(&[5, 20]);
        let err = sample_episodes(&pool, &spec(2, 5, 1, 0)).unwrap_err();
        assert!(err.to_string().contains("has only 5 images"), "{err}");
        let err = sample_episodes(&pool, &spec(3, 1, 1, 0)).unwrap_err();
        assert!(err.to_string().contains("--ways"), "{err}");
    }

    #[test]
    fn resolves_bare_and_qualified_class_names() {
        let dir = tempfile::tempdir().unwrap();
        for (d, c) in [("a", "x"), ("a", "y"), ("b", "y")] {
            let p = dir.path().join(d).join(c);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("2.JPG"), b"x").unwrap();
            std::fs::write(p.join("1.png"), b"x").unwrap();
            std::fs::write(p.join("notes.txt"), b"x").unwrap();
        }
        let pool = ImagePool::open(dir.path(), &["x".into(), "b/y".into()]).unwrap();
        assert_eq!(pool.classes[0].rel, "a/x");
        assert_eq!(pool.classes[1].rel, "b/y");
        assert_eq!(pool.images.len(), 4);
        assert_eq!(pool.images[0], PathBuf::from("a/x/1.png"));
        assert_eq!(pool.images[1], PathBuf::from("a/x/2.JPG"));
        let err = ImagePool::open(dir.path(), &["y".into()]).unwrap_err();
        assert!(err.to_string().contains("ambiguous"), "{err}");
        let err = ImagePool::open(dir.path(), &["z".into()]).unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
    }
}
