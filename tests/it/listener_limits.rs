//! A listener's limits on sockets, with real sockets on loopback: sockets that never send
//! CONNECT are counted apart from connections (`max_handshakes`, `connect_timeout`), and one
//! source address holds at most `max_connections_per_address` sockets. Clients bind to
//! other 127/8 addresses (Linux routes all of them to `lo`) to be different addresses.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use mqtt::packet::{self, Connect};
use mqtt::{within, Client, Raw, Version, WAIT};

use crate::util::mqtt;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an IP address")
}

/// Open from `source`, send CONNECT and return the CONNACK's return code, or `None` when
/// the broker closed the socket without answering.
async fn connack_from(broker: std::net::SocketAddr, source: IpAddr, id: &str) -> Option<u8> {
    let mut raw = Raw::open_from(broker, source).await;
    if raw.try_send(&Connect::v311(id).encode()).await.is_err() {
        return None;
    }
    raw.recv().await.map(|frame| frame.connack().1)
}

#[tokio::test]
async fn silent_sockets_beyond_max_connections_do_not_keep_real_clients_out() {
    let mut config = mqtt::config();
    config.listeners[0].max_connections = 5;
    let broker = mqtt::start(config).await;

    // Twenty sockets that never send CONNECT: four times max_connections.
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(Raw::open_from(broker.addr, ip("127.0.0.2")).await);
    }

    // Real clients still connect, at once (not after the silent ones time out).
    let started = Instant::now();
    let (_raw, connack) = Raw::connect(broker.addr, &Connect::v311("real-raw")).await;
    assert_eq!(
        connack.connack(),
        (false, 0),
        "CONNACK 0 beside 20 silent sockets"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "CONNACK after {:?}",
        started.elapsed()
    );
    let mut client = Client::connect(Version::V5, broker.addr, "real-v5").await;
    assert_eq!(client.subscribe("a/b", 1).await, Some(1));

    // max_connections still counts connections: three more fill it, the next is refused
    // with a CONNACK as before.
    let mut kept = Vec::new();
    for n in 0..3 {
        kept.push(Raw::connected(broker.addr, &Connect::v311(&format!("fill-{n}"))).await);
    }
    let (_over, connack) = Raw::connect(broker.addr, &Connect::v311("over")).await;
    assert_eq!(
        connack.connack(),
        (false, 3),
        "over max_connections: CONNACK 3"
    );
    // The silent sockets are still open (the broker waits for their CONNECT).
    silent[0].send(&packet::pingreq()).await;
}

#[tokio::test]
async fn sockets_past_max_handshakes_are_closed_at_once_and_silent_ones_after_connect_timeout() {
    let mut config = mqtt::config();
    config.listeners[0].max_handshakes = 4;
    config.listeners[0].max_connections_per_address = 0;
    config.listeners[0].connect_timeout = Duration::from_secs(1);
    let broker = mqtt::start(config).await;

    let opened = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(Raw::open(broker.addr).await);
    }
    // The fifth is closed at once, without a CONNACK (nothing is read from it).
    let mut fifth = Raw::open(broker.addr).await;
    assert!(fifth.expect_closed().await.is_empty());
    assert!(
        opened.elapsed() < Duration::from_millis(900),
        "closed at once, not at the connect_timeout: {:?}",
        opened.elapsed()
    );

    // The silent ones are closed when connect_timeout has passed...
    for socket in &mut silent {
        assert!(socket.expect_closed().await.is_empty());
    }
    let waited = opened.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "silent sockets closed after {waited:?}, connect_timeout is 1 s"
    );
    // ...and their places are free again.
    let (_raw, connack) = Raw::connect(broker.addr, &Connect::v311("after")).await;
    assert_eq!(connack.connack(), (false, 0));
}

#[tokio::test]
async fn a_connection_leaves_the_handshake_count_once_its_connect_is_read() {
    let mut config = mqtt::config();
    config.listeners[0].max_handshakes = 2;
    let broker = mqtt::start(config).await;
    // Far more connections than handshake places, one after the other: each leaves the
    // handshake phase with its CONNECT.
    let mut connected = Vec::new();
    for n in 0..10 {
        connected.push(Raw::connected(broker.addr, &Connect::v311(&format!("c{n}"))).await);
    }
}

#[tokio::test]
async fn one_address_over_its_limit_is_closed_at_once_while_other_addresses_connect() {
    let mut config = mqtt::config();
    config.listeners[0].max_connections_per_address = 3;
    let broker = mqtt::start(config).await;
    let crowded = ip("127.0.0.2");

    // Three sockets from 127.0.0.2: two connected clients and one still silent.
    let mut first = Raw::open_from(broker.addr, crowded).await;
    first.send(&Connect::v311("crowded-1").encode()).await;
    assert_eq!(first.recv().await.expect("CONNACK").connack(), (false, 0));
    assert_eq!(
        connack_from(broker.addr, crowded, "crowded-2").await,
        Some(0)
    );
    let _silent = Raw::open_from(broker.addr, crowded).await;
    // crowded-2's socket was dropped by connack_from: wait until the broker has let go
    // of it, then fill its place again with a connection we keep.
    let mut kept = within("a place for 127.0.0.2", async {
        loop {
            let mut raw = Raw::open_from(broker.addr, crowded).await;
            if raw
                .try_send(&Connect::v311("crowded-3").encode())
                .await
                .is_ok()
            {
                if let Some(frame) = raw.recv().await {
                    assert_eq!(frame.connack(), (false, 0));
                    return raw;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // A fourth from 127.0.0.2 is closed at once, without a CONNACK.
    let started = Instant::now();
    let mut fourth = Raw::open_from(broker.addr, crowded).await;
    assert!(fourth.expect_closed().await.is_empty());
    assert!(started.elapsed() < Duration::from_secs(2));

    // Other addresses are not affected.
    assert_eq!(
        connack_from(broker.addr, ip("127.0.0.3"), "other-3").await,
        Some(0)
    );
    assert_eq!(
        connack_from(broker.addr, ip("127.0.0.1"), "other-1").await,
        Some(0)
    );
    kept.send(&packet::pingreq()).await;
    assert_eq!(kept.recv().await.expect("PINGRESP").kind(), 13);

    // When one of 127.0.0.2's connections ends, it may connect again.
    first.send(&packet::disconnect()).await;
    assert!(first.expect_closed().await.is_empty());
    let deadline = Instant::now() + WAIT;
    loop {
        if connack_from(broker.addr, crowded, "crowded-again").await == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "127.0.0.2 got no place back within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
