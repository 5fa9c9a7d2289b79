//! The status API and the status page: `GET /api/v1/status` (everything),
//! `/api/v1/devices`, `/api/v1/uplinks`, `/api/v1/clients` as JSON, and `GET /` as a
//! server-rendered HTML page that refreshes itself (no script, no external resource: it
//! works offline). Both read a copy of the [`StatusBoard`]; every value on the page is
//! HTML-escaped by the template engine (device names and error texts come from outside).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use minijinja::Environment;
use serde::Serialize;

use crate::status::{
    BusView, ClientView, DeviceView, DiagnosticsView, ErrorView, GatewayView, ModbusServerView,
    StatusBoard, StatusSnapshot, UplinkView,
};

/// The page's template; its `.html` name turns on HTML escaping of every value.
const PAGE_NAME: &str = "status.html";
const PAGE_TEMPLATE: &str = include_str!("status.html");
/// How often the page reloads itself, seconds.
pub const PAGE_REFRESH_S: u64 = 5;
/// Clients listed on the page at most (all of them are in `/api/v1/clients`).
const PAGE_CLIENTS: usize = 200;

#[derive(Clone)]
struct StatusState {
    board: StatusBoard,
    templates: Arc<Environment<'static>>,
}

/// The status routes, reading `board`.
pub fn routes(board: StatusBoard) -> Router {
    let mut templates = Environment::new();
    // The template is part of the binary; a test renders it, so this cannot fail at run
    // time without failing there first.
    if let Err(error) = templates.add_template(PAGE_NAME, PAGE_TEMPLATE) {
        tracing::error!(%error, "the status page template does not parse");
    }
    let state = StatusState {
        board,
        templates: Arc::new(templates),
    };
    Router::new()
        .route("/", get(page))
        .route("/api/v1/status", get(status))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/uplinks", get(uplinks))
        .route("/api/v1/clients", get(clients))
        .with_state(state)
}

async fn status(State(state): State<StatusState>) -> Json<StatusSnapshot> {
    Json(state.board.snapshot())
}

async fn devices(State(state): State<StatusState>) -> Json<Vec<DeviceView>> {
    Json(state.board.devices())
}

async fn uplinks(State(state): State<StatusState>) -> Json<Vec<UplinkView>> {
    Json(state.board.uplinks())
}

async fn clients(State(state): State<StatusState>) -> Json<Vec<ClientView>> {
    Json(state.board.client_list())
}

async fn page(State(state): State<StatusState>) -> Response {
    match render_page(&state.templates, state.board.snapshot()) {
        Ok(html) => ([(header::CACHE_CONTROL, "no-store")], Html(html)).into_response(),
        Err(error) => {
            tracing::error!(%error, "cannot render the status page");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the status page could not be rendered; /api/v1/status has the same data\n",
            )
                .into_response()
        }
    }
}

/// What the page shows: the snapshot with every value already written as text.
#[derive(Serialize)]
struct Page {
    refresh_s: u64,
    gateway: GatewayView,
    uptime: String,
    reloads: String,
    devices_count: usize,
    devices: Vec<PageDevice>,
    buses_count: usize,
    buses: Vec<PageBus>,
    modbus_servers_count: usize,
    modbus_servers: Vec<PageModbusServer>,
    uplinks_count: usize,
    uplinks: Vec<PageUplink>,
    clients_total: usize,
    clients_hidden: usize,
    clients: Vec<ClientView>,
    errors_count: usize,
    errors: Vec<ErrorView>,
}

#[derive(Serialize)]
struct PageDevice {
    name: String,
    driver: String,
    state: String,
    last_error: String,
    last_error_at: String,
    diagnostics: Option<PageDiagnostics>,
    points: Vec<PagePoint>,
}

/// A Modbus device's requests, as text.
#[derive(Serialize)]
struct PageDiagnostics {
    requests_ok: u64,
    requests_failed: u64,
    timeouts: u64,
    crc_errors: u64,
    /// `2: 5, 4: 1`, or empty.
    exceptions: String,
    /// `last 1.2 ms, median 1.1 ms, max 3.0 ms (64 answers)`, or empty.
    latency: String,
    consecutive_failures: u32,
    /// `backed off for 3.2 s more (until ...)`, or empty.
    backoff: String,
}

