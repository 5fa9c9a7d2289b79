//! The Sparkplug B edge node against an independent host application: the real `fieldmq`
//! binary with a simulated device and a `[uplinks.sparkplug]` uplink, Mosquitto as the
//! cloud, and `tests/py/sparkplug_host.py` (pysparkplug, installed by `.ci/run` in
//! `target/sparkplug-venv`) as the host that decodes every message and sends commands.
//!
//! Without Mosquitto or the Python peer the tests skip with a message, and fail when `CI`
//! is set.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::cloud::{mosquitto_available, Cloud, CloudOptions};
use crate::util::gateway::GatewayProcess;
use crate::util::skip;

const GROUP: &str = "plant1";
const NODE: &str = "line1";

/// The Python interpreter of the venv with pysparkplug.
fn python() -> PathBuf {
    std::env::var_os("FIELDMQ_SPARKPLUG_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/sparkplug-venv/bin/python")
        })
}

/// Whether Mosquitto and the Python host can run (fails under CI when they cannot).
fn peers_available(test: &str) -> bool {
    if !mosquitto_available(test) {
        return false;
    }
    let ok = Command::new(python())
        .args(["-c", "import pysparkplug"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip::skip(
            test,
            "pysparkplug is not installed in target/sparkplug-venv \
             (`python3 -m venv target/sparkplug-venv && target/sparkplug-venv/bin/pip install 'pysparkplug>=0.6,<0.7'`, as .ci/run does)",
        );
    }
    ok
}

/// The host application: decoded messages as JSON lines, commands on its stdin.
struct Host {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<Value>,
    /// Every message seen so far, in arrival order.
    seen: Vec<Value>,
}

impl Host {
    fn start(port: u16, host_id: Option<&str>) -> Host {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/sparkplug_host.py");
        let mut command = Command::new(python());
        command
            .arg(script)
            .args(["--port", &port.to_string(), "--group", GROUP]);
        if let Some(id) = host_id {
            command.args(["--host-id", id]);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the Sparkplug host");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match serde_json::from_str::<Value>(&line) {
                    Ok(value) => {
                        if tx.send(value).is_err() {
                            return;
                        }
                    }
                    Err(_) => eprintln!("[host] {line}"),
                }
            }
        });
        let mut host = Host {
            child,
            stdin,
            lines: rx,
            seen: Vec::new(),
        };
        host.next_event("ready", Duration::from_secs(20));
        host
    }

    fn send(&mut self, command: Value) {
        writeln!(self.stdin, "{command}").expect("write to the host");
        self.stdin.flush().expect("flush");
        self.next_event("sent", Duration::from_secs(5));
    }

    /// The next line of `event` (messages that come first are kept in `seen`).
    fn next_event(&mut self, event: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line["event"] == event => return line,
                Ok(line) if line["event"] == "message" => self.seen.push(line),
                Ok(line) if line["event"] == "error" => panic!("the host reported {line}"),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no {event} from the host within {limit:?}")
                }
                Err(RecvTimeoutError::Disconnected) => panic!("the host exited"),
            }
        }
    }

    /// The next message for which `matches` holds, within `limit`; every message received
    /// meanwhile is kept in `seen`.
    fn wait_for(&mut self, what: &str, limit: Duration, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line["event"] == "message" => {
                    self.seen.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                }
                Ok(line) if line["event"] == "error" => panic!("the host reported {line}"),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!("no {what} within {limit:?}"),
                Err(RecvTimeoutError::Disconnected) => panic!("the host exited"),
            }
        }
    }

    /// Take every message that arrives within `period`.
    fn drain_for(&mut self, period: Duration) {
        let deadline = Instant::now() + period;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line["event"] == "message" => self.seen.push(line),
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is(kind: &'static str) -> impl Fn(&Value) -> bool {
    move |m| m["type"] == kind
}

fn metric<'a>(message: &'a Value, name: &str) -> &'a Value {
    message["metrics"]
        .as_array()
        .and_then(|metrics| metrics.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("no metric {name} in {message}"))
}

/// A gateway config: one simulated device polled every `poll`, a Sparkplug uplink to
/// `cloud_port` over MQTT 3.1.1 (with `primary_host` when given).
fn write_config(dir: &Path, cloud_port: u16, poll: &str, primary_host: Option<&str>) -> PathBuf {
    write_config_with(dir, cloud_port, poll, primary_host, "3.1.1")
}

