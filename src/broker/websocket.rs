//! MQTT over WebSocket: the server handshake (path and the `mqtt` subprotocol) and an
//! adapter that turns the WebSocket's binary messages back into a byte stream, so the
//! connection code reads and writes MQTT exactly as it does on TCP.
//!
//! MQTT packets may span WebSocket messages and a message may hold several packets
//! (MQTT 3.1.1 section 6, MQTT 5 section 6): the adapter does not care where messages end.
//! A text message is a protocol error and ends the connection.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// Subprotocols we answer, in order of preference: `mqtt` (MQTT 3.1.1 and 5) and the
/// `mqttv3.1` of old MQTT 3.1 clients, which Mosquitto accepts too.
const SUBPROTOCOLS: &[&str] = &["mqtt", "mqttv3.1"];

/// Buffers per connection: small, since a gateway may hold many idle clients (tungstenite
/// defaults to 128 KiB each way).
const READ_BUFFER: usize = 8 * 1024;
const WRITE_BUFFER: usize = 8 * 1024;

/// Accept a WebSocket upgrade on `path`; any other path is answered 404.
// The callback's error type is tungstenite's HTTP response, large by design.
#[allow(clippy::result_large_err)]
pub(crate) async fn accept<S>(stream: S, path: &str) -> Result<WsIo<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER);
    let callback = |request: &Request, response: Response| check(request, response, path);
    let ws =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await?;
    Ok(WsIo {
        ws,
        read: Bytes::new(),
    })
}

/// The handshake callback: path check and subprotocol choice.
#[allow(clippy::result_large_err)]
fn check(request: &Request, mut response: Response, path: &str) -> Result<Response, ErrorResponse> {
    if request.uri().path() != path {
        let mut refusal = ErrorResponse::new(Some(format!(
            "no MQTT WebSocket endpoint at {}\n",
            request.uri().path()
        )));
        *refusal.status_mut() = StatusCode::NOT_FOUND;
        return Err(refusal);
    }
    let offered: Vec<&str> = request
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .collect();
    if let Some(chosen) = SUBPROTOCOLS
        .iter()
        .find(|p| offered.iter().any(|o| o.eq_ignore_ascii_case(p)))
    {
        response
            .headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_static(chosen));
    }
    // A client that offers no subprotocol is accepted (some omit it); one that offers
    // only others gets no subprotocol header and decides itself (RFC 6455 4.2.2).
    Ok(response)
}

/// A WebSocket as a byte stream: reads yield the payloads of binary messages, each write
/// is sent as one binary message.
pub(crate) struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// The unread rest of the last binary message.
    read: Bytes,
}

fn io_error(error: WsError) -> io::Error {
    match error {
        WsError::Io(error) => error,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "WebSocket closed")
        }
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.read.is_empty() {
                let n = self.read.len().min(buf.remaining());
                buf.put_slice(&self.read[..n]);
                self.read.advance(n);
                return Poll::Ready(Ok(()));
            }
            // Pings are answered by tungstenite itself while reading.
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(bytes))) => self.read = bytes,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket message: MQTT needs binary messages",
                    )))
                }
                // End of stream: the connection sees a closed socket.
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                    return Poll::Ready(Ok(()))
                }
                Some(Err(error)) => return Poll::Ready(Err(io_error(error))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut ws = Pin::new(&mut self.ws);
        ready!(ws.as_mut().poll_ready(cx)).map_err(io_error)?;
        ws.start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(error) => Poll::Ready(Err(io_error(error))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    async fn pair(
        path: &str,
        protocols: Option<&str>,
    ) -> (
        Result<WsIo<tokio::io::DuplexStream>, WsError>,
        Result<(WebSocketStream<tokio::io::DuplexStream>, Response), WsError>,
    ) {
        let (server, client) = tokio::io::duplex(64 * 1024);
        let mut request = format!("ws://localhost{path}")
            .into_client_request()
            .expect("request");
        if let Some(protocols) = protocols {
            request.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_str(protocols).expect("header"),
            );
        }
        let server = accept(server, "/mqtt");
        let client = tokio_tungstenite::client_async(request, client);
        let (server, client) = tokio::join!(server, client);
        (
            server,
            client.map(|(ws, response)| (ws, *response_box(response))),
        )
    }

    fn response_box(
        response: tokio_tungstenite::tungstenite::handshake::client::Response,
    ) -> Box<Response> {
        let (parts, _) = response.into_parts();
        Box::new(Response::from_parts(parts, ()))
    }

    #[tokio::test]
    async fn bytes_cross_in_binary_messages_both_ways() {
        use futures::{SinkExt, StreamExt};
        let (server, client) = pair("/mqtt", Some("mqttv3.1, mqtt")).await;
        let mut server = server.expect("server handshake");
        let (mut client, response) = client.expect("client handshake");
        assert_eq!(
            response.headers().get("sec-websocket-protocol"),
            Some(&HeaderValue::from_static("mqtt"))
        );

        // One packet split over two messages, then two packets in one message.
        client
            .send(Message::binary(vec![0xC0]))
            .await
            .expect("send");
        client
            .send(Message::binary(vec![0x00, 0xC0, 0x00]))
            .await
            .expect("send");
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(got, [0xC0, 0x00, 0xC0, 0x00]);

        server.write_all(&[0xD0, 0x00]).await.expect("write");
        server.flush().await.expect("flush");
        let message = client.next().await.expect("a message").expect("ok");
        assert_eq!(message, Message::binary(vec![0xD0, 0x00]));

        client.send(Message::text("CONNECT")).await.expect("send");
        let error = server.read_u8().await.expect_err("text is refused");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_close_is_end_of_stream() {
        let (server, client) = pair("/mqtt", None).await;
        let mut server = server.expect("server handshake");
        let (mut client, response) = client.expect("client handshake");
        assert!(response.headers().get("sec-websocket-protocol").is_none());
        client.close(None).await.expect("close");
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.expect("clean end");
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn another_path_is_not_found() {
        let (server, client) = pair("/other", Some("mqtt")).await;
        assert!(server.is_err());
        match client {
            Err(WsError::Http(response)) => assert_eq!(response.status(), StatusCode::NOT_FOUND),
            other => panic!("expected a 404, got {:?}", other.map(|(_, r)| r)),
        }
    }
}