#[derive(Serialize)]
struct PageBus {
    name: String,
    transport: String,
    /// `meter-a (unit 1), meter-b (unit 2)`
    devices: String,
    requests: u64,
    errors: u64,
    /// Percent, one decimal.
    utilisation: String,
    window_s: u64,
}

#[derive(Serialize)]
struct PageModbusServer {
    name: String,
    bind: String,
    connections_open: u64,
    connections_accepted: u64,
    connections_refused: u64,
    requests: u64,
    requests_by_function: String,
    exceptions: String,
    writes_ok: u64,
    writes_failed: u64,
}

#[derive(Serialize)]
struct PagePoint {
    name: String,
    value: String,
    unit: String,
    quality: String,
    error: String,
    timestamp: String,
}

#[derive(Serialize)]
struct PageUplink {
    name: String,
    url: String,
    state: String,
    state_since: String,
    backlog_messages: u64,
    backlog_bytes: u64,
    oldest_age_s: u64,
    acked_total: u64,
    dropped_total: u64,
    last_error: String,
    last_error_at: String,
}

fn render_page(
    templates: &Environment<'static>,
    snapshot: StatusSnapshot,
) -> Result<String, minijinja::Error> {
    let page = page_model(snapshot);
    templates
        .get_template(PAGE_NAME)?
        .render(minijinja::value::Serde(&page))
}

fn page_model(snapshot: StatusSnapshot) -> Page {
    let StatusSnapshot {
        gateway,
        devices,
        buses,
        modbus_servers,
        uplinks,
        mut clients,
        errors,
    } = snapshot;
    let clients_total = clients.len();
    clients.truncate(PAGE_CLIENTS);
    let reloads = gateway
        .reloads
        .as_ref()
        .map(reload_text)
        .unwrap_or_default();
    Page {
        refresh_s: PAGE_REFRESH_S,
        uptime: crate::status::duration_text(gateway.uptime_s),
        reloads,
        gateway,
        devices_count: devices.len(),
        devices: devices.into_iter().map(page_device).collect(),
        buses_count: buses.len(),
        buses: buses.into_iter().map(page_bus).collect(),
        modbus_servers_count: modbus_servers.len(),
        modbus_servers: modbus_servers.into_iter().map(page_modbus_server).collect(),
        uplinks_count: uplinks.len(),
        uplinks: uplinks.into_iter().map(page_uplink).collect(),
        clients_hidden: clients_total - clients.len(),
        clients_total,
        clients,
        errors_count: errors.len(),
        errors,
    }
}

fn page_device(device: DeviceView) -> PageDevice {
    PageDevice {
        name: device.name,
        driver: device.driver,
        state: device.state,
        last_error: device.last_error.unwrap_or_default(),
        last_error_at: device.last_error_at.unwrap_or_default(),
        diagnostics: device.diagnostics.map(page_diagnostics),
        points: device
            .points
            .into_iter()
            .map(|point| PagePoint {
                name: point.name,
                value: point.value.as_ref().map(value_text).unwrap_or_default(),
                unit: point.unit.unwrap_or_default(),
                quality: point.quality,
                error: point.error.unwrap_or_default(),
                timestamp: point.timestamp.unwrap_or_default(),
            })
            .collect(),
    }
}

fn page_diagnostics(d: DiagnosticsView) -> PageDiagnostics {
    PageDiagnostics {
        requests_ok: d.requests_ok,
        requests_failed: d.requests_failed,
        timeouts: d.timeouts,
        crc_errors: d.crc_errors,
        exceptions: counts_text(&d.exceptions),
        latency: d.latency.map_or_else(String::new, |l| {
            format!(
                "last {:.1} ms, median {:.1} ms, max {:.1} ms ({} answers)",
                l.last_ms, l.p50_ms, l.max_ms, l.samples
            )
        }),
        consecutive_failures: d.consecutive_failures,
        backoff: d.backoff.map_or_else(String::new, |b| {
            format!(
                "backed off for {:.1} s more (until {})",
                b.remaining_s, b.until
            )
        }),
    }
}