/// [`write_config`] with the uplink's MQTT `protocol` ("3.1.1" or "5").
fn write_config_with(
    dir: &Path,
    cloud_port: u16,
    poll: &str,
    primary_host: Option<&str>,
    protocol: &str,
) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let host_line = primary_host
        .map(|h| format!("primary_host = \"{h}\""))
        .unwrap_or_default();
    let config = format!(
        r#"
[gateway]
id = "{NODE}"
data_dir = "{data}"
shutdown_timeout = "5s"

[broker]
allow_anonymous = true

[[broker.listeners]]
bind = "127.0.0.1:0"

[[devices]]
name = "sim"
driver = "simulated"
poll = "{poll}"
points = [
  {{ name = "temperature", waveform = "ramp", min = 0.0, max = 1000.0, period = "1000s", unit = "°C" }},
  {{ name = "setpoint", waveform = "constant", value = 21.5, writable = true, unit = "°C" }},
  {{ name = "count", waveform = "constant", value = 3 }},
  {{ name = "running", waveform = "constant", value = true }},
  {{ name = "label", waveform = "constant", value = "boiler" }},
]

[[uplinks]]
name = "scada"
url = "mqtt://127.0.0.1:{cloud_port}"
protocol = "{protocol}"
reconnect = {{ min = "100ms", max = "1s" }}

[uplinks.sparkplug]
group_id = "{GROUP}"
edge_node_id = "{{gateway}}"
{host_line}
"#,
        data = data.display()
    );
    let path = dir.join("fieldmq.toml");
    std::fs::write(&path, config).expect("write config");
    path
}

#[test]
fn births_decode_with_every_point_and_its_datatype_and_data_uses_aliases() {
    if !peers_available("sparkplug births") {
        return;
    }
    let cloud = Cloud::start(CloudOptions::default());
    let mut host = Host::start(cloud.port, None);
    let dir = tempfile::tempdir().expect("tempdir");
    let _gateway = GatewayProcess::start(&write_config(dir.path(), cloud.port, "200ms", None));

    let nbirth = host.wait_for("NBIRTH", Duration::from_secs(15), is("NBIRTH"));
    assert_eq!(nbirth["node"], NODE);
    assert_eq!(nbirth["seq"], 0);
    assert_eq!(metric(&nbirth, "bdSeq")["datatype"], "INT64");
    let rebirth = metric(&nbirth, "Node Control/Rebirth");
    assert_eq!(
        (rebirth["datatype"].clone(), rebirth["value"].clone()),
        (json!("BOOLEAN"), json!(false))
    );

    let dbirth = host.wait_for("DBIRTH", Duration::from_secs(10), is("DBIRTH"));
    assert_eq!(dbirth["device"], "sim");
    assert_eq!(dbirth["seq"], 1);
    let expected = [
        ("temperature", "DOUBLE"),
        ("setpoint", "DOUBLE"),
        ("count", "INT64"),
        ("running", "BOOLEAN"),
        ("label", "STRING"),
    ];
    assert_eq!(
        dbirth["metrics"].as_array().map(Vec::len),
        Some(expected.len())
    );
    let mut aliases = std::collections::HashMap::new();
    for (name, datatype) in expected {
        let m = metric(&dbirth, name);
        assert_eq!(m["datatype"], datatype, "{name}");
        assert!(m["alias"].is_u64(), "{name} has an alias");
        aliases.insert(m["alias"].as_u64(), name);
    }
    assert_eq!(
        metric(&dbirth, "temperature")["properties"]["engUnit"],
        "°C"
    );

    // Data: by alias only (the host names it through the birth), with the birth's datatype.
    let ddata = host.wait_for("DDATA of label", Duration::from_secs(10), |m| {
        m["type"] == "DDATA" && m["metrics"][0]["name"] == "label"
    });
    let m = &ddata["metrics"][0];
    assert_eq!(m["named"], false, "DDATA carries the alias, not the name");
    assert_eq!(aliases.get(&m["alias"].as_u64()), Some(&"label"));
    assert_eq!(m["value"], "boiler");
    assert_eq!(m["datatype"], "STRING");
    assert!(m["timestamp"]
        .as_u64()
        .is_some_and(|t| t > 1_600_000_000_000));
    let count = host.wait_for("DDATA of count", Duration::from_secs(10), |m| {
        m["type"] == "DDATA" && m["metrics"][0]["name"] == "count"
    });
    assert_eq!(count["metrics"][0]["value"], 3);
    let running = host.wait_for("DDATA of running", Duration::from_secs(10), |m| {
        m["type"] == "DDATA" && m["metrics"][0]["name"] == "running"
    });
    assert_eq!(running["metrics"][0]["value"], true);
}

