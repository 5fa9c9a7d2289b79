//! Certificates made in the test with rcgen (a server CA and a server certificate for
//! `localhost` and 127.0.0.1, a client CA with a client certificate, and a second CA whose
//! client certificate the broker must refuse), rustls client configurations with the ring
//! provider, and listener configurations that use them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fieldmq::config::{ListenerConfig, ListenerTls};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The CN of [`Pki::client`].
pub(crate) const CLIENT_CN: &str = "sensor-1";

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate and its key, PEM.
    fn sign(&self, cn: &str, sans: &[&str]) -> Identity {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        Identity {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub(crate) struct Identity {
    pub(crate) cert: String,
    pub(crate) key: String,
}

/// Every certificate a test needs, and the files the broker reads.
pub(crate) struct Pki {
    _dir: tempfile::TempDir,
    server_ca_pem: String,
    pub(crate) server_cert: PathBuf,
    pub(crate) server_key: PathBuf,
    pub(crate) client_ca: PathBuf,
    /// Signed by the client CA, CN [`CLIENT_CN`].
    pub(crate) client: Identity,
    /// Signed by another CA the broker does not know.
    pub(crate) stranger: Identity,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write PEM file");
    path
}

impl Pki {
    pub(crate) fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let server_ca = Ca::new("fieldmq test server CA");
        let client_ca = Ca::new("fieldmq test client CA");
        let other_ca = Ca::new("somebody else's CA");
        let server = server_ca.sign("broker", &["localhost", "127.0.0.1"]);
        Pki {
            server_cert: write(dir.path(), "server.crt", &server.cert),
            server_key: write(dir.path(), "server.key", &server.key),
            client_ca: write(dir.path(), "client-ca.pem", &client_ca.pem),
            server_ca_pem: server_ca.pem.clone(),
            client: client_ca.sign(CLIENT_CN, &[]),
            stranger: other_ca.sign("stranger", &[]),
            _dir: dir,
        }
    }

    /// A listener's TLS settings; with `client_ca`, client certificates are checked
    /// (`require` makes one mandatory).
    pub(crate) fn listener_tls(&self, client_ca: bool, require: bool) -> ListenerTls {
        ListenerTls {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            client_ca: client_ca.then(|| self.client_ca.clone()),
            require_client_cert: require,
            identity_as_username: false,
        }
    }

    /// A client configuration trusting the server CA, presenting `identity` if given.
    pub(crate) fn client_config(&self, identity: Option<&Identity>) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for cert in certs(&self.server_ca_pem) {
            roots.add(cert).expect("server CA");
        }
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots);
        let config = match identity {
            Some(identity) => builder
                .with_client_auth_cert(certs(&identity.cert), key(&identity.key))
                .expect("client certificate"),
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("PEM certificates")
}

fn key(pem: &str) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("a PEM private key")
}

/// A listener on an ephemeral 127.0.0.1 port.
pub(crate) fn listener(tls: Option<ListenerTls>, websocket: bool) -> ListenerConfig {
    ListenerConfig {
        tls,
        websocket,
        ..ListenerConfig::tcp("127.0.0.1:0".parse().expect("address"))
    }
}

/// TCP then the TLS handshake to `addr` as `localhost`.
pub(crate) async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost").expect("server name");
    TlsConnector::from(config).connect(name, tcp).await
}
