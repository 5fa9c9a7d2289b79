//! Basic authentication against the broker's Mosquitto-format password file: the same
//! users and hashes as MQTT clients, checked by the broker's own verification.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use crate::broker::PasswordFile;

const CHALLENGE: &str = "Basic realm=\"fieldmq\", charset=\"UTF-8\"";

/// Lets a request through only with a valid `Authorization: Basic` header.
pub(super) async fn require_basic_auth(
    State(passwords): State<Arc<PasswordFile>>,
    request: Request,
    next: Next,
) -> Response {
    let credentials = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| basic_credentials(value.as_bytes()));
    let authorized = credentials
        .as_ref()
        .is_some_and(|(user, password)| passwords.verify(user, password));
    if authorized {
        return next.run(request).await;
    }
    if let Some((user, _)) = &credentials {
        tracing::warn!(user = %user.escape_debug(), "HTTP request with a wrong password");
    }
    let mut response = (StatusCode::UNAUTHORIZED, "authentication required\n").into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(CHALLENGE),
    );
    response
}

/// `Basic base64(user:password)` as UTF-8 (RFC 7617); anything else is no credentials.
fn basic_credentials(header: &[u8]) -> Option<(String, String)> {
    let header = std::str::from_utf8(header).ok()?;
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = BASE64.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_decoded_as_utf8() {
        let header = format!("Basic {}", BASE64.encode("jürgen:pa:ss"));
        assert_eq!(
            basic_credentials(header.as_bytes()),
            Some(("jürgen".to_owned(), "pa:ss".to_owned()))
        );
    }

    #[test]
    fn malformed_credentials_are_none() {
        assert_eq!(basic_credentials(b"Bearer abc"), None);
        assert_eq!(basic_credentials(b"Basic !!!"), None);
        assert_eq!(basic_credentials(b"Basic"), None);
        let no_colon = format!("Basic {}", BASE64.encode("user"));
        assert_eq!(basic_credentials(no_colon.as_bytes()), None);
        let not_utf8 = format!("Basic {}", BASE64.encode([0xff, 0xfe, b':', b'x']));
        assert_eq!(basic_credentials(not_utf8.as_bytes()), None);
        assert_eq!(basic_credentials(&[0xc3, 0x28]), None);
    }
}