#[test]
fn seq_counts_every_message_of_the_session_and_wraps_after_255() {
    if !peers_available("sparkplug seq") {
        return;
    }
    let cloud = Cloud::start(CloudOptions::default());
    let mut host = Host::start(cloud.port, None);
    let dir = tempfile::tempdir().expect("tempdir");
    // 5 points every 20 ms: 250 messages a second.
    let _gateway = GatewayProcess::start(&write_config(dir.path(), cloud.port, "20ms", None));
    host.wait_for("NBIRTH", Duration::from_secs(15), is("NBIRTH"));
    let start = host.seen.len() - 1;
    host.wait_for("seq 0 after 255", Duration::from_secs(20), |m| {
        m["type"] == "DDATA" && m["seq"] == 0
    });
    let seqs: Vec<u64> = host.seen[start..]
        .iter()
        .map(|m| {
            m["seq"]
                .as_u64()
                .expect("every message of the session has a seq")
        })
        .collect();
    assert_eq!(seqs[0], 0, "NBIRTH starts the session at 0");
    for pair in seqs.windows(2) {
        assert_eq!(
            pair[1],
            (pair[0] + 1) % 256,
            "seq goes up by one and wraps: {seqs:?}"
        );
    }
    assert!(seqs.len() > 256 && seqs.contains(&255));
}

#[test]
fn kill_9_delivers_the_ndeath_with_the_bdseq_of_the_nbirth_and_bdseq_goes_on_after_a_restart() {
    if !peers_available("sparkplug NDEATH") {
        return;
    }
    let cloud = Cloud::start(CloudOptions::default());
    let mut host = Host::start(cloud.port, None);
    let dir = tempfile::tempdir().expect("tempdir");
    // MQTT 5 here (clean start, no session expiry, the will with its properties); the
    // other tests use 3.1.1.
    let config = write_config_with(dir.path(), cloud.port, "200ms", None, "5");
    let mut gateway = GatewayProcess::start(&config);
    let nbirth = host.wait_for("NBIRTH", Duration::from_secs(15), is("NBIRTH"));
    let bdseq = metric(&nbirth, "bdSeq")["value"].as_u64().expect("bdSeq");

    gateway.kill9();
    let ndeath = host.wait_for("NDEATH", Duration::from_secs(10), is("NDEATH"));
    assert_eq!(ndeath["node"], NODE);
    assert_eq!(metric(&ndeath, "bdSeq")["value"].as_u64(), Some(bdseq));

    // The next process takes the next number (persisted in the data directory).
    let mut gateway = GatewayProcess::start(&config);
    let nbirth = host.wait_for("NBIRTH", Duration::from_secs(15), is("NBIRTH"));
    assert_eq!(
        metric(&nbirth, "bdSeq")["value"].as_u64(),
        Some((bdseq + 1) % 256)
    );

    // A clean stop publishes the NDEATH itself, with that bdSeq.
    assert!(gateway.terminate().success());
    let ndeath = host.wait_for("NDEATH", Duration::from_secs(10), is("NDEATH"));
    assert_eq!(
        metric(&ndeath, "bdSeq")["value"].as_u64(),
        Some((bdseq + 1) % 256)
    );
}

