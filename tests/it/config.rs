//! The configuration file: every shipped example is valid, and every kind of mistake is
//! reported with its line and key path, all at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fieldmq::config::ConfigError;
use fieldmq::drivers::config::{DriverConfig, PayloadFormat};
use fieldmq::drivers::simulated::config::Waveform;
use fieldmq::model::{QoS, Value};
use fieldmq::service::config;
use fieldmq::uplink::config::{MqttVersion, SecretSource, UrlScheme, WhenFull};

use crate::util::pki;

/// A valid start for bad configs: lines 1 to 4.
const HEAD: &str = "[gateway]\nid = \"gw\"\n[broker]\nallow_anonymous = true\n";

/// A valid uplink to append (3 lines).
const UPLINK: &str = "[[uplinks]]\nname = \"cloud\"\nurl = \"mqtts://broker.example.com:8883\"\n";

fn parse_in(dir: &Path, text: &str) -> Result<config::Config, ConfigError> {
    config::parse(text, &dir.join("bad.toml"))
}

fn errors(text: &str) -> ConfigError {
    let dir = tempfile::tempdir().expect("tempdir");
    match parse_in(dir.path(), text) {
        Ok(config) => panic!("expected errors, got a valid config: {config:?}\n{text}"),
        Err(error) => error,
    }
}

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

fn toml_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("config/ is readable") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            toml_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "toml") {
            found.push(path);
        }
    }
}

#[test]
fn every_example_config_is_valid() {
    let mut files = Vec::new();
    toml_files(&config_dir(), &mut files);
    assert!(
        files.len() >= 2,
        "expected example configs, found {files:?}"
    );
    for file in files {
        if let Err(error) = config::load(&file) {
            panic!("{} is invalid:\n{error}", file.display());
        }
    }
}

#[test]
fn the_embedded_demo_runs_without_a_cloud() {
    let demo = config::demo();
    assert_eq!(demo.gateway.id, "demo");
    assert!(demo.gateway.data_dir.ends_with("fieldmq-data"));
    assert!(demo.gateway.data_dir.is_absolute());
    assert!(demo.uplinks.is_empty());
    assert!(demo.broker.allow_anonymous);
    assert_eq!(demo.broker.listeners.len(), 1);
    assert_eq!(demo.broker.listeners[0].bind.to_string(), "127.0.0.1:1883");
    assert_eq!(demo.devices.len(), 1);
    let device = &demo.devices[0];
    assert_eq!(device.name, "sim");
    assert_eq!(device.topic, "{gateway}/{device}/{point}");
    let DriverConfig::Simulated(sim) = &device.driver else {
        panic!("expected a simulated device, got {:?}", device.driver);
    };
    let kinds: Vec<&str> = sim
        .points
        .iter()
        .map(|p| match p.waveform {
            Waveform::Sine { .. } => "sine",
            Waveform::Ramp { .. } => "ramp",
            Waveform::RandomWalk { .. } => "random_walk",
            Waveform::Constant { .. } => "constant",
        })
        .collect();
    assert_eq!(kinds, ["sine", "ramp", "random_walk", "constant"]);
    let setpoint = &sim.points[3];
    assert!(setpoint.writable);
    assert_eq!(
        setpoint.waveform,
        Waveform::Constant {
            value: Value::Float(21.5)
        }
    );
    assert_eq!(sim.points[0].unit.as_deref(), Some("°C"));

    let summary = demo.summary();
    assert!(summary.contains("\"demo\""), "{summary}");
    assert!(summary.contains("127.0.0.1:1883"), "{summary}");
    assert!(summary.contains("sim: simulated, 4 point(s)"), "{summary}");
    assert!(summary.contains("uplinks: 0"), "{summary}");
}

#[test]
fn a_minimal_config_gets_every_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = parse_in(dir.path(), HEAD).expect("valid");
    assert_eq!(config.gateway.data_dir, Path::new("/var/lib/fieldmq"));
    assert_eq!(config.gateway.log_level, "info");
    assert_eq!(config.gateway.status_topic, "fieldmq/gw/status");
    assert_eq!(config.gateway.shutdown_timeout, Duration::from_secs(10));
    assert_eq!(config.gateway.worker_threads, None);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(
        config.gateway.runtime_threads(),
        cores.saturating_sub(1).max(1)
    );
    assert_eq!(config.broker.listeners.len(), 1);
    assert_eq!(
        config.broker.listeners[0].bind.to_string(),
        "127.0.0.1:1883"
    );
    assert!(!config.broker.listeners[0].websocket);
    assert_eq!(config.broker.listeners[0].max_connections, 1000);
    assert_eq!(config.broker.listeners[0].max_handshakes, 256);
    assert_eq!(config.broker.listeners[0].max_connections_per_address, 64);
    assert_eq!(
        config.broker.listeners[0].connect_timeout,
        Duration::from_secs(5)
    );
    assert_eq!(config.broker.max_packet_size, 1024 * 1024);
    assert_eq!(config.broker.max_queued_messages, 1000);
    assert_eq!(config.broker.max_inflight, 20);

    let text = format!(
        "{HEAD}[[devices]]\nname = \"d\"\ndriver = \"simulated\"\npoints = [{{ name = \"p\", waveform = \"random_walk\", min = 0, max = 10 }}]\n{UPLINK}"
    );
    let config = parse_in(dir.path(), &text).expect("valid");
    let device = &config.devices[0];
    assert_eq!(device.poll, Duration::from_secs(1));
    assert_eq!(device.payload, PayloadFormat::Json);
    let DriverConfig::Simulated(sim) = &device.driver else {
        panic!("expected a simulated device, got {:?}", device.driver);
    };
    assert_eq!(
        sim.points[0].waveform,
        Waveform::RandomWalk {
            min: 0.0,
            max: 10.0,
            step: 0.1
        }
    );
    let uplink = &config.uplinks[0];
    assert_eq!(uplink.protocol, MqttVersion::V5);
    assert_eq!(uplink.client_id, "gw");
    assert_eq!(uplink.keep_alive, Duration::from_secs(30));
    assert_eq!(uplink.session_expiry, Duration::from_secs(3600));
    assert!(!uplink.clean_start);
    assert_eq!(uplink.inflight, 100);
    assert_eq!(uplink.max_rate, None);
    assert_eq!(uplink.queue.max_messages, 1_000_000);
    assert_eq!(uplink.queue.max_bytes, 256 * 1024 * 1024);
    assert_eq!(uplink.queue.max_age, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(uplink.queue.when_full, WhenFull::DropOldest);
    assert_eq!(
        (uplink.reconnect_min, uplink.reconnect_max),
        (Duration::from_secs(1), Duration::from_secs(60))
    );
    assert!(uplink.will.is_none() && uplink.birth.is_none());
    let tls = uplink.tls.as_ref().expect("mqtts has TLS");
    assert!(tls.ca.is_none() && tls.cert.is_none() && tls.alpn.is_empty());
    assert_eq!(uplink.url.port, 8883);
}

