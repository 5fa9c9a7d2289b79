//! SunSpec discovery against a device laid out as SunSpec: a tokio-modbus TCP server on
//! 127.0.0.1:0 holding a model chain (common model, three-phase inverter, wye meter, a
//! vendor model), with the embedded broker in-process, and `fieldmq probe --sunspec`
//! against the same server.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldmq::broker::config::BrokerConfig;
use fieldmq::broker::{self, BrokerHandle, InternalSubscribeOptions, InternalSubscription};
use fieldmq::drivers::modbus::probe::{probe, ProbeArgs};
use fieldmq::drivers::{self, DeviceContext};
use fieldmq::model::QoS;
use fieldmq::service::config;
use serde_json::Value as Json;
use tokio::time::{timeout, Instant};
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

use crate::util::gateway;
use crate::util::modbus::Answer;

/// Holding registers; a read that covers an address not in the map is refused with
/// "illegal data address", as real devices do. Every read is logged (start, count).
#[derive(Debug, Default)]
struct Registers {
    holding: HashMap<u16, u16>,
    reads: Vec<(u16, u16)>,
    /// Every write (FC06 and FC16) taken: its address and the registers written.
    writes: Vec<(u16, Vec<u16>)>,
    /// The next this many reads get no answer (the gateway times out and reconnects).
    stall: u32,
}

