//! The status of a running gateway (the real binary): `fieldmq status` through the control
//! socket, the JSON API and the status page over HTTP, the page in headless Chromium.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use scraper::{Html, Selector};
use serde_json::Value as Json;

use crate::util::cloud::{mosquitto_available, Cloud, CloudOptions};
use crate::util::gateway::{run_within, GatewayProcess};
use crate::util::http::{self, http_addr};
use crate::util::modbus::{BackgroundDevice, RegisterDevice};
use crate::util::skip::skip;

/// How long a test waits for the status to show what it expects.
const SETTLE: Duration = Duration::from_secs(20);

/// A gateway with a simulated device `sim` of three points (with units), optionally an
/// uplink to `cloud` and an HTTP listener on a free loopback port.
fn write_config(dir: &Path, cloud: Option<&Cloud>, http: bool) -> PathBuf {
    let uplink = cloud.map_or(String::new(), |cloud| {
        format!(
            r#"
[[uplinks]]
name = "cloud"
url = "mqtt://127.0.0.1:{}"
routes = [{{ out = "{{gateway}}/#", qos = 1 }}]
"#,
            cloud.port
        )
    });
    let http = if http {
        "[http]\nbind = \"127.0.0.1:0\"\n"
    } else {
        ""
    };
    let config = format!(
        r#"
[gateway]
id = "status-test"
data_dir = "{data}"

[broker]
allow_anonymous = true

[[broker.listeners]]
bind = "127.0.0.1:0"

{http}
[[devices]]
name = "sim"
driver = "simulated"
topic = "{{gateway}}/sim/{{point}}"
poll = "100ms"
points = [
  {{ name = "temperature", waveform = "sine", min = 18.0, max = 24.0, period = "60s", unit = "°C" }},
  {{ name = "level", waveform = "ramp", min = 0.0, max = 100.0, period = "30s", unit = "%" }},
  {{ name = "setpoint", waveform = "constant", value = 21.5, writable = true, unit = "°C" }},
]
{uplink}
"#,
        data = dir.join("data").display(),
    );
    let path = dir.join("fieldmq.toml");
    std::fs::write(&path, config).expect("write config");
    path
}

