//! Release signing: ed25519 keys (`cargo xtask keygen`), `SHA256SUMS` + `SHA256SUMS.sig`, and
//! verification of a bundle directory. Keys are PEM (PKCS#8 secret, SPKI public) so the device can
//! verify with stock `openssl pkeyutl -verify -rawin`.

use crate::tools;
use anyhow::{Context, Result, bail};
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const SUMS: &str = "SHA256SUMS";
pub const SIG: &str = "SHA256SUMS.sig";
/// File name of the public key inside a bundle.
pub const BUNDLE_PUBKEY: &str = "release.pub.pem";

/// Default location of the secret signing key (`$SGPS_SIGNING_KEY` overrides).
pub fn default_secret_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SGPS_SIGNING_KEY") {
        return PathBuf::from(p);
    }
    config_dir().join("release.key.pem")
}

/// The public key next to a secret key path: `<dir>/release.pub.pem`.
pub fn public_path_for(secret: &Path) -> PathBuf {
    secret.with_file_name("release.pub.pem")
}

fn config_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("sgps")
}

/// Generates a key pair: the secret (mode 0600) at `secret`, the public key at `public`.
/// Refuses to overwrite an existing secret unless `force`.
pub fn keygen(secret: &Path, public: &Path, force: bool) -> Result<()> {
    if secret.exists() && !force {
        bail!(
            "{} already exists; refusing to overwrite a signing key (devices trust its public \
             key). Pass --force to replace it, or --secret to write elsewhere.",
            secret.display()
        );
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no system randomness: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    let pem = key
        .to_pkcs8_pem(Default::default())
        .map_err(|e| anyhow::anyhow!("cannot encode key: {e}"))?;
    for p in [secret, public] {
        if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
    }
    // Write the secret to a 0600 temp file, then rename into place.
    let tmp = secret.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(pem.as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, secret).with_context(|| format!("cannot write {}", secret.display()))?;
    let pub_pem = key
        .verifying_key()
        .to_public_key_pem(Default::default())
        .map_err(|e| anyhow::anyhow!("cannot encode public key: {e}"))?;
    fs::write(public, pub_pem).with_context(|| format!("cannot write {}", public.display()))?;
    Ok(())
}

/// Loads a secret key; refuses keys readable by group/others.
pub fn load_secret(path: &Path) -> Result<SigningKey> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).with_context(|| {
        format!(
            "no signing key at {}: run `cargo xtask keygen` first (or pass --key / set \
             SGPS_SIGNING_KEY)",
            path.display()
        )
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "signing key {} is readable by other users; run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    let pem = fs::read_to_string(path)?;
    SigningKey::from_pkcs8_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{} is not an ed25519 PKCS#8 PEM key: {e}", path.display()))
}

/// Loads a public key (SPKI PEM).
pub fn load_public(path: &Path) -> Result<VerifyingKey> {
    let pem = fs::read_to_string(path)
        .with_context(|| format!("cannot read public key {}", path.display()))?;
    VerifyingKey::from_public_key_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{} is not an ed25519 public key PEM: {e}", path.display()))
}

/// PEM of a key's public half.
pub fn public_pem(key: &SigningKey) -> Result<String> {
    key.verifying_key()
        .to_public_key_pem(Default::default())
        .map_err(|e| anyhow::anyhow!("cannot encode public key: {e}"))
}

/// All regular files under `dir`, as sorted relative paths with `/` separators.
pub fn list_files(dir: &Path) -> Result<Vec<String>> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        for e in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let e = e?;
            let p = e.path();
            let ft = e.file_type()?;
            if ft.is_dir() {
                walk(base, &p, out)?;
            } else if ft.is_file() {
                let rel = p.strip_prefix(base).expect("under base");
                out.push(rel.to_string_lossy().replace('\\', "/"));
            } else {
                bail!("{} is not a regular file or directory", p.display());
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Writes `SHA256SUMS` (sha256sum format) over every file in `dir` and signs it.
pub fn write_sums_and_sign(dir: &Path, key: &SigningKey) -> Result<()> {
    let mut sums = String::new();
    for rel in list_files(dir)? {
        if rel == SUMS || rel == SIG {
            continue;
        }
        let h = tools::sha256_file(&dir.join(&rel))?;
        sums.push_str(&format!("{h}  {rel}\n"));
    }
    fs::write(dir.join(SUMS), &sums)?;
    let sig = key.sign(sums.as_bytes());
    fs::write(dir.join(SIG), sig.to_bytes())?;
    Ok(())
}

/// Verifies a bundle directory: the signature of `SHA256SUMS` under `public`, every listed
/// file's hash, and that no unlisted file is present.
pub fn verify_dir(dir: &Path, public: &VerifyingKey) -> Result<()> {
    let sums =
        fs::read(dir.join(SUMS)).with_context(|| format!("{} has no {SUMS}", dir.display()))?;
    let sig = fs::read(dir.join(SIG)).with_context(|| format!("{} has no {SIG}", dir.display()))?;
    let sig = Signature::from_slice(&sig)
        .map_err(|_| anyhow::anyhow!("{SIG} in {} is not an ed25519 signature", dir.display()))?;
    public.verify(&sums, &sig).map_err(|_| {
        anyhow::anyhow!(
            "signature check failed for {}: {SUMS} was not signed by the trusted key",
            dir.display()
        )
    })?;
    let sums = String::from_utf8(sums).context("SHA256SUMS is not UTF-8")?;
    let mut listed = BTreeSet::new();
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        let (h, rel) = line
            .split_once("  ")
            .with_context(|| format!("malformed {SUMS} line: {line}"))?;
        if rel.contains("..") || rel.starts_with('/') {
            bail!("{SUMS} names a path outside the bundle: {rel}");
        }
        let actual = tools::sha256_file(&dir.join(rel))?;
        if actual != h {
            bail!("checksum mismatch for {rel} in {}", dir.display());
        }
        listed.insert(rel.to_string());
    }
    for rel in list_files(dir)? {
        if rel != SUMS && rel != SIG && !listed.contains(&rel) {
            bail!(
                "{} contains {rel}, which {SUMS} does not list",
                dir.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keygen_writes_private_0600_and_refuses_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("k/release.key.pem");
        let p = public_path_for(&s);
        keygen(&s, &p, false).unwrap();
        assert_eq!(
            fs::metadata(&s).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let key = load_secret(&s).unwrap();
        assert_eq!(load_public(&p).unwrap(), key.verifying_key());
        assert!(keygen(&s, &p, false).is_err());
        keygen(&s, &p, true).unwrap();
        assert_ne!(load_secret(&s).unwrap().to_bytes(), key.to_bytes());
        fs::set_permissions(&s, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            load_secret(&s)
                .unwrap_err()
                .to_string()
                .contains("chmod 600")
        );
    }

    #[test]
    fn verify_rejects_tampering_extra_files_and_wrong_key() {
        let d = tempfile::tempdir().unwrap();
        let b = d.path();
        fs::create_dir(b.join("bin")).unwrap();
        fs::write(b.join("bin/sgps"), b"binary").unwrap();
        fs::write(b.join("a.txt"), b"a").unwrap();
        let key = SigningKey::from_bytes(&[7; 32]);
        write_sums_and_sign(b, &key).unwrap();
        verify_dir(b, &key.verifying_key()).unwrap();

        let other = SigningKey::from_bytes(&[8; 32]);
        assert!(verify_dir(b, &other.verifying_key()).is_err());

        fs::write(b.join("bin/sgps"), b"evil").unwrap();
        let e = verify_dir(b, &key.verifying_key()).unwrap_err().to_string();
        assert!(e.contains("bin/sgps"), "{e}");
        fs::write(b.join("bin/sgps"), b"binary").unwrap();

        fs::write(b.join("extra"), b"x").unwrap();
        assert!(verify_dir(b, &key.verifying_key()).is_err());
        fs::remove_file(b.join("extra")).unwrap();

        // Re-hashing a tampered file without the key breaks the signature.
        let sums = fs::read_to_string(b.join(SUMS)).unwrap();
        fs::write(b.join(SUMS), sums.replace("a.txt", "a.txt ")).unwrap();
        assert!(verify_dir(b, &key.verifying_key()).is_err());
    }
}
