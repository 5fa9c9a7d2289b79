//! The status for a person at a terminal (`fieldmq status`): the gateway, a table of
//! devices (and one of the Modbus devices' requests), the Modbus links and servers, the
//! uplinks, the number of clients and the recent errors. Names and
//! error texts come from outside: control characters in them are shown escaped, so they
//! cannot move the cursor or recolour the terminal.

use std::fmt::Write;

use super::StatusSnapshot;

/// Recent errors shown (all of them are in `--json`).
const ERRORS_SHOWN: usize = 10;

/// The snapshot as short tables.
pub fn render(snapshot: &StatusSnapshot) -> String {
    let mut out = String::new();
    let gateway = &snapshot.gateway;
    let _ = writeln!(
        out,
        "gateway {}  fieldmq {}  up {}",
        clean(&gateway.id),
        clean(&gateway.version),
        duration(gateway.uptime_s)
    );
    let _ = writeln!(out, "  config  {}", clean(&gateway.config_file));
    let _ = writeln!(out, "  data    {}", clean(&gateway.data_dir));
    if let Some(reloads) = &gateway.reloads {
        let count = |key: &str| reloads.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
        let _ = writeln!(
            out,
            "  reloads {} applied, {} refused",
            count("succeeded"),
            count("failed")
        );
    }

    out.push('\n');
    if snapshot.devices.is_empty() {
        out.push_str("no devices\n");
    } else {
        let mut rows = vec![row(&[
            "DEVICE",
            "DRIVER",
            "STATE",
            "POINTS",
            "GOOD",
            "BAD",
            "LAST ERROR",
        ])];
        for device in &snapshot.devices {
            let good = device.points.iter().filter(|p| p.quality == "good").count();
            let bad = device.points.iter().filter(|p| p.quality == "bad").count();
            rows.push(vec![
                clean(&device.name),
                clean(&device.driver),
                clean(&device.state),
                device.points.len().to_string(),
                good.to_string(),
                bad.to_string(),
                device.last_error.as_deref().map_or("-".into(), clean),
            ]);
        }
        table(&mut out, &rows);
        requests(&mut out, snapshot);
    }
    links(&mut out, snapshot);
    modbus_servers(&mut out, snapshot);

    out.push('\n');
    if snapshot.uplinks.is_empty() {
        out.push_str("no uplinks\n");
    } else {
        let mut rows = vec![row(&[
            "UPLINK",
            "STATE",
            "BACKLOG",
            "BYTES",
            "OLDEST",
            "LAST ERROR",
        ])];
        for uplink in &snapshot.uplinks {
            rows.push(vec![
                clean(&uplink.name),
                clean(&uplink.state),
                uplink.backlog_messages.to_string(),
                uplink.backlog_bytes.to_string(),
                duration(uplink.oldest_age_s),
                uplink.last_error.as_deref().map_or("-".into(), clean),
            ]);
        }
        table(&mut out, &rows);
    }

    out.push('\n');
    let _ = writeln!(out, "clients: {} connected", snapshot.clients.len());

    if snapshot.errors.is_empty() {
        out.push_str("recent errors: none\n");
    } else {
        let _ = writeln!(
            out,
            "recent errors ({}, newest first):",
            snapshot.errors.len()
        );
        for error in snapshot.errors.iter().take(ERRORS_SHOWN) {
            let times = if error.count > 1 {
                format!(" (x{})", error.count)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "  {}  {}: {}{times}",
                clean(&error.at),
                clean(&error.source),
                clean(&error.text)
            );
        }
    }
    out
}

