//! An MQTT-aware TCP proxy on 127.0.0.1, put between an uplink and its cloud broker to see
//! and shape what travels on the wire:
//!
//! - it records every CONNECT it forwards (protocol level and client id);
//! - it can hold back the packets of one type coming from the cloud (e.g. PUBCOMP) and
//!   release them later, while the others pass;
//! - it can cut the connections it carries, as a network partition does: from the cut on,
//!   whatever either side sends is dropped (the client's unacknowledged tail never reaches
//!   the cloud, the cloud's acknowledgements never reach the client), and the client's
//!   socket stays open until the client closes it;
//! - it can close its connections and refuse new ones (the cloud is unreachable);
//! - it can close a connection right after forwarding a PUBACK or PUBREC with an error
//!   reason code, as Mosquitto 2.0 does after refusing a publish (both arrive together).
//!
//! Packets are framed (fixed header and remaining length) but otherwise forwarded as they
//! are. Every wait is bounded.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// MQTT control packet types (the high nibble of the first byte).
pub(crate) const CONNECT: u8 = 1;
pub(crate) const PUBLISH: u8 = 3;
pub(crate) const PUBACK: u8 = 4;
pub(crate) const PUBREC: u8 = 5;
pub(crate) const PUBCOMP: u8 = 7;

/// A CONNECT the proxy forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Connect {
    /// 4 for MQTT 3.1.1, 5 for MQTT 5.
    pub(crate) level: u8,
    pub(crate) client_id: String,
}

/// One proxied connection's switches.
struct Link {
    /// Drop everything from now on (a partition).
    cut: Arc<AtomicBool>,
    /// Close both sockets now.
    close: CancellationToken,
}

struct Shared {
    upstream: SocketAddr,
    connects: watch::Sender<Vec<Connect>>,
    refusing: AtomicBool,
    links: Mutex<Vec<Link>>,
    /// Packet type held back from the cloud, if any.
    hold: watch::Sender<Option<u8>>,
    /// Packets held back so far.
    held: watch::Sender<usize>,
    /// PUBLISH packets from the client dropped because their connection was cut.
    dropped_publishes: AtomicUsize,
    /// Close a connection right after forwarding a refusal (PUBACK/PUBREC reason >= 0x80).
    close_after_refusal: AtomicBool,
}

