//! The broker's TLS and WebSocket listeners with real peers: rumqttc over TLS (3.1.1 and
//! 5), mutual TLS accepted and refused, WebSocket and secure WebSocket clients speaking
//! both protocol versions (tokio-tungstenite carrying packets encoded by rumqttc's
//! codecs), and handshakes that never hold up other clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use mqtt::{within, Client, TestBroker};
use pki::Pki;
use rumqttc::TlsConfiguration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

use crate::util::{mqtt, pki};

async fn start(listener: fieldmq::broker::config::ListenerConfig) -> TestBroker {
    let mut config = mqtt::config();
    config.listeners = vec![listener];
    mqtt::start(config).await
}

fn tls_options_v3(
    addr: SocketAddr,
    id: &str,
    config: Arc<rustls::ClientConfig>,
) -> rumqttc::MqttOptions {
    let mut options = rumqttc::MqttOptions::new(id, "localhost", addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_transport(rumqttc::Transport::tls_with_config(
        TlsConfiguration::Rustls(config),
    ));
    options
}

fn tls_options_v5(
    addr: SocketAddr,
    id: &str,
    config: Arc<rustls::ClientConfig>,
) -> rumqttc::v5::MqttOptions {
    let mut options = rumqttc::v5::MqttOptions::new(id, "localhost", addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_transport(rumqttc::Transport::tls_with_config(
        TlsConfiguration::Rustls(config),
    ));
    options
}

/// Subscribe `a`, publish from `b`, and check `a` receives it.
async fn round_trip(a: &mut Client, b: &mut Client, topic: &str) {
    assert_eq!(a.subscribe(topic, 1).await, Some(1));
    b.publish(topic, 1, false, b"over TLS").await;
    let got = a.recv().await;
    assert_eq!(
        (got.topic.as_str(), got.payload.as_slice()),
        (topic, &b"over TLS"[..])
    );
}

#[tokio::test]
async fn a_tls_listener_serves_mqtt_3_1_1_and_5() {
    let pki = Pki::new();
    let broker = start(pki::listener(Some(pki.listener_tls(false, false)), false)).await;
    let config = pki.client_config(None);
    let (mut v3, _) =
        Client::connect_v3(tls_options_v3(broker.addr, "tls-v3", config.clone())).await;
    let (mut v5, _) = Client::connect_v5(tls_options_v5(broker.addr, "tls-v5", config)).await;
    round_trip(&mut v3, &mut v5, "tls/a").await;
    round_trip(&mut v5, &mut v3, "tls/b").await;
}

/// Handshake, send a 3.1.1 CONNECT and read the answer: `Ok(CONNACK bytes)`, or why
/// there was none (handshake refused, connection closed).
async fn try_connect_tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<Vec<u8>, String> {
    within("a TLS attempt", async {
        let mut stream = pki::connect(addr, config)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        // With TLS 1.3 the server checks the client certificate after the client's side
        // of the handshake is done: a refusal shows on the first read.
        stream
            .write_all(&mqtt::packet::Connect::v311("mtls").encode())
            .await
            .map_err(|e| format!("write: {e}"))?;
        stream.flush().await.map_err(|e| format!("flush: {e}"))?;
        let mut answer = [0u8; 4];
        stream
            .read_exact(&mut answer)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok(answer.to_vec())
    })
    .await
}

const CONNACK_ACCEPTED: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

#[tokio::test]
async fn mutual_tls_accepts_the_right_certificate_and_refuses_others() {
    let pki = Pki::new();
    let broker = start(pki::listener(Some(pki.listener_tls(true, true)), false)).await;

    let good = pki.client_config(Some(&pki.client));
    assert_eq!(
        try_connect_tls(broker.addr, good.clone()).await,
        Ok(CONNACK_ACCEPTED.to_vec())
    );
    let (mut v3, _) =
        Client::connect_v3(tls_options_v3(broker.addr, "mtls-v3", good.clone())).await;
    let (mut v5, _) = Client::connect_v5(tls_options_v5(broker.addr, "mtls-v5", good)).await;
    round_trip(&mut v3, &mut v5, "mtls/a").await;

    let stranger = try_connect_tls(broker.addr, pki.client_config(Some(&pki.stranger))).await;
    assert!(
        stranger.is_err(),
        "a certificate from another CA got {stranger:?}"
    );
    let anonymous = try_connect_tls(broker.addr, pki.client_config(None)).await;
    assert!(anonymous.is_err(), "no certificate got {anonymous:?}");

    // The refusals did not disturb the connected clients.
    round_trip(&mut v5, &mut v3, "mtls/b").await;
}

#[tokio::test]
async fn optional_client_certificates_are_still_verified() {
    let pki = Pki::new();
    let broker = start(pki::listener(Some(pki.listener_tls(true, false)), false)).await;
    let none = try_connect_tls(broker.addr, pki.client_config(None)).await;
    assert_eq!(none, Ok(CONNACK_ACCEPTED.to_vec()));
    let good = try_connect_tls(broker.addr, pki.client_config(Some(&pki.client))).await;
    assert_eq!(good, Ok(CONNACK_ACCEPTED.to_vec()));
    let stranger = try_connect_tls(broker.addr, pki.client_config(Some(&pki.stranger))).await;
    assert!(
        stranger.is_err(),
        "a certificate from another CA got {stranger:?}"
    );
}

// ---------------------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum V {
    V311,
    V5,
}

/// What the tests look at in a packet from the broker.
#[derive(Debug, PartialEq, Eq)]
enum In {
    ConnAck(u8),
    SubAck(Vec<u8>),
    PubAck,
    Publish(String, Vec<u8>),
    Other(String),
}

/// An MQTT client over a WebSocket: packets encoded and decoded by rumqttc's codecs,
/// each sent as one binary message.
struct WsClient<S> {
    ws: WebSocketStream<S>,
    version: V,
    buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsClient<S> {
    /// The upgrade on `/mqtt` offering subprotocol `mqtt`; checks the broker chose it.
    async fn open(stream: S, version: V) -> WsClient<S> {
        let mut request = "ws://localhost/mqtt"
            .into_client_request()
            .expect("request");
        request
            .headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
        let (ws, response) = within(
            "the WebSocket handshake",
            tokio_tungstenite::client_async(request, stream),
        )
        .await
        .expect("WebSocket handshake");
        assert_eq!(
            response.headers().get("sec-websocket-protocol"),
            Some(&HeaderValue::from_static("mqtt"))
        );
        WsClient {
            ws,
            version,
            buf: BytesMut::new(),
        }
    }

    async fn send_v4(&mut self, packet: rumqttc::mqttbytes::v4::Packet) {
        let mut bytes = BytesMut::new();
        packet.write(&mut bytes, 1 << 20).expect("encode");
        self.ws
            .send(WsMessage::binary(bytes.freeze()))
            .await
            .expect("send");
    }

    async fn send_v5(&mut self, packet: rumqttc::v5::mqttbytes::v5::Packet) {
        let mut bytes = BytesMut::new();
        packet.write(&mut bytes, None).expect("encode");
        self.ws
            .send(WsMessage::binary(bytes.freeze()))
            .await
            .expect("send");
    }

    async fn connect(&mut self, id: &str) {
        match self.version {
            V::V311 => {
                let connect = rumqttc::mqttbytes::v4::Connect::new(id);
                self.send_v4(rumqttc::mqttbytes::v4::Packet::Connect(connect))
                    .await
            }
            V::V5 => {
                let connect = rumqttc::v5::mqttbytes::v5::Connect {
                    keep_alive: 30,
                    client_id: id.to_owned(),
                    clean_start: true,
                    properties: None,
                };
                self.send_v5(rumqttc::v5::mqttbytes::v5::Packet::Connect(
                    connect, None, None,
                ))
                .await
            }
        }
        assert_eq!(self.recv().await, In::ConnAck(0));
    }

    async fn subscribe(&mut self, filter: &str) -> In {
        match self.version {
            V::V311 => {
                let mut subscribe = rumqttc::mqttbytes::v4::Subscribe::new(
                    filter,
                    rumqttc::mqttbytes::QoS::AtLeastOnce,
                );
                subscribe.pkid = 1;
                self.send_v4(rumqttc::mqttbytes::v4::Packet::Subscribe(subscribe))
                    .await
            }
            V::V5 => {
                use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Subscribe};
                let filter = Filter::new(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce);
                let mut subscribe = Subscribe::new(filter, None);
                subscribe.pkid = 1;
                self.send_v5(Packet::Subscribe(subscribe)).await
            }
        }
        self.recv().await
    }

    async fn publish(&mut self, topic: &str, payload: &[u8]) {
        match self.version {
            V::V311 => {
                let mut publish = rumqttc::mqttbytes::v4::Publish::new(
                    topic,
                    rumqttc::mqttbytes::QoS::AtLeastOnce,
                    payload.to_vec(),
                );
                publish.pkid = 7;
                self.send_v4(rumqttc::mqttbytes::v4::Packet::Publish(publish))
                    .await
            }
            V::V5 => {
                use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
                let mut publish = Publish::new(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    payload.to_vec(),
                    None,
                );
                publish.pkid = 7;
                self.send_v5(Packet::Publish(publish)).await
            }
        }
    }

    /// The next packet from the broker.
    async fn recv(&mut self) -> In {
        within("a packet over the WebSocket", async {
            loop {
                if let Some(packet) = self.decode() {
                    return packet;
                }
                match self.ws.next().await {
                    Some(Ok(WsMessage::Binary(bytes))) => self.buf.extend_from_slice(&bytes),
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                    other => panic!("expected a binary message, got {other:?}"),
                }
            }
        })
        .await
    }

    fn decode(&mut self) -> Option<In> {
        match self.version {
            V::V311 => {
                use rumqttc::mqttbytes::v4::Packet;
                match Packet::read(&mut self.buf, 1 << 20) {
                    Ok(Packet::ConnAck(ack)) => Some(In::ConnAck(ack.code as u8)),
                    Ok(Packet::SubAck(ack)) => Some(In::SubAck(
                        ack.return_codes
                            .iter()
                            .map(|code| match code {
                                rumqttc::mqttbytes::v4::SubscribeReasonCode::Success(qos) => {
                                    *qos as u8
                                }
                                rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure => 0x80,
                            })
                            .collect(),
                    )),
                    Ok(Packet::PubAck(_)) => Some(In::PubAck),
                    Ok(Packet::Publish(p)) => Some(In::Publish(p.topic, p.payload.to_vec())),
                    Ok(other) => Some(In::Other(format!("{other:?}"))),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => None,
                    Err(error) => panic!("undecodable packet: {error:?}"),
                }
            }
            V::V5 => {
                use rumqttc::v5::mqttbytes::v5::Packet;
                match Packet::read(&mut self.buf, None) {
                    Ok(Packet::ConnAck(ack)) => Some(In::ConnAck(ack.code as u8)),
                    Ok(Packet::SubAck(ack)) => Some(In::SubAck(
                        ack.return_codes
                            .iter()
                            .map(|code| {
                                use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as R;
                                match code {
                                    R::Success(qos) => *qos as u8,
                                    R::NotAuthorized => 0x87,
                                    R::Failure | R::Unspecified => 0x80,
                                    _ => 0xFF,
                                }
                            })
                            .collect(),
                    )),
                    Ok(Packet::PubAck(_)) => Some(In::PubAck),
                    Ok(Packet::Publish(p)) => Some(In::Publish(
                        String::from_utf8_lossy(&p.topic).into_owned(),
                        p.payload.to_vec(),
                    )),
                    Ok(other) => Some(In::Other(format!("{other:?}"))),
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => None,
                    Err(error) => panic!("undecodable packet: {error:?}"),
                }
            }
        }
    }

    /// Subscribe to `topic`, publish to it, and get the PUBACK and the message back.
    async fn echo(&mut self, topic: &str) {
        assert_eq!(self.subscribe(topic).await, In::SubAck(vec![1]));
        self.publish(topic, b"over WebSocket").await;
        let mut got = Vec::new();
        while got.len() < 2 {
            got.push(self.recv().await);
        }
        assert!(got.contains(&In::PubAck), "{got:?}");
        assert!(
            got.contains(&In::Publish(topic.to_owned(), b"over WebSocket".to_vec())),
            "{got:?}"
        );
    }
}

async fn tcp(addr: SocketAddr) -> TcpStream {
    within("TCP connect", TcpStream::connect(addr))
        .await
        .expect("TCP connect")
}

#[tokio::test]
async fn a_websocket_listener_serves_mqtt_3_1_1_and_5() {
    let broker = start(pki::listener(None, true)).await;
    let mut v3 = WsClient::open(tcp(broker.addr).await, V::V311).await;
    v3.connect("ws-v3").await;
    let mut v5 = WsClient::open(tcp(broker.addr).await, V::V5).await;
    v5.connect("ws-v5").await;
    v3.echo("ws/v3").await;
    v5.echo("ws/v5").await;
    // And across: a WebSocket client and a TCP-style client library on the same broker
    // see each other's messages.
    v5.publish("ws/v3", b"from v5").await;
    let mut got = Vec::new();
    while !got.contains(&In::Publish("ws/v3".into(), b"from v5".to_vec())) {
        got.push(v3.recv().await);
    }
}

#[tokio::test]
async fn a_websocket_on_another_path_is_not_found() {
    let broker = start(pki::listener(None, true)).await;
    let request = "ws://localhost/other"
        .into_client_request()
        .expect("request");
    let refused = within(
        "the WebSocket handshake",
        tokio_tungstenite::client_async(request, tcp(broker.addr).await),
    )
    .await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 404)
        }
        other => panic!("expected 404, got {:?}", other.map(|(_, r)| r.status())),
    }
}

