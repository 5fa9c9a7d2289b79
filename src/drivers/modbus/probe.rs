//! `fieldmq probe`: reads a register range from a device named on the command line and
//! prints the raw words in hex and every interpretation (u16/i16/u32/i32/f32/u64/i64/f64 in
//! all four byte/word orders), so the right `type = "f32:CDAB"` can be picked by eye.
//! With `--sunspec` it finds the device's SunSpec models instead and prints each with its
//! points, decoded and scaled as `profile = "sunspec"` publishes them. `--repeat N` reads
//! the range N times, to see how a device and its link behave. Every report ends with a
//! summary of the requests it took: failures by kind and the answer times.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use super::bus::{call, connect, exception_name, Failure, Link, Op, Reply};
use super::codec::{f32_to_f64, ordered_bytes};
use super::config::{Order, Parity, SerialSettings, Table};
use super::sunspec;

/// Arguments of `fieldmq probe`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("link").required(true).args(["tcp", "rtu", "rtu_over_tcp"])))]
pub struct ProbeArgs {
    /// Modbus TCP device, `host:port`.
    #[arg(long, value_name = "HOST:PORT")]
    pub tcp: Option<String>,
    /// Modbus RTU serial port, e.g. /dev/ttyUSB0.
    #[arg(long, value_name = "PORT")]
    pub rtu: Option<String>,
    /// RTU frames over TCP (a serial device server in transparent mode), `host:port`.
    #[arg(long, value_name = "HOST:PORT")]
    pub rtu_over_tcp: Option<String>,
    #[arg(long, default_value_t = 9600)]
    pub baud: u32,
    /// none, even or odd.
    #[arg(long, default_value = "even")]
    pub parity: String,
    #[arg(long, default_value_t = 8)]
    pub data_bits: u8,
    #[arg(long, default_value_t = 1)]
    pub stop_bits: u8,
    /// Unit id (slave address).
    #[arg(long, default_value_t = 1)]
    pub unit: u8,
    /// coil, discrete, holding or input.
    #[arg(long, default_value = "holding")]
    pub table: String,
    /// First 0-based protocol address (register "40001" is address 0).
    #[arg(long, required_unless_present = "sunspec")]
    pub address: Option<u16>,
    /// Registers (or bits) to read, at most 125 (2000).
    #[arg(long, default_value_t = 4)]
    pub count: u16,
    /// Read the range this many times, one request after another; the report shows the
    /// last answer and counts every failure.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000), conflicts_with = "sunspec")]
    pub repeat: u32,
    /// Response timeout, e.g. "1s".
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Find the SunSpec marker and models (holding registers at 40000, 0 or 50000) and
    /// print every model with its points, decoded and scaled.
    #[arg(long, conflicts_with_all = ["address", "count", "table"])]
    pub sunspec: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Link(String),
    #[error("the device answered {exception}")]
    Exception { exception: String },
    #[error("no response within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// `--repeat`: no request was answered.
    #[error("{last}\n{summary}")]
    NoAnswer { last: String, summary: String },
}

/// What the requests of one probe came to, for the summary line.
#[derive(Debug, Default)]
struct Tally {
    requests: u32,
    failed: u32,
    timeouts: u32,
    crc_errors: u32,
    exceptions: BTreeMap<u8, u32>,
    /// Of the answered requests.
    latencies: Vec<Duration>,
}

impl Tally {
    fn count<T>(&mut self, result: &Result<T, Failure>, took: Duration) {
        self.requests += 1;
        match result {
            Ok(_) => self.latencies.push(took),
            Err(failure) => {
                self.failed += 1;
                match failure {
                    Failure::Timeout(_) => self.timeouts += 1,
                    Failure::Garbled { .. } => self.crc_errors += 1,
                    Failure::Exception(code) => {
                        *self.exceptions.entry(u8::from(*code)).or_default() += 1
                    }
                    Failure::Link(_) | Failure::Unexpected(_) => {}
                }
            }
        }
    }

