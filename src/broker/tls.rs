//! TLS for broker listeners: the rustls server configuration built once per listener at
//! start (certificate chain and key, optionally a CA for client certificates, required or
//! optional), and the client certificate's common name for `identity_as_username`.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;

use crate::broker::config::ListenerTls;
use crate::pem::{self, PemError};

/// A listener's TLS files cannot be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS {0}")]
    Pem(#[from] PemError),
    #[error("TLS client_ca file {path}: {source}")]
    ClientCa {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("TLS cert {cert} and key {key} cannot be used together: {source}")]
    CertKey {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// The rustls server configuration for one listener (ring provider, TLS 1.2 and 1.3).
pub(crate) fn server_config(tls: &ListenerTls) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = pem::certificates("cert", &tls.cert)?;
    let key = pem::private_key(&tls.key)?;
    let verifier = match &tls.client_ca {
        Some(ca) => {
            let roots = pem::ca_roots("client_ca", ca)?;
            let builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let builder = if tls.require_client_cert {
                builder
            } else {
                builder.allow_unauthenticated()
            };
            builder.build().map_err(|source| TlsError::ClientCa {
                path: ca.clone(),
                source,
            })?
        }
        None => WebPkiClientVerifier::no_client_auth(),
    };
    let cert_key = |source: rustls::Error| TlsError::CertKey {
        cert: tls.cert.clone(),
        key: tls.key.clone(),
        source,
    };
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(cert_key)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(cert_key)?;
    Ok(Arc::new(config))
}

/// The common name (CN) of the client certificate the peer presented, if any. Only
/// certificates the listener's verifier accepted get this far: the TLS handshake fails
/// for any other.
pub(crate) fn peer_common_name(conn: &rustls::ServerConnection) -> Option<String> {
    let cert = conn.peer_certificates()?.first()?;
    common_name(cert.as_ref())
}

/// The first CN of a DER certificate's subject (UTF8String, PrintableString or IA5String).
fn common_name(der: &[u8]) -> Option<String> {
    use x509_cert::der::asn1::{Ia5StringRef, PrintableStringRef, Utf8StringRef};
    use x509_cert::der::oid::ObjectIdentifier;
    use x509_cert::der::Decode as _;
    const CN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let value = cert
        .tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|attribute| attribute.oid == CN)?
        .value
        .clone();
    let name = value
        .decode_as::<Utf8StringRef<'_>>()
        .map(|s| s.as_str().to_owned())
        .or_else(|_| {
            value
                .decode_as::<PrintableStringRef<'_>>()
                .map(|s| s.as_str().to_owned())
        })
        .or_else(|_| {
            value
                .decode_as::<Ia5StringRef<'_>>()
                .map(|s| s.as_str().to_owned())
        })
        .ok()?;
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::RootCertStore;
    use rustls::{ClientConfig, ClientConnection, ServerConnection};
    use std::path::Path;

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    fn ca(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("CA cert");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(ca: &Ca, cn: &str, sans: &[&str]) -> (String, String) {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &ca.issuer).expect("leaf cert");
        (cert.pem(), key.serialize_pem())
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    /// Run a handshake in memory; the server connection afterwards, or the error.
    fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> Result<ServerConnection, rustls::Error> {
        let mut server = ServerConnection::new(server)?;
        let name = ServerName::try_from("localhost").expect("name");
        let mut client = ClientConnection::new(client, name)?;
        for _ in 0..20 {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).expect("client writes");
            server.read_tls(&mut &buf[..]).expect("server reads");
            server.process_new_packets()?;
            let mut buf = Vec::new();
            server.write_tls(&mut buf).expect("server writes");
            client.read_tls(&mut &buf[..]).expect("client reads");
            client.process_new_packets()?;
            if !server.is_handshaking() && !client.is_handshaking() {
                return Ok(server);
            }
        }
        panic!("handshake did not finish");
    }

    fn client_config(ca_pem: &str, identity: Option<(&str, &str)>) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.expect("pem")).expect("root");
        }
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots);
        let config = match identity {
            Some((cert, key)) => {
                let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("certs");
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
                builder
                    .with_client_auth_cert(certs, key)
                    .expect("client auth")
            }
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }

    #[test]
    fn client_certificates_are_verified_and_their_cn_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server_ca = ca("server CA");
        let client_ca = ca("client CA");
        let other_ca = ca("other CA");
        let (cert, key) = leaf(&server_ca, "broker", &["localhost"]);
        let tls = ListenerTls {
            cert: write(dir.path(), "cert.pem", &cert),
            key: write(dir.path(), "key.pem", &key),
            client_ca: Some(write(dir.path(), "ca.pem", &client_ca.pem)),
            require_client_cert: true,
            identity_as_username: true,
        };
        let required = server_config(&tls).expect("server config");
        let optional = server_config(&ListenerTls {
            require_client_cert: false,
            ..tls.clone()
        })
        .expect("server config");

        let (good_cert, good_key) = leaf(&client_ca, "sensor-7", &[]);
        let (bad_cert, bad_key) = leaf(&other_ca, "intruder", &[]);
        let good = client_config(&server_ca.pem, Some((&good_cert, &good_key)));
        let bad = client_config(&server_ca.pem, Some((&bad_cert, &bad_key)));
        let none = client_config(&server_ca.pem, None);

        let server = handshake(required.clone(), good.clone()).expect("accepted");
        assert_eq!(peer_common_name(&server).as_deref(), Some("sensor-7"));
        assert!(handshake(required.clone(), bad.clone()).is_err());
        assert!(handshake(required, none.clone()).is_err());

        let server = handshake(optional.clone(), none).expect("optional: no cert is fine");
        assert_eq!(peer_common_name(&server), None);
        assert!(handshake(optional.clone(), bad).is_err());
        let server = handshake(optional, good).expect("accepted");
        assert_eq!(peer_common_name(&server).as_deref(), Some("sensor-7"));
    }

    #[test]
    fn bytes_that_are_no_certificate_have_no_common_name() {
        assert_eq!(common_name(&[]), None);
        assert_eq!(common_name(b"\x30\x03\x02\x01\x00"), None);
        assert_eq!(common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server_ca = ca("server CA");
        let (cert, key) = leaf(&server_ca, "broker", &["localhost"]);
        let (_, other_key) = leaf(&server_ca, "other", &["localhost"]);
        let cert = write(dir.path(), "cert.pem", &cert);
        let key = write(dir.path(), "key.pem", &key);
        let garbage = write(dir.path(), "garbage.pem", "hello\n");
        let tls = ListenerTls {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: None,
            require_client_cert: false,
            identity_as_username: false,
        };
        server_config(&tls).expect("valid");

        let error = server_config(&ListenerTls {
            cert: garbage.clone(),
            ..tls.clone()
        })
        .expect_err("no certificate");
        assert!(error.to_string().contains("garbage.pem"), "{error}");
        let error = server_config(&ListenerTls {
            key: garbage.clone(),
            ..tls.clone()
        })
        .expect_err("no key");
        assert!(error.to_string().contains("garbage.pem"), "{error}");
        let error = server_config(&ListenerTls {
            client_ca: Some(dir.path().join("missing.pem")),
            ..tls.clone()
        })
        .expect_err("missing CA");
        assert!(error.to_string().contains("missing.pem"), "{error}");
        let error = server_config(&ListenerTls {
            key: write(dir.path(), "other-key.pem", &other_key),
            ..tls
        })
        .expect_err("key of another certificate");
        assert!(error.to_string().contains("other-key.pem"), "{error}");
    }
}