#[test]
fn a_sparkplug_uplink_to_the_gateways_own_listener_serves_lan_hosts_on_the_local_broker() {
    if !peers_available("sparkplug on the local broker") {
        return;
    }
    // The uplink's "cloud" is the gateway's own listener: LAN hosts find the edge node on
    // the local broker, no other broker involved.
    let port = crate::util::free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), port, "200ms", None);
    let text = std::fs::read_to_string(&config)
        .expect("read config")
        .replace(
            "bind = \"127.0.0.1:0\"",
            &format!("bind = \"127.0.0.1:{port}\""),
        );
    std::fs::write(&config, text).expect("write config");
    let gateway = GatewayProcess::start(&config);
    assert_eq!(gateway.addr.port(), port);
    let mut host = Host::start(port, None);
    // The first births may have gone before the host subscribed: ask for them again.
    host.send(json!({"op": "rebirth", "node": NODE}));
    let nbirth = host.wait_for(
        "NBIRTH on the local broker",
        Duration::from_secs(15),
        is("NBIRTH"),
    );
    assert_eq!(nbirth["node"], NODE);
    let dbirth = host.wait_for(
        "DBIRTH on the local broker",
        Duration::from_secs(10),
        is("DBIRTH"),
    );
    assert_eq!(metric(&dbirth, "label")["datatype"], "STRING");
    host.wait_for(
        "DDATA on the local broker",
        Duration::from_secs(10),
        is("DDATA"),
    );
}

#[test]
fn ncmd_rebirth_republishes_every_birth() {
    if !peers_available("sparkplug rebirth") {
        return;
    }
    let cloud = Cloud::start(CloudOptions::default());
    let mut host = Host::start(cloud.port, None);
    let dir = tempfile::tempdir().expect("tempdir");
    let _gateway = GatewayProcess::start(&write_config(dir.path(), cloud.port, "200ms", None));
    let first = host.wait_for("NBIRTH", Duration::from_secs(15), is("NBIRTH"));
    host.wait_for("DBIRTH", Duration::from_secs(10), is("DBIRTH"));
    host.wait_for("DDATA", Duration::from_secs(10), is("DDATA"));

    host.send(json!({"op": "rebirth", "node": NODE}));
    let again = host.wait_for("NBIRTH after NCMD", Duration::from_secs(10), is("NBIRTH"));
    assert_eq!(again["seq"], 0);
    assert_eq!(
        metric(&again, "bdSeq")["value"],
        metric(&first, "bdSeq")["value"],
        "same session, same bdSeq"
    );
    let dbirth = host.wait_for("DBIRTH after NCMD", Duration::from_secs(10), is("DBIRTH"));
    assert_eq!(dbirth["seq"], 1);
    // The birth carries current values now.
    assert_eq!(metric(&dbirth, "label")["value"], "boiler");
    assert_eq!(metric(&dbirth, "setpoint")["properties"]["Quality"], 192);
}

#[test]
fn dcmd_writes_the_point_through_set_and_the_new_value_comes_back_in_ddata() {
    if !peers_available("sparkplug DCMD") {
        return;
    }
    let cloud = Cloud::start(CloudOptions::default());
    let mut host = Host::start(cloud.port, None);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut gateway = GatewayProcess::start(&write_config(dir.path(), cloud.port, "100ms", None));
    host.wait_for("DBIRTH", Duration::from_secs(15), is("DBIRTH"));

    // A read-only point and a malformed command are refused without harm.
    host.send(json!({"op": "dcmd", "node": NODE, "device": "sim", "metric": "count", "datatype": "INT64", "value": 9}));
    host.send(json!({"op": "dcmd", "node": NODE, "device": "nosuch", "metric": "x", "datatype": "INT64", "value": 9}));

    host.send(json!({"op": "dcmd", "node": NODE, "device": "sim", "metric": "setpoint", "datatype": "DOUBLE", "value": 30.5}));
    let ddata = host.wait_for(
        "DDATA with the new setpoint",
        Duration::from_secs(10),
        |m| {
            m["type"] == "DDATA"
                && m["metrics"][0]["name"] == "setpoint"
                && m["metrics"][0]["value"] == 30.5
        },
    );
    assert_eq!(ddata["metrics"][0]["is_historical"], false);
    // count kept its value and the gateway still runs.
    let count = host.wait_for("DDATA of count", Duration::from_secs(10), |m| {
        m["type"] == "DDATA" && m["metrics"][0]["name"] == "count"
    });
    assert_eq!(count["metrics"][0]["value"], 3);
    assert!(gateway.is_running());
}