/// `fieldmq status --json -c config`, parsed.
fn status_json(config: &Path) -> Json {
    let (code, stdout, stderr) = run_within(
        &[
            "status".as_ref(),
            "--json".as_ref(),
            "-c".as_ref(),
            config.as_os_str(),
        ],
        &[],
        Duration::from_secs(15),
    );
    assert_eq!(code, Some(0), "fieldmq status --json failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Ask `fetch` until `ready` holds for its answer (bounded by [`SETTLE`]).
fn wait_for(what: &str, mut fetch: impl FnMut() -> Json, ready: impl Fn(&Json) -> bool) -> Json {
    let deadline = Instant::now() + SETTLE;
    loop {
        let status = fetch();
        if ready(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not shown within {SETTLE:?}; last status:\n{status:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn device<'a>(status: &'a Json, name: &str) -> Option<&'a Json> {
    status["devices"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == name)
}

fn point<'a>(device: &'a Json, name: &str) -> Option<&'a Json> {
    device["points"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
}

/// Every point of `sim` has a good reading.
fn points_read(status: &Json) -> bool {
    device(status, "sim").is_some_and(|d| {
        ["temperature", "level", "setpoint"]
            .iter()
            .all(|p| point(d, p).is_some_and(|p| p["quality"] == "good" && p["value"].is_number()))
    })
}

#[test]
fn status_json_from_a_running_gateway_shows_the_device_points_and_uplink_state() {
    if !mosquitto_available(
        "status_json_from_a_running_gateway_shows_the_device_points_and_uplink_state",
    ) {
        return;
    }
    let cloud = Cloud::start(CloudOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), Some(&cloud), true);
    let gateway = GatewayProcess::start(&config);
    let status = wait_for(
        "the device's readings and the connected uplink",
        || status_json(&config),
        |s| points_read(s) && s["uplinks"][0]["state"] == "connected",
    );
    let sim = device(&status, "sim").expect("device sim");
    assert_eq!(sim["driver"], "simulated");
    assert_eq!(sim["state"], "online");
    let setpoint = point(sim, "setpoint").expect("point setpoint");
    assert_eq!(setpoint["value"], 21.5);
    assert_eq!(setpoint["unit"], "°C");
    assert!(setpoint["timestamp"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert_eq!(point(sim, "level").expect("level")["unit"], "%");
    let uplink = &status["uplinks"][0];
    assert_eq!(uplink["name"], "cloud");
    assert!(uplink["backlog_messages"].is_u64(), "{uplink}");
    assert_eq!(status["gateway"]["id"], "status-test");
    assert_eq!(
        status["gateway"]["config_file"],
        config.display().to_string()
    );

    // The JSON API says the same as `fieldmq status --json`.
    let http = http_addr(&gateway);
    let (code, content_type, body) = http_get(http, "/api/v1/status");
    assert_eq!(code, 200, "{body}");
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let api: Json = serde_json::from_str(&body).expect("JSON from /api/v1/status");
    let api_sim = device(&api, "sim").expect("device sim in the API");
    assert_eq!(api_sim["state"], "online");
    assert_eq!(point(api_sim, "setpoint").expect("setpoint")["value"], 21.5);
    assert_eq!(
        point(api_sim, "temperature").expect("temperature")["quality"],
        "good"
    );
    assert_eq!(api["uplinks"][0]["state"], "connected");
    assert_eq!(api["gateway"], {
        let mut gateway = status["gateway"].clone();
        gateway["uptime_s"] = api["gateway"]["uptime_s"].clone();
        gateway
    });
    let (code, _, devices) = http_get(http, "/api/v1/devices");
    assert_eq!(code, 200);
    let devices: Json = serde_json::from_str(&devices).expect("JSON devices");
    assert_eq!(devices[0]["name"], "sim");
    assert_eq!(devices[0]["points"].as_array().map(Vec::len), Some(3));
    let (code, _, uplinks) = http_get(http, "/api/v1/uplinks");
    assert_eq!(code, 200);
    let uplinks: Json = serde_json::from_str(&uplinks).expect("JSON uplinks");
    assert_eq!(
        (&uplinks[0]["name"], &uplinks[0]["state"]),
        (&"cloud".into(), &"connected".into())
    );
    let (code, _, clients) = http_get(http, "/api/v1/clients");
    assert_eq!((code, clients.as_str()), (200, "[]"));
}

#[test]
fn status_for_a_person_names_the_device_and_the_clients_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), None, false);
    let gateway = GatewayProcess::start(&config);
    wait_for(
        "the device's readings",
        || status_json(&config),
        points_read,
    );
    // A LAN client is listed while it is connected.
    let client = TcpStream::connect(gateway.addr).expect("connect");
    mqtt_connect(&client, "status-client-ä");
    let status = wait_for(
        "the LAN client",
        || status_json(&config),
        |s| s["clients"].as_array().is_some_and(|c| c.len() == 1),
    );
    let listed = &status["clients"][0];
    assert_eq!(listed["client_id"], "status-client-ä");
    assert_eq!(listed["protocol"], "3.1.1");
    assert_eq!(listed["listener"], gateway.addr.to_string());
    assert_eq!(
        listed["remote_address"],
        client.local_addr().expect("local address").to_string()
    );

    let (code, stdout, stderr) = run_within(
        &["status".as_ref(), "-c".as_ref(), config.as_os_str()],
        &[],
        Duration::from_secs(15),
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with("gateway status-test"), "{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("sim "))
        .unwrap_or_else(|| panic!("no row for the device sim:\n{stdout}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[..4], ["sim", "simulated", "online", "3"], "{stdout}");
    assert!(stdout.contains("clients: 1 connected"), "{stdout}");

    drop(client);
    wait_for(
        "the client's disconnect",
        || status_json(&config),
        |s| s["clients"].as_array().is_some_and(Vec::is_empty),
    );
}

#[test]
fn status_without_a_running_gateway_says_so_and_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), None, false);
    let (code, stdout, stderr) = run_within(
        &["status".as_ref(), "-c".as_ref(), config.as_os_str()],
        &[],
        Duration::from_secs(15),
    );
    assert_ne!(code, Some(0));
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("no gateway is running"), "{stderr}");
    assert!(
        stderr.contains(&dir.path().join("data").display().to_string()),
        "{stderr}"
    );
}