#[test]
fn configured_runtime_threads_override_the_core_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = HEAD.replace("id = \"gw\"\n", "id = \"gw\"\nworker_threads = 3\n");
    let config = parse_in(dir.path(), &text).expect("valid");
    assert_eq!(config.gateway.worker_threads, Some(3));
    assert_eq!(config.gateway.runtime_threads(), 3);
    assert!(
        config.summary().contains(", 3 runtime thread(s)\n"),
        "{}",
        config.summary()
    );
}

#[test]
fn gateway_id_is_substituted_in_uplink_topics_but_not_in_device_topics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        r#"{HEAD}[[devices]]
name = "d"
driver = "simulated"
points = [{{ name = "p", waveform = "constant", value = true }}]
{UPLINK}will = {{ topic = "gateways/{{gateway}}/status", delay = "5s" }}
routes = [
  {{ out = "plant/#", remote_prefix = "sites/{{gateway}}/", qos = 0, retain = true, durable = false }},
  {{ out = "fast/#", remote_template = "sites/{{gateway}}/{{topic}}" }},
  {{ in = "sites/{{gateway}}/cmd/#", local_prefix = "plant/", qos = 2 }},
]
"#
    );
    let config = parse_in(dir.path(), &text).expect("valid");
    assert_eq!(config.devices[0].topic, "{gateway}/{device}/{point}");
    let uplink = &config.uplinks[0];
    let will = uplink.will.as_ref().expect("will");
    assert_eq!(will.topic, "gateways/gw/status");
    assert_eq!(
        (will.payload.as_str(), will.qos, will.retain, will.delay),
        ("offline", QoS::AtLeastOnce, true, Duration::from_secs(5))
    );
    let birth = uplink.birth.as_ref().expect("birth defaults from the will");
    assert_eq!(
        (birth.topic.as_str(), birth.payload.as_str(), birth.retain),
        ("gateways/gw/status", "online", true)
    );
    assert_eq!(uplink.routes_out.len(), 2);
    let best_effort = &uplink.routes_out[0];
    assert_eq!(best_effort.remote_prefix.as_deref(), Some("sites/gw/"));
    assert!(!best_effort.durable && best_effort.retain);
    assert_eq!(best_effort.qos, QoS::AtMostOnce);
    let templated = &uplink.routes_out[1];
    assert_eq!(
        templated.remote_template.as_deref(),
        Some("sites/gw/{topic}")
    );
    assert!(templated.durable && !templated.retain);
    assert_eq!(templated.qos, QoS::AtLeastOnce);
    assert_eq!(uplink.routes_in[0].filter, "sites/gw/cmd/#");
    assert_eq!(uplink.routes_in[0].local_prefix.as_deref(), Some("plant/"));
    assert_eq!(uplink.routes_in[0].qos, QoS::ExactlyOnce);
}

#[test]
fn relative_files_are_resolved_against_the_config_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("secrets")).expect("mkdir");
    std::fs::write(dir.path().join("secrets/cloud.pass"), "pw\n").expect("write");
    std::fs::write(dir.path().join("passwd"), "u:hash\n").expect("write");
    let text =
        "[gateway]\nid = \"gw\"\ndata_dir = \"data\"\n[broker]\npassword_file = \"passwd\"\n\
                [[uplinks]]\nname = \"c\"\nurl = \"mqtt://h\"\nusername = \"u\"\n\
                password_file = \"secrets/cloud.pass\"\n";
    let file = dir.path().join("fieldmq.toml");
    std::fs::write(&file, text).expect("write");
    let config = config::load(&file).expect("valid");
    assert_eq!(config.gateway.data_dir, dir.path().join("data"));
    assert_eq!(config.broker.password_file, Some(dir.path().join("passwd")));
    assert!(!config.broker.allow_anonymous);
    assert_eq!(
        config.uplinks[0].password,
        Some(SecretSource::File(dir.path().join("secrets/cloud.pass")))
    );
    assert_eq!(config.uplinks[0].url.scheme, UrlScheme::Mqtt);
    assert!(config.uplinks[0].tls.is_none());
}

#[test]
fn an_unreadable_file_is_named_in_the_error() {
    let error = config::load(Path::new("/nonexistent/fieldmq.toml")).expect_err("missing");
    let text = error.to_string();
    assert!(
        text.starts_with("/nonexistent/fieldmq.toml: cannot read"),
        "{text}"
    );
}

#[test]
fn a_config_with_three_independent_errors_reports_all_three() {
    let text = format!(
        r#"[gateway]
id = "bad/id"
[broker]
allow_anonymous = true
max_inflight = "many"
[[devices]]
name = "d"
driver = "simulated"
points = [{{ name = "p", waveform = "sinus", min = 0, max = 1 }}]
{UPLINK}routes = [{{ out = "a/#/b" }}]
"#
    );
    let error = errors(&text);
    let found: Vec<(Option<usize>, &str)> = error
        .diagnostics
        .iter()
        .map(|d| (d.line, d.key_path.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            (Some(2), "gateway.id"),
            (Some(5), "broker.max_inflight"),
            (Some(9), "devices[0].points[0].waveform"),
            (Some(13), "uplinks[0].routes[0].out"),
        ],
        "{error}"
    );
    assert_eq!(
        error
            .to_string()
            .lines()
            .filter(|l| l.contains("bad.toml:"))
            .count(),
        4
    );
}

