//! On-disk cache of per-image embeddings, keyed by (image encoder SHA-256, image file SHA-256).
//!
//! One file per encoder: `<dir>/emb-<first 16 hex of encoder sha>.bin`, postcard-encoded with a
//! format version and a CRC32 trailer, replaced atomically. A missing, corrupt or foreign cache
//! file is ignored (with a warning) and rebuilt; the cache can never change a result, only skip
//! work, because a hit requires byte-identical image content and the same encoder.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct CacheFile {
    format: u32,
    encoder_sha256: String,
    entries: Vec<(Vec<u8>, Vec<f32>)>,
}

/// Embedding cache for one image encoder.
pub struct EmbeddingCache {
    path: PathBuf,
    encoder_sha256: String,
    map: HashMap<[u8; 32], Vec<f32>>,
    dirty: bool,
    /// Lookups answered from the cache / computed since open.
    pub hits: usize,
    pub misses: usize,
}

/// SHA-256 of a file's bytes.
pub fn file_sha256(path: &Path) -> anyhow::Result<[u8; 32]> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Sha256::digest(&bytes).into())
}

impl EmbeddingCache {
    /// Open (or start) the cache for `encoder_sha256` in `dir`. Never fails: an unreadable cache
    /// is logged and treated as empty.
    pub fn open(dir: &Path, encoder_sha256: &str) -> EmbeddingCache {
        let short: String = encoder_sha256.chars().take(16).collect();
        let path = dir.join(format!("emb-{short}.bin"));
        let map = match Self::read(&path, encoder_sha256) {
            Ok(m) => m,
            Err(e) => {
                if path.exists() {
                    log::warn!("ignoring embedding cache {}: {e:#}", path.display());
                }
                HashMap::new()
            }
        };
        log::debug!("embedding cache {}: {} entries", path.display(), map.len());
        EmbeddingCache {
            path,
            encoder_sha256: encoder_sha256.to_string(),
            map,
            dirty: false,
            hits: 0,
            misses: 0,
        }
    }

    fn read(path: &Path, encoder_sha256: &str) -> anyhow::Result<HashMap<[u8; 32], Vec<f32>>> {
        let bytes = std::fs::read(path)?;
        anyhow::ensure!(bytes.len() >= 4, "file too short");
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        anyhow::ensure!(
            crc32fast::hash(body).to_le_bytes() == crc,
            "checksum mismatch (corrupt file)"
        );
        let file: CacheFile = postcard::from_bytes(body).context("cannot decode")?;
        anyhow::ensure!(
            file.format == FORMAT,
            "format {} (expected {FORMAT})",
            file.format
        );
        anyhow::ensure!(
            file.encoder_sha256 == encoder_sha256,
            "written for encoder {} (using {encoder_sha256})",
            file.encoder_sha256
        );
        let mut map = HashMap::with_capacity(file.entries.len());
        for (k, v) in file.entries {
            let key: [u8; 32] = k
                .as_slice()
                .try_into()
                .map_err(|_| anyhow::anyhow!("bad key length {}", k.len()))?;
            map.insert(key, v);
        }
        Ok(map)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, file_sha: &[u8; 32]) -> Option<&[f32]> {
        self.map.get(file_sha).map(|v| v.as_slice())
    }

    pub fn insert(&mut self, file_sha: [u8; 32], embedding: Vec<f32>) {
        self.map.insert(file_sha, embedding);
        self.dirty = true;
    }