/// `2: 5, 4: 1` (code or function: count).
fn counts_text(counts: &std::collections::BTreeMap<String, u64>) -> String {
    counts
        .iter()
        .map(|(code, count)| format!("{code}: {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn page_bus(bus: BusView) -> PageBus {
    PageBus {
        devices: bus
            .devices
            .iter()
            .map(|d| format!("{} (unit {})", d.name, d.unit))
            .collect::<Vec<_>>()
            .join(", "),
        name: bus.name,
        transport: bus.transport,
        requests: bus.requests,
        errors: bus.errors,
        utilisation: format!("{:.1} %", bus.utilisation * 100.0),
        window_s: bus.utilisation_window_s,
    }
}

fn page_modbus_server(server: ModbusServerView) -> PageModbusServer {
    PageModbusServer {
        requests_by_function: counts_text(&server.requests_by_function),
        exceptions: counts_text(&server.exceptions),
        name: server.name,
        bind: server.bind,
        connections_open: server.connections_open,
        connections_accepted: server.connections_accepted,
        connections_refused: server.connections_refused,
        requests: server.requests,
        writes_ok: server.writes_ok,
        writes_failed: server.writes_failed,
    }
}

fn page_uplink(uplink: UplinkView) -> PageUplink {
    PageUplink {
        name: uplink.name,
        url: uplink.url,
        state: uplink.state,
        state_since: uplink.state_since.unwrap_or_default(),
        backlog_messages: uplink.backlog_messages,
        backlog_bytes: uplink.backlog_bytes,
        oldest_age_s: uplink.oldest_age_s,
        acked_total: uplink.acked_total,
        dropped_total: uplink.dropped_total,
        last_error: uplink.last_error.unwrap_or_default(),
        last_error_at: uplink.last_error_at.unwrap_or_default(),
    }
}

/// A point's value for a person: text bare, numbers with at most 3 decimals, the fields of
/// a serial frame as JSON.
pub fn value_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        serde_json::Value::Number(number) => match number.as_f64() {
            Some(x) if number.is_f64() => {
                let text = format!("{x:.3}");
                text.trim_end_matches('0').trim_end_matches('.').to_owned()
            }
            _ => number.to_string(),
        },
        other => other.to_string(),
    }
}

