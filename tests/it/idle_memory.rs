//! What an idle client costs the real `fieldmq` process: its resident memory grows by a few
//! KiB per connected client that sends nothing after CONNECT (a connection gives its buffers
//! back when it goes idle, and its task is kept small). `fieldmq-bench memory` measures the
//! figure on a release build (docs/benchmarks.md); this test only guards it, with a wide
//! margin for a debug build on a busy machine.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use gateway::GatewayProcess;
use mqtt::packet::Connect;

use crate::util::{gateway, mqtt};

/// Clients opened before the first reading, so that one-time growth (tables, allocator
/// arenas) is not counted per client.
const WARM_UP: usize = 100;
/// Clients measured.
const CLIENTS: usize = 500;
/// Bytes per idle client allowed. Release builds measure about 3.5 KiB; before buffers were
/// released when idle and the connection's future was made smaller, 20 KiB.
const LIMIT_PER_CLIENT: u64 = 8 * 1024;

fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kib * 1024
}

/// Connect `count` MQTT 3.1.1 clients (raw CONNECT, CONNACK checked) that then stay idle.
fn open_idle_clients(addr: SocketAddr, first: usize, count: usize) -> Vec<TcpStream> {
    (first..first + count)
        .map(|i| {
            let id = format!("idle-{i}");
            let mut stream =
                TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            stream
                .write_all(&Connect::v311(&id).encode())
                .expect("send CONNECT");
            let mut connack = [0u8; 4];
            stream.read_exact(&mut connack).expect("CONNACK");
            assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "client {id} accepted");
            stream
        })
        .collect()
}

#[test]
fn each_idle_client_costs_the_broker_process_a_few_kib() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = gateway::write_config(dir.path(), &dir.path().join("data"), "");
    // The listener table is the last one: all clients come from 127.0.0.1.
    let mut text = std::fs::read_to_string(&config).expect("read config");
    text.push_str("max_connections_per_address = 0\nmax_connections = 1000\n");
    std::fs::write(&config, text).expect("write config");
    let gateway = GatewayProcess::start(&config);
    let pid = gateway.pid();

    let _warm = open_idle_clients(gateway.addr, 0, WARM_UP);
    std::thread::sleep(Duration::from_millis(500));
    let before = resident_bytes(pid);
    let _idle = open_idle_clients(gateway.addr, WARM_UP, CLIENTS);
    std::thread::sleep(Duration::from_secs(1));
    let after = resident_bytes(pid);

    let per_client = after.saturating_sub(before) / CLIENTS as u64;
    eprintln!(
        "resident {} KiB -> {} KiB: {per_client} bytes per idle client",
        before / 1024,
        after / 1024
    );
    assert!(
        per_client <= LIMIT_PER_CLIENT,
        "{per_client} bytes per idle client, more than {LIMIT_PER_CLIENT}"
    );
}