#[test]
fn with_the_primary_host_offline_data_is_held_and_arrives_later_as_historical_in_order_across_a_kill_9(
) {
    if !peers_available("sparkplug store and forward") {
        return;
    }
    let cloud = Cloud::start(CloudOptions::default());
    let mut host = Host::start(cloud.port, Some("scada-1"));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), cloud.port, "100ms", Some("scada-1"));
    let mut gateway = GatewayProcess::start(&config);
    // No births before the host says it is online.
    host.drain_for(Duration::from_secs(1));
    assert!(
        host.seen.is_empty(),
        "births wait for the primary host: {:?}",
        host.seen
    );
    host.send(json!({"op": "state", "online": true}));
    host.wait_for("NBIRTH", Duration::from_secs(10), is("NBIRTH"));
    host.wait_for("live DDATA", Duration::from_secs(10), is("DDATA"));

    // The host goes away: the node holds its data.
    host.send(json!({"op": "state", "online": false}));
    host.drain_for(Duration::from_millis(500));
    let held_from = host.seen.len();
    host.drain_for(Duration::from_millis(1500));
    assert_eq!(
        host.seen.len(),
        held_from,
        "nothing is sent while the primary host is offline"
    );

    // Killed while holding data (the cloud sends the will, NDEATH), and started again:
    // still held.
    gateway.kill9();
    host.wait_for("NDEATH", Duration::from_secs(10), is("NDEATH"));
    let _gateway = GatewayProcess::start(&config);
    host.drain_for(Duration::from_millis(1500));
    assert_eq!(
        host.seen.len(),
        held_from + 1,
        "nothing but the NDEATH after the restart either"
    );

    host.send(json!({"op": "state", "online": true}));
    host.wait_for(
        "NBIRTH after the host's return",
        Duration::from_secs(10),
        is("NBIRTH"),
    );
    // Historical data first, then live data again.
    host.wait_for(
        "live DDATA after the backlog",
        Duration::from_secs(20),
        |m| m["type"] == "DDATA" && m["metrics"][0]["is_historical"] == false,
    );
    let after: Vec<&Value> = host.seen[held_from..]
        .iter()
        .filter(|m| m["type"] == "DDATA" && m["metrics"][0]["name"] == "temperature")
        .collect();
    let historical: Vec<&Value> = after
        .iter()
        .copied()
        .filter(|m| m["metrics"][0]["is_historical"] == true)
        .collect();
    assert!(
        historical.len() >= 20,
        "about 3.5 s of held readings at 10/s: {}",
        historical.len()
    );
    // In order, and nothing lost: the readings before the kill and after the restart each
    // follow on without a gap (the one gap is the time the gateway was down).
    let stamps: Vec<u64> = host
        .seen
        .iter()
        .filter(|m| m["type"] == "DDATA" && m["metrics"][0]["name"] == "temperature")
        .map(|m| m["metrics"][0]["timestamp"].as_u64().expect("timestamp"))
        .collect();
    for pair in stamps.windows(2) {
        assert!(pair[1] > pair[0], "timestamps in order: {stamps:?}");
    }
    let gaps = stamps.windows(2).filter(|p| p[1] - p[0] > 600).count();
    assert!(
        gaps <= 1,
        "only the restart leaves a gap in the readings: {stamps:?}"
    );
    let first_historical = historical[0]["metrics"][0]["timestamp"]
        .as_u64()
        .unwrap_or(0);
    let last_live_before = host.seen[..held_from]
        .iter()
        .filter(|m| m["type"] == "DDATA" && m["metrics"][0]["name"] == "temperature")
        .filter_map(|m| m["metrics"][0]["timestamp"].as_u64())
        .max()
        .unwrap_or(0);
    assert!(
        first_historical > last_live_before && first_historical - last_live_before <= 600,
        "the backlog starts where live data stopped: {last_live_before} then {first_historical}"
    );
}

// ---------------------------------------------------------------------------------------
// A Modbus TCP device (tokio-modbus server) behind the node: its types, writes and outages.

/// Registers and coils of the server, and a switch that makes it stop answering.
#[derive(Default)]
struct Registers {
    holding: std::collections::HashMap<u16, u16>,
    coils: std::collections::HashMap<u16, bool>,
    mute: bool,
    /// Every write: function code, start address, count.
    writes: Vec<(u8, u16, usize)>,
}

type SharedRegisters = std::sync::Arc<std::sync::Mutex<Registers>>;

#[derive(Clone)]
struct ModbusDevice {
    registers: SharedRegisters,
}

impl tokio_modbus::server::Service for ModbusDevice {
    type Request = tokio_modbus::SlaveRequest<'static>;
    type Response = Option<tokio_modbus::Response>;
    type Exception = tokio_modbus::ExceptionCode;
    type Future = std::future::Ready<Result<Self::Response, Self::Exception>>;

