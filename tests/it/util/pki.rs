//! Certificates made in the test with rcgen: one CA builder ([`Ca`]) for servers (valid for
//! `localhost` and 127.0.0.1) and clients, the bundles the tests use ([`Pki`] for our
//! broker's listeners, [`Certs`] for Mosquitto as the cloud and the uplinks that reach it),
//! rustls client configurations with the ring provider, and listener configurations.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fieldmq::broker::config::{ListenerConfig, ListenerTls};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The CN of [`Pki::client`].
pub(crate) const CLIENT_CN: &str = "sensor-1";

/// A certificate authority that signs server and client certificates.
pub(crate) struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub(crate) pem: String,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub(crate) fn server(&self, cn: &str) -> Identity {
        let sans = vec![
            SanType::DnsName("localhost".try_into().expect("DNS name")),
            SanType::IpAddress([127, 0, 0, 1].into()),
        ];
        self.sign(cn, sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with common name `cn`.
    pub(crate) fn client(&self, cn: &str) -> Identity {
        self.sign(cn, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn sign(&self, cn: &str, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> Identity {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        // OpenSSL (Mosquitto) looks for the issuer by this key identifier.
        params.use_authority_key_identifier_extension = true;
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

/// Write `text` to `dir/name`.
pub(crate) fn write_pem(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write PEM file");
    path
}

/// Every certificate a broker test needs, and the files the broker reads: a server CA, a
/// client CA with a client certificate, and a second CA whose client certificate the broker
/// must refuse.
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

impl Pki {
    pub(crate) fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let server_ca = Ca::new("fieldmq test server CA");
        let client_ca = Ca::new("fieldmq test client CA");
        let other_ca = Ca::new("somebody else's CA");
        let server = server_ca.server("broker");
        Pki {
            server_cert: write_pem(dir.path(), "server.crt", &server.cert),
            server_key: write_pem(dir.path(), "server.key", &server.key),
            client_ca: write_pem(dir.path(), "client-ca.pem", &client_ca.pem),
            server_ca_pem: server_ca.pem.clone(),
            client: client_ca.client(CLIENT_CN),
            stranger: other_ca.client("stranger"),
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
        client_trusting(&self.server_ca_pem, identity)
    }
}

/// Certificate files for a cloud broker and its clients: a CA, a server certificate for
/// `localhost`/127.0.0.1, a client certificate signed by the CA, and a second, unrelated CA
/// with its own client.
pub(crate) struct Certs {
    pub(crate) ca: PathBuf,
    pub(crate) server_cert: PathBuf,
    pub(crate) server_key: PathBuf,
    pub(crate) client_cert: PathBuf,
    pub(crate) client_key: PathBuf,
    pub(crate) other_ca: PathBuf,
    pub(crate) other_client_cert: PathBuf,
    pub(crate) other_client_key: PathBuf,
}

/// Write a [`Certs`] set into `dir`.
pub(crate) fn make_certs(dir: &Path) -> Certs {
    let ca = Ca::new("fieldmq test CA");
    let server = ca.server("localhost");
    let client = ca.client("line1-pi");
    let other_ca = Ca::new("some other CA");
    let other_client = other_ca.client("intruder");
    Certs {
        ca: write_pem(dir, "ca.pem", &ca.pem),
        server_cert: write_pem(dir, "server.pem", &server.cert),
        server_key: write_pem(dir, "server.key", &server.key),
        client_cert: write_pem(dir, "client.pem", &client.cert),
        client_key: write_pem(dir, "client.key", &client.key),
        other_ca: write_pem(dir, "other-ca.pem", &other_ca.pem),
        other_client_cert: write_pem(dir, "other-client.pem", &other_client.cert),
        other_client_key: write_pem(dir, "other-client.key", &other_client.key),
    }
}

/// A client configuration trusting only the CA certificates in `ca_pem`, presenting
/// `identity` if given.
pub(crate) fn client_trusting(ca_pem: &str, identity: Option<&Identity>) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in certs(ca_pem) {
        roots.add(cert).expect("CA certificate");
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

/// The certificates in a PEM text.
pub(crate) fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("PEM certificates")
}

/// The private key in a PEM text.
pub(crate) fn key(pem: &str) -> PrivateKeyDer<'static> {
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