#[tokio::test]
async fn a_secure_websocket_listener_serves_mqtt_3_1_1_and_5() {
    let pki = Pki::new();
    let broker = start(pki::listener(Some(pki.listener_tls(true, true)), true)).await;
    let config = pki.client_config(Some(&pki.client));
    let stream = pki::connect(broker.addr, config.clone())
        .await
        .expect("TLS");
    let mut v3 = WsClient::open(stream, V::V311).await;
    v3.connect("wss-v3").await;
    v3.echo("wss/v3").await;
    let stream = pki::connect(broker.addr, config).await.expect("TLS");
    let mut v5 = WsClient::open(stream, V::V5).await;
    v5.connect("wss-v5").await;
    v5.echo("wss/v5").await;

    // Without a client certificate there is no WebSocket at all.
    let refused = within("a refused attempt", async {
        let stream = pki::connect(broker.addr, pki.client_config(None)).await?;
        let request = "ws://localhost/mqtt"
            .into_client_request()
            .expect("request");
        tokio_tungstenite::client_async(request, stream)
            .await
            .map(|_| ())
            .map_err(std::io::Error::other)
    })
    .await;
    assert!(
        refused.is_err(),
        "a client without certificate got a WebSocket"
    );
}

// ---------------------------------------------------------------------------------------
// Handshakes never hold up others
// ---------------------------------------------------------------------------------------