impl Registers {
    /// Writes `values` from `address` when every register exists, as a device does.
    fn write(&mut self, address: u16, values: &[u16]) -> Result<(), ExceptionCode> {
        let addresses = (0..values.len() as u16).map(|i| address.checked_add(i));
        if !addresses
            .clone()
            .all(|a| a.is_some_and(|a| self.holding.contains_key(&a)))
        {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        for (a, value) in addresses.flatten().zip(values) {
            self.holding.insert(a, *value);
        }
        self.writes.push((address, values.to_vec()));
        Ok(())
    }
}

type Shared = Arc<Mutex<Registers>>;

#[derive(Clone)]
struct SunSpecDevice(Shared);

impl tokio_modbus::server::Service for SunSpecDevice {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn call(&self, request: Self::Request) -> Self::Future {
        let mut s = self.0.lock().unwrap();
        let answer = match request.request {
            Request::ReadHoldingRegisters(_, _) if s.stall > 0 => {
                s.stall -= 1;
                return Box::pin(async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Err(ExceptionCode::ServerDeviceBusy)
                });
            }
            Request::ReadHoldingRegisters(start, count) => {
                s.reads.push((start, count));
                let words: Option<Vec<u16>> = (u32::from(start)
                    ..u32::from(start) + u32::from(count))
                    .map(|a| s.holding.get(&(a as u16)).copied())
                    .collect();
                match words {
                    Some(words) => Ok(Some(Response::ReadHoldingRegisters(words))),
                    None => Err(ExceptionCode::IllegalDataAddress),
                }
            }
            Request::WriteSingleRegister(address, value) => s
                .write(address, &[value])
                .map(|()| Some(Response::WriteSingleRegister(address, value))),
            Request::WriteMultipleRegisters(address, ref values) => {
                let count = values.len() as u16;
                s.write(address, values)
                    .map(|()| Some(Response::WriteMultipleRegisters(address, count)))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        };
        Box::pin(std::future::ready(answer))
    }
}

async fn serve(state: Shared) -> std::net::SocketAddr {
    let device = SunSpecDevice(state);
    crate::util::modbus::serve_tcp(device, "127.0.0.1:0".parse().expect("address"))
        .await
        .0
}

/// Writes a model: id, length, then `length` registers (zero unless set in `values`,
/// offsets after ID and L). Returns the address after it.
fn model(map: &mut HashMap<u16, u16>, at: u16, id: u16, length: u16, values: &[(u16, u16)]) -> u16 {
    map.insert(at, id);
    map.insert(at + 1, length);
    for i in 0..length {
        map.insert(at + 2 + i, 0);
    }
    for &(offset, value) in values {
        map.insert(at + 2 + offset, value);
    }
    at + 2 + length
}

fn text(s: &str, registers: u16) -> Vec<u16> {
    let mut bytes = s.as_bytes().to_vec();
    bytes.resize(usize::from(registers) * 2, 0);
    bytes
        .chunks(2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .collect()
}

/// A SunSpec inverter with a meter, chain at 40000:
/// 40002 model 1 (66), 40070 model 103 (50), 40122 model 203 (105), 40229 model 64001 (4),
/// 40235 model 701 (153), end at 40390.
fn inverter() -> Shared {
    let mut map = HashMap::new();
    map.insert(40000, 0x5375);
    map.insert(40001, 0x6E53);
    let mut common = Vec::new();
    for (i, w) in text("SMA", 16).into_iter().enumerate() {
        common.push((i as u16, w));
    }
    for (i, w) in text("3001234567", 16).into_iter().enumerate() {
        common.push((48 + i as u16, w));
    }
    common.push((64, 3)); // DA
    let next = model(&mut map, 40002, 1, 66, &common);
    let next = model(
        &mut map,
        next,
        103,
        50,
        &[
            (0, 125),     // A = 12.5 A with A_SF = -1
            (1, 42),      // AphA = 4.2 A
            (2, 0xFFFF),  // AphB: not implemented
            (4, 0xFFFF),  // A_SF = -1
            (8, 2305),    // PhVphA = 230.5 V with V_SF = -1
            (11, 0xFFFF), // V_SF = -1
            (12, 0x8000), // W: not implemented (int16)
            (13, 0),      // W_SF = 0
            (14, 5001),   // Hz = 50.01 with Hz_SF = -2
            (15, 0xFFFE), // Hz_SF = -2
            (22, 0x0001), // WH = 0x0001E240 = 123456 Wh
            (23, 0xE240),
            (24, 0), // WH_SF = 0
            (36, 4), // St = MPPT
        ],
    );
    let next = model(
        &mut map,
        next,
        203,
        105,
        &[
            (16, 1500),   // W = 1500 with W_SF = 0x8000: the scale factor is not implemented
            (20, 0x8000), // W_SF
            (44, 0x0012), // TotWhImp = 0x0012D687 = 1234567 with TotWh_SF = -3: 1234.567 Wh
            (45, 0xD687),
            (52, 0xFFFD), // TotWh_SF = -3
        ],
    );
    let next = model(&mut map, next, 64001, 4, &[]);
    // Model 701 (153 registers): more than one request holds.
    let mut der = vec![
        (8, 1234), // W = 12340 W with W_SF = 1
        (17, 0),   // TotWhInj (u64) = 5000 Wh with TotWh_SF = 0
        (18, 0),
        (19, 0),
        (20, 5000),
        (114, 1), // W_SF
        (118, 0), // TotWh_SF
    ];
    for (i, w) in text("GRID FAULT", 32).into_iter().enumerate() {
        der.push((121 + i as u16, w)); // MnAlrmInfo, after the cut
    }
    let next = model(&mut map, next, 701, 153, &der);
    map.insert(next, 0xFFFF);
    map.insert(next + 1, 0);
    Arc::new(Mutex::new(Registers {
        holding: map,
        reads: Vec::new(),
        writes: Vec::new(),
        stall: 0,
    }))
}

struct Gateway {
    broker: BrokerHandle,
    messages: InternalSubscription,
    _shutdown: CancellationToken,
}

async fn start_gateway(address: std::net::SocketAddr) -> Gateway {
    start_gateway_with(address, "").await
}

/// A gateway with one `profile = "sunspec"` device `inv` at `address`, polled every 200 ms,
/// with `extra` device keys.
async fn start_gateway_with(address: std::net::SocketAddr, extra: &str) -> Gateway {
    let text = format!(
        "[gateway]\nid = \"gw\"\n[broker]\nallow_anonymous = true\n\
         [[devices]]\nname = \"inv\"\ndriver = \"modbus-tcp\"\naddress = \"{address}\"\n\
         poll = \"200ms\"\nbackoff_max = \"1s\"\nprofile = \"sunspec\"\n{extra}\n"
    );
    let config = config::parse(&text, Path::new("sunspec-test.toml"))
        .unwrap_or_else(|e| panic!("test config is invalid:\n{e}"));
    let shutdown = CancellationToken::new();
    let running = broker::start(
        &BrokerConfig {
            listeners: vec![],
            allow_anonymous: true,
            ..BrokerConfig::default()
        },
        shutdown.clone(),
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
            ],
            InternalSubscribeOptions::default(),
        )
        .await
        .unwrap();
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
            );
            (device, context)
        })
        .collect();
    for task in drivers::modbus::device_tasks(devices, shutdown.clone()) {
        tokio::spawn(task);
    }
    std::mem::forget(running); // lives as long as the test
    Gateway {
        broker: handle,
        messages,
        _shutdown: shutdown,
    }
}

impl Gateway {
    async fn publish(&self, topic: &str, payload: &str) {
        crate::util::mqtt::publish_in_process(&self.broker, topic, payload).await;
    }

    /// The next message on `topic`, others skipped (10 s at most).
    async fn next_on(&mut self, topic: &str) -> Json {
        self.next_matching(topic, |_| true).await
    }