    fn call(&self, request: Self::Request) -> Self::Future {
        use tokio_modbus::{ExceptionCode, Request, Response};
        let mut r = self
            .registers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if r.mute {
            return std::future::ready(Ok(None));
        }
        let answer = match request.request {
            Request::ReadHoldingRegisters(start, count) => {
                Ok(Some(Response::ReadHoldingRegisters(
                    (start..start + count)
                        .map(|a| r.holding.get(&a).copied().unwrap_or(0))
                        .collect(),
                )))
            }
            Request::ReadCoils(start, count) => Ok(Some(Response::ReadCoils(
                (start..start + count)
                    .map(|a| r.coils.get(&a).copied().unwrap_or(false))
                    .collect(),
            ))),
            Request::WriteSingleRegister(address, value) => {
                r.writes.push((6, address, 1));
                r.holding.insert(address, value);
                Ok(Some(Response::WriteSingleRegister(address, value)))
            }
            Request::WriteSingleCoil(address, value) => {
                r.writes.push((5, address, 1));
                r.coils.insert(address, value);
                Ok(Some(Response::WriteSingleCoil(address, value)))
            }
            Request::WriteMultipleRegisters(address, values) => {
                r.writes.push((16, address, values.len()));
                for (a, value) in (address..).zip(values.iter()) {
                    r.holding.insert(a, *value);
                }
                Ok(Some(Response::WriteMultipleRegisters(
                    address,
                    values.len() as u16,
                )))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        };
        std::future::ready(answer)
    }
}

/// A Modbus TCP server on a free loopback port, on a runtime of its own (the test itself
/// is synchronous); stops with the returned runtime.
fn serve_modbus(registers: SharedRegisters) -> (std::net::SocketAddr, tokio::runtime::Runtime) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    runtime.spawn(async move {
        let server = tokio_modbus::server::tcp::Server::new(listener);
        let on_connected = move |stream, _peer| {
            let service = ModbusDevice {
                registers: registers.clone(),
            };
            async move { Ok(Some((service, stream))) }
        };
        let _ = server.serve(&on_connected, |_error| {}).await;
    });
    (addr, runtime)
}