#[test]
fn a_bad_key_does_not_hide_the_rest_of_its_table() {
    let text = format!(
        "[gateway]\ncolour = 3\nid = \"bad/id\"\n[broker]\nallow_anonymous = true\n\
         [[devices]]\nname = 1\ndriver = \"simulated\"\npoll = \"soon\"\npoints = [{POINT}]\n"
    );
    let error = errors(&text);
    let found: Vec<(Option<usize>, &str)> = error
        .diagnostics
        .iter()
        .map(|d| (d.line, d.key_path.as_str()))
        .collect();
    // The wrong-typed name is reported once, not again as missing.
    assert_eq!(
        found,
        [
            (Some(2), "gateway.colour"),
            (Some(3), "gateway.id"),
            (Some(7), "devices[0].name"),
            (Some(9), "devices[0].poll"),
        ],
        "{error}"
    );
}

#[test]
fn a_missing_gateway_table_is_reported_without_a_line() {
    let error = errors("[broker]\nallow_anonymous = true\n");
    assert_eq!(error.diagnostics.len(), 1, "{error}");
    assert_eq!(error.diagnostics[0].key_path, "gateway");
    assert_eq!(error.diagnostics[0].line, None);
}

/// One bad config: its text, then the line, key path and a piece of the message (and of
/// the hint) that must be reported.
struct Case {
    name: &'static str,
    text: String,
    line: usize,
    key_path: &'static str,
    message: &'static str,
    hint: Option<&'static str>,
}

fn device(points: &str, extra: &str) -> String {
    format!(
        "{HEAD}[[devices]]\nname = \"d\"\ndriver = \"simulated\"\n{extra}points = [\n{points}\n]\n"
    )
}

const POINT: &str = "{ name = \"p\", waveform = \"sine\", min = 0.0, max = 1.0 }";