    /// The next message on `topic` that `accept`s, others skipped (10 s at most).
    async fn next_matching(&mut self, topic: &str, accept: impl Fn(&Json) -> bool) -> Json {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let message = timeout(deadline - Instant::now(), self.messages.recv())
                .await
                .unwrap_or_else(|_| panic!("nothing matching on {topic} within 10s"))
                .expect("broker running");
            if message.topic.as_ref() != topic {
                continue;
            }
            let json: Json = serde_json::from_slice(&message.payload).unwrap_or_default();
            if accept(&json) {
                return json;
            }
        }
    }

    /// The latest payload of every topic seen until each of `topics` has one (10 s at most).
    async fn collect(&mut self, topics: &[&str]) -> HashMap<String, Json> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen: HashMap<String, Json> = HashMap::new();
        while !topics.iter().all(|t| seen.contains_key(*t)) {
            let missing: Vec<&&str> = topics.iter().filter(|t| !seen.contains_key(**t)).collect();
            let message = timeout(deadline - Instant::now(), self.messages.recv())
                .await
                .unwrap_or_else(|_| panic!("nothing on {missing:?} within 10s"))
                .expect("broker running");
            let json = serde_json::from_slice(&message.payload)
                .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(&message.payload).into()));
            seen.insert(message.topic.to_string(), json);
        }
        seen
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sunspec_models_are_discovered_and_published_with_their_scale_factors() {
    let state = inverter();
    let address = serve(state.clone()).await;
    let mut gw = start_gateway(address).await;
    let topics = [
        "gw/inv/common_Mn",
        "gw/inv/common_SN",
        "gw/inv/inverter_A",
        "gw/inv/inverter_AphA",
        "gw/inv/inverter_AphB",
        "gw/inv/inverter_PhVphA",
        "gw/inv/inverter_W",
        "gw/inv/inverter_Hz",
        "gw/inv/inverter_WH",
        "gw/inv/inverter_St",
        "gw/inv/meter_W",
        "gw/inv/meter_TotWhImp",
        "gw/inv/der_ac_W",
        "gw/inv/der_ac_TotWhInj",
        "gw/inv/der_ac_MnAlrmInfo",
        "fieldmq/gw/status/devices/inv",
    ];
    let seen = gw.collect(&topics).await;
    let value = |topic: &str| {
        let reading = &seen[topic];
        assert_eq!(reading["quality"], "good", "{topic}: {reading}");
        reading["value"].clone()
    };
    assert_eq!(value("gw/inv/common_Mn"), "SMA");
    assert_eq!(value("gw/inv/common_SN"), "3001234567");
    assert_eq!(value("gw/inv/inverter_A"), 12.5);
    assert_eq!(value("gw/inv/inverter_AphA"), 4.2);
    assert_eq!(value("gw/inv/inverter_PhVphA"), 230.5);
    assert_eq!(value("gw/inv/inverter_Hz"), 50.01);
    assert_eq!(value("gw/inv/inverter_WH"), 123456);
    assert_eq!(value("gw/inv/inverter_St"), 4);
    assert_eq!(value("gw/inv/meter_TotWhImp"), 1234.567);
    assert_eq!(value("gw/inv/der_ac_W"), 12340.0);
    assert_eq!(value("gw/inv/der_ac_TotWhInj"), 5000);
    assert_eq!(value("gw/inv/der_ac_MnAlrmInfo"), "GRID FAULT");
    assert_eq!(
        seen["gw/inv/inverter_PhVphA"]["unit"], "V",
        "{}",
        seen["gw/inv/inverter_PhVphA"]
    );

    // Unimplemented values and scale factors are bad quality, not numbers.
    for (topic, reason) in [
        ("gw/inv/inverter_AphB", "not implemented by the device"),
        ("gw/inv/inverter_W", "not implemented by the device"),
        (
            "gw/inv/meter_W",
            "scale factor not implemented by the device",
        ),
    ] {
        let reading = &seen[topic];
        assert_eq!(reading["quality"], "bad", "{topic}: {reading}");
        assert!(reading["value"].is_null(), "{topic}: {reading}");
        assert_eq!(reading["error"], reason, "{topic}: {reading}");
    }
    assert_eq!(seen["fieldmq/gw/status/devices/inv"]["status"], "online");

    // Each model block is one read: the value and its scale factor come from one answer.
    let reads = state.lock().unwrap().reads.clone();
    // Model 701 takes two, cut before the string that would not fit the first.
    for block in [
        (40004, 66),
        (40072, 50),
        (40124, 105),
        (40237, 121),
        (40358, 32),
    ] {
        assert!(
            reads.contains(&block),
            "{block:?} not read as one block: {reads:?}"
        );
    }
    // The vendor model is listed in the chain but not read.
    assert!(!reads.iter().any(|&(start, _)| start == 40231), "{reads:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_without_a_sunspec_marker_reports_why_in_its_status() {
    let state = Arc::new(Mutex::new(Registers {
        holding: (0..10).map(|a| (a, 0)).collect(),
        reads: Vec::new(),
        writes: Vec::new(),
        stall: 0,
    }));
    let address = serve(state).await;
    let mut gw = start_gateway(address).await;
    let status =
        &gw.collect(&["fieldmq/gw/status/devices/inv"]).await["fieldmq/gw/status/devices/inv"];
    assert_eq!(status["status"], "error", "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(error.contains("no SunSpec marker"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_that_runs_past_the_last_register_ends_discovery_with_an_error() {
    let mut map = HashMap::new();
    map.insert(50000, 0x5375);
    map.insert(50001, 0x6E53);
    map.insert(50002, 1);
    map.insert(50003, 65000);
    let state = Arc::new(Mutex::new(Registers {
        holding: map,
        reads: Vec::new(),
        writes: Vec::new(),
        stall: 0,
    }));
    let address = serve(state).await;
    let mut gw = start_gateway(address).await;
    let status =
        &gw.collect(&["fieldmq/gw/status/devices/inv"]).await["fieldmq/gw/status/devices/inv"];
    assert_eq!(status["status"], "error", "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(error.contains("runs past register 65535"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_sunspec_lists_the_models_and_their_scaled_points() {
    let address = serve(inverter()).await;
    let args = ProbeArgs {
        tcp: Some(address.to_string()),
        rtu: None,
        rtu_over_tcp: None,
        baud: 9600,
        parity: "even".into(),
        data_bits: 8,
        stop_bits: 1,
        unit: 1,
        table: "holding".into(),
        address: None,
        count: 4,
        repeat: 1,
        timeout: Duration::from_secs(1),
        sunspec: true,
    };
    let out = probe(&args).await.expect("probe");
    assert!(out.contains("SunSpec marker at holding 40000"), "{out}");
    assert!(out.contains("model 1 common at 40002, length 66"), "{out}");
    assert!(
        out.contains("model 103 inverter, three phase at 40070, length 50"),
        "{out}"
    );
    assert!(
        out.contains("model 64001 not mapped at 40229, length 4"),
        "{out}"
    );
    assert!(out.contains("end marker at 40390"), "{out}");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
            .to_owned()
    };
    assert!(line("inverter_PhVphA").ends_with("230.5 V"), "{out}");
    assert!(
        line("inverter_AphB").ends_with("bad: not implemented by the device"),
        "{out}"
    );
    assert!(line("meter_TotWhImp").ends_with("1234.567 Wh"), "{out}");
    assert!(line("der_ac_MnAlrmInfo").ends_with("GRID FAULT"), "{out}");
    let summary = out.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("requests ")
            && summary.contains(", failed 0 (timeouts 0, CRC errors 0, exceptions none)"),
        "{out}"
    );
}

#[test]
fn a_sunspec_device_needs_no_points_and_may_add_its_own() {
    let text = "[gateway]\nid = \"gw\"\n[broker]\nallow_anonymous = true\n\
        [[devices]]\nname = \"inv\"\ndriver = \"modbus-tcp\"\naddress = \"127.0.0.1:502\"\nprofile = \"sunspec\"\n\
        [[devices]]\nname = \"meter\"\ndriver = \"modbus-tcp\"\naddress = \"127.0.0.1:503\"\nprofile = \"sunspec\"\n\
        points = [ { name = \"export_limit\", table = \"holding\", address = 40500, writable = true } ]\n";
    let config = config::parse(text, Path::new("sunspec.toml")).unwrap_or_else(|e| panic!("{e}"));
    let modbus = |i: usize| match &config.devices[i].driver {
        drivers::config::DriverConfig::Modbus(modbus) => modbus.clone(),
        other => panic!("not modbus: {other:?}"),
    };
    assert!(modbus(0).sunspec && modbus(0).points.is_empty());
    assert!(modbus(1).sunspec);
    assert_eq!(modbus(1).points.len(), 1);

    // A point without table and address sets how a SunSpec point reports; keys that
    // describe registers are refused.
    let device = |points: &str| {
        format!(
            "[gateway]\nid = \"gw\"\n[broker]\nallow_anonymous = true\n\
             [[devices]]\nname = \"inv\"\ndriver = \"modbus-tcp\"\naddress = \"127.0.0.1:502\"\n\
             profile = \"sunspec\"\npoints = [ {points} ]\n"
        )
    };
    let config = config::parse(
        &device(r#"{ name = "inverter_W", deadband = 50.0, max_interval = "1m" }"#),
        Path::new("sunspec.toml"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let drivers::config::DriverConfig::Modbus(modbus) = &config.devices[0].driver else {
        panic!("not modbus");
    };
    assert!(modbus.points.is_empty());
    assert_eq!(modbus.sunspec_settings.len(), 1);
    assert_eq!(
        modbus.sunspec_settings[0].max_interval,
        Some(Duration::from_secs(60))
    );
    let error = config::parse(
        &device(r#"{ name = "inverter_W", type = "f32" }"#),
        Path::new("sunspec.toml"),
    )
    .expect_err("type on a SunSpec point")
    .to_string();
    assert!(
        error.contains("points[0].type") && error.contains("does not apply to a SunSpec point"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sunspec_points_report_by_the_settings_given_for_their_names() {
    let address = serve(inverter()).await;
    let mut gw = start_gateway_with(
        address,
        r#"points = [ { name = "common_SN", report = "change" }, { name = "inverter_PhVphA", unit = "volt" } ]"#,
    )
    .await;
    // Every poll (200 ms) publishes inverter_A; common_SN, on change only, once.
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut units: HashMap<String, Json> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while counts.get("gw/inv/inverter_A").copied().unwrap_or(0) < 5 {
        let message = timeout(deadline - Instant::now(), gw.messages.recv())
            .await
            .expect("five polls within 10s")
            .expect("broker running");
        let json: Json = serde_json::from_slice(&message.payload).unwrap_or_default();
        units.insert(message.topic.to_string(), json["unit"].clone());
        *counts.entry(message.topic.to_string()).or_default() += 1;
    }
    assert_eq!(counts.get("gw/inv/common_SN"), Some(&1), "{counts:?}");
    assert!(
        counts.get("gw/inv/common_Mn").copied().unwrap_or(0) >= 4,
        "{counts:?}"
    );
    assert_eq!(units["gw/inv/inverter_PhVphA"], "volt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_shows_the_sunspec_profile_checks_a_device_and_probes_one() {
    let address = serve(inverter()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fieldmq.toml");
    std::fs::write(
        &config,
        "[gateway]\nid = \"gw\"\n[broker]\nallow_anonymous = true\n\
         [[devices]]\nname = \"inv\"\ndriver = \"modbus-tcp\"\naddress = \"10.0.0.1\"\nprofile = \"sunspec\"\n",
    )
    .unwrap();
    let config = config.into_os_string();
    let probe_address = address.to_string();
    let (list, show, check, probe) = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| {
            let mut full: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
            if args[0] != "probe" {
                full.extend([std::ffi::OsStr::new("-c"), config.as_os_str()]);
            }
            gateway::run_within(&full, &[], Duration::from_secs(20))
        };
        (
            run(&["profiles", "list"]),
            run(&["profiles", "show", "sunspec"]),
            run(&["check"]),
            run(&["probe", "--sunspec", "--tcp", &probe_address]),
        )
    })
    .await
    .unwrap();
    assert_eq!(list.0, Some(0));
    assert!(
        list.1
            .lines()
            .any(|l| l.starts_with("sunspec ") && l.contains("[built in]")),
        "{}",
        list.1
    );
    assert_eq!(show.0, Some(0));
    assert!(
        show.1.contains("model 203 meter, three phase wye"),
        "{}",
        show.1
    );
    assert!(show.1.contains("meter_TotWhImp"), "{}", show.1);
    assert!(show.1.contains("acc32 × 10^TotWh_SF [Wh]"), "{}", show.1);
    assert_eq!(check.0, Some(0), "{}", check.2);
    assert!(
        check.1.contains("SunSpec models found at run time"),
        "{}",
        check.1
    );
    assert_eq!(probe.0, Some(0), "{}", probe.2);
    assert!(
        probe
            .1
            .contains("model 103 inverter, three phase at 40070, length 50"),
        "{}",
        probe.1
    );
}

/// Model 160 with `modules` modules at `at` (and `extra` registers of a partial module):
/// DCA_SF = -2, DCV_SF = -1, DCW_SF = 0, DCWH_SF = 0; module n has DCA = 10.0 × n A,
/// DCV = 400.0 + n V, DCW = 4000 × n W, IDStr "PV<n>". Returns the address after it.
fn mppt(map: &mut HashMap<u16, u16>, at: u16, modules: u16, extra: u16) -> u16 {
    let mut values = vec![(0, 0xFFFE), (1, 0xFFFF), (2, 0), (3, 0), (6, modules)];
    for n in 1..=modules {
        let m = 8 + (n - 1) * 20;
        values.push((m, n)); // ID
        for (i, w) in text(&format!("PV{n}"), 8).into_iter().enumerate() {
            values.push((m + 1 + i as u16, w));
        }
        values.extend([(m + 9, 1000 * n), (m + 10, 4000 + n), (m + 11, 4000 * n)]);
        values.extend([(m + 12, 0), (m + 13, 500 * n)]); // DCWH
        values.push((m + 16, 25)); // Tmp
    }
    model(map, at, 160, 8 + 20 * modules + extra, &values)
}

/// A SunSpec inverter with multiple MPPT: model 1 at 40002, model 103 at 40070 (W = 6000
/// W), model 160 at 40122 with `modules` modules (+ `extra` registers), then the end.
fn mppt_inverter(modules: u16, extra: u16) -> HashMap<u16, u16> {
    let mut map = HashMap::new();
    map.insert(40000, 0x5375);
    map.insert(40001, 0x6E53);
    let next = model(
        &mut map,
        40002,
        1,
        66,
        &text("SMA", 16)
            .into_iter()
            .enumerate()
            .map(|(i, w)| (i as u16, w))
            .collect::<Vec<_>>(),
    );
    let next = model(&mut map, next, 103, 50, &[(12, 6000), (13, 0)]);
    let next = mppt(&mut map, next, modules, extra);
    map.insert(next, 0xFFFF);
    map.insert(next + 1, 0);
    map
}

fn shared(holding: HashMap<u16, u16>) -> Shared {
    Arc::new(Mutex::new(Registers {
        holding,
        reads: Vec::new(),
        writes: Vec::new(),
        stall: 0,
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mppt_modules_are_published_per_module_and_a_partial_module_is_ignored() {
    // Two modules and 7 registers of a third, which is not read.
    let mut holding = mppt_inverter(2, 7);
    holding.insert(40124 + 8 + 20 + 10, 0xFFFF); // module 2 DCV: not implemented
    let state = shared(holding);
    let address = serve(state.clone()).await;
    let mut gw = start_gateway(address).await;
    let topics = [
        "gw/inv/mppt_N",
        "gw/inv/mppt_1_IDStr",
        "gw/inv/mppt_1_DCA",
        "gw/inv/mppt_1_DCV",
        "gw/inv/mppt_1_DCW",
        "gw/inv/mppt_1_DCWH",
        "gw/inv/mppt_2_DCA",
        "gw/inv/mppt_2_DCV",
        "gw/inv/mppt_2_DCW",
        "fieldmq/gw/status/devices/inv",
    ];
    let seen = gw.collect(&topics).await;
    let value = |topic: &str| {
        let reading = &seen[topic];
        assert_eq!(reading["quality"], "good", "{topic}: {reading}");
        reading["value"].clone()
    };
    assert_eq!(value("gw/inv/mppt_N"), 2);
    assert_eq!(value("gw/inv/mppt_1_IDStr"), "PV1");
    assert_eq!(value("gw/inv/mppt_1_DCA"), 10.0);
    assert_eq!(value("gw/inv/mppt_1_DCV"), 400.1);
    assert_eq!(value("gw/inv/mppt_1_DCW"), 4000);
    assert_eq!(value("gw/inv/mppt_1_DCWH"), 500);
    assert_eq!(value("gw/inv/mppt_2_DCA"), 20.0);
    assert_eq!(value("gw/inv/mppt_2_DCW"), 8000);
    assert_eq!(seen["gw/inv/mppt_1_DCV"]["unit"], "V");
    let dcv = &seen["gw/inv/mppt_2_DCV"];
    assert_eq!(dcv["quality"], "bad", "{dcv}");
    assert_eq!(dcv["error"], "not implemented by the device", "{dcv}");
    assert_eq!(seen["fieldmq/gw/status/devices/inv"]["status"], "online");
    assert!(
        !seen.keys().any(|t| t.starts_with("gw/inv/mppt_3_")),
        "{:?}",
        seen.keys()
    );
    // The model block: the fixed block and two modules, not the partial third.
    let reads = state.lock().unwrap().reads.clone();
    assert!(reads.contains(&(40124, 48)), "{reads:?}");
}

/// Waits for a good reading on `topic` that `check` accepts (10 s at most).
async fn wait_for(gw: &mut Gateway, topic: &str, check: impl Fn(&Json) -> bool) -> Json {
    gw.next_matching(topic, |json| {
        json["quality"] == "good" && check(&json["value"])
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_added_while_the_link_was_down_is_found_after_the_reconnect() {
    let state = shared(mppt_inverter(2, 0));
    let address = serve(state.clone()).await;
    let mut gw = start_gateway_with(address, "timeout = \"300ms\"").await;
    wait_for(&mut gw, "gw/inv/mppt_2_DCA", |v| *v == 20.0).await;
    {
        // A third module (the device was updated); the next answer never comes, so the
        // gateway drops the connection and opens a new one.
        let mut s = state.lock().unwrap();
        s.holding = mppt_inverter(3, 0);
        s.stall = 1;
    }
    let dca = wait_for(&mut gw, "gw/inv/mppt_3_DCA", |v| *v == 30.0).await;
    assert_eq!(dca["unit"], "A");
    wait_for(&mut gw, "gw/inv/mppt_3_IDStr", |v| *v == "PV3").await;
    let reads = state.lock().unwrap().reads.clone();
    assert!(reads.contains(&(40124, 68)), "{reads:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_block_refused_with_illegal_data_address_makes_the_chain_read_again() {
    let state = shared(mppt_inverter(2, 0));
    let address = serve(state.clone()).await;
    let mut gw = start_gateway(address).await;
    wait_for(&mut gw, "gw/inv/mppt_2_DCA", |v| *v == 20.0).await;
    {
        // One module left: the old block's registers past the new end are gone, and
        // module 1 reads 12.5 A.
        let mut holding = mppt_inverter(1, 0);
        holding.insert(40124 + 8 + 9, 1250);
        let mut s = state.lock().unwrap();
        s.holding = holding;
        s.reads.clear();
    }
    wait_for(&mut gw, "gw/inv/mppt_1_DCA", |v| *v == 12.5).await;
    let reads = state.lock().unwrap().reads.clone();
    assert!(reads.contains(&(40124, 28)), "{reads:?}");
    // The chain was read again: the header of model 160.
    assert!(reads.contains(&(40122, 2)), "{reads:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistant_discovery_follows_the_points_a_sunspec_device_finds() {
    let state = shared(mppt_inverter(2, 0));
    let address = serve(state.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[gateway]\nid = \"gw\"\ndata_dir = \"{}\"\n[broker]\nallow_anonymous = true\n\
         [homeassistant]\ndiscovery_prefix = \"ha\"\n\
         [[devices]]\nname = \"inv\"\ndriver = \"modbus-tcp\"\naddress = \"{address}\"\n\
         poll = \"200ms\"\ntimeout = \"300ms\"\nprofile = \"sunspec\"\n",
        dir.path().display()
    );
    let config = config::parse(&text, Path::new("sunspec-ha.toml"))
        .unwrap_or_else(|e| panic!("test config is invalid:\n{e}"));
    let shutdown = CancellationToken::new();
    let running = fieldmq::service::start(config, shutdown.clone())
        .await
        .expect("the gateway starts");
    let mut configs = running
        .broker
        .subscribe(
            "test",
            vec![("ha/#".into(), QoS::AtLeastOnce)],
            InternalSubscribeOptions {
                send_retained: true,
                ..InternalSubscribeOptions::default()
            },
        )
        .await
        .unwrap();
    // The config message of `topic` with a payload (10 s at most).
    let mut seen: HashMap<String, Json> = HashMap::new();
    let mut wait_config = async |topic: &str| -> Json {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !seen.contains_key(topic) {
            let message = timeout(deadline - Instant::now(), configs.recv())
                .await
                .unwrap_or_else(|_| panic!("no {topic} within 10s: {:?}", seen.keys()))
                .expect("broker running");
            if let Ok(json) = serde_json::from_slice::<Json>(&message.payload) {
                seen.insert(message.topic.to_string(), json);
            }
        }
        seen[topic].clone()
    };
    let w = wait_config("ha/sensor/gw/inv_inverter_W/config").await;
    assert_eq!(w["state_topic"], "gw/inv/inverter_W", "{w}");
    assert_eq!(w["unit_of_measurement"], "W", "{w}");
    assert_eq!(w["device_class"], "power", "{w}");
    let dca = wait_config("ha/sensor/gw/inv_mppt_2_DCA/config").await;
    assert_eq!(dca["device_class"], "current", "{dca}");

    // A third module after a reconnect: its points are announced too.
    {
        let mut s = state.lock().unwrap();
        s.holding = mppt_inverter(3, 0);
        s.stall = 1;
    }
    let dcv = wait_config("ha/sensor/gw/inv_mppt_3_DCV/config").await;
    assert_eq!(dcv["state_topic"], "gw/inv/mppt_3_DCV", "{dcv}");
    shutdown.cancel();
    running.stop().await;
}

/// An inverter with the immediate controls (model 123) and the DER AC controls (704)
/// after its common model: 40002 model 1 (66), 40070 model 123 (24), 40096 model 704 (65),
/// end at 40163. WMaxLimPct is register 40075 (100.0 % with WMaxLimPct_SF = -1 at 40093),
/// WMaxLim_Ena 40079, OutPFSet 40080 (0.95 with OutPFSet_SF = -3 at 40094), VArWMaxPct
/// 40085 (its VArPct_SF at 40095 is not implemented); 704's WSet (int32) is 40120-40121,
/// with WSet_SF = 1 at 40151.
fn inverter_with_controls() -> Shared {
    let mut map = HashMap::new();
    map.insert(40000, 0x5375);
    map.insert(40001, 0x6E53);
    let common: Vec<(u16, u16)> = text("SMA", 16)
        .into_iter()
        .enumerate()
        .map(|(i, w)| (i as u16, w))
        .collect();
    let next = model(&mut map, 40002, 1, 66, &common);
    let next = model(
        &mut map,
        next,
        123,
        24,
        &[
            (2, 1),       // Conn
            (3, 1000),    // WMaxLimPct = 100.0 %
            (8, 950),     // OutPFSet = 0.950
            (21, 0xFFFF), // WMaxLimPct_SF = -1
            (22, 0xFFFD), // OutPFSet_SF = -3
            (23, 0x8000), // VArPct_SF: not implemented
        ],
    );
    let next = model(&mut map, next, 704, 65, &[(53, 1)]); // WSet_SF = 1
    map.insert(next, 0xFFFF);
    map.insert(next + 1, 0);
    shared(map)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sunspec_controls_made_writable_are_written_through_their_scale_factor() {
    let state = inverter_with_controls();
    let address = serve(state.clone()).await;
    let mut gw = start_gateway_with(
        address,
        "points = [\n\
           { name = \"controls_WMaxLimPct\", writable = true },\n\
           { name = \"controls_WMaxLim_Ena\", writable = true },\n\
           { name = \"controls_VArWMaxPct\", writable = true },\n\
           { name = \"common_Mn\", writable = true },\n\
           { name = \"der_ctl_ac_WSet\", writable = true },\n\
         ]",
    )
    .await;
    // The announced point set says which points take writes (Home Assistant makes them
    // numbers, Sparkplug accepts DCMDs for them).
    let announced = gw.next_on("fieldmq/gw/status/devices/inv/points").await;
    let writable = |name: &str| {
        announced["points"]
            .as_array()
            .and_then(|points| points.iter().find(|p| p["name"] == name))
            .map(|p| p["writable"].clone())
    };
    assert_eq!(
        writable("controls_WMaxLimPct"),
        Some(Json::Bool(true)),
        "{announced}"
    );
    assert_eq!(
        writable("controls_OutPFSet"),
        Some(Json::Bool(false)),
        "{announced}"
    );
    assert_eq!(
        writable("common_Mn"),
        Some(Json::Bool(false)),
        "{announced}"
    );
    // Read once: the scale factors are known.
    wait_for(&mut gw, "gw/inv/controls_WMaxLimPct", |v| *v == 100.0).await;
    wait_for(&mut gw, "gw/inv/controls_OutPFSet", |v| *v == 0.95).await;

    // 55.5 % with WMaxLimPct_SF = -1 is 555 in the register, one FC06, read back.
    gw.publish("gw/inv/controls_WMaxLimPct/set", "55.5").await;
    let result = gw.next_on("gw/inv/controls_WMaxLimPct/set/result").await;
    assert_eq!(result, serde_json::json!({"status": "ok", "value": 55.5}));
    gw.publish("gw/inv/controls_WMaxLim_Ena/set", "1").await;
    let result = gw.next_on("gw/inv/controls_WMaxLim_Ena/set/result").await;
    assert_eq!(result, serde_json::json!({"status": "ok", "value": 1}));
    {
        let device = state.lock().unwrap();
        assert_eq!(device.holding[&40075], 555);
        assert_eq!(device.holding[&40079], 1);
        assert_eq!(
            device.writes,
            vec![(40075, vec![555]), (40079, vec![1])],
            "one single-register write each"
        );
    }

    // Refused before the device: the reserved value, out of range, a scale factor the
    // device does not implement, a point not made writable, a read-only SunSpec point.
    for (point, payload, reason) in [
        (
            "controls_WMaxLimPct",
            "6553.5",
            "reserves for \"not implemented\"",
        ),
        ("controls_WMaxLimPct", "7000", "out of range for u16"),
        ("controls_WMaxLimPct", "-1", "out of range for u16"),
        ("controls_WMaxLimPct", "lots", "expected a number"),
        (
            "controls_VArWMaxPct",
            "10",
            "scale factor of controls_VArWMaxPct has not been read",
        ),
        (
            "controls_OutPFSet",
            "0.9",
            "point controls_OutPFSet is not writable",
        ),
        ("common_Mn", "\"ACME\"", "point common_Mn is not writable"),
    ] {
        gw.publish(&format!("gw/inv/{point}/set"), payload).await;
        let result = gw.next_on(&format!("gw/inv/{point}/set/result")).await;
        assert_eq!(result["status"], "error", "{point} {payload}: {result}");
        let said = result["reason"].as_str().unwrap_or_default();
        assert!(said.contains(reason), "{point} {payload}: {result}");
    }

    // Several controls in one command: checked together, then written in address order.
    gw.publish(
        "gw/inv/set",
        r#"{"controls_WMaxLimPct": 80, "controls_WMaxLim_Ena": 0}"#,
    )
    .await;
    let result = gw.next_on("gw/inv/set/result").await;
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(
        result["points"]["controls_WMaxLimPct"]["value"], 80.0,
        "{result}"
    );
    {
        let device = state.lock().unwrap();
        assert_eq!(device.holding[&40075], 800);
        assert_eq!(device.holding[&40079], 0);
        assert_eq!(device.holding[&40080], 950, "OutPFSet untouched");
        assert_eq!(device.holding[&40085], 0, "VArWMaxPct untouched");
        assert_eq!(
            device.holding[&40004],
            text("SMA", 16)[0],
            "common_Mn untouched"
        );
        assert_eq!(device.writes.len(), 4, "{:?}", device.writes);
    }
    // A 32-bit control is one FC16 of both registers: -2500 W with WSet_SF = 1 is -250.
    wait_for(&mut gw, "gw/inv/der_ctl_ac_WSet", |v| *v == 0.0).await;
    gw.publish("gw/inv/der_ctl_ac_WSet/set", "-2500").await;
    let result = gw.next_on("gw/inv/der_ctl_ac_WSet/set/result").await;
    assert_eq!(
        result,
        serde_json::json!({"status": "ok", "value": -2500.0})
    );
    // i32::MIN × 10 would be 0x8000 0x0000, "not implemented" for an int32.
    gw.publish("gw/inv/der_ctl_ac_WSet/set", "-21474836480")
        .await;
    let result = gw.next_on("gw/inv/der_ctl_ac_WSet/set/result").await;
    assert_eq!(result["status"], "error", "{result}");
    assert!(
        result["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("0x8000 0x0000"),
        "{result}"
    );
    {
        let device = state.lock().unwrap();
        assert_eq!(
            device.writes.last(),
            Some(&(40120, vec![0xFFFF, 0xFF06])),
            "{:?}",
            device.writes
        );
        assert_eq!(device.writes.len(), 5, "{:?}", device.writes);
    }
    // The next poll publishes what the device now holds.
    wait_for(&mut gw, "gw/inv/controls_WMaxLimPct", |v| *v == 80.0).await;
}
