use std::net::SocketAddr;

use super::*;

fn board() -> StatusBoard {
    StatusBoard::new(GatewayInfo {
        id: "gw".into(),
        version: "1.2.3".into(),
        config_file: "/etc/fieldmq/fieldmq.toml".into(),
        data_dir: "/var/lib/fieldmq".into(),
    })
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("a socket address")
}

#[test]
fn a_reading_shows_with_its_value_quality_time_and_configured_unit() {
    let board = board();
    let device = board.register_device(
        "boiler",
        "simulated",
        &[
            ("temperature".into(), Some("°C".into())),
            ("pressure".into(), None),
        ],
    );
    device.record_reading(
        "temperature",
        Some(&Value::Float(21.5)),
        &Quality::Good,
        SystemTime::UNIX_EPOCH,
    );
    let devices = board.devices();
    assert_eq!(devices.len(), 1);
    let points = &devices[0].points;
    let temperature = points
        .iter()
        .find(|p| p.name == "temperature")
        .expect("temperature");
    assert_eq!(temperature.value, Some(serde_json::json!(21.5)));
    assert_eq!(temperature.quality, "good");
    assert_eq!(temperature.unit.as_deref(), Some("°C"));
    assert_eq!(
        temperature.timestamp.as_deref(),
        Some("1970-01-01T00:00:00Z")
    );
    let pressure = points
        .iter()
        .find(|p| p.name == "pressure")
        .expect("pressure");
    assert_eq!(
        (pressure.quality.as_str(), &pressure.value),
        ("unknown", &None)
    );
}

#[test]
fn a_point_that_turns_bad_is_one_recent_error_until_its_reason_changes() {
    let board = board();
    let device = board.register_device("meter", "modbus", &[]);
    let bad = Quality::Bad("timeout".into());
    for _ in 0..5 {
        device.record_reading("power", None, &bad, SystemTime::now());
    }
    let errors = board.snapshot().errors;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].source, "device meter");
    assert_eq!(errors[0].text, "point power: timeout");
    device.record_reading(
        "power",
        Some(&Value::Int(3)),
        &Quality::Good,
        SystemTime::now(),
    );
    device.record_reading("power", None, &bad, SystemTime::now());
    let errors = board.snapshot().errors;
    assert_eq!((errors.len(), errors[0].count), (1, 2), "{errors:?}");
    let point = &board.devices()[0].points[0];
    assert_eq!(
        (point.quality.as_str(), point.error.as_deref()),
        ("bad", Some("timeout"))
    );
}

#[test]
fn the_error_ring_keeps_the_newest_and_counts_repeats() {
    let board = board();
    for n in 0..(RECENT_ERRORS + 10) {
        board.record_error("gateway", &format!("error {n}"));
    }
    board.record_error("gateway", &format!("error {}", RECENT_ERRORS + 5));
    let errors = board.snapshot().errors;
    assert_eq!(errors.len(), RECENT_ERRORS);
    assert_eq!(errors[0].text, format!("error {}", RECENT_ERRORS + 5));
    assert_eq!(errors[0].count, 2);
    assert_eq!(errors[1].text, format!("error {}", RECENT_ERRORS + 9));
    assert!(errors.iter().all(|e| e.text != "error 0"));
}

#[test]
fn a_client_shows_while_its_presence_lives() {
    let board = board();
    let clients = board.clients();
    let presence = clients.connected(
        Arc::from("hmi-1"),
        addr("192.0.2.7:50000"),
        ProtocolVersion::V5,
        addr("0.0.0.0:1883"),
    );
    let listed = board.client_list();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].client_id, "hmi-1");
    assert_eq!(listed[0].remote_address, "192.0.2.7:50000");
    assert_eq!(
        (listed[0].protocol.as_str(), listed[0].listener.as_str()),
        ("5", "0.0.0.0:1883")
    );
    drop(presence);
    assert!(board.client_list().is_empty());
}

#[test]
fn a_taken_over_client_id_is_listed_once_per_connection_and_leaves_with_it() {
    let board = board();
    let clients = board.clients();
    let first = clients.connected(
        Arc::from("same"),
        addr("127.0.0.1:1"),
        ProtocolVersion::V311,
        addr("127.0.0.1:1883"),
    );
    let second = clients.connected(
        Arc::from("same"),
        addr("127.0.0.1:2"),
        ProtocolVersion::V311,
        addr("127.0.0.1:1883"),
    );
    drop(first);
    let listed = board.client_list();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].remote_address, "127.0.0.1:2");
    drop(second);
    assert!(board.client_list().is_empty());
}

#[test]
fn an_uplink_shows_state_error_and_backlog() {
    let board = board();
    let uplink = board.register_uplink("cloud", "mqtts://cloud.example:8883");
    assert_eq!(board.uplinks()[0].state, "connecting");
    uplink.set_state(UplinkState::Connected);
    uplink.set_backlog(Backlog {
        messages: 3,
        bytes: 120,
        oldest_age_s: 7,
        dropped_total: 1,
        acked_total: 40,
    });
    uplink.set_error("connection refused");
    uplink.set_state(UplinkState::Disconnected);
    let view = &board.uplinks()[0];
    assert_eq!(view.state, "disconnected");
    assert_eq!(view.last_error.as_deref(), Some("connection refused"));
    assert!(view.last_error_at.is_some());
    assert_eq!((view.backlog_messages, view.backlog_bytes), (3, 120));
    assert!(view.oldest_age_s >= 7);
    assert_eq!(board.snapshot().errors[0].source, "uplink cloud");
}

#[test]
fn a_device_registered_again_starts_fresh_and_a_removed_one_is_gone() {
    let board = board();
    let old = board.register_device("pump", "simulated", &[]);
    old.set_state(DeviceState::Error, Some("port gone"));
    let new = board.register_device("pump", "simulated", &[]);
    assert_eq!(board.devices()[0].state, "starting");
    new.set_state(DeviceState::Online, None);
    assert_eq!(board.devices()[0].state, "online");
    board.remove_device("pump");
    assert!(board.devices().is_empty());
}

#[test]
fn the_snapshot_round_trips_through_json() {
    let board = board();
    let device = board.register_device("<b>x</b>", "simulated", &[]);
    device.record_reading(
        "t",
        Some(&Value::Text("ä".into())),
        &Quality::Good,
        SystemTime::now(),
    );
    let json = serde_json::to_string(&board.snapshot()).expect("serialises");
    let back: StatusSnapshot = serde_json::from_str(&json).expect("parses");
    assert_eq!(back.devices[0].name, "<b>x</b>");
    assert_eq!(
        back.devices[0].points[0].value,
        Some(serde_json::json!("ä"))
    );
    assert_eq!(back.gateway.version, "1.2.3");
}