/// Send an MQTT 3.1.1 CONNECT as raw bytes and read the CONNACK.
fn mqtt_connect(stream: &std::net::TcpStream, client_id: &str) {
    use std::io::{Read, Write};
    let id = client_id.as_bytes();
    let mut variable = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    variable.extend_from_slice(&(id.len() as u16).to_be_bytes());
    variable.extend_from_slice(id);
    let mut packet = vec![0x10, variable.len() as u8];
    packet.extend_from_slice(&variable);
    let mut stream = stream;
    stream.write_all(&packet).expect("send CONNECT");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).expect("CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
}

/// A GET over a fresh connection: (status code, content type, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let answer = http::get(addr, path, &[]);
    let content_type = answer.header("content-type").unwrap_or_default().to_owned();
    (answer.status, content_type, answer.body)
}

/// `chromium` or `chromium-browser` on PATH; `None` means skip (a failure under CI).
fn chromium(test: &str) -> Option<PathBuf> {
    let on_path = |name: &str| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        })
    };
    let found = on_path("chromium").or_else(|| on_path("chromium-browser"));
    if found.is_none() {
        skip(
            test,
            "neither chromium nor chromium-browser is on PATH (`apt-get install -y chromium`)",
        );
    }
    found
}

/// The page at `url` as headless Chromium builds its DOM (scripts, if any, have run),
/// within 60 s.
fn dump_dom(chromium: &Path, url: &str) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut dom = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut dom);
        dom
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait for chromium").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().expect("chromium output")
}

fn selector(css: &str) -> Selector {
    Selector::parse(css).unwrap_or_else(|e| panic!("selector {css}: {e:?}"))
}

fn text_of(element: scraper::ElementRef<'_>, css: &str) -> String {
    element
        .select(&selector(css))
        .next()
        .map(|e| e.text().collect::<String>().trim().to_owned())
        .unwrap_or_else(|| panic!("no {css} in {}", element.html()))
}

/// A LAN client's id is outside input: HTML that would run a script, and non-ASCII.
const HOSTILE_CLIENT_ID: &str =
    "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">温度-ä";