/// While `idle` connections sit on the listener without finishing any handshake, a new
/// client still gets its CONNACK within a second.
async fn second_connack_is_prompt<F, Fut>(idle: Vec<TcpStream>, connect: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Vec<u8>>,
{
    let start = Instant::now();
    let connack = tokio::time::timeout(Duration::from_secs(1), connect())
        .await
        .expect("CONNACK within 1 s while other connections idle");
    assert_eq!(connack, CONNACK_ACCEPTED.to_vec());
    assert!(start.elapsed() < Duration::from_secs(1));
    drop(idle);
}

#[tokio::test]
async fn an_idle_connection_does_not_delay_a_tls_client() {
    let pki = Pki::new();
    let broker = start(pki::listener(Some(pki.listener_tls(false, false)), false)).await;
    // One that opens TCP and sends nothing, one that stops inside its ClientHello.
    let silent = tcp(broker.addr).await;
    let mut partial = tcp(broker.addr).await;
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .expect("write");
    let config = pki.client_config(None);
    second_connack_is_prompt(vec![silent, partial], || async {
        try_connect_tls(broker.addr, config)
            .await
            .expect("connected")
    })
    .await;
}

#[tokio::test]
async fn an_idle_connection_does_not_delay_a_websocket_client() {
    let broker = start(pki::listener(None, true)).await;
    let silent = tcp(broker.addr).await;
    let mut partial = tcp(broker.addr).await;
    partial
        .write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    second_connack_is_prompt(vec![silent, partial], || async {
        let mut client = WsClient::open(tcp(broker.addr).await, V::V311).await;
        client.connect("prompt").await;
        CONNACK_ACCEPTED.to_vec()
    })
    .await;
}

#[tokio::test]
async fn an_idle_connection_does_not_delay_a_tcp_client() {
    let broker = start(pki::listener(None, false)).await;
    let silent = tcp(broker.addr).await;
    second_connack_is_prompt(vec![silent], || async {
        let mut stream = tcp(broker.addr).await;
        stream
            .write_all(&mqtt::packet::Connect::v311("prompt").encode())
            .await
            .expect("write");
        let mut answer = [0u8; 4];
        stream.read_exact(&mut answer).await.expect("CONNACK");
        answer.to_vec()
    })
    .await;
}

#[tokio::test]
async fn a_client_past_the_listener_limit_is_refused_over_tls_too() {
    let pki = Pki::new();
    let mut listener = pki::listener(Some(pki.listener_tls(false, false)), false);
    listener.max_connections = 1;
    let broker = start(listener).await;
    let config = pki.client_config(None);
    // A connection counts once its CONNECT is read (a TLS handshake alone does not).
    let mut first = pki::connect(broker.addr, config.clone())
        .await
        .expect("TLS");
    first
        .write_all(&mqtt::packet::Connect::v311("first").encode())
        .await
        .expect("write");
    let mut answer = [0u8; 4];
    within("the first CONNACK", first.read_exact(&mut answer))
        .await
        .expect("CONNACK");
    assert_eq!(answer, CONNACK_ACCEPTED);
    // 3.1.1 CONNACK "server unavailable" (3) for the second.
    let second = try_connect_tls(broker.addr, config).await;
    assert_eq!(second, Ok(vec![0x20, 0x02, 0x00, 0x03]));
    drop(first);
}

// ---------------------------------------------------------------------------------------
// connect_timeout: one deadline from accept to a complete CONNECT
// ---------------------------------------------------------------------------------------

/// The listeners' `connect_timeout` in the test below.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the slow clients below wait before their handshake: most of the timeout.
const SLOW_START: Duration = Duration::from_millis(1500);

/// Wait until the broker closes the connection (it sends nothing before a CONNECT);
/// `Instant` of the close. Bounded.
async fn closed_at<S: AsyncRead + Unpin>(mut stream: S) -> Instant {
    within("the broker to close the connection", async {
        let mut buf = [0u8; 64];
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => Instant::now(),
            Ok(_) => panic!("the broker sent something before any CONNECT"),
        }
    })
    .await
}

