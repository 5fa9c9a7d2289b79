//! PEM files for TLS, shared by the broker's listeners, the uplinks and the config check:
//! certificate chains, CA bundles and private keys (PKCS#8, PKCS#1/RSA, SEC1/EC), read with
//! rustls' own PEM parser. Every error names the file and what is wrong with it.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::{self as pki_pem, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("cannot read {what} file {path}: {source}", path = path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} file {path} is not valid PEM: {source}", path = path.display())]
    Invalid {
        what: &'static str,
        path: PathBuf,
        source: PemSyntax,
    },
    #[error(
        "{what} file {path} contains no PEM certificate (expected a \
         `-----BEGIN CERTIFICATE-----` block)",
        path = path.display()
    )]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("{what} file {path}: certificate #{index} is not a valid CA certificate: {reason}", path = path.display())]
    BadCa {
        what: &'static str,
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error(
        "key file {path} contains no private key (expected PEM `PRIVATE KEY`, \
         `RSA PRIVATE KEY` or `EC PRIVATE KEY`)",
        path = path.display()
    )]
    NoKey { path: PathBuf },
}

/// What is wrong in a file's PEM, with the markers it quotes shown as text.
#[derive(Debug)]
pub struct PemSyntax(pki_pem::Error);

impl fmt::Display for PemSyntax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            pki_pem::Error::MissingSectionEnd { end_marker } => write!(
                f,
                "section end \"-----END {}-----\" missing",
                String::from_utf8_lossy(end_marker)
            ),
            pki_pem::Error::IllegalSectionStart { line } => write!(
                f,
                "illegal section start: {:?}",
                String::from_utf8_lossy(line)
            ),
            other => other.fmt(f),
        }
    }
}

impl std::error::Error for PemSyntax {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Why a PEM file is unusable: it cannot be read, or its PEM is broken.
enum Unusable {
    Read(std::io::Error),
    Invalid(PemSyntax),
}

impl From<pki_pem::Error> for Unusable {
    fn from(error: pki_pem::Error) -> Unusable {
        match error {
            pki_pem::Error::Io(source) => Unusable::Read(source),
            other => Unusable::Invalid(PemSyntax(other)),
        }
    }
}

impl Unusable {
    fn naming(self, what: &'static str, path: &Path) -> PemError {
        let path = path.to_path_buf();
        match self {
            Unusable::Read(source) => PemError::Read { what, path, source },
            Unusable::Invalid(source) => PemError::Invalid { what, path, source },
        }
    }
}

/// Every item of type `T` in the PEM file at `path`, in file order. Broken PEM anywhere in
/// the file is an error, even after the items wanted.
fn read_all<T: PemObject>(path: &Path) -> Result<Vec<T>, Unusable> {
    let items = T::pem_file_iter(path)?;
    items
        .collect::<Result<Vec<T>, _>>()
        .map_err(|e| Unusable::Invalid(PemSyntax(e)))
}

/// Every certificate in a PEM file (a chain, leaf first), at least one.
pub fn certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = read_all(path).map_err(|e| e.naming(what, path))?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// A CA bundle as trust roots.
pub fn ca_roots(what: &'static str, path: &Path) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    for (index, cert) in certificates(what, path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| PemError::BadCa {
            what,
            path: path.to_path_buf(),
            index: index + 1,
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The first private key in a PEM file.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    match PrivateKeyDer::from_pem_file(path) {
        Ok(key) => Ok(key),
        Err(pki_pem::Error::NoItemsFound) => Err(PemError::NoKey {
            path: path.to_path_buf(),
        }),
        Err(error) => Err(Unusable::from(error).naming("key", path)),
    }
}

/// What the files at `paths` hold now, as one number: a reload compares it with the one
/// taken when they were loaded to tell whether a certificate, key or CA file was replaced
/// on disk (certificate rotation). A file that cannot be read counts as its error kind.
pub fn fingerprint<'a>(paths: impl IntoIterator<Item = &'a Path>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for path in paths {
        path.hash(&mut hasher);
        match std::fs::read(path) {
            Ok(bytes) => bytes.hash(&mut hasher),
            Err(error) => error.kind().hash(&mut hasher),
        }
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &tempfile::TempDir, name: &str, contents: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("write");
        path
    }

    #[test]
    fn certificates_and_keys_are_read_from_pem_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let cert_path = file(&dir, "cert.pem", &cert.pem());
        let key_path = file(&dir, "key.pem", &key.serialize_pem());
        assert_eq!(certificates("cert", &cert_path).expect("certs").len(), 1);
        ca_roots("CA", &cert_path).expect("roots");
        private_key(&key_path).expect("key");
        let both = file(
            &dir,
            "both.pem",
            &format!("{}{}", cert.pem(), key.serialize_pem()),
        );
        assert_eq!(certificates("cert", &both).expect("certs").len(), 1);
        private_key(&both).expect("key");
    }

    #[test]
    fn every_error_says_what_is_wrong_and_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let garbage = file(&dir, "garbage.pem", "hello\n");
        let broken = file(&dir, "broken.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n");

        let error = certificates("cert", &missing)
            .expect_err("missing")
            .to_string();
        assert!(error.starts_with("cannot read cert file "), "{error}");
        assert!(error.contains("missing.pem"), "{error}");
        let error = certificates("CA", &garbage)
            .expect_err("no certs")
            .to_string();
        assert!(
            error.contains("garbage.pem contains no PEM certificate"),
            "{error}"
        );
        let error = private_key(&garbage).expect_err("no key").to_string();
        assert!(
            error.contains("garbage.pem contains no private key"),
            "{error}"
        );
        let error = certificates("cert", &broken)
            .expect_err("broken")
            .to_string();
        assert!(
            error.contains(
                "broken.pem is not valid PEM: section end \"-----END CERTIFICATE-----\" missing"
            ),
            "{error}"
        );
    }
}