fn cases() -> Vec<Case> {
    // Any file that exists, where a check needs one.
    let existing = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let case = |name, text: String, line, key_path, message, hint| Case {
        name,
        text,
        line,
        key_path,
        message,
        hint,
    };
    vec![
        case(
            "no runtime threads",
            "[gateway]\nid = \"gw\"\nworker_threads = 0\n".into(),
            3,
            "gateway.worker_threads",
            "0 is out of range, expected 1 to 256",
            None,
        ),
        case(
            "syntax error",
            "[gateway]\nid = \"gw\"\nlog_level = info\n".into(),
            3,
            "gateway.log_level",
            "expected a value, found the bare word `info`",
            Some("strings must be quoted: \"info\""),
        ),
        case(
            "unclosed string",
            format!("{HEAD}[[devices]]\nname = \"d\n"),
            6,
            "devices[0].name",
            "invalid basic string",
            None,
        ),
        case(
            "unknown key with a hint",
            device(POINT, "pol = \"1s\"\n"),
            8,
            "devices[0].pol",
            "unknown key `pol`",
            Some("did you mean `poll`?"),
        ),
        case(
            "unknown top-level table",
            format!("{HEAD}[[uplink]]\nname = \"x\"\n"),
            5,
            "uplink",
            "unknown key `uplink`",
            Some("did you mean `uplinks`?"),
        ),
        case(
            "bad duration",
            device(POINT, "poll = \"1 parsec\"\n"),
            8,
            "devices[0].poll",
            "invalid duration \"1 parsec\"",
            Some("500ms"),
        ),
        case(
            "bad size",
            format!("{HEAD}max_packet_size = \"12 parsecs\"\n"),
            5,
            "broker.max_packet_size",
            "invalid size \"12 parsecs\"",
            Some("256MiB"),
        ),
        case(
            "negative size",
            format!("{UPLINK}queue = {{ max_bytes = -5 }}\n{HEAD}"),
            4,
            "uplinks[0].queue.max_bytes",
            "invalid size -5",
            None,
        ),
        case(
            "unknown waveform",
            device(&format!("{POINT},\n{{ name = \"q\", waveform = \"sinus\" }}"), ""),
            10,
            "devices[0].points[1].waveform",
            "unknown waveform \"sinus\", expected one of sine, ramp, random_walk, constant",
            Some("did you mean `sine`?"),
        ),
        case(
            "wrong type",
            format!("{HEAD}max_inflight = \"20\"\n"),
            5,
            "broker.max_inflight",
            "invalid type: string \"20\", expected an integer",
            None,
        ),
        case(
            "wrong type in a point",
            device("{ name = \"p\", waveform = \"sine\", min = \"low\", max = 1.0 }", ""),
            9,
            "devices[0].points[0].min",
            "expected a number",
            None,
        ),
        case(
            "duplicate device",
            format!("{}[[devices]]\nname = \"d\"\ndriver = \"simulated\"\npoints = [{POINT}]\n", device(POINT, "")),
            12,
            "devices[1].name",
            "duplicate device name \"d\", already used by devices[0] (line 6)",
            None,
        ),
        case(
            "duplicate point",
            device(&format!("{POINT},\n{POINT}"), ""),
            10,
            "devices[0].points[1].name",
            "duplicate point name \"p\"",
            None,
        ),
        case(
            "duplicate listener address",
            format!("{HEAD}[[broker.listeners]]\nbind = \"127.0.0.1:1883\"\n[[broker.listeners]]\nbind = \"127.0.0.1:1883\"\nwebsocket = true\n"),
            8,
            "broker.listeners[1].bind",
            "127.0.0.1:1883 is already used by broker.listeners[0] (line 6)",
            None,
        ),
        case(
            "listener overlapping a wildcard address",
            format!("{HEAD}[[broker.listeners]]\nbind = \"0.0.0.0:1883\"\n[[broker.listeners]]\nbind = \"127.0.0.1:1883\"\n"),
            8,
            "broker.listeners[1].bind",
            "overlaps 0.0.0.0:1883",
            None,
        ),
        case(
            "invalid route filter",
            format!("{HEAD}{UPLINK}routes = [\n  {{ out = \"plant/#/x\" }},\n]\n"),
            9,
            "uplinks[0].routes[0].out",
            "invalid topic filter \"plant/#/x\"",
            Some("`#` must be the last level"),
        ),
        case(
            "missing password file",
            "[gateway]\nid = \"gw\"\n[broker]\npassword_file = \"passwd\"\n".into(),
            4,
            "broker.password_file",
            "file not found: ",
            Some("relative paths are resolved against the config file's directory"),
        ),
        case(
            "missing uplink password file",
            format!("{HEAD}{UPLINK}username = \"u\"\npassword_file = \"secrets/cloud.pass\"\n"),
            9,
            "uplinks[0].password_file",
            "file not found: ",
            None,
        ),
        case(
            "cert without key",
            format!("{HEAD}{UPLINK}cert = \"{existing}\"\n"),
            8,
            "uplinks[0].cert",
            "cert is set without key",
            Some("both cert and key"),
        ),
        case(
            "durable false with qos 1",
            format!("{HEAD}{UPLINK}routes = [\n  {{ out = \"fast/#\", qos = 1, durable = false }},\n]\n"),
            9,
            "uplinks[0].routes[0].durable",
            "durable = false is only allowed on QoS 0 routes",
            Some("qos = 0"),
        ),
        case(
            "bad url scheme",
            format!("{HEAD}[[uplinks]]\nname = \"cloud\"\nurl = \"https://broker.example.com\"\n"),
            7,
            "uplinks[0].url",
            "unsupported url scheme \"https\"",
            Some("mqtts://host:8883"),
        ),
        case(
            "empty gateway id",
            "[gateway]\nid = \"\"\n[broker]\nallow_anonymous = true\n".into(),
            2,
            "gateway.id",
            "must not be empty",
            None,
        ),
        case(
            "gateway id with a topic wildcard",
            "[broker]\nallow_anonymous = true\n[gateway]\nid = \"a+b\"\n".into(),
            4,
            "gateway.id",
            "\"a+b\" contains characters other than",
            None,
        ),
        case(
            "both password_file and password_env",
            format!("{HEAD}{UPLINK}password_file = \"{existing}\"\npassword_env = \"PW\"\n"),
            9,
            "uplinks[0].password_env",
            "password_file and password_env are both set",
            None,
        ),
        case(
            "unknown driver",
            format!("{HEAD}[[devices]]\nname = \"d\"\ndriver = \"simulatd\"\n"),
            7,
            "devices[0].driver",
            "unknown driver \"simulatd\", expected one of simulated",
            Some("did you mean `simulated`?"),
        ),
        case(
            "min greater than max",
            device("{ name = \"p\", waveform = \"ramp\", min = 5.0, max = 1.0 }", ""),
            9,
            "devices[0].points[0].min",
            "min (5) is greater than max (1)",
            None,
        ),
        case(
            "qos out of range",
            format!("{HEAD}{UPLINK}will = {{ topic = \"s\", qos = 3 }}\n"),
            8,
            "uplinks[0].will.qos",
            "invalid QoS 3, expected 0, 1 or 2",
            None,
        ),
        case(
            "wildcard in a device topic template",
            device(POINT, "topic = \"{gateway}/+/{point}\"\n"),
            8,
            "devices[0].topic",
            "contains a wildcard",
            None,
        ),
        case(
            "route with both directions",
            format!("{HEAD}{UPLINK}routes = [{{ out = \"a/#\", in = \"b/#\" }}]\n"),
            8,
            "uplinks[0].routes[0].in",
            "either `out` or `in`, not both",
            None,
        ),
        case(
            "TLS settings on a plain url",
            format!("{HEAD}[[uplinks]]\nname = \"c\"\nurl = \"mqtt://h\"\n\nca = \"{existing}\"\n"),
            9,
            "uplinks[0].ca",
            "TLS settings need an mqtts:// or wss:// url",
            None,
        ),
        case(
            "duplicate uplink",
            format!("{HEAD}{UPLINK}{UPLINK}"),
            9,
            "uplinks[1].name",
            "duplicate uplink name \"cloud\"",
            None,
        ),
        case(
            "unknown placeholder",
            format!("{HEAD}{UPLINK}routes = [{{ out = \"a/#\", remote_prefix = \"{{site}}/\" }}]\n"),
            8,
            "uplinks[0].routes[0].remote_prefix",
            "unknown placeholder {site}",
            Some("{gateway}"),
        ),
        case(
            "missing required key",
            format!("{HEAD}[[devices]]\ndriver = \"simulated\"\npoints = [{POINT}]\n"),
            5,
            "devices[0].name",
            "missing required key",
            None,
        ),
        case(
            "no way for clients to connect",
            "[gateway]\nid = \"gw\"\n[broker]\nmax_inflight = 5\n".into(),
            3,
            "broker.allow_anonymous",
            "no client could connect",
            Some("allow_anonymous = true"),
        ),
        case(
            "sub-second keep alive",
            format!("{HEAD}{UPLINK}keep_alive = \"500ms\"\n"),
            8,
            "uplinks[0].keep_alive",
            "not a whole number of seconds",
            None,
        ),
        case(
            "unknown broker durability",
            format!("{HEAD}durability = \"synch\"\n"),
            5,
            "broker.durability",
            "unknown durability \"synch\", expected one of sync, batched, memory",
            Some("did you mean `sync`?"),
        ),
        case(
            "unknown subscribe_denied_reason",
            format!("{HEAD}subscribe_denied_reason = \"unspecified-eror\"\n"),
            5,
            "broker.subscribe_denied_reason",
            "unknown reason \"unspecified-eror\", expected one of not-authorized, unspecified-error",
            Some("did you mean `unspecified-error`?"),
        ),
        case(
            "zero commit window",
            format!("{HEAD}durability = \"batched\"\ncommit_window = \"0s\"\n"),
            6,
            "broker.commit_window",
            "must be more than zero",
            None,
        ),
        case(
            "bad max_queued_bytes",
            format!("{HEAD}max_queued_bytes = \"lots\"\n"),
            5,
            "broker.max_queued_bytes",
            "invalid size \"lots\"",
            Some("256MiB"),
        ),
        case(
            "bad queue_memory",
            format!("{HEAD}queue_memory = \"plenty\"\n"),
            5,
            "broker.queue_memory",
            "invalid size \"plenty\"",
            Some("256MiB"),
        ),
        case(
            "missing ACL file",
            format!("{HEAD}acl_file = \"acl\"\n"),
            5,
            "broker.acl_file",
            "file not found: ",
            Some("relative paths are resolved against the config file's directory"),
        ),
        case(
            "sub-second $SYS interval",
            format!("{HEAD}sys_interval = \"100ms\"\n"),
            5,
            "broker.sys_interval",
            "\"100ms\" is too short",
            Some("\"0s\" to turn $SYS off"),
        ),
        case(
            "listener certificate that is not PEM",
            format!("{HEAD}[[broker.listeners]]\nbind = \"127.0.0.1:8883\"\ntls = {{ cert = \"{existing}\", key = \"{existing}\" }}\n"),
            7,
            "broker.listeners[0].tls.cert",
            "Cargo.toml: no PEM certificate in this file",
            Some("BEGIN CERTIFICATE"),
        ),
        case(
            "listener key that is not PEM",
            format!("{HEAD}[[broker.listeners]]\nbind = \"127.0.0.1:8883\"\ntls = {{ cert = \"{existing}\", key = \"{existing}\" }}\n"),
            7,
            "broker.listeners[0].tls.key",
            "Cargo.toml: no PEM private key in this file",
            Some("PRIVATE KEY"),
        ),
        case(
            "listener TLS without key",
            format!("{HEAD}[[broker.listeners]]\nbind = \"127.0.0.1:8883\"\ntls = {{ cert = \"server.crt\" }}\n"),
            7,
            "broker.listeners[0].tls.key",
            "missing required key",
            Some("private key"),
        ),
        case(
            "client certificates required without a CA",
            format!("{HEAD}[[broker.listeners]]\nbind = \"127.0.0.1:8883\"\n[broker.listeners.tls]\ncert = \"{existing}\"\nkey = \"{existing}\"\nrequire_client_cert = true\n"),
            10,
            "broker.listeners[0].tls.require_client_cert",
            "require_client_cert needs client_ca",
            Some("client_ca"),
        ),
        case(
            "identity as username without a CA",
            format!("{HEAD}[[broker.listeners]]\nbind = \"127.0.0.1:8883\"\ntls = {{ cert = \"{existing}\", key = \"{existing}\", identity_as_username = true }}\n"),
            7,
            "broker.listeners[0].tls.identity_as_username",
            "identity_as_username needs client_ca",
            None,
        ),
        case(
            "unknown key in a listener's TLS table",
            format!("{HEAD}[[broker.listeners]]\nbind = \"127.0.0.1:8883\"\ntls = {{ cert = \"{existing}\", key = \"{existing}\", client_cert = true }}\n"),
            7,
            "broker.listeners[0].tls.client_cert",
            "unknown key `client_cert`",
            None,
        ),
        case(
            "websocket path without websocket",
            format!("{HEAD}[[broker.listeners]]\nbind = \"127.0.0.1:8083\"\nwebsocket_path = \"/ws\"\n"),
            7,
            "broker.listeners[0].websocket_path",
            "websocket_path is set but websocket is not",
            Some("websocket = true"),
        ),
        case(
            "websocket path without a slash",
            format!("{HEAD}[[broker.listeners]]\nbind = \"127.0.0.1:8083\"\nwebsocket = true\nwebsocket_path = \"mqtt\"\n"),
            8,
            "broker.listeners[0].websocket_path",
            "invalid WebSocket path \"mqtt\"",
            None,
        ),
        case(
            "no handshake places",
            format!("{HEAD}[[broker.listeners]]\nbind = \"127.0.0.1:1883\"\nmax_handshakes = 0\n"),
            7,
            "broker.listeners[0].max_handshakes",
            "0 is out of range, expected 1 to 4294967295",
            None,
        ),
        case(
            "a negative per-address limit",
            format!("{HEAD}[[broker.listeners]]\nbind = \"127.0.0.1:1883\"\nmax_connections_per_address = -1\n"),
            7,
            "broker.listeners[0].max_connections_per_address",
            "-1 is out of range, expected 0 to 4294967295",
            None,
        ),
        case(
            "a zero connect timeout",
            format!("{HEAD}[[broker.listeners]]\nbind = \"127.0.0.1:1883\"\nconnect_timeout = \"0s\"\n"),
            7,
            "broker.listeners[0].connect_timeout",
            "must be more than zero",
            None,
        ),
        case(
            "a connect timeout without a unit",
            format!("{HEAD}[[broker.listeners]]\nbind = \"127.0.0.1:1883\"\nconnect_timeout = \"5\"\n"),
            7,
            "broker.listeners[0].connect_timeout",
            "invalid duration \"5\"",
            Some("a number and a unit"),
        ),
        case(
            "a misspelt listener limit",
            format!("{HEAD}[[broker.listeners]]\nbind = \"127.0.0.1:1883\"\nmax_handshake = 10\n"),
            7,
            "broker.listeners[0].max_handshake",
            "unknown key `max_handshake`",
            Some("did you mean `max_handshakes`?"),
        ),
        case(
            "modbus server: unknown key with a hint",
            modbus_server("bnd = \"0.0.0.0:502\"\n", MAP_ENTRY),
            10,
            "modbus_servers[0].bnd",
            "unknown key `bnd`",
            Some("did you mean `bind`?"),
        ),
        case(
            "modbus server: a map entry naming an unknown device",
            modbus_server("", &MAP_ENTRY.replace("\"meter\"", "\"meterr\"")),
            12,
            "modbus_servers[0].map[0].device",
            "no device named \"meterr\"",
            Some("did you mean `meter`?"),
        ),
        case(
            "modbus server: a map entry naming an unknown point",
            modbus_server("", &MAP_ENTRY.replace("\"power\"", "\"powr\"")),
            12,
            "modbus_servers[0].map[0].point",
            "device \"meter\" has no point named \"powr\"",
            Some("did you mean `power`?"),
        ),
        case(
            "modbus server: a map entry naming a point no SunSpec model has",
            format!(
                "{HEAD}[[devices]]\nname = \"inv\"\ndriver = \"modbus-tcp\"\naddress = \"127.0.0.1:502\"\n\
                 profile = \"sunspec\"\n[[modbus_servers]]\nbind = \"127.0.0.1:0\"\nmap = [\n  \
                 {{ table = \"holding\", address = 0, device = \"inv\", point = \"inverter_Hzz\" }},\n  \
                 {{ table = \"holding\", address = 1, device = \"inv\", point = \"mppt_2_DCV\" }},\n]\n"
            ),
            13,
            "modbus_servers[0].map[0].point",
            "device \"inv\" has no point named \"inverter_Hzz\"",
            Some("did you mean `inverter_Hz`?"),
        ),
        case(
            "modbus server: overlapping map entries",
            modbus_server(
                "",
                &format!("{MAP_ENTRY},\n  {{ table = \"holding\", address = 1, topic = \"a/b\" }}"),
            ),
            13,
            "modbus_servers[0].map[1]",
            "holding 1..=1 overlaps modbus_servers[0].map[0] (holding 0..=1)",
            None,
        ),
        case(
            "modbus server: overlapping map entries of one unit",
            modbus_server(
                "",
                &format!(
                    "{},\n  {{ unit = 1, table = \"holding\", address = 1, topic = \"a/b\" }}",
                    MAP_ENTRY.replace("{ table", "{ unit = 1, table")
                ),
            ),
            13,
            "modbus_servers[0].map[1]",
            "holding 1..=1 overlaps modbus_servers[0].map[0] (holding 0..=1) on unit 1",
            None,
        ),
        case(
            "modbus server: a unit's entry overlapping an entry of every unit",
            modbus_server(
                "",
                &format!("{MAP_ENTRY},\n  {{ unit = 4, table = \"holding\", address = 1, topic = \"a/b\" }}"),
            ),
            13,
            "modbus_servers[0].map[1]",
            "holding 1..=1 overlaps modbus_servers[0].map[0] (holding 0..=1)",
            None,
        ),
        case(
            "modbus server: an entry for a unit the server does not answer",
            modbus_server(
                "bind = \"127.0.0.1:0\"\nunit_ids = [1, 2]\n",
                &MAP_ENTRY.replace("{ table", "{ unit = 5, table"),
            ),
            13,
            "modbus_servers[0].map[0].unit",
            "unit 5 is not one of the server's unit_ids [1, 2]",
            Some("add 5 to unit_ids, or remove `unit`"),
        ),
        case(
            "modbus server: an entry past address 65535",
            modbus_server("", &MAP_ENTRY.replace("address = 0", "address = 65535")),
            12,
            "modbus_servers[0].map[0]",
            "runs past address 65535",
            None,
        ),
        case(
            "modbus server: a device whose payload it cannot read",
            format!(
                "{HEAD}[[devices]]\nname = \"meter\"\ndriver = \"simulated\"\npayload = \"influx\"\n\
                 points = [{{ name = \"power\", waveform = \"constant\", value = 1.5 }}]\n\
                 [[modbus_servers]]\nbind = \"127.0.0.1:0\"\nmap = [\n  {MAP_ENTRY}\n]\n"
            ),
            13,
            "modbus_servers[0].map[0].device",
            "reads json and plain payloads only",
            Some("payload = \"json\""),
        ),
        case(
            "modbus server: a sentinel without bad_quality = sentinel",
            modbus_server("sentinel = -1\n", MAP_ENTRY),
            10,
            "modbus_servers[0].sentinel",
            "only used with bad_quality = \"sentinel\"",
            None,
        ),
        case(
            "modbus server: an unknown type",
            modbus_server("", &MAP_ENTRY.replace("\"f32\"", "\"f23\"")),
            12,
            "modbus_servers[0].map[0].type",
            "unknown type \"f23\" for holding registers, expected one of u16",
            None,
        ),
        case(
            "unknown when_full policy",
            format!("{HEAD}{UPLINK}queue = {{ when_full = \"drop_olest\" }}\n"),
            8,
            "uplinks[0].queue.when_full",
            "unknown policy \"drop_olest\"",
            Some("did you mean `drop_oldest`?"),
        ),
        case(
            "a misspelt Sparkplug key",
            format!("{HEAD}{UPLINK}[uplinks.sparkplug]\ngroup_id = \"g\"\nprimary_hots = \"scada\"\n"),
            10,
            "uplinks[0].sparkplug.primary_hots",
            "unknown key `primary_hots`",
            Some("did you mean `primary_host`?"),
        ),
        case(
            "a Sparkplug table without group_id",
            format!("{HEAD}{UPLINK}[uplinks.sparkplug]\nedge_node_id = \"n\"\n"),
            8,
            "uplinks[0].sparkplug.group_id",
            "missing required key",
            Some("group_id = "),
        ),
        case(
            "a Sparkplug id with a topic separator",
            format!("{HEAD}{UPLINK}[uplinks.sparkplug]\ngroup_id = \"plant/1\"\n"),
            9,
            "uplinks[0].sparkplug.group_id",
            "\"plant/1\" is not a valid Sparkplug id",
            Some("without `/`, `+` or `#`"),
        ),
        case(
            "a will on a Sparkplug uplink",
            format!("{HEAD}{UPLINK}will = {{ topic = \"gw/status\" }}\n[uplinks.sparkplug]\ngroup_id = \"g\"\n"),
            8,
            "uplinks[0].will",
            "`will` does not apply to a Sparkplug uplink",
            Some("NDEATH"),
        ),
    ]
}

