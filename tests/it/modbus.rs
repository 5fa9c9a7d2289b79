//! The Modbus driver against real peers: a tokio-modbus TCP server on 127.0.0.1:0 (and an
//! RTU server on a pty pair) holding known registers and counting requests, and the
//! embedded broker in-process.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fieldmq::broker::config::BrokerConfig;
use fieldmq::broker::{self, BrokerHandle, InternalSubscribeOptions, InternalSubscription};
use fieldmq::drivers::{self, DeviceContext};
use fieldmq::model::{Message, MessageProperties, QoS};
use fieldmq::service::config;
use serde_json::{json, Value as Json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

use crate::util::gateway;
use crate::util::modbus::Answer;

// ---------------------------------------------------------------------------------------
// The device: a tokio-modbus server with registers, a request log and failure switches.

#[derive(Debug, Default)]
pub(crate) struct DeviceState {
    pub(crate) holding: HashMap<u16, u16>,
    input: HashMap<u16, u16>,
    pub(crate) coils: HashMap<u16, bool>,
    discrete: HashMap<u16, bool>,
    /// (unit, table, start, count) of every read.
    reads: Vec<(u8, &'static str, u16, u16)>,
    writes: usize,
    /// The function code of every write, in order.
    write_functions: Vec<u8>,
    /// Every write in order: function code, start address, and the registers (coils as
    /// 0/1) it carried.
    pub(crate) write_log: Vec<(u8, u16, Vec<u16>)>,
    /// Writes that start at this address answer "illegal data value".
    refuse_writes_at: Option<u16>,
    /// Reads that touch an address at or above this answer "illegal data address".
    exception_from: Option<u16>,
    /// No answer at all (the client times out).
    mute: bool,
    /// Register reads answer one register fewer than asked (a well-formed, short answer).
    short: bool,
    dead_units: HashSet<u8>,
    /// Addresses not in the map: a read that covers one answers "illegal data address".
    holes: HashSet<u16>,
}

pub(crate) type Shared = Arc<Mutex<DeviceState>>;

#[derive(Clone)]
struct FakeDevice {
    state: Shared,
}

impl tokio_modbus::server::Service for FakeDevice {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn call(&self, request: Self::Request) -> Self::Future {
        let answer = answer(&mut self.state.lock().unwrap(), request);
        Box::pin(std::future::ready(answer))
    }
}

fn answer(s: &mut DeviceState, request: SlaveRequest<'static>) -> Answer {
    let unit = request.slave;
    if s.dead_units.contains(&unit) {
        // Logged, so a test can count what the gateway asked a unit that never answers.
        if let Some((table, start, count)) = read_of(&request.request) {
            s.reads.push((unit, table, start, count));
        }
        return Ok(None);
    }
    if s.mute {
        return Ok(None);
    }
    let check = |s: &DeviceState, start: u16, count: u16| match s.exception_from {
        Some(from) if u32::from(start) + u32::from(count) > u32::from(from) => {
            Err(ExceptionCode::IllegalDataAddress)
        }
        _ if s.holes.iter().any(|&hole| {
            (u32::from(start)..u32::from(start) + u32::from(count)).contains(&u32::from(hole))
        }) =>
        {
            Err(ExceptionCode::IllegalDataAddress)
        }
        _ => Ok(()),
    };
    let short = s.short;
    let words = |map: &HashMap<u16, u16>, start: u16, count: u16| {
        let count = if short { count - 1 } else { count };
        (start..start + count)
            .map(|a| map.get(&a).copied().unwrap_or(0))
            .collect::<Vec<_>>()
    };
    let bits = |map: &HashMap<u16, bool>, start: u16, count: u16| {
        (start..start + count)
            .map(|a| map.get(&a).copied().unwrap_or(false))
            .collect::<Vec<_>>()
    };
    let write_start = match &request.request {
        Request::WriteSingleCoil(address, _)
        | Request::WriteSingleRegister(address, _)
        | Request::WriteMultipleRegisters(address, _)
        | Request::WriteMultipleCoils(address, _) => Some(*address),
        _ => None,
    };
    if write_start.is_some() && write_start == s.refuse_writes_at {
        return Err(ExceptionCode::IllegalDataValue);
    }
    Ok(Some(match request.request {
        Request::ReadHoldingRegisters(start, count) => {
            s.reads.push((unit, "holding", start, count));
            check(s, start, count)?;
            Response::ReadHoldingRegisters(words(&s.holding, start, count))
        }
        Request::ReadInputRegisters(start, count) => {
            s.reads.push((unit, "input", start, count));
            check(s, start, count)?;
            Response::ReadInputRegisters(words(&s.input, start, count))
        }
        Request::ReadCoils(start, count) => {
            s.reads.push((unit, "coil", start, count));
            check(s, start, count)?;
            Response::ReadCoils(bits(&s.coils, start, count))
        }
        Request::ReadDiscreteInputs(start, count) => {
            s.reads.push((unit, "discrete", start, count));
            check(s, start, count)?;
            Response::ReadDiscreteInputs(bits(&s.discrete, start, count))
        }
        Request::WriteSingleCoil(address, value) => {
            s.writes += 1;
            s.write_functions.push(5);
            s.write_log.push((5, address, vec![u16::from(value)]));
            s.coils.insert(address, value);
            Response::WriteSingleCoil(address, value)
        }
        Request::WriteSingleRegister(address, value) => {
            s.writes += 1;
            s.write_functions.push(6);
            s.write_log.push((6, address, vec![value]));
            s.holding.insert(address, value);
            Response::WriteSingleRegister(address, value)
        }
        Request::WriteMultipleRegisters(address, values) => {
            s.writes += 1;
            s.write_functions.push(16);
            s.write_log.push((16, address, values.to_vec()));
            for (i, value) in values.iter().enumerate() {
                s.holding.insert(address + i as u16, *value);
            }
            Response::WriteMultipleRegisters(address, values.len() as u16)
        }
        Request::WriteMultipleCoils(address, values) => {
            s.writes += 1;
            s.write_functions.push(15);
            s.write_log
                .push((15, address, values.iter().map(|&v| u16::from(v)).collect()));
            for (i, value) in values.iter().enumerate() {
                s.coils.insert(address + i as u16, *value);
            }
            Response::WriteMultipleCoils(address, values.len() as u16)
        }
        _ => return Err(ExceptionCode::IllegalFunction),
    }))
}

/// The table, start and count of a read request.
fn read_of(request: &Request<'_>) -> Option<(&'static str, u16, u16)> {
    match *request {
        Request::ReadHoldingRegisters(start, count) => Some(("holding", start, count)),
        Request::ReadInputRegisters(start, count) => Some(("input", start, count)),
        Request::ReadCoils(start, count) => Some(("coil", start, count)),
        Request::ReadDiscreteInputs(start, count) => Some(("discrete", start, count)),
        _ => None,
    }
}

/// The device as a Modbus TCP server on `addr` (port 0 for a free one).
pub(crate) async fn serve_tcp(state: Shared, addr: SocketAddr) -> (SocketAddr, JoinHandle<()>) {
    crate::util::modbus::serve_tcp(FakeDevice { state }, addr).await
}

pub(crate) fn device_with(registers: &[(u16, u16)]) -> Shared {
    let state = DeviceState {
        holding: registers.iter().copied().collect(),
        ..DeviceState::default()
    };
    Arc::new(Mutex::new(state))
}

// ---------------------------------------------------------------------------------------
// The gateway side: the embedded broker and the Modbus buses, wired like the service.

struct Gateway {
    broker: BrokerHandle,
    /// What the devices record, as `GET /metrics` would show it.
    metrics: Arc<fieldmq::metrics::Metrics>,
    messages: InternalSubscription,
    /// Received but not yet asked for, in arrival order.
    backlog: std::collections::VecDeque<Message>,
    shutdown: CancellationToken,
    _broker_shutdown: CancellationToken,
}

const HEADER: &str = "[gateway]\nid = \"gw\"\n[broker]\nallow_anonymous = true\n";

async fn start_gateway(devices_toml: &str) -> Gateway {
    let text = format!("{HEADER}{devices_toml}");
    let config = config::parse(&text, Path::new("modbus-test.toml"))
        .unwrap_or_else(|e| panic!("test config is invalid:\n{e}"));
    let broker_shutdown = CancellationToken::new();
    let running = broker::start(
        &BrokerConfig {
            listeners: vec![],
            allow_anonymous: true,
            ..BrokerConfig::default()
        },
        broker_shutdown.clone(),
    )
    .await
    .unwrap();
    let handle = running.handle.clone();
    let messages = handle
        .subscribe(
            "test",
            vec![
                ("gw/#".into(), QoS::AtLeastOnce),
                ("fieldmq/gw/status/#".into(), QoS::AtLeastOnce),
                ("replies/#".into(), QoS::AtLeastOnce),
            ],
            InternalSubscribeOptions::default(),
        )
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(fieldmq::metrics::Metrics::new());
    let devices = config
        .devices
        .iter()
        .cloned()
        .map(|device| {
            let context = DeviceContext::new(
                &config.gateway.id,
                &config.gateway.status_topic,
                &device,
                handle.clone(),
            )
            .with_metrics(metrics.device(&device.name), None);
            (device, context)
        })
        .collect();
    for task in drivers::modbus::device_tasks(devices, shutdown.clone()) {
        tokio::spawn(task);
    }
    std::mem::forget(running); // lives as long as the test
    Gateway {
        broker: handle,
        metrics,
        messages,
        backlog: Default::default(),
        shutdown,
        _broker_shutdown: broker_shutdown,
    }
}

impl Gateway {
    /// The next message on `topic`, as JSON (or a JSON string for a plain payload).
    async fn next_on(&mut self, topic: &str) -> Json {
        self.next_matching(topic, |_| true).await
    }

    async fn next_matching(&mut self, topic: &str, accept: impl Fn(&Json) -> bool) -> Json {
        self.next_message(topic, accept).await.1
    }

    /// The next message on `topic` that `accept`s; earlier ones on `topic` are dropped,
    /// messages on other topics are kept for later calls.
    async fn next_message(
        &mut self,
        topic: &str,
        accept: impl Fn(&Json) -> bool,
    ) -> (Message, Json) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let position = self.backlog.iter().position(|m| &*m.topic == topic);
            let message = match position.and_then(|i| self.backlog.remove(i)) {
                Some(message) => message,
                None => {
                    let message = timeout(deadline - Instant::now(), self.messages.recv())
                        .await
                        .unwrap_or_else(|_| panic!("nothing acceptable on {topic} within 10s"))
                        .expect("broker running");
                    if &*message.topic != topic {
                        self.backlog.push_back(message);
                        continue;
                    }
                    message
                }
            };
            let json = serde_json::from_slice(&message.payload).unwrap_or_else(|_| {
                Json::String(String::from_utf8_lossy(&message.payload).into_owned())
            });
            if accept(&json) {
                return (message, json);
            }
        }
    }

    async fn publish(&self, topic: &str, payload: &str) {
        crate::util::mqtt::publish_in_process(&self.broker, topic, payload).await;
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn is_good(reading: &Json) -> bool {
    reading["quality"] == "good"
}

// ---------------------------------------------------------------------------------------

/// (type spec, registers at the point's address, expected value)
const DECODE_TABLE: &[(&str, &[u16], &str)] = &[
    ("u16", &[0x1234], "4660"),
    ("u16:BADC", &[0x3412], "4660"),
    ("u16:DCBA", &[0x3412], "4660"),
    ("u16:CDAB", &[0x1234], "4660"),
    ("i16", &[0xFFFE], "-2"),
    ("i16:BADC", &[0xFEFF], "-2"),
    ("u32", &[0x1234, 0x5678], "305419896"),
    ("u32:CDAB", &[0x5678, 0x1234], "305419896"),
    ("u32:BADC", &[0x3412, 0x7856], "305419896"),
    ("u32:DCBA", &[0x7856, 0x3412], "305419896"),
    ("i32", &[0xFFFF, 0xFFFE], "-2"),
    ("i32:CDAB", &[0xFFFE, 0xFFFF], "-2"),
    ("i32:BADC", &[0xFFFF, 0xFEFF], "-2"),
    ("i32:DCBA", &[0xFEFF, 0xFFFF], "-2"),
    ("f32", &[0x41C8, 0x0000], "25.0"),
    ("f32:CDAB", &[0x0000, 0x41C8], "25.0"),
    ("f32:BADC", &[0xC841, 0x0000], "25.0"),
    ("f32:DCBA", &[0x0000, 0xC841], "25.0"),
    ("f32", &[0xBFC0, 0x0000], "-1.5"),
    ("f32:CDAB", &[0xAE14, 0x41AD], "21.71"),
    (
        "u64",
        &[0x0102, 0x0304, 0x0506, 0x0708],
        "72623859790382856",
    ),
    (
        "u64:CDAB",
        &[0x0708, 0x0506, 0x0304, 0x0102],
        "72623859790382856",
    ),
    (
        "u64:BADC",
        &[0x0201, 0x0403, 0x0605, 0x0807],
        "72623859790382856",
    ),
    (
        "u64:DCBA",
        &[0x0807, 0x0605, 0x0403, 0x0201],
        "72623859790382856",
    ),
    ("i64", &[0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE], "-2"),
    ("i64:CDAB", &[0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF], "-2"),
    ("i64:BADC", &[0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF], "-2"),
    ("i64:DCBA", &[0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF], "-2"),
    ("f64", &[0x3FF8, 0x0000, 0x0000, 0x0000], "1.5"),
    ("f64:CDAB", &[0x0000, 0x0000, 0x0000, 0x3FF8], "1.5"),
    ("f64:BADC", &[0xF83F, 0x0000, 0x0000, 0x0000], "1.5"),
    ("f64:DCBA", &[0x0000, 0x0000, 0x0000, 0xF83F], "1.5"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_and_order_decodes_from_a_real_server() {
    let mut registers = Vec::new();
    let mut points = Vec::new();
    for (i, (spec, words, _)) in DECODE_TABLE.iter().enumerate() {
        let address = i as u16 * 10;
        for (j, word) in words.iter().enumerate() {
            registers.push((address + j as u16, *word));
        }
        points.push(format!(
            "{{ name = \"p{i}\", table = \"holding\", address = {address}, type = \"{spec}\" }}"
        ));
    }
    // Strings, bits of a register, scale and offset, coils and discrete inputs.
    registers.extend([(1000, 0x4142), (1001, 0x4344), (1002, 0x4500)]);
    registers.extend([(1010, 0x4241), (1011, 0x4443), (1012, 0x0045)]);
    registers.extend([(1020, 0x0008), (1030, 0x00D7), (1040, 0xFF9C)]);
    points.extend([
        r#"{ name = "text", table = "holding", address = 1000, type = "string", length = 3 }"#.to_owned(),
        r#"{ name = "text_swapped", table = "holding", address = 1010, type = "string:BADC", length = 3 }"#.to_owned(),
        r#"{ name = "bit3", table = "holding", address = 1020, type = "bit", bit = 3 }"#.to_owned(),
        r#"{ name = "bit2", table = "holding", address = 1020, type = "bit", bit = 2 }"#.to_owned(),
        r#"{ name = "scaled", table = "holding", address = 1030, scale = 0.1 }"#.to_owned(),
        r#"{ name = "offset", table = "holding", address = 1040, type = "i16", scale = 0.5, offset = 40 }"#.to_owned(),
        r#"{ name = "coil", table = "coil", address = 7 }"#.to_owned(),
        r#"{ name = "discrete", table = "discrete", address = 9 }"#.to_owned(),
        r#"{ name = "input", table = "input", address = 3, type = "i16" }"#.to_owned(),
    ]);
    let state = device_with(&registers);
    {
        let mut s = state.lock().unwrap();
        s.coils.insert(7, true);
        s.discrete.insert(9, true);
        s.input.insert(3, 0x8000);
    }
    let (addr, _server) = serve_tcp(state.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let mut gw = start_gateway(&format!(
        "[[devices]]\nname = \"dev\"\ndriver = \"modbus-tcp\"\naddress = \"{addr}\"\npoll = \"1h\"\npoints = [\n{}\n]\n",
        points.join(",\n")
    ))
    .await;

    let mut expected: Vec<(String, Json, String)> = DECODE_TABLE
        .iter()
        .enumerate()
        .map(|(i, (spec, words, value))| {
            let hex: Vec<String> = words.iter().map(|w| format!("{w:04X}")).collect();
            (
                format!("p{i}"),
                serde_json::from_str(value).unwrap(),
                format!("{spec} [{}]", hex.join(" ")),
            )
        })
        .collect();
    for (name, value) in [
        ("text", json!("ABCDE")),
        ("text_swapped", json!("ABCDE")),
        ("bit3", json!(true)),
        ("bit2", json!(false)),
        ("scaled", json!(21.5)),
        ("offset", json!(-10.0)),
        ("coil", json!(true)),
        ("discrete", json!(true)),
        ("input", json!(-32768)),
    ] {
        expected.push((name.to_owned(), value, name.to_owned()));
    }
    let mut failures = Vec::new();
    for (name, value, what) in &expected {
        let reading = gw.next_on(&format!("gw/dev/{name}")).await;
        if reading["value"] != *value || !is_good(&reading) {
            failures.push(format!("{what}: expected {value}, got {reading}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_scattered_points_use_the_planned_number_of_requests() {
    // 200 u16 points, one every third register: 0, 3, 6 ... 597.
    let points: Vec<String> = (0..200)
        .map(|i| {
            format!(
                "{{ name = \"p{i}\", table = \"holding\", address = {} }}",
                i * 3
            )
        })
        .collect();
    let points = points.join(",\n");
    // (extra device keys, expected requests): gap 2 lets neighbours merge; at most 125
    // registers hold 42 points (0..=123), so 5 requests; a gap of 1 merges nothing; a
    // 30-register limit holds 10 points per request.
    for (keys, expected) in [
        ("max_gap = 2", 5),
        ("max_gap = 1", 200),
        ("max_gap = 2\nmax_registers_per_request = 30", 20),
    ] {
        let state = device_with(&[]);
        let (addr, _server) = serve_tcp(state.clone(), "127.0.0.1:0".parse().unwrap()).await;
        let mut gw = start_gateway(&format!(
            "[[devices]]\nname = \"dev\"\ndriver = \"modbus-tcp\"\naddress = \"{addr}\"\npoll = \"1h\"\n{keys}\npoints = [\n{points}\n]\n"
        ))
        .await;
        for i in 0..200 {
            let reading = gw.next_on(&format!("gw/dev/p{i}")).await;
            assert!(is_good(&reading), "{keys}: p{i}: {reading}");
        }
        let reads = state.lock().unwrap().reads.clone();
        assert_eq!(reads.len(), expected, "{keys}: {reads:?}");
        let limit = if keys.contains("30") { 30 } else { 125 };
        for (_, _, start, count) in &reads {
            assert!(*count <= limit, "{keys}: {count} registers from {start}");
            // Every request starts and ends on a point: gaps only inside.
            assert_eq!(start % 3, 0, "{keys}");
            assert_eq!((start + count - 1) % 3, 0, "{keys}");
        }
    }
}

/// The value of one series as `GET /metrics` would show it, if it is there.
fn sample(metrics: &fieldmq::metrics::Metrics, series: &str) -> Option<f64> {
    let text = metrics
        .encode(fieldmq::metrics::Format::PrometheusText)
        .expect("encode");
    crate::util::http::metric_value(&text, series)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_answer_makes_the_points_bad_and_counts_as_a_decode_error() {
    let state = device_with(&[(0, 1), (1, 2)]);
    state.lock().unwrap().short = true;
    let (addr, _server) = serve_tcp(state.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let mut gw = start_gateway(&format!(
        r#"[[devices]]
name = "meter"
driver = "modbus-tcp"
address = "{addr}"
poll = "100ms"
timeout = "500ms"
points = [ {{ name = "energy", table = "holding", address = 0, type = "u32" }} ]
"#
    ))
    .await;
    let reading = gw.next_on("gw/meter/energy").await;
    assert_eq!(reading["quality"], "bad", "{reading}");
    let error = reading["error"].as_str().unwrap_or_default();
    assert!(error.contains("short response to holding 0"), "{error}");
    let decode = r#"fieldmq_device_errors_total{device="meter",kind="decode"}"#;
    assert!(
        sample(&gw.metrics, decode).is_some_and(|n| n >= 1.0),
        "{decode}"
    );
    // The transaction itself went through: no timeout, I/O or exception is counted.
    for kind in ["timeout", "io", "exception"] {
        let series = format!(r#"fieldmq_device_errors_total{{device="meter",kind="{kind}"}}"#);
        assert_eq!(sample(&gw.metrics, &series).unwrap_or(0.0), 0.0, "{series}");
    }

    // A full answer again: good, and no more decode errors are counted.
    state.lock().unwrap().short = false;
    let good = gw.next_matching("gw/meter/energy", is_good).await;
    assert_eq!(good["value"], 65538, "{good}");
    let counted = sample(&gw.metrics, decode).unwrap_or_default();
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(sample(&gw.metrics, decode).unwrap_or_default(), counted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceptions_and_timeouts_go_bad_and_the_device_comes_back_after_a_restart() {
    let state = device_with(&[(0, 7), (100, 1)]);
    let (addr, server) = serve_tcp(state.clone(), "127.0.0.1:0".parse().unwrap()).await;
    state.lock().unwrap().exception_from = Some(100);
    let mut gw = start_gateway(&format!(
        r#"[[devices]]
name = "meter"
driver = "modbus-tcp"
address = "{addr}"
poll = "100ms"
timeout = "200ms"
backoff_min = "100ms"
backoff_max = "200ms"
points = [
  {{ name = "ok", table = "holding", address = 0 }},
  {{ name = "missing", table = "holding", address = 100 }},
]
"#
    ))
    .await;
    let status_topic = "fieldmq/gw/status/devices/meter";

    // An exception: the point is bad, the rest good, the status names address and exception.
    let reading = gw.next_on("gw/meter/missing").await;
    assert_eq!(reading["quality"], "bad", "{reading}");
    let error = reading["error"].as_str().unwrap().to_owned();
    assert!(
        error.contains("illegal data address (exception 2)"),
        "{error}"
    );
    assert!(error.contains("holding 100"), "{error}");
    assert!(is_good(&gw.next_on("gw/meter/ok").await));
    let status = gw.next_on(status_topic).await;
    assert_eq!(status["status"], "error", "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(
        error.contains("meter")
            && error.contains("holding 100")
            && error.contains("illegal data address"),
        "{error}"
    );
    let exceptions = r#"fieldmq_device_exceptions_total{device="meter",code="2"}"#;
    assert!(
        sample(&gw.metrics, exceptions).is_some_and(|n| n >= 1.0),
        "{exceptions}"
    );

    // A timeout: every point bad, the device offline.
    state.lock().unwrap().mute = true;
    let reading = gw
        .next_matching("gw/meter/ok", |r| r["quality"] == "bad")
        .await;
    assert!(
        reading["error"]
            .as_str()
            .unwrap()
            .contains("no response within 200ms"),
        "{reading}"
    );
    let status = gw
        .next_matching(status_topic, |s| s["status"] == "offline")
        .await;
    assert!(
        status["error"].as_str().unwrap().contains("holding 0"),
        "{status}"
    );
    // Three timeouts in a row back the device off; the metrics say for how long.
    let backoff = r#"fieldmq_device_backoff_seconds{device="meter"}"#;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sample(&gw.metrics, backoff).is_some_and(|s| s > 0.0) {
        assert!(Instant::now() < deadline, "{backoff} stays 0");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The server stops: still offline (connection refused), nothing panics.
    server.abort();
    let _ = server.await;
    let status = gw
        .next_matching(status_topic, |s| {
            s["error"]
                .as_str()
                .is_some_and(|e| e.contains("cannot connect"))
        })
        .await;
    assert_eq!(status["status"], "offline");

    // It restarts on the same port, answering again: good values, online.
    {
        let mut s = state.lock().unwrap();
        s.mute = false;
        s.exception_from = None;
    }
    let (_, _server) = serve_tcp(state.clone(), addr).await;
    let reading = gw.next_matching("gw/meter/ok", is_good).await;
    assert_eq!(reading["value"], 7);
    let reading = gw.next_matching("gw/meter/missing", is_good).await;
    assert_eq!(reading["value"], 1);
    gw.next_matching(status_topic, |s| s["status"] == "online")
        .await;
    assert_eq!(sample(&gw.metrics, backoff), Some(0.0), "{backoff}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_read_over_a_hole_is_split_and_the_hole_is_skipped_afterwards() {
    let registers: Vec<(u16, u16)> = (0..12).map(|a| (a, 100 + a)).collect();
    let state = device_with(&registers);
    state.lock().unwrap().holes = HashSet::from([5, 9]);
    let (addr, _server) = serve_tcp(state.clone(), "127.0.0.1:0".parse().unwrap()).await;
    // One read of 0..=11 by the plan (gaps of one register are merged); 9 is a point, 5 is not.
    let points: Vec<String> = [0u16, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
        .iter()
        .map(|a| format!("{{ name = \"r{a}\", table = \"holding\", address = {a} }}"))
        .collect();
    let mut gw = start_gateway(&format!(
        r#"[[devices]]
name = "meter"
driver = "modbus-tcp"
address = "{addr}"
poll = "100ms"
max_gap = 1
backoff_max = "5s"
points = [ {} ]
"#,
        points.join(", ")
    ))
    .await;
    for a in [0u16, 4, 6, 8, 10, 11] {
        let reading = gw.next_matching(&format!("gw/meter/r{a}"), is_good).await;
        assert_eq!(reading["value"], 100 + a, "{reading}");
    }
    let hole = gw.next_on("gw/meter/r9").await;
    assert_eq!(hole["quality"], "bad", "{hole}");
    assert!(
        hole["error"]
            .as_str()
            .unwrap()
            .contains("illegal data address (exception 2) reading holding 9..=9"),
        "{hole}"
    );
    // Steady state: the points around the holes keep being read, every cycle, and no
    // request covers 5 again; 9 alone is asked at most once per backoff_max.
    let settled = state.lock().unwrap().reads.len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reads: Vec<(u16, u16)> = state.lock().unwrap().reads[settled..]
        .iter()
        .map(|(_, _, start, count)| (*start, *count))
        .collect();
    let covers = |address: u16| {
        reads
            .iter()
            .filter(|(start, count)| (*start..*start + *count).contains(&address))
            .count()
    };
    assert_eq!(covers(5), 0, "{reads:?}");
    assert!(covers(9) <= 1, "{reads:?}");
    assert!(covers(0) >= 10 && covers(11) >= 10, "{reads:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_functions_are_fc05_fc06_fc16_by_default_and_fc15_fc16_with_write_multiple() {
    for (multiple, expected) in [(false, vec![5u8, 6, 16, 6]), (true, vec![15, 16, 16, 16])] {
        let state = device_with(&[(10, 5), (40, 0b1000)]);
        let (addr, _server) = serve_tcp(state.clone(), "127.0.0.1:0".parse().unwrap()).await;
        let mut gw = start_gateway(&format!(
            r#"[[devices]]
name = "plc"
driver = "modbus-tcp"
address = "{addr}"
poll = "1h"
write_multiple = {multiple}
points = [
  {{ name = "pump", table = "coil", address = 3, writable = true }},
  {{ name = "setpoint", table = "holding", address = 10, writable = true }},
  {{ name = "flow", table = "holding", address = 20, type = "f32", writable = true }},
  {{ name = "valve", table = "holding", address = 40, type = "bit", bit = 0, writable = true }},
]
"#
        ))
        .await;
        gw.next_on("gw/plc/valve").await;
        for (point, value) in [
            ("pump", "true"),
            ("setpoint", "7"),
            ("flow", "2.5"),
            ("valve", "true"),
        ] {
            gw.publish(&format!("gw/plc/{point}/set"), value).await;
            let result = gw.next_on(&format!("gw/plc/{point}/set/result")).await;
            assert_eq!(result["status"], "ok", "{point}: {result}");
        }
        let s = state.lock().unwrap();
        // The bit is a read-modify-write: its read is in `reads`, its write here.
        let functions: Vec<u8> = s.write_functions.clone();
        assert_eq!(functions, expected, "write_multiple = {multiple}");
        assert_eq!(s.coils.get(&3), Some(&true));
        assert_eq!(s.holding.get(&10), Some(&7));
        assert_eq!(s.holding.get(&40), Some(&0b1001), "the other bits kept");
        // The f32 went in one request, never two.
        assert_eq!(
            functions.iter().filter(|&&f| f == 16).count(),
            if multiple { 3 } else { 1 }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_end_to_end_and_bad_commands_change_nothing() {
    let state = device_with(&[(10, 5), (20, 0x0000), (21, 0x41C8)]);
    let (addr, _server) = serve_tcp(state.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let mut gw = start_gateway(&format!(
        r#"[[devices]]
name = "plc"
driver = "modbus-tcp"
address = "{addr}"
poll = "1h"
points = [
  {{ name = "pump", table = "coil", address = 3, writable = true }},
  {{ name = "setpoint", table = "holding", address = 10, type = "u16", writable = true }},
  {{ name = "flow", table = "holding", address = 20, type = "f32:CDAB", writable = true, unit = "m³/h" }},
  {{ name = "locked", table = "holding", address = 30 }},
  {{ name = "trim", table = "holding", address = 40, type = "i16", writable = true }},
]
"#
    ))
    .await;
    // The first readings mean the bus (and its write subscription) is running. The unit
    // travels in the payload and as an MQTT 5 user property.
    let (flow, reading) = gw.next_message("gw/plc/flow", |_| true).await;
    assert_eq!(reading["value"], 25.0);
    assert_eq!(reading["unit"], "m³/h");
    let properties = flow.properties.as_deref().expect("properties");
    assert_eq!(properties.content_type.as_deref(), Some("application/json"));
    assert_eq!(properties.payload_format_indicator, Some(1));
    assert_eq!(
        properties.user_properties,
        vec![("unit".to_owned(), "m³/h".to_owned())]
    );

    // A coil.
    gw.publish("gw/plc/pump/set", "true").await;
    let result = gw.next_on("gw/plc/pump/set/result").await;
    assert_eq!(result, json!({"status": "ok", "value": true}));
    gw.next_matching("gw/plc/pump", |r| r["value"] == true)
        .await;
    assert_eq!(state.lock().unwrap().coils.get(&3), Some(&true));

    // A u16, as JSON, with an MQTT 5 response topic and correlation data.
    let mut message = Message::internal(
        "test",
        "gw/plc/setpoint/set",
        r#"{"value": 1234}"#,
        QoS::AtLeastOnce,
        false,
    );
    message.properties = Some(Arc::new(MessageProperties {
        response_topic: Some("replies/42".into()),
        correlation_data: Some(Bytes::from_static(b"req-42")),
        ..MessageProperties::default()
    }));
    gw.broker.publish(message).await.unwrap();
    assert_eq!(
        gw.next_on("gw/plc/setpoint/set/result").await["status"],
        "ok"
    );
    let (reply, body) = gw.next_message("replies/42", |_| true).await;
    assert_eq!(body, json!({"status": "ok", "value": 1234}));
    let correlation = reply
        .properties
        .as_ref()
        .and_then(|p| p.correlation_data.clone());
    assert_eq!(correlation, Some(Bytes::from_static(b"req-42")));
    assert_eq!(state.lock().unwrap().holding.get(&10), Some(&1234));

    // An f32 with the words swapped: 21.5 = 0x41AC0000, low word first.
    gw.publish("gw/plc/flow/set", "21.5").await;
    assert_eq!(
        gw.next_on("gw/plc/flow/set/result").await,
        json!({"status": "ok", "value": 21.5})
    );
    gw.next_matching("gw/plc/flow", |r| r["value"] == 21.5)
        .await;
    {
        let s = state.lock().unwrap();
        assert_eq!(
            (s.holding.get(&20), s.holding.get(&21)),
            (Some(&0x0000), Some(&0x41AC))
        );
    }

    // Bad commands: each answered with a reason, none reaches the device.
    let writes_before = state.lock().unwrap().writes;
    let holding_before = state.lock().unwrap().holding.clone();
    for (topic, payload, reason) in [
        ("gw/plc/locked", "1", "not writable"),
        ("gw/plc/setpoint", "70000", "out of range for u16"),
        ("gw/plc/setpoint", "-1", "out of range for u16"),
        ("gw/plc/flow", "\"fast\"", "expected a number"),
        ("gw/plc/flow", "1e39", "out of range for f32"),
        ("gw/plc/pump", "maybe", "expected true/false"),
        ("gw/plc/setpoint", "", "empty write payload"),
        ("gw/plc/setpoint", "not json", "expected a number"),
        ("gw/plc/trim", "40000", "out of range for i16"),
        ("gw/plc/trim", "-32769", "out of range for i16"),
        (
            "gw/plc/nosuch",
            "1",
            "device plc has no point named \"nosuch\"",
        ),
    ] {
        gw.publish(&format!("{topic}/set"), payload).await;
        let result = gw.next_on(&format!("{topic}/set/result")).await;
        assert_eq!(result["status"], "error", "{topic} {payload:?}: {result}");
        let got = result["reason"].as_str().unwrap();
        assert!(got.contains(reason), "{topic} {payload:?}: {got}");
    }
    let s = state.lock().unwrap();
    assert_eq!(s.writes, writes_before);
    assert_eq!(s.holding, holding_before);
}

// ---------------------------------------------------------------------------------------
// Device-level writes: several points in one command on `<device topic>/set`.

/// A device `plc` with `points` (TOML inline tables), polled once an hour, started and
/// running (its first readings arrived, so its write subscription is in place).
async fn plc_with(state: &Shared, points: &str, first: &str) -> Gateway {
    let (addr, _server) = serve_tcp(state.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let mut gw = start_gateway(&format!(
        "[[devices]]\nname = \"plc\"\ndriver = \"modbus-tcp\"\naddress = \"{addr}\"\npoll = \"1h\"\npoints = [\n{points}\n]\n"
    ))
    .await;
    gw.next_on(&format!("gw/plc/{first}")).await;
    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_adjacent_registers_written_in_one_command_are_one_fc16() {
    let state = device_with(&[]);
    let mut gw = plc_with(
        &state,
        r#"{ name = "low", table = "holding", address = 10, type = "u16", writable = true },
  { name = "flow", table = "holding", address = 11, type = "f32", writable = true },
  { name = "high", table = "holding", address = 13, type = "u16", writable = true },"#,
        "high",
    )
    .await;
    gw.publish("gw/plc/set", r#"{"high": 7, "flow": 21.5, "low": 2}"#)
        .await;
    assert_eq!(
        gw.next_on("gw/plc/set/result").await,
        json!({"status": "ok", "points": {
            "high": {"status": "ok", "value": 7},
            "flow": {"status": "ok", "value": 21.5},
            "low": {"status": "ok", "value": 2},
        }})
    );
    // One FC16 from register 10, four registers: 2, 21.5 as 0x41AC0000, 7.
    assert_eq!(
        state.lock().unwrap().write_log,
        vec![(16, 10, vec![2, 0x41AC, 0x0000, 7])]
    );
    // Each point's new value is published on its own topic.
    gw.next_matching("gw/plc/flow", |r| r["value"] == 21.5)
        .await;
    gw.next_matching("gw/plc/low", |r| r["value"] == 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adjacent_coils_written_in_one_command_are_one_fc15() {
    let state = device_with(&[]);
    let mut gw = plc_with(
        &state,
        r#"{ name = "pump", table = "coil", address = 3, writable = true },
  { name = "fan", table = "coil", address = 4, writable = true },
  { name = "horn", table = "coil", address = 5, writable = true },"#,
        "horn",
    )
    .await;
    gw.publish(
        "gw/plc/set",
        r#"{"horn": true, "pump": true, "fan": false}"#,
    )
    .await;
    let result = gw.next_on("gw/plc/set/result").await;
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(
        result["points"]["fan"],
        json!({"status": "ok", "value": false})
    );
    let s = state.lock().unwrap();
    assert_eq!(s.write_log, vec![(15, 3, vec![1, 0, 1])]);
    assert_eq!(
        (s.coils.get(&3), s.coils.get(&5)),
        (Some(&true), Some(&true))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_apart_are_written_in_address_order_and_a_failed_request_says_what_was_not() {
    let state = device_with(&[(30, 99)]);
    let mut gw = plc_with(
        &state,
        r#"{ name = "a", table = "holding", address = 20, writable = true },
  { name = "b", table = "holding", address = 22, writable = true },
  { name = "c", table = "holding", address = 30, writable = true },
  { name = "valve", table = "holding", address = 25, type = "bit", bit = 2, writable = true },"#,
        "c",
    )
    .await;
    gw.publish("gw/plc/set", r#"{"b": 2, "a": 1}"#).await;
    assert_eq!(gw.next_on("gw/plc/set/result").await["status"], "ok");
    assert_eq!(
        state.lock().unwrap().write_log,
        vec![(6, 20, vec![1]), (6, 22, vec![2])]
    );

    // The device refuses the second request: the first point stays written and says so,
    // the refused one and the ones after it were not written.
    state.lock().unwrap().refuse_writes_at = Some(22);
    gw.publish("gw/plc/set", r#"{"c": 9, "b": 5, "valve": true, "a": 4}"#)
        .await;
    let result = gw.next_on("gw/plc/set/result").await;
    assert_eq!(result["status"], "error", "{result}");
    assert_eq!(result["reason"], "3 of 4 point(s) failed; 1 written");
    let points = &result["points"];
    assert_eq!(points["a"], json!({"status": "ok", "value": 4}));
    assert_eq!(
        points["b"],
        json!({"status": "error", "written": false,
               "reason": "device exception: illegal data value (exception 3)"})
    );
    for later in ["valve", "c"] {
        assert_eq!(points[later]["written"], false, "{result}");
        assert!(
            points[later]["reason"]
                .as_str()
                .unwrap()
                .starts_with("not written: an earlier request failed"),
            "{result}"
        );
    }
    let s = state.lock().unwrap();
    assert_eq!(s.write_log[2..], [(6, 20, vec![4])]);
    assert_eq!(s.holding.get(&30), Some(&99));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_with_any_bad_point_writes_nothing_and_names_each_bad_point() {
    let state = device_with(&[(10, 5)]);
    let mut gw = plc_with(
        &state,
        r#"{ name = "setpoint", table = "holding", address = 10, type = "u16", writable = true },
  { name = "flow", table = "holding", address = 11, type = "f32", writable = true },
  { name = "locked", table = "holding", address = 30 },"#,
        "locked",
    )
    .await;
    let writes_before = state.lock().unwrap().writes;
    // Refused point by point: each bad point named with its reason, the good ones not written.
    for (payload, bad, reason) in [
        (
            r#"{"flow": 1.5, "setpoint": 70000}"#,
            "setpoint",
            "70000 is out of range for u16",
        ),
        (
            r#"{"setpoint": 1, "nosuch": 2}"#,
            "nosuch",
            "device plc has no point named \"nosuch\"",
        ),
        (
            r#"{"setpoint": 1, "locked": 2}"#,
            "locked",
            "point locked is not writable",
        ),
        (
            r#"{"setpoint": 1, "flow": "fast"}"#,
            "flow",
            "expected a number",
        ),
    ] {
        gw.publish("gw/plc/set", payload).await;
        let result = gw.next_on("gw/plc/set/result").await;
        assert_eq!(result["status"], "error", "{payload}: {result}");
        assert!(
            result["reason"]
                .as_str()
                .unwrap()
                .ends_with("nothing written"),
            "{payload}: {result}"
        );
        let points = result["points"].as_object().unwrap();
        assert_eq!(points.len(), 2, "{payload}: {result}");
        for (name, outcome) in points {
            assert_eq!(outcome["status"], "error", "{payload}: {result}");
            assert_eq!(outcome["written"], false, "{payload}: {result}");
            let got = outcome["reason"].as_str().unwrap();
            if name == bad {
                assert!(got.contains(reason), "{payload}: {got}");
            } else {
                assert!(
                    got.contains("another point of the command was refused"),
                    "{payload}: {got}"
                );
            }
        }
    }
    // Refused as a whole: not an object of distinct points.
    let oversized = format!(r#"{{"setpoint": "{}"}}"#, "x".repeat(20_000));
    for (payload, reason) in [
        (
            r#"{"setpoint": 1, "setpoint": 2}"#,
            "point \"setpoint\" is named twice",
        ),
        ("[1, 2]", "a device-level write takes a JSON object"),
        ("21.5", "a device-level write takes a JSON object"),
        ("{}", "empty write"),
        ("{\"setpoint\": ", "write payload is not JSON"),
        (oversized.as_str(), "larger than the limit of 16384 bytes"),
    ] {
        gw.publish("gw/plc/set", payload).await;
        let result = gw.next_on("gw/plc/set/result").await;
        assert_eq!(result["status"], "error", "{payload:.40}: {result}");
        assert!(
            result["reason"].as_str().unwrap().contains(reason),
            "{payload:.40}: {result}"
        );
        assert!(result.get("points").is_none(), "{result}");
    }
    let s = state.lock().unwrap();
    assert_eq!(s.writes, writes_before, "{:?}", s.write_log);
    assert_eq!(s.holding.get(&10), Some(&5));
}

#[tokio::test(start_paused = true)]
async fn deadband_min_interval_and_heartbeat_publish_exactly_when_they_should() {
    let state = device_with(&[(0, 100), (1, 100), (2, 100)]);
    let (addr, _server) = serve_tcp(state.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let mut gw = start_gateway(&format!(
        r#"[[devices]]
name = "d"
driver = "modbus-tcp"
address = "{addr}"
poll = "1s"
timeout = "500ms"
points = [
  {{ name = "band", table = "holding", address = 0, deadband = 5 }},
  {{ name = "slow", table = "holding", address = 1, min_interval = "3s" }},
  {{ name = "beat", table = "holding", address = 2, report = "change", max_interval = "4s" }},
]
"#
    ))
    .await;
    let start = Instant::now();
    // Register changes at half seconds, between polls (polls at 0s, 1s, 2s ...).
    let script: &[(u64, u16, u16)] = &[
        // (ms, address, value)
        (500, 0, 103),  // within the deadband
        (1500, 0, 106), // 6 from the last published 100: out
        (2500, 0, 110), // 4 from 106: in
        (3500, 0, 112), // 6 from 106: out
        (4500, 2, 101), // beat changes: published at once at 5s
    ];
    let changer = {
        let state = state.clone();
        let script = script.to_vec();
        tokio::spawn(async move {
            for (ms, address, value) in script {
                tokio::time::sleep_until(start + Duration::from_millis(ms)).await;
                state.lock().unwrap().holding.insert(address, value);
            }
        })
    };
    let mut seen: HashMap<String, Vec<(u64, Json)>> = HashMap::new();
    while Instant::now() < start + Duration::from_millis(12_500) {
        let Ok(Some(message)) = timeout(Duration::from_millis(200), gw.messages.recv()).await
        else {
            continue;
        };
        let Some(point) = message.topic.strip_prefix("gw/d/") else {
            continue;
        };
        let reading: Json = serde_json::from_slice(&message.payload).unwrap();
        let at = (Instant::now() - start).as_millis() as u64;
        seen.entry(point.to_owned())
            .or_default()
            .push((at, reading["value"].clone()));
    }
    changer.await.unwrap();
    let band: Vec<(u64, Json)> = vec![(0, json!(100)), (2000, json!(106)), (4000, json!(112))];
    assert_eq!(seen["band"], band);
    // Always reported, but at most every 3s.
    let slow: Vec<u64> = seen["slow"].iter().map(|(at, _)| *at).collect();
    assert_eq!(slow, vec![0, 3000, 6000, 9000, 12000]);
    // On change only, plus a heartbeat 4s after the last publish.
    let beat: Vec<(u64, Json)> = vec![
        (0, json!(100)),
        (4000, json!(100)),
        (5000, json!(101)),
        (9000, json!(101)),
    ];
    assert_eq!(seen["beat"], beat);
}

/// A pty pair with the tokio-modbus RTU server on one end; the driver opens the other
/// end by its path.
fn serve_rtu(state: Shared) -> String {
    let (a, b) = tokio_serial::SerialStream::pair().expect("pty pair");
    use tokio_serial::SerialPort as _;
    let (server_end, path) = match (a.name(), b.name()) {
        // Keep the named side open (unlocked: the driver opens it again by path), or the
        // server's end would read EIO until the driver has it open.
        (_, Some(path)) => {
            std::mem::forget(b);
            (a, path)
        }
        (Some(path), None) => {
            std::mem::forget(a);
            (b, path)
        }
        (None, None) => panic!("pty without a name"),
    };
    let server = tokio_modbus::server::rtu::Server::new(server_end);
    tokio::spawn(async move {
        let _ = server.serve_forever(FakeDevice { state }).await;
    });
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_units_share_an_rtu_bus_and_a_dead_one_does_not_starve_the_other() {
    let state = device_with(&[(0, 11)]);
    state.lock().unwrap().dead_units.insert(2);
    let port = serve_rtu(state.clone());
    let device = |name: &str, unit: u8| {
        format!(
            r#"[[devices]]
name = "{name}"
driver = "modbus-rtu"
port = "{port}"
baud = 115200
parity = "none"
unit = {unit}
poll = "100ms"
timeout = "500ms"
turnaround = "2ms"
points = [ {{ name = "v", table = "holding", address = 0 }} ]
"#
        )
    };
    let gateway_started = Instant::now();
    let mut gw = start_gateway(&format!("{}{}", device("alive", 1), device("dead", 2))).await;
    let first = gw.next_on("gw/alive/v").await;
    assert_eq!(first["value"], 11, "{first}");
    let started = Instant::now();
    let mut alive = 1;
    let mut dead_status = None;
    while started.elapsed() < Duration::from_secs(4) {
        let Ok(Some(message)) = timeout(Duration::from_millis(100), gw.messages.recv()).await
        else {
            continue;
        };
        match &*message.topic {
            "gw/alive/v" => alive += 1,
            "fieldmq/gw/status/devices/dead" => {
                dead_status = Some(serde_json::from_slice::<Json>(&message.payload).unwrap())
            }
            _ => {}
        }
    }
    // Polled every 100ms, it would publish 40 times in 4s; the dead unit's first three
    // timeouts (1.5 s) and its retries after each backoff take some of that. Without the
    // backoff each cycle would wait out a 500ms timeout: about 8. The bound sits at twice
    // that, so a busy test machine's slower polls do not fail it.
    assert!(alive >= 16, "alive unit published only {alive} times in 4s");
    let status = dead_status.expect("status of the dead unit");
    assert_eq!(status["status"], "offline", "{status}");
    assert!(
        status["error"].as_str().unwrap().contains("unit 2"),
        "{status}"
    );
    // Both units went over the one port, and the dead unit got one request per backoff
    // period: three timeouts (1.5 s), then a retry after backoff_min (1 s ±25 %), the next
    // after 2 s ±25 %, the next after 4 s ±25 %. In a window under 11 s that is 4 to 6
    // requests; without the backoff it would be one per 500 ms timeout, and a unit given
    // up on after the backoff would stay at 3.
    let window = gateway_started.elapsed();
    let reads = state.lock().unwrap().reads.clone();
    assert!(reads.iter().any(|(unit, ..)| *unit == 1));
    let dead_reads = reads.iter().filter(|(unit, ..)| *unit == 2).count();
    assert!(
        window < Duration::from_secs(11),
        "the window took {window:?}"
    );
    assert!(
        (4..=6).contains(&dead_reads),
        "the dead unit got {dead_reads} requests in {window:?}"
    );
}

/// A serial device server in transparent mode: a TCP listener whose every connection is
/// bridged byte for byte to the pty at `path`; returns its address and a count of the
/// connections it accepted.
async fn serve_device_server(path: String) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            use tokio_serial::SerialPortBuilderExt as _;
            let Ok(mut port) = tokio_serial::new(&path, 115_200).open_native_async() else {
                continue;
            };
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut socket, &mut port).await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_over_tcp_reaches_two_units_behind_one_device_server_on_one_connection() {
    let state = device_with(&[(0, 21), (1, 0xFFFE)]);
    let (addr, accepted) = serve_device_server(serve_rtu(state.clone())).await;
    let device = |name: &str, unit: u8| {
        format!(
            r#"[[devices]]
name = "{name}"
driver = "modbus-tcp"
transport = "rtu-over-tcp"
address = "{addr}"
unit = {unit}
poll = "100ms"
timeout = "500ms"
points = [ {{ name = "a", table = "holding", address = 0 }}, {{ name = "b", table = "holding", address = 1, type = "i16" }} ]
"#
        )
    };
    let mut gw = start_gateway(&format!("{}{}", device("left", 3), device("right", 4))).await;
    let a = gw.next_on("gw/left/a").await;
    assert_eq!(a["value"], 21, "{a}");
    let b = gw.next_on("gw/right/b").await;
    assert_eq!(b["value"], -2, "{b}");
    // Both units answered, through RTU frames (CRC checked by both sides), over one
    // connection: the units behind one address share it, one request at a time.
    let units: HashSet<u8> = state
        .lock()
        .unwrap()
        .reads
        .iter()
        .map(|(unit, ..)| *unit)
        .collect();
    assert_eq!(units, HashSet::from([3, 4]));
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn rtu_over_tcp_is_a_transport_of_modbus_tcp_only() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "driver = \"modbus-tcp\"\naddress = \"10.0.0.1:4001\"\ntransport = \"rtu\"\n",
            "devices[0].transport: unknown transport \"rtu\"",
        ),
        (
            "driver = \"modbus-rtu\"\nport = \"/dev/ttyUSB0\"\nunit = 1\ntransport = \"rtu-over-tcp\"\n",
            "devices[0].transport: `transport` is not used by driver modbus-rtu",
        ),
    ];
    for (keys, message) in cases {
        let path = dir.path().join("fieldmq.toml");
        std::fs::write(
            &path,
            format!("{HEADER}[[devices]]\nname = \"d\"\n{keys}points = [ {{ name = \"p\", table = \"holding\", address = 0 }} ]\n"),
        )
        .unwrap();
        let error = config::load(&path).expect_err("refused");
        assert!(error.to_string().contains(message), "{error}");
    }
}

/// Modbus CRC-16 (polynomial 0xA001, initial 0xFFFF), sent low byte first.
fn crc16(data: &[u8]) -> u16 {
    let mut crc = 0xFFFFu16;
    for &byte in data {
        crc ^= u16::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_rtu_answer_is_a_counted_crc_error_and_the_next_answer_decodes() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_serial::SerialPort as _;
    // A device written by hand on a pty: it answers every "read holding registers" with
    // 0x1234 per register, the first answer with one data byte flipped (its CRC no longer
    // fits).
    let (a, b) = tokio_serial::SerialStream::pair().expect("pty pair");
    let (mut device, path) = match (a.name(), b.name()) {
        (_, Some(path)) => {
            std::mem::forget(b);
            (a, path)
        }
        (Some(path), None) => {
            std::mem::forget(a);
            (b, path)
        }
        (None, None) => panic!("pty without a name"),
    };
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        let mut request = [0u8; 8];
        while device.read_exact(&mut request).await.is_ok() {
            if request[1] != 0x03 || crc16(&request[..6]).to_le_bytes() != request[6..8] {
                continue;
            }
            let registers = u16::from_be_bytes([request[4], request[5]]);
            let mut frame = vec![request[0], 0x03, (registers * 2) as u8];
            for _ in 0..registers {
                frame.extend_from_slice(&[0x12, 0x34]);
            }
            let crc = crc16(&frame);
            frame.extend_from_slice(&crc.to_le_bytes());
            if count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                frame[3] ^= 0x40;
            }
            if device.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    let mut gw = start_gateway(&format!(
        r#"[[devices]]
name = "meter"
driver = "modbus-rtu"
port = "{path}"
baud = 115200
parity = "none"
unit = 1
poll = "200ms"
timeout = "300ms"
points = [ {{ name = "v", table = "holding", address = 0 }} ]
"#
    ))
    .await;
    let first = gw.next_on("gw/meter/v").await;
    assert_eq!(first["quality"], "bad", "{first}");
    let error = first["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("without a valid frame (CRC error or noise)"),
        "{error}"
    );
    // The very next answer decodes: the garbled bytes did not stay in front of it.
    let next = gw.next_on("gw/meter/v").await;
    assert_eq!(next["value"], 0x1234, "{next}");
    assert_eq!(next["quality"], "good", "{next}");
    let crc = r#"fieldmq_device_errors_total{device="meter",kind="crc"}"#;
    assert_eq!(sample(&gw.metrics, crc), Some(1.0), "{crc}");
    let timeouts = r#"fieldmq_device_errors_total{device="meter",kind="timeout"}"#;
    assert_eq!(sample(&gw.metrics, timeouts), Some(0.0), "{timeouts}");
}

/// The value a profile test gives point `index`: numbers whose raw register value is a
/// whole number (so every scale and type holds it exactly), alternating booleans, text.
fn profile_value(point: &fieldmq::drivers::modbus::Point, index: usize) -> fieldmq::model::Value {
    use fieldmq::drivers::modbus::DataType;
    use fieldmq::model::Value;
    let raw = (index as i64 + 1) * 7;
    match point.data_type {
        DataType::Bool | DataType::Bit(_) => Value::Bool(index % 2 == 0),
        DataType::String { .. } => Value::Text("AB".into()),
        DataType::I16 | DataType::I32 | DataType::I64 if index % 3 == 0 => {
            Value::Float(-(raw as f64) * point.scale + point.offset)
        }
        _ => Value::Float(raw as f64 * point.scale + point.offset),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_built_in_profile_reads_a_device_laid_out_from_its_own_table() {
    use fieldmq::drivers::modbus::codec::{encode, Encoded};
    use fieldmq::drivers::modbus::{profile, Table};
    let names: Vec<String> = profile::list(None)
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert!(names.len() >= 7, "{names:?}");
    for name in names {
        let found = profile::find(&name, None).unwrap_or_else(|e| panic!("{e}"));
        // The device: every point's register(s) or bit holding its value.
        let state = device_with(&[]);
        let mut expected = Vec::new();
        {
            let mut s = state.lock().unwrap();
            for (index, point) in found.points.iter().enumerate() {
                let value = profile_value(point, index);
                let encoded =
                    encode(point, &value).unwrap_or_else(|e| panic!("{name} {}: {e}", point.name));
                match (point.table, encoded) {
                    (Table::Coil, Encoded::Coil(b)) => {
                        s.coils.insert(point.address, b);
                    }
                    (Table::Discrete, Encoded::Coil(b)) => {
                        s.discrete.insert(point.address, b);
                    }
                    (table, Encoded::Bit { bit, value: b }) => {
                        let map = if table == Table::Input {
                            &mut s.input
                        } else {
                            &mut s.holding
                        };
                        let word = map.entry(point.address).or_default();
                        if b {
                            *word |= 1 << bit;
                        }
                    }
                    (table, Encoded::Registers(words)) => {
                        let map = if table == Table::Input {
                            &mut s.input
                        } else {
                            &mut s.holding
                        };
                        for (offset, word) in words.into_iter().enumerate() {
                            map.insert(point.address + offset as u16, word);
                        }
                    }
                    (table, other) => panic!("{name} {}: {other:?} in {table}", point.name),
                }
                expected.push((point.name.clone(), value));
            }
        }
        let (addr, _server) = serve_tcp(state.clone(), "127.0.0.1:0".parse().unwrap()).await;
        let mut gw = start_gateway(&format!(
            "[[devices]]\nname = \"m\"\ndriver = \"modbus-tcp\"\naddress = \"{addr}\"\npoll = \"200ms\"\nprofile = \"{name}\"\n"
        ))
        .await;
        for (point, value) in expected {
            let reading = gw.next_on(&format!("gw/m/{point}")).await;
            assert_eq!(reading["quality"], "good", "{name} {point}: {reading}");
            match value {
                fieldmq::model::Value::Float(x) => {
                    let got = reading["value"].as_f64().unwrap_or(f64::NAN);
                    assert!(
                        (got - x).abs() <= x.abs() * 1e-6 + 1e-9,
                        "{name} {point}: {got} != {x}"
                    );
                }
                other => assert_eq!(reading["value"], json!(other), "{name} {point}"),
            }
        }
        gw.shutdown.cancel();
    }
}

#[test]
fn profiles_are_listed_shown_overridden_locally_and_their_mistakes_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fieldmq.toml");
    let device = |profile: &str| {
        format!("{HEADER}[[devices]]\nname = \"m\"\ndriver = \"modbus-tcp\"\naddress = \"10.0.0.1\"\nprofile = \"{profile}\"\n")
    };
    let run = |args: &[&str]| {
        let mut full: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        full.extend([std::ffi::OsStr::new("-c"), config.as_os_str()]);
        gateway::run_within(&full, &[], Duration::from_secs(20))
    };

    // Built in: listed, shown, usable; `check` says how many requests a cycle takes.
    let (code, stdout, _) = run(&["profiles", "list"]);
    assert_eq!(code, Some(0));
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("eastron-sdm630 ") && l.contains("[built in]")),
        "{stdout}"
    );
    let (code, stdout, _) = run(&["profiles", "show", "eastron-sdm630"]);
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("voltage_l1")
            && stdout.contains("input")
            && stdout.contains("f32:ABCD [V]"),
        "{stdout}"
    );
    std::fs::write(&config, device("eastron-sdm630")).unwrap();
    let (code, stdout, stderr) = run(&["check"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("m: modbus-tcp, 39 point(s) in 3 read request(s) per cycle"),
        "{stdout}"
    );

    // A misspelt name is refused at its line with the closest profile.
    std::fs::write(&config, device("eastron-sdm603")).unwrap();
    let (code, _, stderr) = run(&["check"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("fieldmq.toml:9:") && stderr.contains("devices[0].profile: unknown profile \"eastron-sdm603\" (did you mean \"eastron-sdm630\"?)"), "{stderr}");

    // A local profile next to the file replaces the built-in one of the same name.
    std::fs::create_dir(dir.path().join("profiles")).unwrap();
    std::fs::write(
        dir.path().join("profiles/eastron-sdm630.toml"),
        "description = \"local\"\nsource = \"test\"\npoints = [ { name = \"only\", table = \"holding\", address = 3 } ]\n",
    )
    .unwrap();
    std::fs::write(&config, device("eastron-sdm630")).unwrap();
    let (code, stdout, stderr) = run(&["check"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("m: modbus-tcp, 1 point(s)"), "{stdout}");
    let (_, stdout, _) = run(&["profiles", "list"]);
    assert!(stdout.lines().any(|l| l.starts_with("eastron-sdm630 ") && l.contains("profiles/eastron-sdm630.toml")), "{stdout}");

    // A broken local profile names its own file, line and key.
    std::fs::write(
        dir.path().join("profiles/site.toml"),
        "description = \"x\"\npoints = [\n  { name = \"a\", table = \"holding\", address = 70000 },\n]\n",
    )
    .unwrap();
    std::fs::write(&config, device("site")).unwrap();
    let (code, _, stderr) = run(&["check"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("profiles/site.toml:3:") && stderr.contains("points[0].address"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_prints_every_interpretation() {
    let state = device_with(&[(40, 0x0000), (41, 0x41C8), (42, 0x4142), (43, 0x4344)]);
    let (addr, _server) = serve_tcp(state.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let output = tokio::process::Command::new(gateway::binary())
        .args([
            "probe",
            "--tcp",
            &addr.to_string(),
            "--table",
            "holding",
            "--address",
            "40",
            "--count",
            "4",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "holding 40..=43 of unit 1",
        "(0-based protocol addresses), answered in ",
        "     41  0x41C8   16840   16840     51265    -14271  A.",
        "     42  0x4142   16706   16706     16961     16961  AB",
        "     40  ABCD   0x000041C8       16840        16840  2.3598e-41",
        "     40  CDAB   0x41C80000  1103626240   1103626240  25",
        "     40  BADC   0x0000C841       51265        51265",
        "     40  DCBA   0xC8410000  3359703040   -935264256  -197632",
        "     41  CDAB   0x414241C8  1094861256   1094861256  12.14106",
        "     40  CDAB   0x4344414241C80000   4847070851784769536   4847070851784769536  1.1402504722972672e16",
        "     40  ABCD   0x000041C841424344        72328344126276        72328344126276  3.57349500533765e-310",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in\n{stdout}");
    }
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with(
            "requests 1, failed 0 (timeouts 0, CRC errors 0, exceptions none), answer time min/avg/max "
        ) && summary.ends_with(" ms"),
        "{stdout}"
    );

    // Repeated, with the range running into an address the device refuses: every read
    // is made and the refusals are counted by exception code.
    state.lock().unwrap().exception_from = Some(43);
    let reads_before = state.lock().unwrap().reads.len();
    let output = tokio::process::Command::new(gateway::binary())
        .args(["probe", "--tcp", &addr.to_string(), "--address", "40"])
        .args(["--count", "4", "--repeat", "3"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "requests 3, failed 3 (timeouts 0, CRC errors 0, exceptions 2:3), answer time min/avg/max - (no answer)"
        ),
        "{stderr}"
    );
    assert_eq!(state.lock().unwrap().reads.len(), reads_before + 3);

    // A read the device refuses (it answers with a Modbus exception) exits non-zero with
    // the exception by name.
    state.lock().unwrap().exception_from = Some(100);
    let output = tokio::process::Command::new(gateway::binary())
        .args([
            "probe",
            "--tcp",
            &addr.to_string(),
            "--table",
            "holding",
            "--address",
            "98",
            "--count",
            "4",
        ])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the device answered illegal data address (exception 2)"),
        "{stderr}"
    );
    let last_read = state.lock().unwrap().reads.last().copied();
    assert_eq!(
        last_read,
        Some((1, "holding", 98, 4)),
        "the refused read reached the device"
    );
}

#[test]
fn config_errors_name_file_line_and_key_path() {
    let text = format!(
        "{HEADER}[[devices]]\nname = \"m\"\ndriver = \"modbus-tcp\"\naddress = \"127.0.0.1:502\"\npoints = [\n  {{ name = \"a\", table = \"holding\", address = 0, type = \"flaot\" }},\n]\n"
    );
    let error = config::parse(&text, Path::new("site.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("site.toml:10:56: devices[0].points[0].type: unknown type \"flaot\", expected one of bool, bit, u16"),
        "{error}"
    );
    assert!(error.contains("did you mean `f32`?"), "{error}");
    let example = config::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/modbus-energy-meter.toml"
    )));
    assert!(
        example.is_ok(),
        "{:?}",
        example.err().map(|e| e.to_string())
    );
}
