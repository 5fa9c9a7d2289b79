//! The broker's connection state machine on arbitrary bytes: one broker per process
//! (127.0.0.1:0, memory durability); per input a TCP client sends a valid CONNECT (the first
//! input byte picks MQTT 3.1.1 or 5) then the rest of the input, closes its sending side and
//! reads until the broker closes. Every few inputs a fresh client must still be accepted.
//! A panic in any broker task aborts the process (the fuzzer's panic hook), so it is found
//! even though tokio would catch it.
#![no_main]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// CONNECT, MQTT 3.1.1, clean session, keep-alive 0, client id "f".
const CONNECT_V311: &[u8] = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x01f";
/// CONNECT, MQTT 5, clean start, keep-alive 0, no properties, client id "f".
const CONNECT_V5: &[u8] = b"\x10\x0e\x00\x04MQTT\x05\x02\x00\x00\x00\x00\x01f";
/// CONNECT, MQTT 3.1.1, client id "health".
const CONNECT_HEALTH: &[u8] = b"\x10\x12\x00\x04MQTT\x04\x02\x00\x00\x00\x06health";
/// A fresh client is checked every this many inputs.
const HEALTH_EVERY: u64 = 64;

const CONFIG: &str = r#"
[gateway]
id = "fuzz"
data_dir = "/tmp"

[broker]
allow_anonymous = true
durability = "memory"

[[broker.listeners]]
bind = "127.0.0.1:0"
"#;

fn broker() -> &'static (Runtime, SocketAddr) {
    static BROKER: OnceLock<(Runtime, SocketAddr)> = OnceLock::new();
    BROKER.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let config = fieldmq::service::config::parse(CONFIG, Path::new("fuzz.toml")).expect("config");
        let addr = runtime.block_on(async {
            let running = fieldmq::broker::start(&config.broker, CancellationToken::new())
                .await
                .expect("broker starts");
            let addr = running.local_addrs[0];
            // Runs for the whole process.
            Box::leak(Box::new(running));
            addr
        });
        (runtime, addr)
    })
}

async fn session(addr: SocketAddr, bytes: &[&[u8]]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("broker accepts");
    for part in bytes {
        if stream.write_all(part).await.is_err() {
            break; // the broker closed already
        }
    }
    let _ = stream.shutdown().await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut answer)).await;
    answer
}

fuzz_target!(|data: &[u8]| {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let Some((&version, rest)) = data.split_first() else {
        return;
    };
    let (runtime, addr) = broker();
    let connect = if version & 1 == 0 {
        CONNECT_V311
    } else {
        CONNECT_V5
    };
    runtime.block_on(async {
        let answer = session(*addr, &[connect, rest]).await;
        // The CONNECT is valid: the broker answers it before anything else.
        assert!(
            answer.first() == Some(&0x20),
            "no CONNACK first: {answer:02x?}"
        );
        if RUNS.fetch_add(1, Ordering::Relaxed) % HEALTH_EVERY == 0 {
            let mut stream = TcpStream::connect(*addr).await.expect("broker accepts");
            stream.write_all(CONNECT_HEALTH).await.expect("write");
            let mut connack = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut connack))
                .await
                .expect("CONNACK in time")
                .expect("CONNACK");
            assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "fresh client refused");
        }
    });
});