#[test]
fn a_modbus_device_maps_its_types_takes_dcmd_writes_and_goes_through_ddeath_and_dbirth() {
    if !peers_available("sparkplug modbus") {
        return;
    }
    let registers = SharedRegisters::default();
    {
        let mut r = registers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.holding.insert(0, 7);
        r.holding.insert(1, 0xfffe);
    }
    let (modbus, _server) = serve_modbus(registers.clone());
    let cloud = Cloud::start(CloudOptions::default());
    let mut host = Host::start(cloud.port, None);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let config = dir.path().join("fieldmq.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[gateway]
id = "{NODE}"
data_dir = "{data}"

[broker]
allow_anonymous = true

[[broker.listeners]]
bind = "127.0.0.1:0"

[[devices]]
name = "plc"
driver = "modbus-tcp"
address = "{modbus}"
poll = "100ms"
timeout = "200ms"
backoff_min = "100ms"
backoff_max = "200ms"
points = [
  {{ name = "level", table = "holding", address = 0, type = "u16", unit = "cm" }},
  {{ name = "trim", table = "holding", address = 1, type = "i16", writable = true }},
  {{ name = "limit", table = "holding", address = 2, type = "u16", writable = true }},
  {{ name = "pump", table = "coil", address = 3, writable = true }},
  {{ name = "flow", table = "holding", address = 4, type = "u16", scale = 0.1 }},
]

[[uplinks]]
name = "scada"
url = "mqtt://127.0.0.1:{port}"
protocol = "3.1.1"

[uplinks.sparkplug]
group_id = "{GROUP}"
"#,
            data = data.display(),
            port = cloud.port
        ),
    )
    .expect("write config");
    let _gateway = GatewayProcess::start(&config);

    let dbirth = host.wait_for("DBIRTH", Duration::from_secs(15), is("DBIRTH"));
    assert_eq!(dbirth["device"], "plc");
    for (name, datatype) in [
        ("level", "UINT16"),
        ("trim", "INT16"),
        ("pump", "BOOLEAN"),
        ("flow", "DOUBLE"),
    ] {
        assert_eq!(metric(&dbirth, name)["datatype"], datatype, "{name}");
    }
    assert_eq!(metric(&dbirth, "level")["properties"]["engUnit"], "cm");
    let trim = host.wait_for("DDATA of trim", Duration::from_secs(10), |m| {
        m["type"] == "DDATA" && m["metrics"][0]["name"] == "trim"
    });
    assert_eq!(
        trim["metrics"][0]["value"], -2,
        "an Int16 decodes with its sign"
    );

    // DCMD: the write reaches the register, and the value read back comes as DDATA.
    host.send(json!({"op": "dcmd", "node": NODE, "device": "plc", "metric": "trim", "datatype": "INT16", "value": -10}));
    host.wait_for("DDATA with trim -10", Duration::from_secs(10), |m| {
        m["type"] == "DDATA" && m["metrics"][0]["name"] == "trim" && m["metrics"][0]["value"] == -10
    });
    let holding = registers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .holding
        .get(&1)
        .copied();
    assert_eq!(holding, Some(0xfff6));
    host.send(json!({"op": "dcmd", "node": NODE, "device": "plc", "metric": "pump", "datatype": "BOOLEAN", "value": true}));
    host.wait_for("DDATA with the pump on", Duration::from_secs(10), |m| {
        m["type"] == "DDATA"
            && m["metrics"][0]["name"] == "pump"
            && m["metrics"][0]["value"] == true
    });
    // Two metrics on adjacent registers in one DCMD: one FC16 request.
    let before = registers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .writes
        .len();
    host.send(
        json!({"op": "dcmd", "node": NODE, "device": "plc", "metrics": [
            {"metric": "limit", "datatype": "UINT16", "value": 300},
            {"metric": "trim", "datatype": "INT16", "value": -5},
        ]}),
    );
    host.wait_for("DDATA with limit 300", Duration::from_secs(10), |m| {
        m["type"] == "DDATA"
            && m["metrics"]
                .as_array()
                .is_some_and(|ms| ms.iter().any(|x| x["name"] == "limit" && x["value"] == 300))
    });
    {
        let r = registers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        assert_eq!(r.writes[before..], [(16, 1, 2)]);
        assert_eq!(
            (r.holding.get(&1), r.holding.get(&2)),
            (Some(&0xfffb), Some(&300))
        );
    }

    // The device stops answering: its status goes offline, the host gets a DDEATH; it
    // answers again: a DBIRTH (with what the node knows at that moment: the readings of
    // the outage were bad), then its values as data.
    registers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .mute = true;
    let ddeath = host.wait_for("DDEATH", Duration::from_secs(10), is("DDEATH"));
    assert_eq!(ddeath["device"], "plc");
    registers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .mute = false;
    let reborn = host.wait_for(
        "DBIRTH after the outage",
        Duration::from_secs(10),
        is("DBIRTH"),
    );
    assert_eq!(reborn["device"], "plc");
    assert_eq!(metric(&reborn, "trim")["datatype"], "INT16");
    host.wait_for(
        "DDATA of trim after the outage",
        Duration::from_secs(10),
        |m| {
            m["type"] == "DDATA"
                && m["metrics"][0]["name"] == "trim"
                && m["metrics"][0]["value"] == -5
        },
    );
}

