//! The Modbus TCP server (`[[modbus_servers]]`) against real peers: the gateway runs in
//! this process on a config, its Modbus devices are tokio-modbus servers on 127.0.0.1:0,
//! and the SCADA side is pymodbus (tests/py/modbus_client.py, from the venv `.ci/run`
//! makes in target/pymodbus-venv) or raw bytes for the attacks on the input path.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldmq::broker::InternalSubscribeOptions;
use fieldmq::model::{Message, QoS};
use serde_json::{json, Value as Json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};
use tokio_modbus::client::Reader as _;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

use crate::util::modbus::Answer;
use crate::util::skip::skip;

// ---------------------------------------------------------------------------------------
// The field device: a tokio-modbus server with holding registers and coils.

#[derive(Debug, Default)]
struct DeviceState {
    holding: HashMap<u16, u16>,
    coils: HashMap<u16, bool>,
}

type Shared = Arc<Mutex<DeviceState>>;

#[derive(Clone)]
struct FieldDevice {
    state: Shared,
}

impl tokio_modbus::server::Service for FieldDevice {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn call(&self, request: Self::Request) -> Self::Future {
        let mut s = self.state.lock().unwrap();
        let answer = match request.request {
            Request::ReadHoldingRegisters(start, count) => {
                Ok(Some(Response::ReadHoldingRegisters(
                    (start..start + count)
                        .map(|a| s.holding.get(&a).copied().unwrap_or(0))
                        .collect(),
                )))
            }
            Request::ReadCoils(start, count) => Ok(Some(Response::ReadCoils(
                (start..start + count)
                    .map(|a| s.coils.get(&a).copied().unwrap_or(false))
                    .collect(),
            ))),
            Request::WriteSingleCoil(address, value) => {
                s.coils.insert(address, value);
                Ok(Some(Response::WriteSingleCoil(address, value)))
            }
            Request::WriteSingleRegister(address, value) => {
                s.holding.insert(address, value);
                Ok(Some(Response::WriteSingleRegister(address, value)))
            }
            Request::WriteMultipleRegisters(address, values) => {
                for (i, value) in values.iter().enumerate() {
                    s.holding.insert(address + i as u16, *value);
                }
                Ok(Some(Response::WriteMultipleRegisters(
                    address,
                    values.len() as u16,
                )))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        };
        Box::pin(std::future::ready(answer))
    }
}

async fn field_device(state: Shared) -> SocketAddr {
    let device = FieldDevice { state };
    crate::util::modbus::serve_tcp(device, "127.0.0.1:0".parse().expect("address"))
        .await
        .0
}

// ---------------------------------------------------------------------------------------
// The gateway, in this process.

struct Gateway {
    running: Option<fieldmq::service::Gateway>,
    shutdown: CancellationToken,
    /// The Modbus servers' addresses, in the configuration's order.
    modbus: Vec<SocketAddr>,
    /// The configuration file (for reloads).
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gateway {
    async fn start(rest: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let text = Gateway::text(dir.path(), rest);
        let path = dir.path().join("fieldmq.toml");
        std::fs::write(&path, &text).unwrap();
        let config = fieldmq::service::config::load(&path)
            .unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n{text}"));
        let shutdown = CancellationToken::new();
        let running = fieldmq::service::start(config, shutdown.clone())
            .await
            .expect("the gateway starts");
        let modbus = running
            .listeners
            .iter()
            .filter(|l| l.service == "Modbus")
            .map(|l| l.addr)
            .collect();
        Gateway {
            running: Some(running),
            shutdown,
            modbus,
            path,
            _dir: dir,
        }
    }

    fn text(dir: &Path, rest: &str) -> String {
        format!(
            "[gateway]\nid = \"gw\"\ndata_dir = \"{}\"\n\n[broker]\nallow_anonymous = true\n\
             [[broker.listeners]]\nbind = \"127.0.0.1:0\"\n\n{rest}",
            dir.join("data").display()
        )
    }

    /// Writes `rest` as the new configuration and reloads it; the report's changes.
    async fn reload(&self, rest: &str) -> Vec<String> {
        let dir = self.path.parent().unwrap();
        std::fs::write(&self.path, Gateway::text(dir, rest)).unwrap();
        let report = timeout(
            Duration::from_secs(15),
            self.running.as_ref().unwrap().reloader.reload(),
        )
        .await
        .expect("the reload finishes")
        .expect("the gateway reloads");
        assert!(report.applied, "{report:?}");
        report.changes
    }

    fn broker(&self) -> fieldmq::broker::BrokerHandle {
        self.running.as_ref().unwrap().broker.clone()
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            timeout(Duration::from_secs(15), running.stop())
                .await
                .expect("the gateway stops");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The SCADA side: pymodbus.

fn python() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pymodbus-venv/bin/python");
    venv.is_file().then_some(venv)
}

/// Runs the pymodbus client on `ops` against `addr` (15 s at most); one result per op.
async fn pymodbus(python: &Path, addr: SocketAddr, ops: &Json) -> Vec<Json> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/modbus_client.py");
    let output = timeout(
        Duration::from_secs(15),
        tokio::process::Command::new(python)
            .arg(script)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg(ops.to_string())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("pymodbus finishes within 15 s")
    .expect("pymodbus runs");
    assert!(
        output.status.success(),
        "pymodbus failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Vec<Json> = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "pymodbus printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    assert_eq!(results.len(), ops.as_array().map_or(0, Vec::len));
    results
}

/// Repeats `ops` (every 200 ms, 10 s at most) until `done` accepts the results.
async fn pymodbus_until(
    python: &Path,
    addr: SocketAddr,
    ops: &Json,
    done: impl Fn(&[Json]) -> bool,
) -> Vec<Json> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let results = pymodbus(python, addr, ops).await;
        if done(&results) {
            return results;
        }
        assert!(Instant::now() < deadline, "never got there: {results:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn f32_words_abcd(x: f32) -> (u16, u16) {
    let bits = x.to_bits();
    ((bits >> 16) as u16, bits as u16)
}

fn meter_config(device: SocketAddr, extra_server: &str) -> String {
    format!(
        r#"
[[devices]]
name = "meter"
driver = "modbus-tcp"
address = "{device}"
poll = "100ms"
timeout = "500ms"
points = [
  {{ name = "voltage", table = "holding", address = 0, type = "f32" }},
  {{ name = "setpoint", table = "holding", address = 5, type = "i16", writable = true }},
  {{ name = "relay", table = "coil", address = 0, writable = true }},
]

[[modbus_servers]]
bind = "127.0.0.1:0"
unit_ids = [1]
write_timeout = "2s"
map = [
  {{ table = "holding", address = 100, device = "meter", point = "voltage", type = "f32:CDAB" }},
  {{ table = "holding", address = 102, device = "meter", point = "voltage", type = "i16", scale = 0.1 }},
  {{ table = "holding", address = 200, device = "meter", point = "setpoint", type = "u16", writable = true }},
  {{ table = "coil", address = 0, device = "meter", point = "relay", writable = true }},
  {{ table = "holding", address = 300, topic = "plant/limit", type = "u16", writable = true }},
]
{extra_server}
"#
    )
}

#[tokio::test]
async fn modbus_server_serves_device_values_to_pymodbus_in_the_chosen_type_and_order() {
    let Some(python) = python() else {
        return skip(
            "modbus_server_serves_device_values_to_pymodbus_in_the_chosen_type_and_order",
            "pymodbus venv missing (.ci/run creates target/pymodbus-venv)",
        );
    };
    let state: Shared = Default::default();
    let (high, low) = f32_words_abcd(230.5);
    state
        .lock()
        .unwrap()
        .holding
        .extend([(0, high), (1, low), (5, 7)]);
    state.lock().unwrap().coils.insert(0, true);
    let device = field_device(state.clone()).await;
    let gateway = Gateway::start(&meter_config(device, "")).await;
    let addr = gateway.modbus[0];

    let ops = json!([
        {"op": "read_holding", "address": 100, "count": 3},
        {"op": "read_holding", "address": 200, "count": 1},
        {"op": "read_coils", "address": 0, "count": 1},
        {"op": "read_holding", "address": 150, "count": 1},
        {"op": "read_holding", "address": 100, "count": 1, "unit": 9},
    ]);
    let results = pymodbus_until(&python, addr, &ops, |r| r[0].get("registers").is_some()).await;
    // f32 CDAB: low word first; then 230.5 as i16 with scale 0.1.
    assert_eq!(results[0], json!({"registers": [low, high, 2305]}));
    assert_eq!(results[1], json!({"registers": [7]}));
    assert_eq!(results[2], json!({"bits": [true]}));
    assert_eq!(results[3], json!({"exception": 2}), "unmapped address");
    assert_eq!(results[4], json!({"exception": 11}), "a unit id not served");

    // The topic entry has no value yet: exception 4 until something is published.
    let results = pymodbus(
        &python,
        addr,
        &json!([{"op": "read_holding", "address": 300, "count": 1}]),
    )
    .await;
    assert_eq!(results[0], json!({"exception": 4}));

    let mut limit = gateway
        .broker()
        .subscribe(
            "test",
            vec![("plant/limit".into(), QoS::AtMostOnce)],
            InternalSubscribeOptions::default(),
        )
        .await
        .unwrap();
    let results = pymodbus(
        &python,
        addr,
        &json!([
            {"op": "write_register", "address": 200, "value": 42},
            {"op": "write_coil", "address": 0, "value": false},
            {"op": "write_register", "address": 300, "value": 75},
            // Read-only entry, and a value the point's i16 cannot hold.
            {"op": "write_registers", "address": 100, "values": [0, 0]},
            {"op": "write_register", "address": 200, "value": 40000},
            // Half of a two-register entry.
            {"op": "write_register", "address": 101, "value": 1},
        ]),
    )
    .await;
    assert_eq!(results[0], json!({"ok": true}), "{results:?}");
    assert_eq!(results[1], json!({"ok": true}), "{results:?}");
    assert_eq!(results[2], json!({"ok": true}), "{results:?}");
    assert_eq!(results[3], json!({"exception": 1}), "read-only entry");
    assert_eq!(
        results[4],
        json!({"exception": 4}),
        "the point's own check refuses 40000 for i16"
    );
    assert_eq!(results[5], json!({"exception": 2}), "a partial entry");
    {
        let s = state.lock().unwrap();
        assert_eq!(s.holding.get(&5), Some(&42), "the write reached the device");
        assert_eq!(s.coils.get(&0), Some(&false));
    }
    let published = timeout(Duration::from_secs(5), limit.recv())
        .await
        .expect("the topic write is published")
        .expect("message");
    assert_eq!(&published.payload[..], b"75");
    // The image follows: the device's read-back and the retained topic value.
    let results = pymodbus_until(
        &python,
        addr,
        &json!([
            {"op": "read_holding", "address": 200, "count": 1},
            {"op": "read_holding", "address": 300, "count": 1},
        ]),
        |r| r[0] == json!({"registers": [42]}) && r[1] == json!({"registers": [75]}),
    )
    .await;
    assert_eq!(results[1], json!({"registers": [75]}));
    gateway.stop().await;
}

#[tokio::test]
async fn modbus_server_serves_and_writes_the_points_a_sunspec_device_finds() {
    let Some(python) = python() else {
        return skip(
            "modbus_server_serves_and_writes_the_points_a_sunspec_device_finds",
            "pymodbus venv missing (.ci/run creates target/pymodbus-venv)",
        );
    };
    let state: Shared = Default::default();
    // Hz = 50.01 at 40018, WMaxLimPct = 100.0 % at 40059 (WMaxLimPct_SF = -1).
    state
        .lock()
        .unwrap()
        .holding
        .extend(crate::util::modbus::sunspec_inverter_registers());
    let device = field_device(state.clone()).await;
    // The map names points that exist only once discovery has read the device's models.
    let gateway = Gateway::start(&format!(
        r#"
[[devices]]
name = "inv"
driver = "modbus-tcp"
address = "{device}"
poll = "100ms"
timeout = "500ms"
profile = "sunspec"
points = [ {{ name = "controls_WMaxLimPct", writable = true }} ]

[[modbus_servers]]
bind = "127.0.0.1:0"
write_timeout = "2s"
map = [
  {{ table = "input", address = 0, device = "inv", point = "inverter_Hz", type = "u16", scale = 0.01 }},
  {{ table = "holding", address = 10, device = "inv", point = "controls_WMaxLimPct", type = "u16", scale = 0.1, writable = true }},
  {{ table = "holding", address = 20, device = "inv", point = "inverter_W", type = "i16" }},
  {{ table = "holding", address = 21, device = "inv", point = "inverter_Hz", type = "u16", scale = 0.01, writable = true }},
]
"#
    ))
    .await;
    let addr = gateway.modbus[0];
    let ops = json!([
        {"op": "read_input", "address": 0, "count": 1},
        {"op": "read_holding", "address": 10, "count": 1},
        {"op": "read_holding", "address": 20, "count": 1},
    ]);
    let results = pymodbus_until(&python, addr, &ops, |r| {
        r[0].get("registers").is_some() && r[1].get("registers").is_some()
    })
    .await;
    assert_eq!(results[0], json!({"registers": [5001]}), "50.01 Hz");
    assert_eq!(results[1], json!({"registers": [1000]}), "100.0 %");
    assert_eq!(results[2], json!({"registers": [1500]}), "1500 W");

    // The SCADA sets the export limit to 60.0 %: the driver writes 600 with WMaxLimPct_SF
    // = -1 to the inverter's register and reads it back.
    // A measurement is read-only in SunSpec: the driver refuses what the map lets through.
    let results = pymodbus(
        &python,
        addr,
        &json!([
            {"op": "write_register", "address": 10, "value": 600},
            {"op": "write_register", "address": 21, "value": 4000},
        ]),
    )
    .await;
    assert_eq!(results[0], json!({"ok": true}), "{results:?}");
    assert_eq!(results[1], json!({"exception": 4}), "{results:?}");
    assert_eq!(state.lock().unwrap().holding.get(&40059), Some(&600));
    assert_eq!(state.lock().unwrap().holding.get(&40018), Some(&5001));
    // A value the device reports as not implemented (W = 0x8000) answers exception 4.
    state.lock().unwrap().holding.insert(40004 + 12, 0x8000);
    pymodbus_until(
        &python,
        addr,
        &json!([{"op": "read_holding", "address": 20, "count": 1}]),
        |r| r[0] == json!({"exception": 4}),
    )
    .await;
    pymodbus_until(
        &python,
        addr,
        &json!([{"op": "read_holding", "address": 10, "count": 1}]),
        |r| r[0] == json!({"registers": [600]}),
    )
    .await;
    gateway.stop().await;
}

#[tokio::test]
async fn modbus_server_answers_bad_values_with_exception_4_or_the_configured_sentinel() {
    let Some(python) = python() else {
        return skip(
            "modbus_server_answers_bad_values_with_exception_4_or_the_configured_sentinel",
            "pymodbus venv missing (.ci/run creates target/pymodbus-venv)",
        );
    };
    // A device address where nothing listens: every point is bad.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let sentinel = r#"
[[modbus_servers]]
bind = "127.0.0.1:0"
bad_quality = "sentinel"
sentinel = -1
map = [
  { table = "holding", address = 0, device = "meter", point = "voltage", type = "f32" },
  { table = "holding", address = 2, device = "meter", point = "setpoint", type = "i16" },
  { table = "coil", address = 0, device = "meter", point = "relay" },
]
"#;
    let gateway = Gateway::start(&meter_config(dead, sentinel)).await;
    let device_bad = |r: &[Json]| r[0] == json!({"exception": 4});
    let results = pymodbus_until(
        &python,
        gateway.modbus[0],
        &json!([{"op": "read_holding", "address": 100, "count": 2}]),
        device_bad,
    )
    .await;
    assert_eq!(results[0], json!({"exception": 4}));
    // A write to an offline device's point is refused by the driver: exception 4.
    let results = pymodbus(
        &python,
        gateway.modbus[0],
        &json!([{"op": "write_register", "address": 200, "value": 1}]),
    )
    .await;
    assert_eq!(results[0], json!({"exception": 4}));
    let results = pymodbus(
        &python,
        gateway.modbus[1],
        &json!([
            {"op": "read_holding", "address": 0, "count": 3},
            {"op": "read_coils", "address": 0, "count": 1},
        ]),
    )
    .await;
    // -1.0 as f32 ABCD is 0xBF80 0x0000; -1 as i16 is 0xFFFF.
    assert_eq!(results[0], json!({"registers": [0xBF80, 0, 0xFFFF]}));
    assert_eq!(results[1], json!({"bits": [false]}));
    gateway.stop().await;
}

// ---------------------------------------------------------------------------------------
// The input path under attack: raw bytes.

/// An MBAP frame: transaction 1, protocol 0, `unit`, `pdu`.
fn frame(unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 1, 0, 0];
    out.extend_from_slice(&((pdu.len() + 1) as u16).to_be_bytes());
    out.push(unit);
    out.extend_from_slice(pdu);
    out
}

/// The PDU of the next response (3 s at most), or `None` when the server closed.
async fn response(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut header = [0u8; 7];
    timeout(Duration::from_secs(3), stream.read_exact(&mut header))
        .await
        .expect("an answer or a close within 3 s")
        .ok()?;
    let length = usize::from(u16::from_be_bytes([header[4], header[5]]));
    let mut pdu = vec![0u8; length.saturating_sub(1)];
    timeout(Duration::from_secs(3), stream.read_exact(&mut pdu))
        .await
        .expect("the rest of the answer")
        .ok()?;
    Some(pdu)
}

/// Whether the server closed `stream` (3 s at most to tell).
async fn closed(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        timeout(Duration::from_secs(3), stream.read(&mut byte)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn topic_server(max_connections: usize, idle: &str) -> String {
    format!(
        r#"
[[modbus_servers]]
bind = "127.0.0.1:0"
max_connections = {max_connections}
idle_timeout = "{idle}"
bad_quality = "sentinel"
sentinel = 0
map = [
  {{ table = "holding", address = 0, topic = "plant/a", type = "u16" }},
  {{ table = "holding", address = 65534, topic = "plant/top", type = "u32" }},
]
"#
    )
}

#[tokio::test]
async fn modbus_server_answers_long_reads_overflows_and_malformed_frames_without_stalling() {
    let gateway = Gateway::start(&topic_server(8, "60s")).await;
    let addr = gateway.modbus[0];
    gateway
        .broker()
        .publish(Message::internal(
            "test",
            "plant/a",
            "1234",
            QoS::AtLeastOnce,
            true,
        ))
        .await
        .unwrap();

    // A client that connects and never sends, and one that sends half a header and
    // half-closes: neither holds up the others.
    let _silent = TcpStream::connect(addr).await.unwrap();
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(&[0, 1, 0]).await.unwrap();
    half.shutdown().await.unwrap();
    assert!(closed(&mut half).await, "a half-closed client is let go");

    let mut client = TcpStream::connect(addr).await.unwrap();
    // 126 registers: illegal data value (exception 3).
    client
        .write_all(&frame(1, &[3, 0, 0, 0, 126]))
        .await
        .unwrap();
    assert_eq!(response(&mut client).await, Some(vec![0x83, 3]));
    // 65535 + 2 runs past the last address: exception 2.
    client
        .write_all(&frame(1, &[3, 0xFF, 0xFF, 0, 2]))
        .await
        .unwrap();
    assert_eq!(response(&mut client).await, Some(vec![0x83, 2]));
    // The entry at the top of the address space reads whole.
    client
        .write_all(&frame(1, &[3, 0xFF, 0xFE, 0, 2]))
        .await
        .unwrap();
    assert_eq!(response(&mut client).await, Some(vec![3, 4, 0, 0, 0, 0]));
    // An unknown function code: exception 1.
    client.write_all(&frame(1, &[0x41, 0, 0])).await.unwrap();
    assert_eq!(response(&mut client).await, Some(vec![0xC1, 1]));
    // The value published on the mapped topic.
    let retry_until = Instant::now() + Duration::from_secs(5);
    loop {
        client.write_all(&frame(1, &[3, 0, 0, 0, 1])).await.unwrap();
        let answer = response(&mut client).await;
        if answer == Some(vec![3, 2, 0x04, 0xD2]) {
            break;
        }
        assert!(
            Instant::now() < retry_until,
            "1234 never served: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Malformed: a protocol id other than 0 and a frame longer than any PDU. Each such
    // client is disconnected; the server goes on.
    for bytes in [
        vec![0, 1, 0x12, 0x34, 0, 6, 1, 3, 0, 0, 0, 1],
        vec![0, 1, 0, 0, 0xFF, 0xFF, 1, 3, 0, 0],
        vec![0, 1, 0, 0, 0, 0],
    ] {
        let mut bad = TcpStream::connect(addr).await.unwrap();
        bad.write_all(&bytes).await.unwrap();
        let _ = bad.shutdown().await;
        assert!(closed(&mut bad).await, "malformed {bytes:02x?} closes");
    }

    // Everyone else still gets answers at once, and the broker still routes.
    let mut context = tokio_modbus::client::tcp::connect(addr).await.unwrap();
    let words = timeout(Duration::from_secs(2), context.read_holding_registers(0, 1))
        .await
        .expect("a prompt answer")
        .unwrap()
        .unwrap();
    assert_eq!(words, vec![1234]);
    gateway.broker().stats().await.expect("the broker answers");
    gateway.stop().await;
}

#[tokio::test]
async fn modbus_server_caps_connections_and_lets_idle_clients_go() {
    let gateway = Gateway::start(&topic_server(4, "1s")).await;
    let addr = gateway.modbus[0];
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    // Let the server accept them all before the fifth.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fifth = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed(&mut fifth).await,
        "past max_connections a client is closed at once"
    );
    // After idle_timeout the silent clients are closed, and new clients are served.
    for stream in &mut silent {
        assert!(closed(stream).await, "an idle client is closed");
    }
    let clients: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut context = tokio_modbus::client::tcp::connect(addr).await.unwrap();
                timeout(Duration::from_secs(2), context.read_holding_registers(0, 1))
                    .await
                    .expect("a prompt answer")
                    .unwrap()
                    .unwrap()
            })
        })
        .collect();
    for client in clients {
        assert_eq!(
            client.await.unwrap(),
            vec![0],
            "the sentinel for a value not yet known"
        );
    }
    gateway.stop().await;
}

#[tokio::test]
async fn modbus_server_restarts_with_a_changed_map_on_reload_keeping_the_last_values() {
    let port = crate::util::free_port();
    let server = |address: u16| {
        format!(
            "[[modbus_servers]]\nbind = \"127.0.0.1:{port}\"\nbad_quality = \"sentinel\"\nsentinel = 9\n\
             map = [{{ table = \"holding\", address = {address}, topic = \"plant/a\" }}]\n"
        )
    };
    let gateway = Gateway::start(&server(0)).await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(gateway.modbus, vec![addr]);
    let mut context = tokio_modbus::client::tcp::connect(addr).await.unwrap();
    assert_eq!(
        context.read_holding_registers(0, 1).await.unwrap(),
        Ok(vec![9])
    );
    // A value that is not retained, as device readings are not.
    gateway
        .broker()
        .publish(Message::internal(
            "lan",
            "plant/a",
            "3",
            QoS::AtLeastOnce,
            false,
        ))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while context.read_holding_registers(0, 1).await.unwrap() != Ok(vec![3]) {
        assert!(Instant::now() < deadline, "3 never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Unchanged: nothing restarts, the connection stays.
    let changes = gateway.reload(&server(0)).await;
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(
        context.read_holding_registers(0, 1).await.unwrap(),
        Ok(vec![3])
    );

    // The entry moves to address 5: the server restarts on the same address.
    let changes = gateway.reload(&server(5)).await;
    assert_eq!(
        changes,
        vec!["modbus_servers: 1 server(s) (re)started".to_owned()]
    );
    let mut context = tokio_modbus::client::tcp::connect(addr).await.unwrap();
    assert_eq!(
        context.read_holding_registers(0, 1).await.unwrap(),
        Err(ExceptionCode::IllegalDataAddress)
    );
    // The restarted server still serves the last value, not the sentinel.
    assert_eq!(
        context.read_holding_registers(5, 1).await.unwrap(),
        Ok(vec![3])
    );
    gateway.stop().await;
}

#[tokio::test]
async fn modbus_server_serves_many_clients_at_once_while_the_broker_keeps_routing() {
    let gateway = Gateway::start(&topic_server(40, "60s")).await;
    let addr = gateway.modbus[0];
    let broker = gateway.broker();
    broker
        .publish(Message::internal(
            "test",
            "plant/a",
            "7",
            QoS::AtLeastOnce,
            true,
        ))
        .await
        .unwrap();
    // Silent clients hold places but no one's time.
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut echo = broker
        .subscribe(
            "echo",
            vec![("plant/echo".into(), QoS::AtMostOnce)],
            InternalSubscribeOptions::default(),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let clients: Vec<_> = (0..32)
        .map(|_| {
            tokio::spawn(async move {
                let mut context = tokio_modbus::client::tcp::connect(addr).await.unwrap();
                let mut served = 0;
                for _ in 0..200 {
                    let words =
                        timeout(Duration::from_secs(2), context.read_holding_registers(0, 1))
                            .await
                            .expect("a prompt answer")
                            .unwrap()
                            .unwrap();
                    if words == vec![7] {
                        served += 1;
                    }
                }
                served
            })
        })
        .collect();
    // Meanwhile the broker routes a message at once.
    let sent = Instant::now();
    broker
        .publish(Message::internal(
            "test",
            "plant/echo",
            "x",
            QoS::AtMostOnce,
            false,
        ))
        .await
        .unwrap();
    timeout(Duration::from_secs(1), echo.recv())
        .await
        .expect("the broker routes within 1 s while 32 Modbus clients read")
        .expect("message");
    let routed = sent.elapsed();
    let mut total = 0;
    for client in clients {
        total += client.await.unwrap();
    }
    assert_eq!(total, 32 * 200, "every read answered with the value");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "6,400 reads took {:?}",
        started.elapsed()
    );
    assert!(routed < Duration::from_secs(1), "{routed:?}");
    drop(silent);
    gateway.stop().await;
}

/// The server's entry in the status, as JSON.
fn server_status(gateway: &Gateway) -> Json {
    let servers = gateway.running.as_ref().unwrap().status.modbus_servers();
    assert_eq!(servers.len(), 1, "{servers:?}");
    serde_json::to_value(&servers[0]).unwrap()
}

#[tokio::test]
async fn modbus_server_counts_connections_requests_exceptions_and_writes() {
    let Some(python) = python() else {
        return skip(
            "modbus_server_counts_connections_requests_exceptions_and_writes",
            "pymodbus venv missing (.ci/run creates target/pymodbus-venv)",
        );
    };
    let state: Shared = Default::default();
    state.lock().unwrap().holding.insert(5, 7);
    let device = field_device(state.clone()).await;
    let gateway = Gateway::start(&meter_config(device, "")).await;
    let addr = gateway.modbus[0];
    pymodbus_until(
        &python,
        addr,
        &json!([{"op": "read_holding", "address": 200, "count": 1}]),
        |r| r[0] == json!({"registers": [7]}),
    )
    .await;
    let before = server_status(&gateway);
    assert_eq!(before["name"], "modbus-server-0");
    assert_eq!(before["bind"], addr.to_string());

    // One connection: two good reads, an unmapped read, a write and a refused write.
    let results = pymodbus(
        &python,
        addr,
        &json!([
            {"op": "read_holding", "address": 200, "count": 1},
            {"op": "read_coils", "address": 0, "count": 1},
            {"op": "read_holding", "address": 150, "count": 1},
            {"op": "write_register", "address": 200, "value": 42},
            {"op": "write_register", "address": 200, "value": 40000},
        ]),
    )
    .await;
    assert_eq!(results[2], json!({"exception": 2}), "{results:?}");
    assert_eq!(results[3], json!({"ok": true}), "{results:?}");
    assert_eq!(results[4], json!({"exception": 4}), "{results:?}");

    // pymodbus has closed its connection; the server notices at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let after = server_status(&gateway);
        if after["connections_open"] == 0 {
            break after;
        }
        assert!(Instant::now() < deadline, "still open: {after}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let delta = |key: &str| after[key].as_u64().unwrap() - before[key].as_u64().unwrap();
    let delta_in = |map: &str, key: &str| {
        after[map][key].as_u64().unwrap_or(0) - before[map][key].as_u64().unwrap_or(0)
    };
    assert_eq!(delta("connections_accepted"), 1, "{after}");
    assert_eq!(delta("connections_refused"), 0, "{after}");
    assert_eq!(delta("requests"), 5, "{after}");
    assert_eq!(delta_in("requests_by_function", "3"), 2, "{after}");
    assert_eq!(delta_in("requests_by_function", "1"), 1, "{after}");
    assert_eq!(delta_in("requests_by_function", "6"), 2, "{after}");
    assert_eq!(delta_in("exceptions", "2"), 1, "{after}");
    assert_eq!(delta_in("exceptions", "4"), 1, "{after}");
    assert_eq!(delta("writes_ok"), 1, "{after}");
    assert_eq!(delta("writes_failed"), 1, "{after}");

    // The metrics are the same counts.
    let text = gateway
        .running
        .as_ref()
        .unwrap()
        .metrics
        .encode(fieldmq::metrics::Format::PrometheusText)
        .unwrap();
    let series = |name: &str, labels: &str| {
        let series = format!("fieldmq_modbus_server_{name}{{server=\"modbus-server-0\"{labels}}}");
        crate::util::http::metric_value(&text, &series)
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(series("connections", ""), 0.0);
    assert_eq!(
        series("connections_accepted_total", ""),
        after["connections_accepted"].as_u64().unwrap() as f64
    );
    assert_eq!(
        series("requests_total", ",function=\"6\""),
        after["requests_by_function"]["6"].as_u64().unwrap() as f64
    );
    assert_eq!(
        series("exceptions_total", ",code=\"2\""),
        after["exceptions"]["2"].as_u64().unwrap() as f64
    );
    assert_eq!(series("writes_total", ",result=\"ok\""), 1.0);
    assert_eq!(series("writes_total", ",result=\"failed\""), 1.0);
    gateway.stop().await;
}

#[tokio::test]
async fn modbus_server_answers_each_unit_id_from_its_own_entries_and_the_shared_ones() {
    let Some(python) = python() else {
        return skip(
            "modbus_server_answers_each_unit_id_from_its_own_entries_and_the_shared_ones",
            "pymodbus venv missing (.ci/run creates target/pymodbus-venv)",
        );
    };
    // Two meters behind one server, each at the same addresses under its own unit id, and
    // one value every unit serves.
    let gateway = Gateway::start(
        r#"
[[modbus_servers]]
bind = "127.0.0.1:0"
unit_ids = [1, 2]
bad_quality = "sentinel"
sentinel = 7
map = [
  { unit = 1, table = "holding", address = 0, topic = "site/meter1/power", type = "u16" },
  { unit = 2, table = "holding", address = 0, topic = "site/meter2/power", type = "u16", writable = true },
  { table = "holding", address = 10, topic = "site/common", type = "u16" },
  { unit = 1, table = "holding", address = 20, topic = "site/meter1/only", type = "u16" },
]
"#,
    )
    .await;
    let addr = gateway.modbus[0];
    let broker = gateway.broker();
    for (topic, value) in [
        ("site/meter1/power", "11"),
        ("site/meter2/power", "22"),
        ("site/common", "33"),
    ] {
        broker
            .publish(Message::internal(
                "lan",
                topic,
                value,
                QoS::AtLeastOnce,
                true,
            ))
            .await
            .unwrap();
    }
    let reads = json!([
        {"op": "read_holding", "address": 0, "count": 1, "unit": 1},
        {"op": "read_holding", "address": 0, "count": 1, "unit": 2},
        {"op": "read_holding", "address": 10, "count": 1, "unit": 1},
        {"op": "read_holding", "address": 10, "count": 1, "unit": 2},
        // Mapped for unit 1 only, and not published yet: the sentinel on unit 1.
        {"op": "read_holding", "address": 20, "count": 1, "unit": 1},
        {"op": "read_holding", "address": 20, "count": 1, "unit": 2},
        // Not one of the server's unit ids.
        {"op": "read_holding", "address": 0, "count": 1, "unit": 3},
    ]);
    let results = pymodbus_until(&python, addr, &reads, |r| {
        r[0] == json!({"registers": [11]}) && r[1] == json!({"registers": [22]})
    })
    .await;
    assert_eq!(results[2], json!({"registers": [33]}), "{results:?}");
    assert_eq!(results[3], json!({"registers": [33]}), "{results:?}");
    assert_eq!(results[4], json!({"registers": [7]}), "{results:?}");
    assert_eq!(
        results[5],
        json!({"exception": 2}),
        "unit 2 has no address 20"
    );
    assert_eq!(results[6], json!({"exception": 11}), "unit 3 is not served");

    // A write goes to the entry of the unit it names.
    let mut meter2 = broker
        .subscribe(
            "test",
            vec![("site/+/power".into(), QoS::AtMostOnce)],
            InternalSubscribeOptions::default(),
        )
        .await
        .unwrap();
    let results = pymodbus(
        &python,
        addr,
        &json!([
            {"op": "write_register", "address": 0, "value": 1, "unit": 1},
            {"op": "write_register", "address": 0, "value": 44, "unit": 2},
        ]),
    )
    .await;
    assert_eq!(
        results[0],
        json!({"exception": 1}),
        "unit 1's entry is read-only"
    );
    assert_eq!(results[1], json!({"ok": true}), "{results:?}");
    // Subscribing sends the retained values first; the write follows them.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let message = timeout(deadline - Instant::now(), meter2.recv())
            .await
            .expect("the write to unit 2 is published")
            .expect("message");
        if &message.payload[..] == b"44" {
            assert_eq!(message.topic.as_ref(), "site/meter2/power");
            break;
        }
    }
    gateway.stop().await;
}
