//! PEM files for TLS, shared by the broker's listeners and the uplinks: certificate chains,
//! CA bundles and private keys (PKCS#8, PKCS#1/RSA, SEC1/EC), read with rustls-pemfile.
//! Every error names the file and what is wrong with it.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

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
        source: std::io::Error,
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

fn open(what: &'static str, path: &Path) -> Result<BufReader<File>, PemError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|source| PemError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })
}

/// Every certificate in a PEM file (a chain, leaf first), at least one.
pub fn certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let mut reader = open(what, path)?;
    let certs = rustls_pemfile::certs(&mut reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PemError::Invalid {
            what,
            path: path.to_path_buf(),
            source,
        })?;
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
    let mut reader = open("key", path)?;
    match rustls_pemfile::private_key(&mut reader) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(PemError::NoKey {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(PemError::Invalid {
            what: "key",
            path: path.to_path_buf(),
            source,
        }),
    }
}