/// Send `bytes` one at a time, 200 ms apart, until the broker closes the connection;
/// `Instant` of the close.
async fn trickle_until_closed(mut stream: TcpStream, bytes: &[u8]) -> Instant {
    for byte in bytes {
        if stream.write_all(&[*byte]).await.is_err() {
            return Instant::now();
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0) | Err(_)) => return Instant::now(),
            Ok(Ok(_)) => panic!("the broker answered a CONNECT it had not read whole"),
        }
    }
    panic!("the whole CONNECT went through before the broker closed the connection");
}

/// `connect_timeout` covers the TLS handshake, the WebSocket upgrade and the CONNECT packet
/// together: a client that takes most of it for its handshake has only the rest for its
/// CONNECT, and one that sends its CONNECT a byte at a time does not get a new timeout with
/// every byte. Each socket is closed `connect_timeout` after it was accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_counts_from_accept_across_tls_websocket_and_connect() {
    let pki = Pki::new();
    let with_timeout = |mut listener: fieldmq::broker::config::ListenerConfig| {
        listener.connect_timeout = CONNECT_TIMEOUT;
        listener
    };
    let tls_broker = start(with_timeout(pki::listener(
        Some(pki.listener_tls(false, false)),
        false,
    )))
    .await;
    let ws_broker = start(with_timeout(pki::listener(None, true))).await;
    let tcp_broker = start(with_timeout(pki::listener(None, false))).await;
    let config = pki.client_config(None);

    let silent_tls = async {
        let stream = tcp(tls_broker.addr).await;
        let opened = Instant::now();
        closed_at(stream).await - opened
    };
    let slow_tls = async {
        let stream = tcp(tls_broker.addr).await;
        let opened = Instant::now();
        tokio::time::sleep(SLOW_START).await;
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let stream = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, stream)
            .await
            .expect("the TLS handshake within the timeout");
        closed_at(stream).await - opened
    };
    let silent_ws = async {
        let stream = tcp(ws_broker.addr).await;
        let opened = Instant::now();
        closed_at(stream).await - opened
    };
    let slow_ws = async {
        let stream = tcp(ws_broker.addr).await;
        let opened = Instant::now();
        tokio::time::sleep(SLOW_START).await;
        let mut client = WsClient::open(stream, V::V311).await;
        let closed = within("the broker to close the WebSocket", async {
            loop {
                match client.ws.next().await {
                    None | Some(Err(_)) | Some(Ok(WsMessage::Close(_))) => return Instant::now(),
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                    Some(Ok(other)) => panic!("the broker sent {other:?} before any CONNECT"),
                }
            }
        })
        .await;
        closed - opened
    };
    let trickled_connect = async {
        let stream = tcp(tcp_broker.addr).await;
        let opened = Instant::now();
        let connect = mqtt::packet::Connect::v311("a-byte-at-a-time").encode();
        trickle_until_closed(stream, &connect).await - opened
    };
    let (silent_tls, slow_tls, silent_ws, slow_ws, trickled_connect) =
        tokio::join!(silent_tls, slow_tls, silent_ws, slow_ws, trickled_connect);

    for (what, after) in [
        ("a silent socket on the TLS listener", silent_tls),
        ("a TLS handshake after 1.5 s, then nothing", slow_tls),
        ("a silent socket on the WebSocket listener", silent_ws),
        ("a WebSocket upgrade after 1.5 s, then nothing", slow_ws),
        ("a CONNECT sent a byte every 200 ms", trickled_connect),
    ] {
        assert!(
            after >= CONNECT_TIMEOUT - Duration::from_millis(100)
                && after < CONNECT_TIMEOUT + Duration::from_millis(600),
            "{what}: closed {after:?} after it was accepted; connect_timeout is {CONNECT_TIMEOUT:?}"
        );
    }
}