#[test]
fn a_reload_that_adds_a_point_restarts_the_node_with_a_new_bdseq_and_the_point_in_its_dbirth() {
    if !peers_available("sparkplug reload") {
        return;
    }
    let cloud = Cloud::start(CloudOptions::default());
    let mut host = Host::start(cloud.port, None);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), cloud.port, "200ms", None);
    let gateway = GatewayProcess::start(&config);
    let nbirth = host.wait_for("NBIRTH", Duration::from_secs(15), is("NBIRTH"));
    let bdseq = metric(&nbirth, "bdSeq")["value"].as_u64().expect("bdSeq");
    let dbirth = host.wait_for("DBIRTH", Duration::from_secs(10), is("DBIRTH"));
    assert_eq!(dbirth["metrics"].as_array().map(Vec::len), Some(5));

    let text = std::fs::read_to_string(&config).expect("read config");
    let added = text.replace(
        "  { name = \"label\",",
        "  { name = \"pressure\", waveform = \"constant\", value = 1.5, unit = \"bar\" },\n  { name = \"label\",",
    );
    assert_ne!(added, text);
    std::fs::write(&config, added).expect("write config");
    gateway.hangup();

    // The node stops cleanly (its own NDEATH) and starts again on a new connection.
    let ndeath = host.wait_for("NDEATH on reload", Duration::from_secs(15), is("NDEATH"));
    assert_eq!(metric(&ndeath, "bdSeq")["value"].as_u64(), Some(bdseq));
    let nbirth = host.wait_for("NBIRTH after reload", Duration::from_secs(15), is("NBIRTH"));
    assert_eq!(
        metric(&nbirth, "bdSeq")["value"].as_u64(),
        Some((bdseq + 1) % 256)
    );
    let dbirth = host.wait_for("DBIRTH after reload", Duration::from_secs(10), is("DBIRTH"));
    assert_eq!(dbirth["metrics"].as_array().map(Vec::len), Some(6));
    assert_eq!(metric(&dbirth, "pressure")["datatype"], "DOUBLE");
    assert_eq!(metric(&dbirth, "pressure")["properties"]["engUnit"], "bar");
}

#[test]
fn a_sunspec_device_is_born_again_with_the_points_its_discovery_found() {
    if !peers_available("sparkplug sunspec") {
        return;
    }
    // SunSpec at 40000: model 103 (W = 1500 W, Hz = 50.01), model 123 (WMaxLimPct = 100.0 %
    // at 40059 with WMaxLimPct_SF = -1), then the end marker.
    let registers = SharedRegisters::default();
    {
        let mut r = registers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.holding
            .extend(crate::util::modbus::sunspec_inverter_registers());
    }
    let (modbus, _server) = serve_modbus(registers.clone());
    let cloud = Cloud::start(CloudOptions::default());
    let mut host = Host::start(cloud.port, None);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let config = dir.path().join("fieldmq.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[gateway]
id = "{NODE}"
data_dir = "{data}"

[broker]
allow_anonymous = true

[[broker.listeners]]
bind = "127.0.0.1:0"

[[devices]]
name = "inv"
driver = "modbus-tcp"
address = "{modbus}"
poll = "200ms"
profile = "sunspec"
points = [ {{ name = "controls_WMaxLimPct", writable = true }} ]

[[uplinks]]
name = "scada"
url = "mqtt://127.0.0.1:{port}"
protocol = "3.1.1"

[uplinks.sparkplug]
group_id = "{GROUP}"
"#,
            data = data.display(),
            port = cloud.port
        ),
    )
    .expect("write config");
    let _gateway = GatewayProcess::start(&config);

    let has = |m: &Value, name: &str| {
        m["metrics"]
            .as_array()
            .is_some_and(|metrics| metrics.iter().any(|x| x["name"] == name))
    };
    let dbirth = host.wait_for("DBIRTH with inverter_W", Duration::from_secs(20), |m| {
        m["type"] == "DBIRTH" && m["device"] == "inv" && has(m, "inverter_W")
    });
    assert_eq!(metric(&dbirth, "inverter_W")["datatype"], "DOUBLE");
    assert_eq!(metric(&dbirth, "inverter_W")["properties"]["engUnit"], "W");
    assert!(has(&dbirth, "inverter_Hz"), "{dbirth}");
    host.wait_for("DDATA of inverter_Hz", Duration::from_secs(10), |m| {
        m["type"] == "DDATA"
            && m["metrics"][0]["name"] == "inverter_Hz"
            && m["metrics"][0]["value"] == 50.01
    });

    // A SunSpec control made writable takes a DCMD, through its scale factor.
    assert_eq!(metric(&dbirth, "controls_WMaxLimPct")["datatype"], "DOUBLE");
    host.send(json!({"op": "dcmd", "node": NODE, "device": "inv", "metric": "controls_WMaxLimPct", "datatype": "DOUBLE", "value": 42.5}));
    host.wait_for("DDATA with the limit 42.5", Duration::from_secs(10), |m| {
        m["type"] == "DDATA"
            && m["metrics"].as_array().is_some_and(|ms| {
                ms.iter()
                    .any(|x| x["name"] == "controls_WMaxLimPct" && x["value"] == 42.5)
            })
    });
    let written = registers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .holding
        .get(&40059)
        .copied();
    assert_eq!(written, Some(425));
}
