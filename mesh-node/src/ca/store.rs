//! The CA's state directory: the generated root key (0600 in a 0700 directory) and the root
//! certificate nodes are given to trust.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use super::error::CaError;
use super::signer::{CaSigner, new_root};

pub const ROOT_CERT_FILE: &str = "root-cert.pem";
const ROOT_KEY_FILE: &str = "root-key.pem";

/// Loads the root of `dir`, creating the directory and a new root on first start.
pub(crate) fn load_or_create(dir: &Path, trust_domain: &str) -> Result<CaSigner, CaError> {
    prepare_dir(dir)?;
    let key_path = dir.join(ROOT_KEY_FILE);
    let cert_path = dir.join(ROOT_CERT_FILE);
    if key_path.exists() {
        tighten(&key_path, 0o600)?;
        let key = fs::read_to_string(&key_path).map_err(|e| CaError::file(&key_path, e))?;
        let cert = fs::read_to_string(&cert_path).map_err(|e| CaError::file(&cert_path, e))?;
        // The file is the published trust bundle: the CA's root first, then any other root of
        // a rotation in progress (`--extra-roots`).
        let root = first_certificate(&cert).map_err(|e| CaError::file(&cert_path, e))?;
        tracing::info!(dir = %dir.display(), "loaded the CA root");
        return CaSigner::from_pem(&root, &key, trust_domain);
    }
    let (cert, key) = new_root(trust_domain)?;
    // The key goes first: a directory holding a key but no certificate is detectable and
    // fails loudly at the next start, the reverse would silently mint a second root.
    write_atomically(&key_path, key.as_bytes(), 0o600)?;
    write_atomically(&cert_path, cert.as_bytes(), 0o644)?;
    tracing::info!(dir = %dir.display(), "created a new CA root (ECDSA P-256, 10 years)");
    CaSigner::from_pem(&cert, &key, trust_domain)
}

/// The first PEM certificate of `text`, re-encoded.
fn first_certificate(text: &str) -> Result<String, String> {
    let first = pem::parse_many(text)
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|p| p.tag() == "CERTIFICATE")
        .ok_or("no certificate in the file")?;
    Ok(pem::encode_config(&first, pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF)))
}

/// Publishes the trust anchor for nodes at `<dir>/root-cert.pem`.
pub(crate) fn write_root_cert(dir: &Path, pem: &str) -> Result<(), CaError> {
    prepare_dir(dir)?;
    write_atomically(&dir.join(ROOT_CERT_FILE), pem.as_bytes(), 0o644)
}

fn prepare_dir(dir: &Path) -> Result<(), CaError> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| CaError::file(dir, e))?;
    tighten(dir, 0o700)
}

/// Removes group/other bits someone may have added, so the key is never readable by others.
fn tighten(path: &Path, mode: u32) -> Result<(), CaError> {
    let meta = fs::metadata(path).map_err(|e| CaError::file(path, e))?;
    let current = meta.permissions().mode() & 0o777;
    if current & !mode != 0 {
        tracing::warn!(path = %path.display(), "permissions {current:o} were too open; setting {mode:o}");
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| CaError::file(path, e))?;
    }
    Ok(())
}

/// Write to a temporary file created with `mode`, then rename: readers never see a partial
/// file and the key is never briefly world-readable.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| CaError::file(&tmp, e))?;
    file.write_all(contents).and_then(|()| file.sync_all()).map_err(|e| CaError::file(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| CaError::file(path, e))
}