#[test]
fn the_status_page_in_chromium_shows_the_device_points_and_an_escaped_client() {
    let test = "the_status_page_in_chromium_shows_the_device_points_and_an_escaped_client";
    let Some(chromium) = chromium(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), None, true);
    let gateway = GatewayProcess::start(&config);
    let http = http_addr(&gateway);
    wait_for(
        "the device's readings",
        || status_json(&config),
        points_read,
    );
    let client = TcpStream::connect(gateway.addr).expect("connect");
    mqtt_connect(&client, HOSTILE_CLIENT_ID);
    wait_for(
        "the LAN client",
        || status_json(&config),
        |s| s["clients"].as_array().is_some_and(|c| c.len() == 1),
    );

    let dom = dump_dom(&chromium, &format!("http://{http}/"));
    let page = Html::parse_document(&dom);
    let title = page
        .select(&selector("title"))
        .next()
        .map(|t| t.text().collect::<String>())
        .unwrap_or_default();
    assert_eq!(
        title, "fieldmq status-test",
        "the title (a script would change it)"
    );
    assert_eq!(
        page.select(&selector("script")).count(),
        0,
        "a script element:\n{dom}"
    );
    assert_eq!(
        page.select(&selector("img")).count(),
        0,
        "an img element:\n{dom}"
    );
    let refresh = page
        .select(&selector("meta[http-equiv=refresh]"))
        .next()
        .expect("a refresh meta element");
    assert!(refresh
        .value()
        .attr("content")
        .is_some_and(|c| c.parse::<u32>().is_ok()));

    let device = page
        .select(&selector("#devices article.device[data-device=sim]"))
        .next()
        .unwrap_or_else(|| panic!("no device sim on the page:\n{dom}"));
    assert_eq!(text_of(device, ".device-name"), "sim");
    assert_eq!(text_of(device, ".device-state"), "online");
    let points: Vec<_> = device.select(&selector("tr.point")).collect();
    assert_eq!(points.len(), 3, "{}", device.html());
    for name in ["temperature", "level", "setpoint"] {
        let row = points
            .iter()
            .find(|p| p.value().attr("data-point") == Some(name))
            .unwrap_or_else(|| panic!("no point {name} on the page"));
        assert_eq!(row.value().attr("data-quality"), Some("good"), "{name}");
        assert_eq!(text_of(*row, ".point-quality"), "good", "{name}");
        let value = text_of(*row, ".point-value");
        assert!(value.parse::<f64>().is_ok(), "{name}: value {value:?}");
        assert!(!text_of(*row, ".point-time").is_empty(), "{name}: no time");
    }
    let setpoint = points
        .iter()
        .find(|p| p.value().attr("data-point") == Some("setpoint"))
        .expect("setpoint");
    assert_eq!(text_of(*setpoint, ".point-value"), "21.5");
    assert_eq!(text_of(*setpoint, ".point-unit"), "°C");

    let clients = page
        .select(&selector("#clients"))
        .next()
        .expect("the clients section");
    assert_eq!(text_of(clients, "#clients-count"), "1");
    assert_eq!(text_of(clients, "tr.client .client-id"), HOSTILE_CLIENT_ID);
    assert!(page.select(&selector("#uplinks")).next().is_some());
    assert!(page.select(&selector("#errors")).next().is_some());
    drop(client);
}