    /// `requests 5, failed 2 (timeouts 1, CRC errors 0, exceptions 2:1), answer time
    /// min/avg/max 1.0/1.5/2.0 ms`
    fn summary(&self) -> String {
        let exceptions = if self.exceptions.is_empty() {
            "none".to_owned()
        } else {
            self.exceptions
                .iter()
                .map(|(code, count)| format!("{code}:{count}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let times = match (self.latencies.iter().min(), self.latencies.iter().max()) {
            (Some(min), Some(max)) => {
                let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
                let total: Duration = self.latencies.iter().sum();
                let avg = ms(&total) / self.latencies.len() as f64;
                format!("{:.1}/{avg:.1}/{:.1} ms", ms(min), ms(max))
            }
            _ => "- (no answer)".to_owned(),
        };
        format!(
            "requests {}, failed {} (timeouts {}, CRC errors {}, exceptions {exceptions}), answer time min/avg/max {times}",
            self.requests, self.failed, self.timeouts, self.crc_errors
        )
    }
}

/// Reads the range (or, with `--sunspec`, the SunSpec models) and returns the report to
/// print.
pub async fn probe(args: &ProbeArgs) -> Result<String, ProbeError> {
    if args.sunspec {
        let (link, source) = link_of(args)?;
        return probe_sunspec(&link, &source, args.unit, args.timeout).await;
    }
    let Some(address) = args.address else {
        return Err(ProbeError::Usage(
            "give --address (or --sunspec to find SunSpec models)".into(),
        ));
    };
    let table = match args.table.to_ascii_lowercase().as_str() {
        "coil" | "coils" => Table::Coil,
        "discrete" => Table::Discrete,
        "holding" => Table::Holding,
        "input" => Table::Input,
        other => {
            return Err(ProbeError::Usage(format!(
                "unknown table {other:?}, expected coil, discrete, holding or input"
            )))
        }
    };
    let max = if table.is_bits() { 2000 } else { 125 };
    if args.count == 0 || args.count > max {
        return Err(ProbeError::Usage(format!(
            "--count must be 1 to {max} for {table}"
        )));
    }
    if u32::from(address) + u32::from(args.count) > 65_536 {
        return Err(ProbeError::Usage(
            "the range runs past address 65535".into(),
        ));
    }
    let (link, source) = link_of(args)?;
    let mut connection = connect(&link, args.timeout.max(Duration::from_secs(3)))
        .await
        .map_err(ProbeError::Link)?;
    let (start, count) = (address, args.count);
    let read = Op::Read {
        table,
        start,
        count,
    };
    let mut tally = Tally::default();
    let mut answer = None;
    let mut last_failure = None;
    for _ in 0..args.repeat {
        let asked = std::time::Instant::now();
        let result = call(&mut connection, args.unit, &read, args.timeout).await;
        let took = asked.elapsed();
        tally.count(&result, took);
        match result {
            Ok(reply) => answer = Some((reply, took)),
            Err(failure) => {
                // A late answer or leftover bytes would be taken for the next answer.
                let reopen = matches!(
                    failure,
                    Failure::Timeout(_) | Failure::Garbled { .. } | Failure::Link(_)
                );
                last_failure = Some(failure);
                if reopen && tally.requests < args.repeat {
                    connection = connect(&link, args.timeout.max(Duration::from_secs(3)))
                        .await
                        .map_err(ProbeError::Link)?;
                }
            }
        }
    }
    let Some((reply, took)) = answer else {
        let failure = last_failure.unwrap_or(Failure::Link("no request made".into()));
        if args.repeat == 1 {
            return Err(probe_error(failure));
        }
        return Err(ProbeError::NoAnswer {
            last: probe_error(failure).to_string(),
            summary: tally.summary(),
        });
    };
    let data = match reply {
        Reply::Bits(bits) => Data::Bits(bits),
        Reply::Words(words) => Data::Words(words),
        Reply::Done => Data::Words(Vec::new()),
    };
    let mut out = format!(
        "{table} {start}..={} of unit {} at {source} (0-based protocol addresses), answered in {:.1} ms\n\n",
        u32::from(start) + u32::from(count) - 1,
        args.unit,
        took.as_secs_f64() * 1000.0
    );
    match data {
        Data::Words(words) => out.push_str(&render_words(start, &words)),
        Data::Bits(bits) => {
            for (i, bit) in bits.iter().take(usize::from(count)).enumerate() {
                let _ = writeln!(
                    out,
                    "{:>7}  {}",
                    u32::from(start) + i as u32,
                    u8::from(*bit)
                );
            }
        }
    }
    let _ = writeln!(out, "\n{}", tally.summary());
    Ok(out)
}

fn probe_error(failure: Failure) -> ProbeError {
    match failure {
        Failure::Timeout(after) => ProbeError::Timeout(after),
        Failure::Exception(code) => ProbeError::Exception {
            exception: exception_name(code),
        },
        failure @ (Failure::Link(_) | Failure::Unexpected(_) | Failure::Garbled { .. }) => {
            ProbeError::Link(failure.describe())
        }
    }
}

/// The link the arguments name, and how to name it in the report.
fn link_of(args: &ProbeArgs) -> Result<(Link, String), ProbeError> {
    let link = match (&args.tcp, &args.rtu, &args.rtu_over_tcp) {
        (Some(address), None, None) => Link::Tcp {
            address: address.clone(),
        },
        (None, None, Some(address)) => Link::RtuOverTcp {
            address: address.clone(),
        },
        (None, Some(port), None) => Link::Rtu(SerialSettings {
            path: port.clone(),
            baud: args.baud,
            parity: match args.parity.to_ascii_lowercase().as_str() {
                "none" => Parity::None,
                "even" => Parity::Even,
                "odd" => Parity::Odd,
                other => {
                    return Err(ProbeError::Usage(format!(
                        "unknown parity {other:?}, expected none, even or odd"
                    )))
                }
            },
            data_bits: args.data_bits,
            stop_bits: args.stop_bits,
            flow_control: crate::drivers::config::FlowControl::None,
        }),
        _ => {
            return Err(ProbeError::Usage(
                "give exactly one of --tcp, --rtu and --rtu-over-tcp".into(),
            ))
        }
    };
    let source = match &link {
        Link::Tcp { address } => address.clone(),
        Link::RtuOverTcp { address } => format!("{address} (rtu-over-tcp)"),
        Link::Rtu(settings) => format!("{} at {} baud", settings.path, settings.baud),
    };
    Ok((link, source))
}

/// A probe connection seen as the device's holding registers, for SunSpec discovery.
struct ProbeRegisters {
    connection: super::bus::Connection,
    unit: u8,
    timeout: Duration,
    tally: Tally,
}

impl sunspec::Registers for ProbeRegisters {
    async fn read(&mut self, start: u16, count: u16) -> Result<Vec<u16>, Failure> {
        let op = Op::Read {
            table: Table::Holding,
            start,
            count,
        };
        let asked = std::time::Instant::now();
        let result = call(&mut self.connection, self.unit, &op, self.timeout).await;
        self.tally.count(&result, asked.elapsed());
        match result? {
            Reply::Words(words) => Ok(words),
            Reply::Bits(_) | Reply::Done => Err(Failure::Unexpected(
                "an answer of another kind to a register read".into(),
            )),
        }
    }
}

/// `fieldmq probe --sunspec`: the base, then each model (id, name, address, length) with
/// its points as `profile = "sunspec"` names, decodes and scales them.
async fn probe_sunspec(
    link: &Link,
    source: &str,
    unit: u8,
    timeout: Duration,
) -> Result<String, ProbeError> {
    let connection = connect(link, timeout.max(Duration::from_secs(3)))
        .await
        .map_err(ProbeError::Link)?;
    let mut registers = ProbeRegisters {
        connection,
        unit,
        timeout,
        tally: Tally::default(),
    };
    let (base, found) = match sunspec::discover(&mut registers).await {
        Ok(chain) => chain,
        Err(sunspec::DiscoveryError::Refused(reason)) => return Err(ProbeError::Link(reason)),
        Err(sunspec::DiscoveryError::Link(failure)) => return Err(probe_error(failure)),
    };
    let mut out = format!(
        "SunSpec marker at holding {base} of unit {unit} at {source} (0-based protocol addresses)\n\n"
    );
    let blocks = sunspec::blocks(&found);
    for f in &found {
        let block = blocks.iter().find(|b| b.found == *f);
        let name = match block {
            Some(block) => block.model.name,
            None => "not mapped",
        };
        let _ = writeln!(
            out,
            "model {} {name} at {}, length {}",
            f.id, f.address, f.length
        );
        let Some(block) = block else {
            continue;
        };
        let start = f.data_start();
        let ranges = sunspec::chunks(
            start,
            block.count,
            block
                .points
                .iter()
                .map(|(_, source)| (source.address, source.kind.width())),
        );
        let words = match sunspec::read_chunks(&mut registers, &ranges).await {
            Ok(words) => words,
            Err(failure) => {
                let _ = writeln!(out, "  cannot read the model: {}", failure.describe());
                continue;
            }
        };
        for (point, point_source) in &block.points {
            let value = match sunspec::decode(point_source, &words, start) {
                Ok(value) => format!(
                    "{value}{}",
                    point
                        .unit
                        .as_deref()
                        .map(|u| format!(" {u}"))
                        .unwrap_or_default()
                ),
                Err(error) => format!("bad: {error}"),
            };
            let _ = writeln!(out, "  {:<28} {:>5}  {value}", point.name, point.address);
        }
    }
    let end = found.last().map_or(u32::from(base) + 2, |f| {
        u32::from(f.data_start()) + u32::from(f.length)
    });
    let _ = writeln!(out, "end marker at {end}");
    let _ = writeln!(out, "\n{}", registers.tally.summary());
    Ok(out)
}

enum Data {
    Words(Vec<u16>),
    Bits(Vec<bool>),
}

/// Every interpretation of `words`, read from `start`.
pub fn render_words(start: u16, words: &[u16]) -> String {
    let mut out = String::new();
    let address = |i: usize| u32::from(start) + i as u32;
    let _ = writeln!(
        out,
        "16-bit values (one register each; BADC = bytes swapped)"
    );
    let _ = writeln!(
        out,
        "{:>7}  {:<6}  {:>6}  {:>6}  {:>8}  {:>8}  ascii",
        "address", "hex", "u16", "i16", "BADC u16", "BADC i16"
    );
    for (i, word) in words.iter().enumerate() {
        let swapped = word.swap_bytes();
        let ascii: String = word
            .to_be_bytes()
            .iter()
            .map(|b| {
                if b.is_ascii_graphic() || *b == b' ' {
                    char::from(*b)
                } else {
                    '.'
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "{:>7}  0x{word:04X}  {word:>6}  {:>6}  {swapped:>8}  {:>8}  {ascii}",
            address(i),
            *word as i16,
            swapped as i16
        );
    }
    if words.len() >= 2 {
        let _ = writeln!(out, "\n32-bit values (two registers from each address)");
        let _ = writeln!(
            out,
            "{:>7}  {:<5}  {:<10}  {:>10}  {:>11}  f32",
            "address", "order", "hex", "u32", "i32"
        );
        for i in 0..=words.len() - 2 {
            for order in Order::ALL {
                let bytes = ordered_bytes(&words[i..i + 2], order);
                let Ok(array) = <[u8; 4]>::try_from(bytes.as_slice()) else {
                    continue;
                };
                let u = u32::from_be_bytes(array);
                let _ = writeln!(
                    out,
                    "{:>7}  {:<5}  0x{u:08X}  {u:>10}  {:>11}  {}",
                    address(i),
                    order.name(),
                    u as i32,
                    show_float(f32_to_f64(f32::from_be_bytes(array)))
                );
            }
        }
    }
    if words.len() >= 4 {
        let _ = writeln!(out, "\n64-bit values (four registers from each address)");
        let _ = writeln!(
            out,
            "{:>7}  {:<5}  {:<18}  {:>20}  {:>20}  f64",
            "address", "order", "hex", "u64", "i64"
        );
        for i in 0..=words.len() - 4 {
            for order in Order::ALL {
                let bytes = ordered_bytes(&words[i..i + 4], order);
                let Ok(array) = <[u8; 8]>::try_from(bytes.as_slice()) else {
                    continue;
                };
                let u = u64::from_be_bytes(array);
                let _ = writeln!(
                    out,
                    "{:>7}  {:<5}  0x{u:016X}  {u:>20}  {:>20}  {}",
                    address(i),
                    order.name(),
                    u as i64,
                    show_float(f64::from_be_bytes(array))
                );
            }
        }
    }
    out
}

/// Plain notation for everyday magnitudes, scientific for the rest (a float read in the
/// wrong order is often tiny or huge, and 300 zeros would hide the line).
fn show_float(x: f64) -> String {
    if x == 0.0 || !x.is_finite() || (1e-4..1e15).contains(&x.abs()) {
        x.to_string()
    } else {
        format!("{x:e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_modbus::ExceptionCode;

    #[test]
    fn every_order_of_a_float_is_shown() {
        // 25.0f32 = 0x41C80000, stored word-swapped (CDAB).
        let out = render_words(10, &[0x0000, 0x41C8]);
        assert!(
            out.contains("     10  CDAB   0x41C80000  1103626240   1103626240  25"),
            "{out}"
        );
        assert!(out.contains("     10  ABCD   0x000041C8"), "{out}");
        assert!(out.contains("     11  0x41C8   16840   16840"), "{out}");
    }

    #[test]
    fn the_summary_counts_failures_by_kind_and_the_answer_times() {
        let mut tally = Tally::default();
        assert_eq!(
            tally.summary(),
            "requests 0, failed 0 (timeouts 0, CRC errors 0, exceptions none), answer time min/avg/max - (no answer)"
        );
        let ms = Duration::from_millis;
        tally.count(&Ok::<(), Failure>(()), ms(1));
        tally.count(&Ok::<(), Failure>(()), ms(4));
        tally.count(&Err::<(), _>(Failure::Timeout(ms(500))), ms(500));
        let garbled = Failure::Garbled {
            bytes: 3,
            after: ms(500),
        };
        tally.count(&Err::<(), _>(garbled), ms(500));
        for code in [
            ExceptionCode::IllegalDataAddress,
            ExceptionCode::IllegalDataAddress,
        ] {
            tally.count(&Err::<(), _>(Failure::Exception(code)), ms(2));
        }
        tally.count(
            &Err::<(), _>(Failure::Exception(ExceptionCode::ServerDeviceBusy)),
            ms(2),
        );
        assert_eq!(
            tally.summary(),
            "requests 7, failed 5 (timeouts 1, CRC errors 1, exceptions 2:2 6:1), answer time min/avg/max 1.0/2.5/4.0 ms"
        );
    }
}