/// A running proxy. Stops (and closes every connection) when dropped.
pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listen on an ephemeral 127.0.0.1 port and forward to `upstream`.
    pub(crate) async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            upstream,
            connects: watch::Sender::new(Vec::new()),
            refusing: AtomicBool::new(false),
            links: Mutex::new(Vec::new()),
            hold: watch::Sender::new(None),
            held: watch::Sender::new(0),
            dropped_publishes: AtomicUsize::new(0),
            close_after_refusal: AtomicBool::new(false),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Proxy {
            addr,
            shared,
            accept,
        }
    }

    pub(crate) fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The CONNECTs forwarded so far.
    pub(crate) fn connects(&self) -> Vec<Connect> {
        self.shared.connects.borrow().clone()
    }

    /// Wait (bounded by `within`) until a CONNECT from `client_id` has been forwarded.
    pub(crate) async fn wait_connect(&self, client_id: &str, within: Duration) -> Connect {
        let mut rx = self.shared.connects.subscribe();
        let found = tokio::time::timeout(
            within,
            rx.wait_for(|c| c.iter().any(|c| c.client_id == client_id)),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no CONNECT from {client_id} within {within:?}; seen: {:?}",
                self.connects()
            )
        })
        .expect("proxy running");
        let connect = found
            .iter()
            .find(|c| c.client_id == client_id)
            .cloned()
            .expect("found");
        connect
    }

    /// Partition every connection carried now: from here on, what either side sends is
    /// dropped. Connections made afterwards are forwarded normally.
    pub(crate) fn cut(&self) {
        for link in self.shared.links.lock().expect("links").iter() {
            link.cut.store(true, Ordering::SeqCst);
        }
    }

    /// Close every connection carried now.
    pub(crate) fn close_all(&self) {
        let links = std::mem::take(&mut *self.shared.links.lock().expect("links"));
        for link in links {
            link.close.cancel();
        }
    }

    /// While refusing, new connections are closed as soon as they are accepted.
    pub(crate) fn set_refusing(&self, refusing: bool) {
        self.shared.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Close a connection right after forwarding a PUBACK or PUBREC that refuses (MQTT 5
    /// reason code 0x80 or more): the client reads the refusal and the end of the
    /// connection together.
    pub(crate) fn set_close_after_refusal(&self, close: bool) {
        self.shared
            .close_after_refusal
            .store(close, Ordering::SeqCst);
    }

    /// PUBLISH packets from clients dropped because their connection had been cut.
    pub(crate) fn dropped_publishes(&self) -> usize {
        self.shared.dropped_publishes.load(Ordering::SeqCst)
    }

    /// Hold back the cloud's packets of type `kind` (the others pass) until
    /// [`Proxy::release`].
    pub(crate) fn hold_from_cloud(&self, kind: u8) {
        self.shared.hold.send_replace(Some(kind));
    }

    /// Forward the held packets and stop holding.
    pub(crate) fn release(&self) {
        self.shared.hold.send_replace(None);
    }

    /// Wait (bounded by `within`) until `count` packets have been held back.
    pub(crate) async fn wait_held(&self, count: usize, within: Duration) {
        let mut rx = self.shared.held.subscribe();
        tokio::time::timeout(within, rx.wait_for(|&n| n >= count))
            .await
            .unwrap_or_else(|_| panic!("{count} packets not held within {within:?}"))
            .expect("proxy running");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.close_all();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while let Ok((client, _)) = listener.accept().await {
        if shared.refusing.load(Ordering::SeqCst) {
            continue;
        }
        let Ok(cloud) = TcpStream::connect(shared.upstream).await else {
            // The cloud is down: the client sees its connection closed.
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = cloud.set_nodelay(true);
        let cut = Arc::new(AtomicBool::new(false));
        let close = CancellationToken::new();
        shared.links.lock().expect("links").push(Link {
            cut: cut.clone(),
            close: close.clone(),
        });
        let (client_read, client_write) = client.into_split();
        let (cloud_read, cloud_write) = cloud.into_split();
        tokio::spawn(client_to_cloud(
            client_read,
            cloud_write,
            shared.clone(),
            cut.clone(),
            close.clone(),
        ));
        tokio::spawn(cloud_to_client(
            cloud_read,
            client_write,
            shared.clone(),
            cut,
            close,
        ));
    }
}

/// Splits a byte stream into MQTT packets.
#[derive(Default)]
struct Framer {
    buf: Vec<u8>,
}

impl Framer {
    /// Add `bytes` and call `packet` with each complete packet, in order.
    fn push(&mut self, bytes: &[u8], mut packet: impl FnMut(&[u8])) {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(len) = packet_len(&self.buf[start..]) {
            packet(&self.buf[start..start + len]);
            start += len;
        }
        self.buf.drain(..start);
    }
}

/// The length of the complete packet at the start of `buf`, if it is all there.
fn packet_len(buf: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for (i, &byte) in buf.iter().enumerate().skip(1).take(4) {
        remaining |= usize::from(byte & 0x7f) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            let total = 1 + i + remaining;
            return (buf.len() >= total).then_some(total);
        }
    }
    None
}

/// Whether a PUBACK or PUBREC carries an error reason code (MQTT 5).
fn is_refusal(packet: &[u8]) -> bool {
    let kind = packet[0] >> 4;
    // Fixed header, packet id, reason code: a 2-byte remaining length has no reason code.
    (kind == PUBACK || kind == PUBREC) && packet.len() >= 5 && packet[1] >= 3 && packet[4] >= 0x80
}

/// Protocol level and client id of a CONNECT packet.
fn parse_connect(packet: &[u8]) -> Option<Connect> {
    let header = (1..packet.len()).find(|&i| packet[i] & 0x80 == 0)? + 1;
    let body = &packet[header..];
    let name_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let level = *body.get(2 + name_len)?;
    // Level, connect flags, keep alive.
    let mut at = 2 + name_len + 4;
    if level == 5 {
        let mut properties = 0usize;
        let mut shift = 0;
        loop {
            let byte = *body.get(at)?;
            at += 1;
            properties |= usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
        at += properties;
    }
    let id_len = usize::from(u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]));
    let id = body.get(at + 2..at + 2 + id_len)?;
    Some(Connect {
        level,
        client_id: String::from_utf8_lossy(id).into_owned(),
    })
}

async fn client_to_cloud(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
    cut: Arc<AtomicBool>,
    close: CancellationToken,
) {
    let mut framer = Framer::default();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            biased;
            _ = close.cancelled() => break,
            read = from.read(&mut chunk) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
        };
        let mut out = Vec::with_capacity(n);
        let is_cut = cut.load(Ordering::SeqCst);
        framer.push(&chunk[..n], |packet| {
            let kind = packet[0] >> 4;
            if is_cut {
                if kind == PUBLISH {
                    shared.dropped_publishes.fetch_add(1, Ordering::SeqCst);
                }
                return;
            }
            if kind == CONNECT {
                if let Some(connect) = parse_connect(packet) {
                    shared.connects.send_modify(|c| c.push(connect));
                }
            }
            out.extend_from_slice(packet);
        });
        if close.is_cancelled() {
            break;
        }
        if !out.is_empty() && to.write_all(&out).await.is_err() {
            break;
        }
    }
    // One side is gone: close the other too.
    close.cancel();
}