#[test]
fn many_concurrent_api_requests_do_not_stall_device_publishing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), None, true);
    let gateway = GatewayProcess::start(&config);
    let http = http_addr(&gateway);
    // A subscriber times every reading (3 points every 100 ms).
    let subscriber = TcpStream::connect(gateway.addr).expect("connect");
    mqtt_connect(&subscriber, "reading-timer");
    mqtt_subscribe(&subscriber, "status-test/sim/#");
    let window = Duration::from_secs(4);
    let timer = std::thread::spawn(move || reading_times(&subscriber, window));
    let stop_at = Instant::now() + window;
    let requesters: Vec<_> = (0..8)
        .map(|n| {
            std::thread::spawn(move || {
                let mut answered = 0u32;
                let path = if n % 2 == 0 { "/api/v1/status" } else { "/" };
                while Instant::now() < stop_at {
                    let (code, _, _) = http_get(http, path);
                    assert_eq!(code, 200, "{path}");
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    let answered: u32 = requesters
        .into_iter()
        .map(|r| r.join().expect("requester"))
        .sum();
    let times = timer.join().expect("reading timer");
    assert!(
        answered >= 40,
        "only {answered} requests answered in {window:?}"
    );
    // 3 readings every 100 ms: about 120 in the window; a stall shows as a long gap.
    assert!(
        times.len() >= 60,
        "only {} readings in {window:?} while {answered} requests were answered",
        times.len()
    );
    let longest_gap = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(
        longest_gap < Duration::from_millis(1000),
        "readings stalled for {longest_gap:?} while {answered} requests were answered"
    );
}

/// SUBSCRIBE to `filter` at QoS 0 as raw bytes and read the SUBACK.
fn mqtt_subscribe(stream: &TcpStream, filter: &str) {
    use std::io::{Read, Write};
    let filter = filter.as_bytes();
    let mut body = vec![0, 1];
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter);
    body.push(0);
    let mut packet = vec![0x82, body.len() as u8];
    packet.extend_from_slice(&body);
    let mut stream = stream;
    stream.write_all(&packet).expect("send SUBSCRIBE");
    let mut suback = [0u8; 5];
    stream.read_exact(&mut suback).expect("SUBACK");
    assert_eq!(suback, [0x90, 3, 0, 1, 0], "SUBACK granted QoS 0");
}

/// When each PUBLISH arrived during `window`.
fn reading_times(stream: &TcpStream, window: Duration) -> Vec<Instant> {
    use std::io::Read;
    let mut stream = stream;
    let end = Instant::now() + window;
    let mut times = Vec::new();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    while Instant::now() < end {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => panic!("subscriber read: {e}"),
        }
        // Take every complete packet in the buffer.
        while let Some((length, header)) = remaining_length(&buffer) {
            if buffer.len() < header + length {
                break;
            }
            if buffer[0] >> 4 == 3 {
                times.push(Instant::now());
            }
            buffer.drain(..header + length);
        }
    }
    times
}

/// An MQTT packet's remaining length and the size of its fixed header, once both are in.
fn remaining_length(buffer: &[u8]) -> Option<(usize, usize)> {
    let mut length = 0usize;
    for (i, byte) in buffer.iter().enumerate().skip(1).take(4) {
        length |= usize::from(byte & 0x7f) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            return Some((length, i + 1));
        }
    }
    None
}

/// Two Modbus TCP devices behind one address (unit ids 1 and 2 of one test device, one
/// shared connection): `meter-a` also reads a range the device refuses. Backed off after
/// three failures, for 2 s at first.
fn start_modbus_gateway(dir: &Path, device: &RegisterDevice) -> (BackgroundDevice, PathBuf) {
    let background = BackgroundDevice::start(device.clone());
    let addr = background.addr;
    let config = format!(
        r#"
[gateway]
id = "diag-test"
data_dir = "{data}"

[broker]
allow_anonymous = true

[[broker.listeners]]
bind = "127.0.0.1:0"

[http]
bind = "127.0.0.1:0"

[[devices]]
name = "meter-a"
driver = "modbus-tcp"
address = "{addr}"
unit = 1
poll = "100ms"
timeout = "200ms"
backoff_min = "2s"
backoff_max = "4s"
points = [
  {{ name = "ok", table = "holding", address = 0 }},
  {{ name = "missing", table = "holding", address = 100 }},
]

[[devices]]
name = "meter-b"
driver = "modbus-tcp"
address = "{addr}"
unit = 2
poll = "100ms"
timeout = "200ms"
backoff_min = "2s"
backoff_max = "4s"
points = [ {{ name = "ok", table = "holding", address = 0 }} ]
"#,
        data = dir.join("data").display(),
    );
    let path = dir.join("fieldmq.toml");
    std::fs::write(&path, config).expect("write config");
    (background, path)
}

fn diagnostics<'a>(status: &'a Json, device_name: &str) -> &'a Json {
    device(status, device_name).map_or(&Json::Null, |d| &d["diagnostics"])
}

fn count(value: &Json) -> u64 {
    value.as_u64().unwrap_or(0)
}

/// `meter-a` has had an exception answer and both units good answers on the shared link.
fn exceptions_and_answers_shown(status: &Json) -> bool {
    let a = diagnostics(status, "meter-a");
    let b = diagnostics(status, "meter-b");
    count(&a["exceptions"]["2"]) >= 1
        && count(&a["requests_ok"]) >= 1
        && count(&b["requests_ok"]) >= 1
        && status["buses"][0]["utilisation"]
            .as_f64()
            .is_some_and(|u| u > 0.0)
}