    /// Write the cache if it changed (temporary file + rename, so a crash never leaves a torn file).
    pub fn save(&mut self) -> anyhow::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create cache directory {}", dir.display()))?;
        let mut entries: Vec<(Vec<u8>, Vec<f32>)> = self
            .map
            .iter()
            .map(|(k, v)| (k.to_vec(), v.clone()))
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let file = CacheFile {
            format: FORMAT,
            encoder_sha256: self.encoder_sha256.clone(),
            entries,
        };
        let mut bytes = postcard::to_allocvec(&file).context("cannot encode embedding cache")?;
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let tmp = self
            .path
            .with_extension(format!("tmp{}", std::process::id()));
        {
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            f.write_all(&bytes)
                .and_then(|_| f.sync_all())
                .with_context(|| format!("cannot write {}", tmp.display()))?;
        }
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("cannot replace {}", self.path.display()))?;
        self.dirty = false;
        Ok(())
    }

    /// Embeddings of `paths`, in order: cached ones are read, the rest are computed with `embed`
    /// in batches of `batch` and added to the cache. `on_progress(n)` is called after each
    /// `n` images are done (hits included). Saves the cache when anything was computed.
    pub fn embed_files(
        &mut self,
        paths: &[PathBuf],
        batch: usize,
        mut embed: impl FnMut(&[PathBuf]) -> anyhow::Result<Vec<Vec<f32>>>,
        mut on_progress: impl FnMut(usize),
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        let batch = batch.max(1);
        let mut keys = Vec::with_capacity(paths.len());
        for p in paths {
            keys.push(file_sha256(p)?);
        }
        let mut out: Vec<Option<Vec<f32>>> = vec![None; paths.len()];
        let mut todo = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            match self.map.get(k) {
                Some(v) => {
                    out[i] = Some(v.clone());
                    self.hits += 1;
                }
                None => todo.push(i),
            }
        }
        on_progress(paths.len() - todo.len());
        let mut result = Ok(());
        for chunk in todo.chunks(batch) {
            let batch_paths: Vec<PathBuf> = chunk.iter().map(|&i| paths[i].clone()).collect();
            match embed(&batch_paths) {
                Ok(embs) => {
                    if embs.len() != chunk.len() {
                        result = Err(anyhow::anyhow!(
                            "encoder returned {} embeddings for {} images",
                            embs.len(),
                            chunk.len()
                        ));
                        break;
                    }
                    for (&i, e) in chunk.iter().zip(embs) {
                        self.insert(keys[i], e.clone());
                        out[i] = Some(e);
                        self.misses += 1;
                    }
                    on_progress(chunk.len());
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // Keep what was computed even when a later batch failed.
        self.save()?;
        result?;
        Ok(out.into_iter().map(|v| v.expect("filled")).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_images(dir: &Path, n: usize) -> Vec<PathBuf> {
        (0..n)
            .map(|i| {
                let p = dir.join(format!("{i}.jpg"));
                std::fs::write(&p, format!("image {i}")).unwrap();
                p
            })
            .collect()
    }

    fn fake_embed(
        calls: &mut usize,
    ) -> impl FnMut(&[PathBuf]) -> anyhow::Result<Vec<Vec<f32>>> + '_ {
        move |paths| {
            *calls += paths.len();
            Ok(paths
                .iter()
                .map(|p| vec![std::fs::read(p).unwrap().len() as f32, 1.0])
                .collect())
        }
    }

    #[test]
    fn second_pass_is_served_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let imgs = write_images(dir.path(), 7);
        let cache_dir = dir.path().join("cache");
        let mut calls = 0;
        let mut c = EmbeddingCache::open(&cache_dir, "abc");
        let first = c
            .embed_files(&imgs, 3, fake_embed(&mut calls), |_| {})
            .unwrap();
        assert_eq!(calls, 7);
        assert_eq!((c.hits, c.misses), (0, 7));

        let mut calls2 = 0;
        let mut c2 = EmbeddingCache::open(&cache_dir, "abc");
        assert_eq!(c2.len(), 7);
        let mut done = 0;
        let second = c2
            .embed_files(&imgs, 3, fake_embed(&mut calls2), |n| done += n)
            .unwrap();
        assert_eq!(calls2, 0);
        assert_eq!(done, 7);
        assert_eq!(first, second);

        // Another encoder does not see these entries.
        let mut calls3 = 0;
        let mut c3 = EmbeddingCache::open(&cache_dir, "def");
        c3.embed_files(&imgs, 3, fake_embed(&mut calls3), |_| {})
            .unwrap();
        assert_eq!(calls3, 7);
    }

    #[test]
    fn changed_file_content_misses() {
        let dir = tempfile::tempdir().unwrap();
        let imgs = write_images(dir.path(), 2);
        let mut calls = 0;
        let mut c = EmbeddingCache::open(dir.path(), "abc");
        c.embed_files(&imgs, 8, fake_embed(&mut calls), |_| {})
            .unwrap();
        std::fs::write(&imgs[1], "different bytes").unwrap();
        let mut calls2 = 0;
        let mut c2 = EmbeddingCache::open(dir.path(), "abc");
        let e = c2
            .embed_files(&imgs, 8, fake_embed(&mut calls2), |_| {})
            .unwrap();
        assert_eq!(calls2, 1);
        assert_eq!(e[1][0], "different bytes".len() as f32);
    }

    #[test]
    fn corrupt_cache_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let imgs = write_images(dir.path(), 3);
        let mut calls = 0;
        let mut c = EmbeddingCache::open(dir.path(), "abc");
        c.embed_files(&imgs, 8, fake_embed(&mut calls), |_| {})
            .unwrap();
        let path = c.path().to_path_buf();
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let c2 = EmbeddingCache::open(dir.path(), "abc");
        assert!(c2.is_empty());
    }

    #[test]
    fn failing_batch_keeps_earlier_work_and_reports_error() {
        let dir = tempfile::tempdir().unwrap();
        let imgs = write_images(dir.path(), 4);
        let mut c = EmbeddingCache::open(dir.path(), "abc");
        let mut n = 0;
        let err = c
            .embed_files(
                &imgs,
                2,
                |p| {
                    n += 1;
                    if n == 2 {
                        anyhow::bail!("cannot decode {}", p[0].display())
                    }
                    Ok(p.iter().map(|_| vec![0.0]).collect())
                },
                |_| {},
            )
            .unwrap_err();
        assert!(err.to_string().contains("cannot decode"));
        assert_eq!(EmbeddingCache::open(dir.path(), "abc").len(), 2);
    }
}
