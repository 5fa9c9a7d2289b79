//! TLS for uplinks: a rustls `ClientConfig` (ring provider) from PEM files.
//!
//! - Trust: the `ca` file, or the system roots when it is absent.
//! - Mutual TLS: `cert` (chain, leaf first) and `key` (PKCS#8, PKCS#1/RSA or SEC1/EC PEM).
//! - SNI: rumqttc sends the URL's host (a DNS name, or no SNI for an IP address, which is
//!   then checked against the certificate's IP SANs).
//! - ALPN: `alpn` (AWS IoT Core on port 443 needs `x-amzn-mqtt-ca`).
//!
//! [`validate_files`] does the same parsing for `fieldmq check`, so a bad certificate or key
//! is a config error naming the file, not a reconnect loop.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};

use super::config::TlsConfig;
use crate::pem::{self, PemError};

/// A TLS file that cannot be used, with the file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("`cert` is set but `key` is not: mutual TLS needs both (cert = {path})", path = path.display())]
    CertWithoutKey { path: PathBuf },
    #[error("`key` is set but `cert` is not: mutual TLS needs both (key = {path})", path = path.display())]
    KeyWithoutCert { path: PathBuf },
    #[error(
        "client certificate {cert} and key {key} cannot be used together: {reason}",
        cert = cert.display(),
        key = key.display()
    )]
    ClientAuth {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("no system root certificates could be loaded ({reason}): set `ca` to a CA file")]
    NoSystemRoots { reason: String },
    #[error("TLS setup failed: {reason}")]
    Setup { reason: String },
}

/// Parse every file `tls` names, as the uplink will at start. For `fieldmq check`.
pub fn validate_files(tls: &TlsConfig) -> Result<(), TlsError> {
    client_config(tls).map(|_| ())
}

/// Build the rustls client configuration for an uplink.
pub fn client_config(tls: &TlsConfig) -> Result<ClientConfig, TlsError> {
    let roots = match &tls.ca {
        Some(path) => pem::ca_roots("CA", path)?,
        None => system_roots()?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup {
            reason: e.to_string(),
        })?
        .with_root_certificates(roots);
    let mut config = match (&tls.cert, &tls.key) {
        (Some(cert_path), Some(key_path)) => {
            let certs = pem::certificates("client certificate", cert_path)?;
            let key = pem::private_key(key_path)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| TlsError::ClientAuth {
                    cert: cert_path.clone(),
                    key: key_path.clone(),
                    reason: e.to_string(),
                })?
        }
        (Some(path), None) => return Err(TlsError::CertWithoutKey { path: path.clone() }),
        (None, Some(path)) => return Err(TlsError::KeyWithoutCert { path: path.clone() }),
        (None, None) => builder.with_no_client_auth(),
    };
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(config)
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
    if added == 0 {
        let reason = loaded
            .errors
            .first()
            .map_or_else(|| "none found".to_string(), |e| e.to_string());
        return Err(TlsError::NoSystemRoots { reason });
    }
    Ok(roots)
}