/// `2:5 4:1`, or `-`.
fn counts(counts: &std::collections::BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "-".into();
    }
    counts
        .iter()
        .map(|(code, count)| format!("{}:{count}", clean(code)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The Modbus devices' requests: counts, latency (median/max of the recent answers, ms)
/// and backoff.
fn requests(out: &mut String, snapshot: &StatusSnapshot) {
    let mut rows = vec![row(&[
        "DEVICE",
        "OK",
        "FAILED",
        "TIMEOUTS",
        "CRC",
        "EXCEPTIONS",
        "LATENCY MS (LAST/MEDIAN/MAX)",
        "FAILING",
    ])];
    for device in &snapshot.devices {
        let Some(d) = &device.diagnostics else {
            continue;
        };
        rows.push(vec![
            clean(&device.name),
            d.requests_ok.to_string(),
            d.requests_failed.to_string(),
            d.timeouts.to_string(),
            d.crc_errors.to_string(),
            counts(&d.exceptions),
            d.latency.map_or("-".into(), |l| {
                format!("{:.1}/{:.1}/{:.1}", l.last_ms, l.p50_ms, l.max_ms)
            }),
            match &d.backoff {
                Some(b) => format!(
                    "{} in a row, backed off {:.1}s more",
                    d.consecutive_failures, b.remaining_s
                ),
                None if d.consecutive_failures > 0 => {
                    format!("{} in a row", d.consecutive_failures)
                }
                None => "-".into(),
            },
        ]);
    }
    if rows.len() > 1 {
        out.push('\n');
        table(out, &rows);
    }
}

/// The Modbus links and how busy each was over the last minute.
fn links(out: &mut String, snapshot: &StatusSnapshot) {
    if snapshot.buses.is_empty() {
        return;
    }
    let mut rows = vec![row(&[
        "MODBUS LINK",
        "TRANSPORT",
        "REQUESTS",
        "ERRORS",
        "BUSY",
        "DEVICES",
    ])];
    for bus in &snapshot.buses {
        rows.push(vec![
            clean(&bus.name),
            clean(&bus.transport),
            bus.requests.to_string(),
            bus.errors.to_string(),
            format!("{:.1}%", bus.utilisation * 100.0),
            bus.devices
                .iter()
                .map(|d| format!("{}@{}", clean(&d.name), d.unit))
                .collect::<Vec<_>>()
                .join(" "),
        ]);
    }
    out.push('\n');
    table(out, &rows);
}

fn modbus_servers(out: &mut String, snapshot: &StatusSnapshot) {
    if snapshot.modbus_servers.is_empty() {
        return;
    }
    let mut rows = vec![row(&[
        "MODBUS SERVER",
        "ADDRESS",
        "OPEN",
        "REQUESTS",
        "EXCEPTIONS",
        "WRITES OK/FAILED",
    ])];
    for server in &snapshot.modbus_servers {
        rows.push(vec![
            clean(&server.name),
            clean(&server.bind),
            server.connections_open.to_string(),
            server.requests.to_string(),
            counts(&server.exceptions),
            format!("{}/{}", server.writes_ok, server.writes_failed),
        ]);
    }
    out.push('\n');
    table(out, &rows);
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

/// Columns padded to their widest cell (in characters); the last one is not padded.
fn table(out: &mut String, rows: &[Vec<String>]) {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |cell| cell.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for cells in rows {
        let mut line = String::new();
        for (c, cell) in cells.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < cells.len() {
                let pad = widths[c].saturating_sub(cell.chars().count()) + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// Control characters (escape sequences, new lines) written as `\u{1b}`, `\n`.
fn clean(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Seconds as `3d 4h`, `2h 5m`, `5m 3s` or `42s`.
pub fn duration(seconds: u64) -> String {
    let (days, hours, minutes, secs) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    if days > 0 {
        format!("{days}d {hours}h")
    } else if hours > 0 {
        format!("{hours}h {minutes}m")
    } else if minutes > 0 {
        format!("{minutes}m {secs}s")
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::model::{Quality, Value};
    use crate::status::{GatewayInfo, StatusBoard};

    #[test]
    fn the_tables_name_devices_points_and_uplinks_and_escape_control_characters() {
        let board = StatusBoard::new(GatewayInfo {
            id: "site-7".into(),
            version: "1.0.0".into(),
            config_file: "/etc/fieldmq/fieldmq.toml".into(),
            data_dir: "/var/lib/fieldmq".into(),
        });
        let device = board.register_device(
            "kessel-ä",
            "simulated",
            &[("t".into(), None), ("p".into(), None)],
        );
        device.record_reading("t", Some(&Value::Int(1)), &Quality::Good, SystemTime::now());
        device.record_reading(
            "p",
            None,
            &Quality::Bad("\u{1b}[31mred\nline".into()),
            SystemTime::now(),
        );
        board.register_uplink("cloud", "mqtt://127.0.0.1:1883");
        let text = render(&board.snapshot());
        assert!(text.starts_with("gateway site-7  fieldmq 1.0.0"), "{text}");
        let device_line = text
            .lines()
            .find(|l| l.starts_with("kessel-ä"))
            .expect("a device row");
        let cells: Vec<&str> = device_line.split_whitespace().collect();
        assert_eq!(
            &cells[..6],
            ["kessel-ä", "simulated", "starting", "2", "1", "1"]
        );
        assert!(text.contains("cloud   connecting"), "{text}");
        assert!(text.contains("clients: 0 connected"), "{text}");
        assert!(
            !text.contains('\u{1b}'),
            "an escape character reached the terminal"
        );
        assert!(text.contains("\\u{1b}[31mred\\nline"), "{text}");
    }

    #[test]
    fn the_modbus_tables_show_requests_links_and_servers() {
        let board = StatusBoard::new(GatewayInfo {
            id: "site-7".into(),
            version: "1.0.0".into(),
            config_file: "/etc/fieldmq/fieldmq.toml".into(),
            data_dir: "/var/lib/fieldmq".into(),
        });
        let metrics = crate::metrics::Metrics::new();
        let meter = metrics.device("meter");
        board
            .register_device("meter", "modbus-tcp", &[])
            .show_diagnostics(meter.clone());
        meter.request_ok(std::time::Duration::from_millis(4));
        meter.request_ok(std::time::Duration::from_millis(2));
        meter.request_failed(crate::metrics::ErrorKind::Exception);
        meter.exception(2);
        meter.request_failed(crate::metrics::ErrorKind::Timeout);
        meter.consecutive_failures(1);
        let bus = metrics.bus("10.0.0.5:502", "tcp");
        bus.request(std::time::Duration::from_millis(4), false);
        board.register_bus("10.0.0.5:502", "tcp", vec![("meter".into(), 3)], bus);
        let server = metrics.modbus_server("modbus-server-0");
        server.request(3);
        server.exception(2);
        server.write(true);
        board.set_modbus_servers(vec![(
            "modbus-server-0".into(),
            "127.0.0.1:5020".parse().expect("address"),
            server,
        )]);
        let text = render(&board.snapshot());
        let line = |start: &str| {
            text.lines()
                .filter(|l| l.starts_with(start))
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .collect::<Vec<_>>()
        };
        // The device table's row, then the requests table's.
        assert_eq!(
            line("meter")[1],
            [
                "meter",
                "2",
                "2",
                "1",
                "0",
                "2:1",
                "2.0/2.0/4.0",
                "1",
                "in",
                "a",
                "row"
            ],
            "{text}"
        );
        // (How busy depends on the clock: a fresh link with a 4 ms request is near 100%.)
        let link = &line("10.0.0.5:502")[0];
        assert_eq!(
            [&link[..4], &link[5..]].concat(),
            ["10.0.0.5:502", "tcp", "1", "0", "meter@3"],
            "{text}"
        );
        assert!(link[4].ends_with('%'), "{text}");
        assert_eq!(
            line("modbus-server-0")[0],
            ["modbus-server-0", "127.0.0.1:5020", "0", "1", "2:1", "1/0"],
            "{text}"
        );
    }
}
