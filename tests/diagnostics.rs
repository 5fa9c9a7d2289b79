//! What the gateway tells its operator, with the real binary: `fieldmq check` shows each
//! listener as the URL clients use and warns about password and ACL files every user may
//! read (`fieldmq run` logs the same warnings), and failed TLS handshakes are logged with
//! the client's address and the reason, at most 10 lines a minute per listener.

#[allow(dead_code)]
#[path = "support/mqtt.rs"]
mod mqtt;
#[path = "support/process.rs"]
mod process;
#[allow(dead_code)]
#[path = "support/tls.rs"]
mod tls;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use mqtt::within;
use process::GatewayProcess;
use rustls::pki_types::{pem::PemObject, CertificateDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn check_prints_each_listener_as_the_url_clients_connect_to() {
    let pki = tls::Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = format!(
        "tls = {{ cert = \"{}\", key = \"{}\" }}",
        pki.server_cert.display(),
        pki.server_key.display()
    );
    let config = dir.path().join("fieldmq.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"gw\"\ndata_dir = \"data\"\n[broker]\nallow_anonymous = true\n\
             [[broker.listeners]]\nbind = \"127.0.0.1:1883\"\n\
             [[broker.listeners]]\nbind = \"127.0.0.1:8883\"\n{tls}\n\
             [[broker.listeners]]\nbind = \"127.0.0.1:8083\"\nwebsocket = true\n\
             [[broker.listeners]]\nbind = \"127.0.0.1:8084\"\nwebsocket = true\nwebsocket_path = \"/ws\"\n{tls}\n"
        ),
    )
    .expect("write config");
    let (code, stdout, stderr) = process::run_to_end(&["check", "-c"], Some(&config));
    assert_eq!(code, Some(0), "{stderr}");
    for url in [
        "mqtt://127.0.0.1:1883 ",
        "mqtts://127.0.0.1:8883 ",
        "ws://127.0.0.1:8083/mqtt ",
        "wss://127.0.0.1:8084/ws ",
    ] {
        assert!(stdout.contains(url), "{url} in:\n{stdout}");
    }
}

/// A config with a password file and an ACL file (mode 0644 as written by most editors).
fn config_with_auth_files(dir: &Path) -> std::path::PathBuf {
    let passwd = dir.join("passwd");
    std::fs::write(
        &passwd,
        format!("{}\n", fieldmq::broker::hash_password("user", "pw")),
    )
    .expect("passwd");
    std::fs::write(dir.join("acl"), "topic readwrite #\n").expect("acl");
    chmod(&passwd, 0o644);
    chmod(&dir.join("acl"), 0o644);
    let config = dir.join("fieldmq.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"gw\"\ndata_dir = \"{}\"\n[broker]\npassword_file = \"passwd\"\n\
             acl_file = \"acl\"\ndurability = \"memory\"\n[[broker.listeners]]\nbind = \"127.0.0.1:0\"\n",
            dir.join("data").display()
        ),
    )
    .expect("write config");
    config
}

#[test]
fn check_and_run_warn_about_password_and_acl_files_every_user_may_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_with_auth_files(dir.path());

    let (code, stdout, stderr) = process::run_to_end(&["check", "-c"], Some(&config));
    assert_eq!(code, Some(0), "a warning is not an error: {stderr}");
    assert!(
        stdout.contains("warning: password file") && stdout.contains("readable by every user"),
        "{stdout}"
    );
    assert!(stdout.contains("warning: ACL file"), "{stdout}");

    let mut gateway = GatewayProcess::start(&config);
    assert!(gateway.terminate().success());
    let log: Vec<String> = gateway.log.try_iter().collect();
    let warned = |what: &str| {
        log.iter()
            .any(|l| l.contains("WARN") && l.contains(what) && l.contains("every user"))
    };
    assert!(warned("password file"), "{log:#?}");
    assert!(warned("ACL file"), "{log:#?}");

    // Readable by owner and group only (the documented chmod 640): no warning.
    chmod(&dir.path().join("passwd"), 0o640);
    chmod(&dir.path().join("acl"), 0o640);
    let (code, stdout, _) = process::run_to_end(&["check", "-c"], Some(&config));
    assert_eq!(code, Some(0));
    assert!(!stdout.contains("warning:"), "{stdout}");
}

/// A TLS client that trusts only `ca_pem` (not the CA that signed the server).
fn client_trusting(ca_pem: &Path) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).expect("CA file") {
        roots.add(cert.expect("PEM")).expect("root");
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Plain MQTT to the TLS port: returns once the gateway has closed the socket.
async fn plain_tcp_to_tls_port(addr: std::net::SocketAddr) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let _ = stream
        .write_all(&mqtt::packet::Connect::v311("plain").encode())
        .await;
    let mut buf = [0u8; 256];
    within("the gateway to close", async {
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// A TLS attempt that fails; returns once it has.
async fn failed_tls(addr: std::net::SocketAddr, config: Arc<rustls::ClientConfig>) {
    within("a refused TLS client", async {
        if let Ok(mut stream) = tls::connect(addr, config).await {
            // TLS 1.3: the server checks the client's certificate after the client's side
            // of the handshake; the refusal shows on the first read.
            let _ = stream
                .write_all(&mqtt::packet::Connect::v311("tls").encode())
                .await;
            let mut buf = [0u8; 16];
            assert!(
                !matches!(stream.read(&mut buf).await, Ok(n) if n > 0),
                "the gateway answered a client it should refuse"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_tls_handshakes_are_logged_with_peer_and_reason_at_most_10_a_minute() {
    let pki = tls::Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("fieldmq.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"gw\"\ndata_dir = \"{}\"\n[broker]\nallow_anonymous = true\n\
             durability = \"memory\"\n[[broker.listeners]]\nbind = \"127.0.0.1:0\"\n\
             tls = {{ cert = \"{}\", key = \"{}\", client_ca = \"{}\", require_client_cert = true }}\n",
            dir.path().join("data").display(),
            pki.server_cert.display(),
            pki.server_key.display(),
            pki.client_ca.display()
        ),
    )
    .expect("write config");
    let mut gateway = GatewayProcess::start(&config);
    let addr = gateway.addr;

    // Three kinds of failure: plain TCP, a client that does not trust the server's
    // certificate, a client without the required certificate.
    plain_tcp_to_tls_port(addr).await;
    failed_tls(addr, client_trusting(&pki.client_ca)).await;
    failed_tls(addr, pki.client_config(None)).await;
    // Then a scanner's worth of them.
    for _ in 0..20 {
        plain_tcp_to_tls_port(addr).await;
    }
    assert!(gateway.terminate().success());

    let log: Vec<String> = gateway.log.try_iter().collect();
    let failures: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("TLS handshake failed"))
        .collect();
    assert_eq!(
        failures.len(),
        10,
        "23 failures within a minute: 10 lines\n{failures:#?}"
    );
    for line in &failures {
        assert!(
            line.contains("WARN") && line.contains("peer=127.0.0.1:") && line.contains("reason="),
            "{line}"
        );
    }
    let reason = |i: usize| {
        failures[i]
            .split("reason=")
            .nth(1)
            .unwrap_or("")
            .to_lowercase()
    };
    assert!(
        reason(0).contains("corrupt") || reason(0).contains("invalid"),
        "plain TCP: {}",
        failures[0]
    );
    assert!(
        reason(1).contains("alert"),
        "untrusted server: {}",
        failures[1]
    );
    assert!(
        reason(2).contains("certificate"),
        "no client certificate: {}",
        failures[2]
    );
}
