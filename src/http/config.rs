//! The `[http]` table: where the HTTP listener binds, its optional TLS and basic
//! authentication, and its limits. Its types, their defaults (each written once, below)
//! and the section's validation. Without the table there is no HTTP listener.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{Checker, Pem, RawSize, S};

/// Connections served at once; past it a new connection is closed at once.
const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// The longest a client may take to send a request's headers (slow-loris).
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest one connection stays open, requests or not: keep-alive has an end.
const DEFAULT_MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// The largest request head (request line and headers) read into memory.
const DEFAULT_MAX_HEADER_BYTES: u64 = 16 * 1024;
/// The largest request body: no endpoint takes more than a small JSON document.
const DEFAULT_MAX_BODY_BYTES: u64 = 16 * 1024;
/// hyper refuses a read buffer smaller than this.
const MIN_HEADER_BYTES: u64 = 8 * 1024;

/// The validated `[http]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Listen address; port 0 picks a free port (the bound address is logged).
    pub bind: SocketAddr,
    /// HTTPS with this certificate and key (the broker listeners' key names).
    pub tls: Option<HttpTls>,
    /// Basic authentication against a Mosquitto-format password file (the broker's format
    /// and hashes); without it every request is served.
    pub password_file: Option<PathBuf>,
    /// Connections at once. Default 64.
    pub max_connections: usize,
    /// A request's headers must arrive within this. Default 5 s.
    pub header_timeout: Duration,
    /// A connection is closed after this, between requests. Default 60 s.
    pub max_connection_age: Duration,
    /// Largest request head. Default 16 KiB.
    pub max_header_bytes: usize,
    /// Largest request body. Default 16 KiB.
    pub max_body_bytes: usize,
}

impl HttpConfig {
    /// A plain listener on `bind` with the default limits.
    pub fn plain(bind: SocketAddr) -> HttpConfig {
        HttpConfig {
            bind,
            tls: None,
            password_file: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_connection_age: DEFAULT_MAX_CONNECTION_AGE,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES as usize,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES as usize,
        }
    }

    /// `http://` or `https://` and the address.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.bind)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHttp {
    pub(crate) bind: Option<S<String>>,
    pub(crate) tls: Option<S<RawHttpTls>>,
    pub(crate) password_file: Option<S<String>>,
    pub(crate) max_connections: Option<S<i64>>,
    pub(crate) header_timeout: Option<S<String>>,
    pub(crate) max_connection_age: Option<S<String>>,
    pub(crate) max_header_bytes: Option<S<RawSize>>,
    pub(crate) max_body_bytes: Option<S<RawSize>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHttpTls {
    pub(crate) cert: Option<S<String>>,
    pub(crate) key: Option<S<String>>,
}

impl Checker<'_> {
    /// The `[http]` table.
    pub(crate) fn http(&mut self, raw: S<RawHttp>) -> Option<HttpConfig> {
        let span = raw.span();
        let raw = raw.into_inner();
        let bind = match &raw.bind {
            Some(bind) => match bind.get_ref().parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    self.d
                        .error(
                            Some(bind.span()),
                            "http.bind",
                            format!("invalid listen address {:?}", bind.get_ref()),
                        )
                        .hint =
                        Some("write ip:port, e.g. \"127.0.0.1:8088\" or \"[::]:8088\"".to_owned());
                    None
                }
            },
            None => {
                self.missing(
                    span,
                    "http.bind".to_owned(),
                    Some("e.g. bind = \"127.0.0.1:8088\""),
                );
                None
            }
        };
        let tls = raw.tls.as_ref().and_then(|tls| self.http_tls(tls));
        let password_file = raw
            .password_file
            .as_ref()
            .map(|file| self.existing_file(file, "http.password_file"));
        let max_connections = self.integer(
            &raw.max_connections,
            "http.max_connections",
            1,
            i64::from(u16::MAX),
            DEFAULT_MAX_CONNECTIONS as i64,
        ) as usize;
        let header_timeout = self.positive_duration(
            &raw.header_timeout,
            "http.header_timeout",
            DEFAULT_HEADER_TIMEOUT,
        );
        let max_connection_age = self.positive_duration(
            &raw.max_connection_age,
            "http.max_connection_age",
            DEFAULT_MAX_CONNECTION_AGE,
        );
        let max_header_bytes = self.bounded_size(
            raw.max_header_bytes.as_ref(),
            "http.max_header_bytes",
            MIN_HEADER_BYTES,
            DEFAULT_MAX_HEADER_BYTES,
        );
        let max_body_bytes = self.bounded_size(
            raw.max_body_bytes.as_ref(),
            "http.max_body_bytes",
            1,
            DEFAULT_MAX_BODY_BYTES,
        );
        Some(HttpConfig {
            bind: bind?,
            tls: match raw.tls {
                Some(_) => Some(tls?),
                None => None,
            },
            password_file,
            max_connections,
            header_timeout,
            max_connection_age,
            max_header_bytes,
            max_body_bytes,
        })
    }

    /// A size of at least `min` and at most 16 MiB (a bound on what one request may hold).
    fn bounded_size(
        &mut self,
        value: Option<&S<RawSize>>,
        key_path: &str,
        min: u64,
        default: u64,
    ) -> usize {
        const MAX: u64 = 16 * 1024 * 1024;
        let Some(value) = value else {
            return default as usize;
        };
        match self.size(value, key_path) {
            Some(bytes) if (min..=MAX).contains(&bytes) => bytes as usize,
            Some(bytes) => {
                self.d.error(
                    Some(value.span()),
                    key_path,
                    format!("{bytes} bytes is out of range ({min} to {MAX})"),
                );
                default as usize
            }
            None => default as usize,
        }
    }

    fn http_tls(&mut self, raw: &S<RawHttpTls>) -> Option<HttpTls> {
        let span = raw.span();
        let r = raw.get_ref();
        let cert = match &r.cert {
            Some(cert) => Some(self.pem_file(cert, "http.tls.cert", Pem::Certificates)),
            None => {
                self.missing(
                    span.clone(),
                    "http.tls.cert".to_owned(),
                    Some("the server certificate (chain) in PEM, e.g. cert = \"server.crt\""),
                );
                None
            }
        };
        let key = match &r.key {
            Some(key) => Some(self.pem_file(key, "http.tls.key", Pem::PrivateKey)),
            None => {
                self.missing(
                    span,
                    "http.tls.key".to_owned(),
                    Some("the certificate's private key in PEM, e.g. key = \"server.key\""),
                );
                None
            }
        };
        Some(HttpTls {
            cert: cert?,
            key: key?,
        })
    }
}