/// `2 applied, 1 refused (last: refused at ...)` from the reload history's JSON.
fn reload_text(history: &serde_json::Value) -> String {
    let count = |key: &str| history.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
    let mut text = format!(
        "{} applied, {} refused",
        count("succeeded"),
        count("failed")
    );
    if let Some(last) = history.get("last").filter(|last| !last.is_null()) {
        let applied = last.get("applied").and_then(|v| v.as_bool()) == Some(true);
        text.push_str(if applied {
            " (last applied)"
        } else {
            " (last refused)"
        });
    }
    text
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;
    use crate::model::{Quality, Value};
    use crate::status::GatewayInfo;

    fn board() -> StatusBoard {
        StatusBoard::new(GatewayInfo {
            id: "gw".into(),
            version: "0.0.0".into(),
            config_file: "/etc/fieldmq/fieldmq.toml".into(),
            data_dir: "/var/lib/fieldmq".into(),
        })
    }

    async fn get_text(router: Router, path: &str) -> (StatusCode, String, String) {
        let response = router
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("answered");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = axum::body::to_bytes(response.into_body(), 16 << 20)
            .await
            .expect("body");
        (
            status,
            content_type,
            String::from_utf8(body.to_vec()).expect("UTF-8"),
        )
    }

    #[tokio::test]
    async fn the_api_answers_json_with_the_device_and_its_points() {
        let board = board();
        let device =
            board.register_device("boiler", "simulated", &[("t".into(), Some("°C".into()))]);
        device.record_reading(
            "t",
            Some(&Value::Float(20.25)),
            &Quality::Good,
            SystemTime::now(),
        );
        let (status, content_type, body) = get_text(routes(board.clone()), "/api/v1/status").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(json["devices"][0]["name"], "boiler");
        assert_eq!(json["devices"][0]["points"][0]["value"], 20.25);
        assert_eq!(json["devices"][0]["points"][0]["quality"], "good");
        assert_eq!(json["devices"][0]["points"][0]["unit"], "°C");
        assert_eq!(json["gateway"]["id"], "gw");
        let (_, _, devices) = get_text(routes(board.clone()), "/api/v1/devices").await;
        let devices: Vec<DeviceView> = serde_json::from_str(&devices).expect("devices JSON");
        assert_eq!(devices[0].name, "boiler");
        let (_, _, uplinks) = get_text(routes(board.clone()), "/api/v1/uplinks").await;
        assert_eq!(uplinks, "[]");
        let (_, _, clients) = get_text(routes(board), "/api/v1/clients").await;
        assert_eq!(clients, "[]");
    }

    #[tokio::test]
    async fn html_in_names_and_errors_is_escaped_and_non_ascii_kept() {
        let board = board();
        let name = "<script>alert(1)</script> Kessel ä 温度";
        let device = board.register_device(
            name,
            "simulated",
            &[("<b>p</b>".into(), Some("\"&'".into()))],
        );
        device.record_reading(
            "<b>p</b>",
            None,
            &Quality::Bad("<img src=x onerror=alert(2)>".into()),
            SystemTime::now(),
        );
        let (status, content_type, html) = get_text(routes(board), "/").await;
        assert_eq!(status, StatusCode::OK);
        assert!(content_type.starts_with("text/html"), "{content_type}");
        assert!(!html.contains("<script"), "unescaped script tag:\n{html}");
        assert!(!html.contains("<img"), "unescaped img tag:\n{html}");
        assert!(!html.contains("<b>p</b>"), "unescaped point name:\n{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;"), "{html}");
        assert!(html.contains("Kessel ä 温度"), "{html}");
        assert!(html.contains("<meta http-equiv=\"refresh\""), "{html}");
    }

    #[tokio::test]
    async fn the_page_needs_nothing_from_outside() {
        let board = board();
        board.register_device("sim", "simulated", &[("temperature".into(), None)]);
        let (_, _, html) = get_text(routes(board), "/").await;
        assert!(!html.contains("<script"), "no script on the page");
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "{html}"
        );
        assert!(
            html.contains("class=\"device\" data-device=\"sim\""),
            "{html}"
        );
    }

    #[test]
    fn values_and_durations_read_well() {
        assert_eq!(value_text(&serde_json::json!(21.5)), "21.5");
        assert_eq!(value_text(&serde_json::json!(1.0 / 3.0)), "0.333");
        assert_eq!(value_text(&serde_json::json!(2.0)), "2");
        assert_eq!(value_text(&serde_json::json!(42)), "42");
        assert_eq!(value_text(&serde_json::json!("on")), "on");
        assert_eq!(value_text(&serde_json::json!(true)), "true");
        let duration_text = crate::status::duration_text;
        assert_eq!(duration_text(42), "42s");
        assert_eq!(duration_text(3 * 60 + 3), "3m 3s");
        assert_eq!(duration_text(2 * 3600 + 5 * 60), "2h 5m");
        assert_eq!(duration_text(3 * 86_400 + 4 * 3600), "3d 4h");
    }

    #[tokio::test]
    async fn the_page_shows_a_modbus_device_s_requests_its_link_and_the_servers() {
        let board = board();
        let metrics = crate::metrics::Metrics::new();
        let meter = metrics.device("meter");
        board
            .register_device("meter", "modbus-tcp", &[])
            .show_diagnostics(meter.clone());
        meter.request_ok(std::time::Duration::from_micros(1500));
        meter.request_failed(crate::metrics::ErrorKind::Exception);
        meter.exception(2);
        meter.backoff(std::time::Duration::from_secs(30));
        let bus = metrics.bus("/dev/ttyUSB0", "rtu");
        bus.request(std::time::Duration::from_millis(20), true);
        board.register_bus("/dev/ttyUSB0", "rtu", vec![("meter".into(), 7)], bus);
        let server = metrics.modbus_server("modbus-server-0");
        let _open = server.connected();
        server.request(3);
        server.request(43);
        server.exception(1);
        board.set_modbus_servers(vec![(
            "modbus-server-0".into(),
            "127.0.0.1:5020".parse().expect("address"),
            server,
        )]);
        let (status, _, html) = get_text(routes(board), "/").await;
        assert_eq!(status, StatusCode::OK);
        for expected in [
            r#"<span class="diag-ok">1</span>"#,
            r#"<span class="diag-failed">1</span>"#,
            r#"<span class="diag-exceptions">2: 1</span>"#,
            "last 1.5 ms, median 1.5 ms, max 1.5 ms (1 answers)",
            "backed off for ",
            r#"<td class="bus-devices">meter (unit 7)</td>"#,
            r#"<td class="bus-errors num">1</td>"#,
            r#"<td class="server-open num">1</td>"#,
            r#"<td class="server-functions">3: 1, other: 1</td>"#,
            r#"<td class="server-exceptions">1: 1</td>"#,
        ] {
            assert!(html.contains(expected), "no {expected:?} in\n{html}");
        }
    }
}