async fn cloud_to_client(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
    cut: Arc<AtomicBool>,
    close: CancellationToken,
) {
    let mut framer = Framer::default();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut hold = shared.hold.subscribe();
    let mut held: Vec<u8> = Vec::new();
    let mut refused = false;
    loop {
        let mut out = Vec::new();
        tokio::select! {
            // A close wins over a release that came with it: held packets die with the link.
            biased;
            _ = close.cancelled() => break,
            changed = hold.changed() => {
                if changed.is_err() {
                    break;
                }
                if hold.borrow_and_update().is_none() {
                    out = std::mem::take(&mut held);
                }
            }
            read = from.read(&mut chunk) => {
                let n = match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let holding = *hold.borrow();
                let close_after_refusal = shared.close_after_refusal.load(Ordering::SeqCst);
                framer.push(&chunk[..n], |packet| {
                    if refused {
                        return;
                    }
                    if Some(packet[0] >> 4) == holding {
                        held.extend_from_slice(packet);
                        shared.held.send_modify(|n| *n += 1);
                    } else {
                        out.extend_from_slice(packet);
                        refused = close_after_refusal && is_refusal(packet);
                    }
                });
            }
        }
        if close.is_cancelled() {
            break;
        }
        if cut.load(Ordering::SeqCst) {
            held.clear();
            continue;
        }
        if !out.is_empty() && to.write_all(&out).await.is_err() {
            break;
        }
        if refused {
            // The refusal and the end of the connection go out together.
            let _ = to.shutdown().await;
            break;
        }
    }
    close.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_packets_of_both_versions_are_parsed() {
        // MQTT 3.1.1: name, level 4, flags, keep alive, client id "ab".
        let v4 = [
            0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 2, b'a', b'b',
        ];
        assert_eq!(
            parse_connect(&v4),
            Some(Connect {
                level: 4,
                client_id: "ab".into()
            })
        );
        // MQTT 5 with 5 bytes of properties (session expiry).
        let v5 = [
            0x10, 20, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 5, 0x11, 0, 0, 0, 10, 0, 2, b'c',
            b'd',
        ];
        assert_eq!(
            parse_connect(&v5),
            Some(Connect {
                level: 5,
                client_id: "cd".into()
            })
        );
        assert_eq!(packet_len(&v5), Some(22));
        assert_eq!(packet_len(&v5[..21]), None);
    }
}