/// One map entry of a Modbus server (to put on line 12 by [`modbus_server`]).
const MAP_ENTRY: &str =
    "{ table = \"holding\", address = 0, device = \"meter\", point = \"power\", type = \"f32\" }";

/// A simulated device `meter` (lines 5 to 8), then a Modbus server: `keys` from line 10,
/// its `bind` after them, and `entries` from line 12 when `keys` is empty.
fn modbus_server(keys: &str, entries: &str) -> String {
    format!(
        "{HEAD}[[devices]]\nname = \"meter\"\ndriver = \"simulated\"\n\
         points = [{{ name = \"power\", waveform = \"constant\", value = 1.5 }}]\n\
         [[modbus_servers]]\n{keys}{}map = [\n  {entries}\n]\n",
        if keys.is_empty() {
            "bind = \"127.0.0.1:0\"\n"
        } else {
            ""
        }
    )
}

#[test]
fn every_bad_config_is_reported_with_its_line_and_key_path() {
    let mut failures = Vec::new();
    for case in cases() {
        let error = errors(&case.text);
        let rendered = error.to_string();
        let hit = error.diagnostics.iter().find(|d| {
            d.line == Some(case.line)
                && d.key_path == case.key_path
                && d.message.contains(case.message)
                && case
                    .hint
                    .is_none_or(|hint| d.hint.as_deref().is_some_and(|h| h.contains(hint)))
        });
        match hit {
            Some(diagnostic) => {
                let shown = diagnostic.to_string();
                let place = format!("bad.toml:{}:", case.line);
                assert!(shown.contains(&place), "{}: {shown}", case.name);
                assert!(
                    shown.contains(&format!(": {}: ", case.key_path)),
                    "{}: {shown}",
                    case.name
                );
                assert!(rendered.contains(&shown), "{}: {rendered}", case.name);
            }
            None => failures.push(format!(
                "{}: wanted line {} {} {:?} (hint {:?}), got:\n{rendered}\n--- config:\n{}",
                case.name, case.line, case.key_path, case.message, case.hint, case.text
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn broker_storage_acl_sys_tls_and_websocket_keys_are_parsed() {
    use fieldmq::broker::config::Durability;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = pki::Ca::new("fieldmq test CA");
    let server = ca.server("localhost");
    pki::write_pem(dir.path(), "ca.pem", &ca.pem);
    pki::write_pem(dir.path(), "server.crt", &server.cert);
    pki::write_pem(dir.path(), "server.key", &server.key);
    std::fs::write(dir.path().join("acl"), "topic read #\n").expect("write");

    let text = "[gateway]\nid = \"gw\"\ndata_dir = \"data\"\n\
        [broker]\nallow_anonymous = true\nmax_queued_bytes = \"8MiB\"\nqueue_memory = \"0\"\ndurability = \"batched\"\n\
        commit_window = \"20ms\"\nstore_file = \"mqtt/broker.sqlite\"\nacl_file = \"acl\"\n\
        sys_interval = \"0s\"\n\
        [[broker.listeners]]\nbind = \"127.0.0.1:8883\"\n\
        tls = { cert = \"server.crt\", key = \"server.key\", client_ca = \"ca.pem\", \
        require_client_cert = true, identity_as_username = true }\n\
        [[broker.listeners]]\nbind = \"127.0.0.1:8443\"\nwebsocket = true\nwebsocket_path = \"/ws\"\n\
        tls = { cert = \"server.crt\", key = \"server.key\" }\n\
        max_handshakes = 32\nmax_connections_per_address = 0\nconnect_timeout = \"1500ms\"\n";
    let config = parse_in(dir.path(), text).unwrap_or_else(|e| panic!("valid:\n{e}"));
    let broker = &config.broker;
    let base = std::path::absolute(dir.path()).expect("absolute");
    assert_eq!(broker.max_queued_bytes, 8 * 1024 * 1024);
    assert_eq!(
        broker.queue_memory, 0,
        "0: nothing beyond each session's window"
    );
    assert_eq!(broker.durability, Durability::Batched);
    assert_eq!(broker.commit_window, Duration::from_millis(20));
    assert_eq!(broker.store_path, base.join("data/mqtt/broker.sqlite"));
    assert_eq!(broker.acl_file.as_deref(), Some(base.join("acl").as_path()));
    assert_eq!(broker.sys_interval, None);
    let mqtts = broker.listeners[0].tls.as_ref().expect("TLS");
    assert_eq!(mqtts.cert, base.join("server.crt"));
    assert_eq!(mqtts.key, base.join("server.key"));
    assert_eq!(
        mqtts.client_ca.as_deref(),
        Some(base.join("ca.pem").as_path())
    );
    assert!(mqtts.require_client_cert && mqtts.identity_as_username);
    assert!(!broker.listeners[0].websocket);
    let wss = &broker.listeners[1];
    assert!(wss.websocket);
    assert_eq!(wss.websocket_path, "/ws");
    assert_eq!(wss.max_handshakes, 32);
    assert_eq!(
        wss.max_connections_per_address, 0,
        "0: no per-address limit"
    );
    assert_eq!(wss.connect_timeout, Duration::from_millis(1500));
    let tls = wss.tls.as_ref().expect("TLS");
    assert!(tls.client_ca.is_none() && !tls.require_client_cert && !tls.identity_as_username);

    // The defaults: sync, <data_dir>/broker.db, $SYS every 10 s, plain TCP on /mqtt.
    let config = parse_in(dir.path(), HEAD).expect("valid");
    let broker = &config.broker;
    assert_eq!(broker.durability, Durability::Sync);
    assert_eq!(broker.store_path, Path::new("/var/lib/fieldmq/broker.db"));
    assert_eq!(broker.sys_interval, Some(Duration::from_secs(10)));
    assert_eq!(broker.commit_window, Duration::from_millis(10));
    assert_eq!(broker.max_queued_bytes, 64 * 1024 * 1024);
    assert_eq!(broker.queue_memory, 32 * 1024 * 1024);
    assert_eq!(broker.acl_file, None);
    assert_eq!(broker.listeners[0].websocket_path, "/mqtt");
    assert!(broker.listeners[0].tls.is_none());
}

#[test]
fn the_http_table_is_optional_and_the_demo_has_one_on_loopback() {
    let demo = config::demo();
    let http = demo.http.as_ref().expect("the demo has an HTTP listener");
    assert_eq!(http.bind.to_string(), "127.0.0.1:8088");
    assert!(http.tls.is_none() && http.password_file.is_none());
    assert!(demo.summary().contains("http: http://127.0.0.1:8088"));

    let dir = tempfile::tempdir().expect("tempdir");
    let without = parse_in(dir.path(), HEAD).expect("valid");
    assert!(without.http.is_none(), "no [http] table, no listener");

    let with = parse_in(
        dir.path(),
        &format!(
            "{HEAD}[http]\nbind = \"0.0.0.0:9000\"\nmax_connections = 8\nheader_timeout = \"2s\"\n\
             max_connection_age = \"30s\"\nmax_header_bytes = \"32KiB\"\nmax_body_bytes = \"1KiB\"\n"
        ),
    )
    .expect("valid");
    let http = with.http.expect("[http]");
    assert_eq!(http.bind.to_string(), "0.0.0.0:9000");
    assert_eq!(http.max_connections, 8);
    assert_eq!(http.header_timeout, Duration::from_secs(2));
    assert_eq!(http.max_connection_age, Duration::from_secs(30));
    assert_eq!(http.max_header_bytes, 32 * 1024);
    assert_eq!(http.max_body_bytes, 1024);
}

#[test]
fn http_mistakes_are_reported_with_their_key_paths() {
    let error = errors(&format!(
        "{HEAD}[http]\nbind = \"localhost:80\"\npassword_file = \"missing-passwd\"\n\
         max_connections = 0\nmax_header_bytes = \"1KiB\"\ntls = {{ cert = \"missing.crt\" }}\n"
    ));
    let paths: Vec<&str> = error
        .diagnostics
        .iter()
        .map(|d| d.key_path.as_str())
        .collect();
    for expected in [
        "http.bind",
        "http.password_file",
        "http.max_connections",
        "http.max_header_bytes",
        "http.tls.cert",
        "http.tls.key",
    ] {
        assert!(
            paths.contains(&expected),
            "no {expected} in {paths:?}\n{error}"
        );
    }
    let unknown = errors(&format!("{HEAD}[http]\nbind = \"127.0.0.1:0\"\nport = 1\n"));
    assert!(unknown.to_string().contains("port"), "{unknown}");
    let missing = errors(&format!("{HEAD}[http]\n"));
    assert!(
        missing
            .diagnostics
            .iter()
            .any(|d| d.key_path == "http.bind"),
        "{missing}"
    );
}

#[test]
fn modbus_server_keys_are_parsed_with_their_defaults() {
    use fieldmq::drivers::modbus::config::{DataType, Order, Table};
    use fieldmq::modbus_server::config::{BadQuality, Source};
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        r#"{HEAD}[[devices]]
name = "meter"
driver = "simulated"
points = [{{ name = "power", waveform = "constant", value = 1.5 }}]
[[modbus_servers]]
bind = "127.0.0.1:5020"
map = [
  {{ table = "holding", address = 4, device = "meter", point = "power", type = "f32:CDAB", scale = 0.5 }},
  {{ table = "coil", address = 0, topic = "plant/relay", writable = true }},
]
[[modbus_servers]]
bind = "127.0.0.1:5021"
unit_ids = [1, 247]
max_connections = 2
idle_timeout = "5s"
write_timeout = "1s"
bad_quality = "sentinel"
sentinel = -9999
map = [{{ table = "input", address = 0, topic = "plant/level", type = "i32", order = "DCBA" }}]
"#
    );
    let config = parse_in(dir.path(), &text).expect("valid");
    let [first, second] = &config.modbus_servers[..] else {
        panic!("two servers: {:?}", config.modbus_servers);
    };
    assert_eq!(first.bind.to_string(), "127.0.0.1:5020");
    assert!(first.unit_ids.is_empty(), "every unit id by default");
    assert_eq!(first.max_connections, 16);
    assert_eq!(first.idle_timeout, Duration::from_secs(60));
    assert_eq!(first.write_timeout, Duration::from_secs(5));
    assert_eq!(first.bad_quality, BadQuality::Exception);
    let float = &first.map[0];
    assert_eq!(
        (
            float.table,
            float.address,
            float.data_type,
            float.order,
            float.scale,
            float.writable
        ),
        (Table::Holding, 4, DataType::F32, Order::Cdab, 0.5, false)
    );
    assert_eq!(
        float.source,
        Source::Point {
            device: "meter".into(),
            point: "power".into()
        }
    );
    let coil = &first.map[1];
    assert_eq!(
        (coil.table, coil.data_type, coil.writable),
        (Table::Coil, DataType::Bool, true)
    );
    assert_eq!(coil.source, Source::Topic("plant/relay".into()));
    assert_eq!(second.unit_ids, vec![1, 247]);
    assert_eq!(second.max_connections, 2);
    assert_eq!(second.idle_timeout, Duration::from_secs(5));
    assert_eq!(second.write_timeout, Duration::from_secs(1));
    assert_eq!(second.bad_quality, BadQuality::Sentinel(-9999.0));
    assert_eq!(
        (second.map[0].data_type, second.map[0].order),
        (DataType::I32, Order::Dcba)
    );
    let summary = config.summary();
    assert!(
        summary.contains("modbus server: 127.0.0.1:5020, 2 map entries, max 16 connections"),
        "{summary}"
    );
}

#[test]
fn a_sparkplug_uplink_gets_the_devices_points_with_their_datatypes_and_a_clean_session() {
    use fieldmq::uplink::sparkplug::proto::DataType;
    let text = format!(
        "{}{UPLINK}[uplinks.sparkplug]\ngroup_id = \"plant1\"\nprimary_host = \"scada-1\"\n",
        device(
            "{ name = \"t\", waveform = \"sine\", min = 0.0, max = 1.0, unit = \"C\" },\n\
             { name = \"on\", waveform = \"constant\", value = true, writable = true }",
            "",
        )
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let config = parse_in(dir.path(), &text).expect("valid");
    let uplink = &config.uplinks[0];
    assert!(uplink.clean_start);
    assert_eq!(uplink.session_expiry, std::time::Duration::ZERO);
    let sparkplug = uplink.sparkplug.as_ref().expect("sparkplug table");
    assert_eq!(sparkplug.group_id, "plant1");
    assert_eq!(sparkplug.edge_node_id, "gw", "the gateway id by default");
    assert_eq!(sparkplug.primary_host.as_deref(), Some("scada-1"));
    let device = &sparkplug.devices[0];
    assert_eq!(device.name, "d");
    assert_eq!(
        device.status_topic,
        format!("{}/devices/d", config.gateway.status_topic)
    );
    let points: Vec<(&str, &str, DataType, Option<&str>, bool)> = device
        .points
        .iter()
        .map(|p| {
            (
                p.name.as_str(),
                p.topic.as_str(),
                p.datatype,
                p.unit.as_deref(),
                p.writable,
            )
        })
        .collect();
    assert_eq!(
        points,
        [
            ("t", "gw/d/t", DataType::Double, Some("C"), false),
            ("on", "gw/d/on", DataType::Boolean, None, true),
        ]
    );
}