#[test]
fn the_status_shows_exceptions_timeouts_backoff_latency_and_a_shared_tcp_link() {
    let dir = tempfile::tempdir().expect("tempdir");
    let meter = RegisterDevice::with(&[(0, 7), (100, 1)]);
    meter.set(|r| r.refuse_from = Some(100));
    let (background, config) = start_modbus_gateway(dir.path(), &meter);
    let gateway = GatewayProcess::start(&config);
    let http = http_addr(&gateway);
    let api = || {
        let (code, _, body) = http_get(http, "/api/v1/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<Json>(&body).expect("JSON from /api/v1/status")
    };

    // The refused range: counted by exception code; the good reads have answer times.
    let status = wait_for(
        "an exception and answers on the shared link",
        api,
        exceptions_and_answers_shown,
    );
    let a = diagnostics(&status, "meter-a");
    assert_eq!(count(&a["timeouts"]), 0, "{a:#}");
    assert_eq!(count(&a["crc_errors"]), 0, "{a:#}");
    assert!(
        count(&a["requests_failed"]) >= count(&a["exceptions"]["2"]),
        "{a:#}"
    );
    assert_eq!(a["backoff"], Json::Null, "an exception is an answer: {a:#}");
    assert_eq!(a["consecutive_failures"], 0, "{a:#}");
    let latency = &a["latency"];
    let ms = |key: &str| latency[key].as_f64().unwrap_or(-1.0);
    assert!(count(&latency["samples"]) >= 1, "{a:#}");
    assert!(
        0.0 < ms("min_ms") && ms("min_ms") <= ms("p50_ms") && ms("p50_ms") <= ms("max_ms"),
        "{latency}"
    );
    assert!(
        ms("max_ms") < 200.0,
        "an answer slower than the timeout: {latency}"
    );
    assert!(
        ms("min_ms") <= ms("mean_ms") && ms("mean_ms") <= ms("max_ms"),
        "{latency}"
    );
    // Every device here is Modbus: each has its own diagnostics.
    assert_eq!(
        diagnostics(&status, "meter-b")["exceptions"],
        serde_json::json!({}),
        "{status:#}"
    );

    // One link for both unit ids, busy some of the time.
    let buses = status["buses"].as_array().expect("buses");
    assert_eq!(buses.len(), 1, "{status:#}");
    let bus = &buses[0];
    assert_eq!(bus["name"], background.addr.to_string());
    assert_eq!(bus["transport"], "tcp");
    assert_eq!(
        bus["devices"],
        serde_json::json!([{ "name": "meter-a", "unit": 1 }, { "name": "meter-b", "unit": 2 }])
    );
    let utilisation = bus["utilisation"].as_f64().expect("utilisation");
    assert!(0.0 < utilisation && utilisation < 1.0, "{bus}");
    assert_eq!(bus["utilisation_window_s"], 60);
    let answered =
        count(&a["requests_ok"]) + count(&diagnostics(&status, "meter-b")["requests_ok"]);
    assert!(count(&bus["requests"]) >= answered, "{status:#}");
    assert!(count(&bus["errors"]) >= 1, "the exception answers: {bus}");

    // The device goes mute: timeouts, then three in a row back each unit off.
    meter.set(|r| r.mute = true);
    let status = wait_for("timeouts and the backoff", api, |s| {
        let a = diagnostics(s, "meter-a");
        count(&a["timeouts"]) >= 3
            && count(&a["consecutive_failures"]) >= 3
            && a["backoff"]["remaining_s"]
                .as_f64()
                .is_some_and(|r| r > 0.0)
    });
    let a = diagnostics(&status, "meter-a");
    let backoff = &a["backoff"];
    assert!(
        backoff["remaining_s"].as_f64().is_some_and(|r| r <= 5.0),
        "backoff_max is 4 s (plus a quarter of jitter): {backoff}"
    );
    assert!(
        backoff["until"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{backoff}"
    );
    assert!(
        count(&a["requests_failed"]) >= count(&a["timeouts"]),
        "{a:#}"
    );
    assert_eq!(
        device(&status, "meter-a").expect("meter-a")["state"],
        "offline"
    );

    // `fieldmq status` shows the same for a person.
    let (code, text, stderr) = run_within(
        &["status".as_ref(), "-c".as_ref(), config.as_os_str()],
        &[],
        Duration::from_secs(15),
    );
    assert_eq!(code, Some(0), "{stderr}");
    let requests_row: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("meter-a "))
        .nth(1)
        .unwrap_or_else(|| panic!("no requests row for meter-a:\n{text}"))
        .split_whitespace()
        .collect();
    // DEVICE OK FAILED TIMEOUTS CRC EXCEPTIONS ...: the timeouts and the exception code.
    assert!(
        requests_row[3].parse::<u64>().is_ok_and(|t| t >= 3),
        "{text}"
    );
    assert_eq!(requests_row[4], "0", "{text}");
    assert!(requests_row[5].starts_with("2:"), "{text}");
    assert!(text.contains("in a row, backed off"), "{text}");
    let link_row = text
        .lines()
        .find(|l| l.starts_with(&background.addr.to_string()))
        .unwrap_or_else(|| panic!("no row for the link:\n{text}"));
    assert!(link_row.ends_with("meter-a@1 meter-b@2"), "{text}");

    // It answers again: the backoff ends, the failures in a row are 0 again.
    let before = count(&a["requests_ok"]);
    meter.set(|r| r.mute = false);
    wait_for("both units' recovery", api, |s| {
        let a = diagnostics(s, "meter-a");
        let b = diagnostics(s, "meter-b");
        a["backoff"].is_null()
            && a["consecutive_failures"] == 0
            && count(&a["requests_ok"]) > before
            && b["backoff"].is_null()
            && b["consecutive_failures"] == 0
            && device(s, "meter-b").is_some_and(|d| d["state"] == "online")
    });
}

#[test]
fn the_status_page_in_chromium_shows_the_modbus_diagnostics_and_the_link() {
    let test = "the_status_page_in_chromium_shows_the_modbus_diagnostics_and_the_link";
    let Some(chromium) = chromium(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let meter = RegisterDevice::with(&[(0, 7)]);
    meter.set(|r| r.refuse_from = Some(100));
    let (background, config) = start_modbus_gateway(dir.path(), &meter);
    let gateway = GatewayProcess::start(&config);
    let http = http_addr(&gateway);
    let status = wait_for(
        "an exception and answers on the shared link",
        || {
            let (_, _, body) = http_get(http, "/api/v1/status");
            serde_json::from_str(&body).unwrap_or(Json::Null)
        },
        exceptions_and_answers_shown,
    );
    assert!(status["buses"][0]["utilisation"].as_f64().is_some());

    let dom = dump_dom(&chromium, &format!("http://{http}/"));
    let page = Html::parse_document(&dom);
    let meter = page
        .select(&selector("#devices article.device[data-device=meter-a]"))
        .next()
        .unwrap_or_else(|| panic!("no device meter-a on the page:\n{dom}"));
    let ok: u64 = text_of(meter, ".diag-ok")
        .parse()
        .expect("a count of answers");
    assert!(ok >= 1, "{}", meter.html());
    let exceptions = text_of(meter, ".diag-exceptions");
    assert!(exceptions.starts_with("2: "), "{exceptions}");
    assert_eq!(text_of(meter, ".diag-timeouts"), "0");
    assert_eq!(text_of(meter, ".diag-crc"), "0");
    let latency = text_of(meter, ".diag-latency");
    assert!(
        latency.starts_with("last ")
            && latency.contains(" ms, median ")
            && latency.ends_with(" answers)"),
        "{latency}"
    );

    let link = page
        .select(&selector("#buses tr.bus"))
        .next()
        .unwrap_or_else(|| panic!("no Modbus link on the page:\n{dom}"));
    assert_eq!(link.value().attr("data-transport"), Some("tcp"));
    assert_eq!(text_of(link, ".bus-name"), background.addr.to_string());
    assert_eq!(
        text_of(link, ".bus-devices"),
        "meter-a (unit 1), meter-b (unit 2)"
    );
    let busy = text_of(link, ".bus-utilisation");
    let percent: f64 = busy
        .strip_suffix(" %")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("utilisation {busy:?}"));
    assert!((0.0..=100.0).contains(&percent), "{busy}");
    let requests: u64 = text_of(link, ".bus-requests").parse().expect("requests");
    assert!(requests >= ok, "{}", link.html());
}
