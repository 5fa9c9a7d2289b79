//! The bus task: one task owns one connection (a Modbus TCP socket, or a serial port with
//! every RTU device on it) and runs every transaction on it, one at a time.
//!
//! Invariants:
//! - Only this task touches the connection; writes arrive through a bounded channel (the
//!   per-device write forwarders wait when it is full: a command is never dropped) and go
//!   before any poll that is due. A command that writes several points runs all of its
//!   requests before anything else uses the bus.
//! - Every request has a timeout (tokio-modbus has none).
//! - RTU: between two frames the line stays silent for 3.5 character times plus the
//!   turnaround of the device last addressed.
//! - A device that fails (timeout, broken frame) three times in a row is backed off
//!   exponentially with jitter; while backed off it gets one request per backoff period,
//!   so a dead unit cannot take the bus time of the live ones.
//! - A lost link (connect refused, port gone, I/O error) is reopened with exponential
//!   backoff and jitter; meanwhile every device on it is `offline` and writes are answered
//!   with an error at once.

use std::time::{Duration, SystemTime};

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_modbus::client::{Client, Context};
use tokio_modbus::slave::SlaveContext;
use tokio_modbus::{ExceptionCode, Request, Response, Slave};
use tokio_util::sync::CancellationToken;

use super::codec;
use super::config::{ModbusConfig, SerialSettings, Table, Transport, MAX_REGISTERS_PER_REQUEST};
use super::plan::{self, ReadRequest, WriteStep};
use super::report::Reporter;
use super::sunspec::{self, Found};
use crate::backoff::{Backoff, Jitter};
use crate::drivers::{DeviceContext, DeviceStatus, PointAccess, SortedWrite};
use crate::metrics::ErrorKind;
use crate::model::{
    Message, PointOutcome, PointsWriteOutcome, PointsWriteRequest, Quality, Reading, Value,
    WriteOutcome, WriteRequest,
};

/// Consecutive failures after which a device is backed off.
const FAILURES_BEFORE_BACKOFF: u32 = 3;
/// Pending write commands per bus.
const WRITE_QUEUE: usize = 16;

/// One device on a bus, as the bus task sees it.
pub(crate) struct BusDevice {
    pub(crate) config: ModbusConfig,
    pub(crate) poll: Duration,
    pub(crate) context: DeviceContext,
}

struct Device {
    config: ModbusConfig,
    context: DeviceContext,
    poll: Duration,
    /// `profile = "sunspec"`: the model discovery and how the SunSpec points decode.
    sunspec: Option<SunSpec>,
    reads: Vec<Scheduled>,
    reporters: Vec<Reporter>,
    /// Whether each point's last reading was good (`None`: not read yet), for the metrics.
    point_good: Vec<Option<bool>>,
    /// Consecutive link-level failures (timeouts, broken frames).
    failures: u32,
    last_failure: Option<String>,
    backoff: Backoff,
    /// While backed off: no request before this.
    retry_at: Option<Instant>,
    published_status: Option<DeviceStatus>,
}

/// A SunSpec device's discovery state. Until the model chain has been read the device has
/// only its configured points; then each mapped model adds its points and one read of its
/// block, never split on an exception: a value and its scale factor must come from one
/// poll (a block longer than one request is read in consecutive requests).
///
/// The chain is read again whenever the device may have changed its models: after the
/// link was reopened, and when a model block's read is refused with illegal data address
/// (which the block's read then retries only every `backoff_max`, so a device that keeps
/// refusing costs one chain read per `backoff_max`). A chain that reads the same keeps
/// the points as they are; a changed one replaces every SunSpec point.
struct SunSpec {
    discovered: bool,
    /// The device's points before discovery added any: the configured ones.
    configured: usize,
    /// The models the points were built from.
    found: Vec<Found>,
    /// The next discovery attempt.
    due: Instant,
    /// Why the last attempt failed, when the device answered (no marker, a broken chain).
    error: Option<String>,
    /// Per point of the device, parallel to `config.points`: how a SunSpec point decodes.
    sources: Vec<Option<sunspec::Source>>,
    /// The scale factor last read at each scale-factor register (valid ones only): a
    /// write to a scaled point is encoded with it, and its read-back decoded.
    scale_factors: HashMap<u16, i16>,
}

struct Scheduled {
    request: ReadRequest,
    due: Instant,
    /// The exception (or decode error) of the last attempt.
    error: Option<String>,
    /// Whether it has been tried since start: the device is `online` only when every
    /// read has been tried (and none failed).
    attempted: bool,
}

struct WriteCommand {
    device: usize,
    request: Command,
}

/// A write of one point (`<point topic>/set`) or of several (`<device topic>/set`).
enum Command {
    Point(WriteRequest),
    Points(PointsWriteRequest),
}

/// What goes over the wire.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Op {
    Read {
        table: Table,
        start: u16,
        count: u16,
    },
    WriteCoil {
        address: u16,
        value: bool,
    },
    WriteRegister {
        address: u16,
        value: u16,
    },
    WriteRegisters {
        address: u16,
        values: Vec<u16>,
    },
    WriteCoils {
        address: u16,
        values: Vec<bool>,
    },
}

pub(super) enum Reply {
    Words(Vec<u16>),
    Bits(Vec<bool>),
    Done,
}

/// Why a transaction failed. The device refusing is not a broken link.
#[derive(Debug)]
pub(super) enum Failure {
    Exception(ExceptionCode),
    Timeout(Duration),
    /// I/O or framing: the connection is reopened.
    Link(String),
    /// RTU: bytes came back but never a valid frame (a CRC error, noise on the line, a
    /// collision). The connection is reopened at once, so no leftover byte can join the
    /// next answer.
    Garbled {
        bytes: usize,
        after: Duration,
    },
    /// A well-formed answer that does not fit the request (a write echoed with another
    /// address or value, another function's answer): the device answered, the link is fine.
    Unexpected(String),
}

impl Failure {
    pub(super) fn describe(&self) -> String {
        match self {
            Failure::Exception(code) => exception_name(*code),
            Failure::Timeout(after) => {
                format!("no response within {}", humantime::format_duration(*after))
            }
            Failure::Link(error) | Failure::Unexpected(error) => error.clone(),
            Failure::Garbled { bytes, after } => format!(
                "no valid answer within {}: {bytes} byte(s) without a valid frame (CRC error or noise)",
                humantime::format_duration(*after)
            ),
        }
    }
}

/// `illegal data address (exception 2)`
pub fn exception_name(code: ExceptionCode) -> String {
    let name = match code {
        ExceptionCode::IllegalFunction => "illegal function",
        ExceptionCode::IllegalDataAddress => "illegal data address",
        ExceptionCode::IllegalDataValue => "illegal data value",
        ExceptionCode::ServerDeviceFailure => "server device failure",
        ExceptionCode::Acknowledge => "acknowledge",
        ExceptionCode::ServerDeviceBusy => "server device busy",
        ExceptionCode::MemoryParityError => "memory parity error",
        ExceptionCode::GatewayPathUnavailable => "gateway path unavailable",
        ExceptionCode::GatewayTargetDevice => "gateway target device failed to respond",
        ExceptionCode::Custom(_) => "unknown exception",
    };
    format!("{name} (exception {})", u8::from(code))
}

/// The link a bus owns.
#[derive(Debug, Clone)]
pub(crate) enum Link {
    Tcp { address: String },
    RtuOverTcp { address: String },
    Rtu(SerialSettings),
}

impl Link {
    pub(crate) fn of(transport: &Transport) -> Link {
        match transport {
            Transport::Tcp { address } => Link::Tcp {
                address: address.clone(),
            },
            Transport::RtuOverTcp { address } => Link::RtuOverTcp {
                address: address.clone(),
            },
            Transport::Rtu(settings) => Link::Rtu(settings.clone()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Link::Tcp { address } => address.clone(),
            Link::RtuOverTcp { address } => format!("{address} (rtu-over-tcp)"),
            Link::Rtu(settings) => settings.path.clone(),
        }
    }

    fn silent_interval(&self) -> Duration {
        match self {
            // The device server keeps the serial line's timing.
            Link::Tcp { .. } | Link::RtuOverTcp { .. } => Duration::ZERO,
            Link::Rtu(settings) => settings.silent_interval(),
        }
    }
}

/// An open link: the tokio-modbus client and, for RTU framing, the count of bytes received
/// since the last request was sent.
pub(crate) struct Connection {
    context: Context,
    /// tokio-modbus' RTU decoder skips a frame with a bad CRC byte by byte, silently: to the
    /// caller a garbled answer looks like no answer. This count tells them apart.
    received: Option<Arc<AtomicUsize>>,
}

/// A stream that counts the bytes read from it.
#[derive(Debug)]
struct Counted<S> {
    inner: S,
    received: Arc<AtomicUsize>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            self.received
                .fetch_add(buf.filled().len() - before, Ordering::Relaxed);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn rtu_connection<S>(stream: S) -> Connection
where
    S: AsyncRead + AsyncWrite + std::fmt::Debug + Unpin + Send + 'static,
{
    let received = Arc::new(AtomicUsize::new(0));
    let counted = Counted {
        inner: stream,
        received: received.clone(),
    };
    Connection {
        context: tokio_modbus::client::rtu::attach(counted),
        received: Some(received),
    }
}

/// Opens the link. TCP connects (bounded by `limit`), RTU opens the serial port.
pub(crate) async fn connect(link: &Link, limit: Duration) -> Result<Connection, String> {
    match link {
        Link::Tcp { address } => {
            let stream = connect_tcp(address, limit).await?;
            Ok(Connection {
                context: tokio_modbus::client::tcp::attach(stream),
                received: None,
            })
        }
        Link::RtuOverTcp { address } => Ok(rtu_connection(connect_tcp(address, limit).await?)),
        Link::Rtu(settings) => Ok(rtu_connection(crate::drivers::serial::open_port(settings)?)),
    }
}

/// A TCP connection to `address` (each resolved address tried in turn), bounded by `limit`.
async fn connect_tcp(address: &str, limit: Duration) -> Result<tokio::net::TcpStream, String> {
    let addresses = timeout(limit, tokio::net::lookup_host(address))
        .await
        .map_err(|_| format!("cannot resolve {address}: timed out"))?
        .map_err(|e| format!("cannot resolve {address}: {e}"))?;
    let mut last = format!("{address} resolves to no address");
    for socket in addresses {
        match timeout(limit, tokio::net::TcpStream::connect(socket)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = format!("cannot connect to {address}: {e}"),
            Err(_) => last = format!("cannot connect to {address}: timed out"),
        }
    }
    Err(last)
}

/// Runs one transaction with a timeout.
pub(super) async fn call(
    connection: &mut Connection,
    unit: u8,
    op: &Op,
    limit: Duration,
) -> Result<Reply, Failure> {
    let Connection { context, received } = connection;
    context.set_slave(Slave(unit));
    if let Some(received) = received {
        received.store(0, Ordering::Relaxed);
    }
    // Through `Client::call` rather than tokio-modbus' `Reader`/`Writer`: those check the
    // answer with debug assertions only (a short answer from a device would panic a debug
    // build and pass unnoticed in release); here every answer is checked the same way.
    let request = match op {
        Op::Read {
            table,
            start,
            count,
        } => match table {
            Table::Coil => Request::ReadCoils(*start, *count),
            Table::Discrete => Request::ReadDiscreteInputs(*start, *count),
            Table::Holding => Request::ReadHoldingRegisters(*start, *count),
            Table::Input => Request::ReadInputRegisters(*start, *count),
        },
        Op::WriteCoil { address, value } => Request::WriteSingleCoil(*address, *value),
        Op::WriteRegister { address, value } => Request::WriteSingleRegister(*address, *value),
        Op::WriteRegisters { address, values } => {
            Request::WriteMultipleRegisters(*address, std::borrow::Cow::Borrowed(values))
        }
        Op::WriteCoils { address, values } => {
            Request::WriteMultipleCoils(*address, std::borrow::Cow::Borrowed(values))
        }
    };
    match timeout(limit, context.call(request)).await {
        Err(_) => match received.as_ref().map(|r| r.load(Ordering::Relaxed)) {
            Some(bytes) if bytes > 0 => Err(Failure::Garbled {
                bytes,
                after: limit,
            }),
            _ => Err(Failure::Timeout(limit)),
        },
        Ok(Err(error)) => Err(Failure::Link(error.to_string())),
        Ok(Ok(Err(code))) => Err(Failure::Exception(code)),
        Ok(Ok(Ok(response))) => reply_to(op, response),
    }
}

/// The answer to `op`, or why it does not fit. A read answered with fewer values than asked
/// is still a reply: the points it does not cover go bad as a short response.
fn reply_to(op: &Op, response: Response) -> Result<Reply, Failure> {
    let unexpected = |what: String| Err(Failure::Unexpected(what));
    match (op, response) {
        (
            Op::Read { count, .. },
            Response::ReadCoils(mut bits) | Response::ReadDiscreteInputs(mut bits),
        ) => {
            // Bits come in whole bytes; the padding is not a value.
            bits.truncate(usize::from(*count));
            Ok(Reply::Bits(bits))
        }
        (
            Op::Read { .. },
            Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words),
        ) => Ok(Reply::Words(words)),
        (Op::WriteCoil { address, value }, Response::WriteSingleCoil(echo_address, echo_value)) => {
            if (echo_address, echo_value) == (*address, *value) {
                Ok(Reply::Done)
            } else {
                unexpected(format!(
                    "the device echoed coil {echo_address} = {echo_value} for coil {address} = {value}"
                ))
            }
        }
        (
            Op::WriteRegister { address, value },
            Response::WriteSingleRegister(echo_address, echo_value),
        ) => {
            if (echo_address, echo_value) == (*address, *value) {
                Ok(Reply::Done)
            } else {
                unexpected(format!(
                    "the device echoed register {echo_address} = {echo_value} for register {address} = {value}"
                ))
            }
        }
        (
            Op::WriteRegisters { address, values },
            Response::WriteMultipleRegisters(echo_address, echo_count),
        ) => {
            if echo_address == *address && usize::from(echo_count) == values.len() {
                Ok(Reply::Done)
            } else {
                unexpected(format!(
                    "the device confirmed {echo_count} registers at {echo_address} for {} at {address}",
                    values.len()
                ))
            }
        }
        (
            Op::WriteCoils { address, values },
            Response::WriteMultipleCoils(echo_address, echo_count),
        ) => {
            if echo_address == *address && usize::from(echo_count) == values.len() {
                Ok(Reply::Done)
            } else {
                unexpected(format!(
                    "the device confirmed {echo_count} coils at {echo_address} for {} at {address}",
                    values.len()
                ))
            }
        }
        (_, response) => unexpected(format!("an answer of another kind: {response:?}")),
    }
}

/// The bus: a link and the devices on it.
pub(crate) struct Bus {
    link: Link,
    silent: Duration,
    connection: Option<Connection>,
    /// RTU: no frame before this (silent interval + turnaround).
    free_at: Instant,
    link_backoff: Backoff,
    link_error: Option<String>,
    devices: Vec<Device>,
}

impl Bus {
    pub(crate) fn new(link: Link, devices: Vec<BusDevice>) -> Bus {
        let now = Instant::now();
        let (backoff_min, backoff_max) = devices
            .first()
            .map(|d| (d.config.backoff_min, d.config.backoff_max))
            .unwrap_or((Duration::from_secs(1), Duration::from_secs(60)));
        let devices = devices
            .into_iter()
            .map(|device| {
                let requests =
                    plan::plan(&device.config.points, device.poll, &device.config.limits);
                let described: Vec<String> = requests
                    .iter()
                    .map(|r| {
                        format!(
                            "{} ({} points, every {})",
                            r.describe(),
                            r.points.len(),
                            humantime::format_duration(r.interval)
                        )
                    })
                    .collect();
                tracing::debug!(
                    device = %device.context.device,
                    link = %link.describe(),
                    unit = device.config.unit,
                    requests = requests.len(),
                    plan = %described.join("; "),
                    "modbus read plan"
                );
                Device {
                    sunspec: device.config.sunspec.then(|| SunSpec {
                        discovered: false,
                        configured: device.config.points.len(),
                        found: Vec::new(),
                        due: now,
                        error: None,
                        sources: vec![None; device.config.points.len()],
                        scale_factors: HashMap::new(),
                    }),
                    poll: device.poll,
                    reporters: device.config.points.iter().map(Reporter::new).collect(),
                    point_good: vec![None; device.config.points.len()],
                    reads: requests
                        .into_iter()
                        .map(|request| Scheduled {
                            request,
                            due: now,
                            error: None,
                            attempted: false,
                        })
                        .collect(),
                    backoff: Backoff::new(
                        device.config.backoff_min,
                        device.config.backoff_max,
                        Jitter::Quarter,
                    ),
                    config: device.config,
                    context: device.context,
                    failures: 0,
                    last_failure: None,
                    retry_at: None,
                    published_status: None,
                }
            })
            .collect();
        Bus {
            silent: link.silent_interval(),
            link,
            connection: None,
            free_at: now,
            link_backoff: Backoff::new(backoff_min, backoff_max, Jitter::Quarter),
            link_error: None,
            devices,
        }
    }

    /// Runs until `shutdown`.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let (tx, mut writes) = mpsc::channel(WRITE_QUEUE);
        let mut forwarders = JoinSet::new();
        for (index, device) in self.devices.iter().enumerate() {
            let points: Vec<(String, bool)> = device
                .config
                .points
                .iter()
                .map(|p| (p.name.clone(), p.writable))
                .collect();
            // Every point is covered, so a write to a read-only or unknown point is
            // answered rather than ignored.
            let names: Vec<&str> = points.iter().map(|(name, _)| name.as_str()).collect();
            match device
                .context
                .subscribe_writes_and_device_writes(&names)
                .await
            {
                Ok(subscription) => {
                    forwarders.spawn(forward_writes(
                        device.context.clone(),
                        points,
                        device.sunspec.is_some(),
                        index,
                        subscription,
                        tx.clone(),
                        shutdown.clone(),
                    ));
                }
                Err(error) => {
                    tracing::error!(device = %device.context.device, %error, "cannot subscribe to writes");
                }
            }
        }
        drop(tx);
        let mut writes_open = !forwarders.is_empty();

        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if self.connection.is_none()
                && !self.open(&shutdown, &mut writes, &mut writes_open).await
            {
                break;
            }
            if let Ok(command) = writes.try_recv() {
                self.write(command).await;
                continue;
            }
            let next = self.next_read();
            // A discovery goes before the reads due at the same time.
            let discovery = self
                .next_discovery()
                .filter(|(_, due)| next.is_none_or(|(_, _, read_due)| *due <= read_due));
            let wake = match (discovery, next) {
                (Some((_, due)), _) | (None, Some((_, _, due))) => due,
                (None, None) => far_future(),
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                command = writes.recv(), if writes_open => match command {
                    Some(command) => self.write(command).await,
                    None => writes_open = false,
                },
                _ = sleep_until(wake) => {
                    if let Some((device, _)) = discovery {
                        if !self.discover(device).await {
                            break;
                        }
                    } else if let Some((device, read, due)) = next {
                        if !self.read(device, read, due).await {
                            break;
                        }
                    }
                }
            }
        }
        forwarders.shutdown().await;
        for device in &self.devices {
            device.context.publish_stopped().await;
        }
        if let Some(mut connection) = self.connection.take() {
            let _ = timeout(
                Duration::from_secs(1),
                tokio_modbus::client::Client::disconnect(&mut connection.context),
            )
            .await;
        }
    }

    /// Opens the link, retrying with backoff; answers writes with an error while it is
    /// down. `false` on shutdown.
    async fn open(
        &mut self,
        shutdown: &CancellationToken,
        writes: &mut mpsc::Receiver<WriteCommand>,
        writes_open: &mut bool,
    ) -> bool {
        loop {
            let limit = self
                .devices
                .iter()
                .map(|d| d.config.timeout)
                .max()
                .unwrap_or(Duration::from_secs(1))
                .max(Duration::from_secs(3));
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return false,
                attempt = connect(&self.link, limit) => attempt,
            };
            match attempt {
                Ok(connection) => {
                    if self.link_error.take().is_some() {
                        tracing::info!(link = %self.link.describe(), "modbus link open again");
                    }
                    self.connection = Some(connection);
                    self.link_backoff.reset();
                    // The device may have restarted with other models (a firmware update,
                    // a module added): read the chains again.
                    for state in self.devices.iter_mut().filter_map(|d| d.sunspec.as_mut()) {
                        state.discovered = false;
                        state.due = Instant::now();
                    }
                    self.free_at = Instant::now() + self.silent;
                    return true;
                }
                Err(error) => {
                    let wait = self.link_backoff.next_delay();
                    tracing::warn!(link = %self.link.describe(), %error, retry_in = ?wait, "modbus link down");
                    self.link_error = Some(error.clone());
                    let now = Instant::now();
                    for index in 0..self.devices.len() {
                        if !self.device_down(index, &error, now).await {
                            return false;
                        }
                    }
                    let until = now + wait;
                    loop {
                        tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => return false,
                            _ = sleep_until(until) => break,
                            command = writes.recv(), if *writes_open => match command {
                                Some(command) => {
                                    self.refuse(&command, format!("device offline: {error}")).await;
                                }
                                None => *writes_open = false,
                            },
                        }
                    }
                }
            }
        }
    }

    /// The next read: the earliest due one, a backed-off device's not before its retry.
    fn next_read(&self) -> Option<(usize, usize, Instant)> {
        let mut best: Option<(usize, usize, Instant)> = None;
        for (d, device) in self.devices.iter().enumerate() {
            for (r, read) in device.reads.iter().enumerate() {
                let due = match device.retry_at {
                    Some(retry) => read.due.max(retry),
                    None => read.due,
                };
                if best.is_none_or(|(_, _, best_due)| due < best_due) {
                    best = Some((d, r, due));
                }
            }
        }
        best
    }

    /// The next SunSpec discovery: a device whose model chain has not been read yet, a
    /// backed-off one not before its retry.
    fn next_discovery(&self) -> Option<(usize, Instant)> {
        self.devices
            .iter()
            .enumerate()
            .filter_map(|(d, device)| {
                let state = device.sunspec.as_ref().filter(|s| !s.discovered)?;
                Some((d, device.retry_at.map_or(state.due, |r| state.due.max(r))))
            })
            .min_by_key(|(_, due)| *due)
    }

    /// Reads device `d`'s SunSpec model chain and adds the points of its models. `false`
    /// when the broker is gone (shutdown).
    async fn discover(&mut self, d: usize) -> bool {
        let result = sunspec::discover(&mut BusRegisters {
            bus: self,
            device: d,
        })
        .await;
        let Some(device) = self.devices.get_mut(d) else {
            return true;
        };
        let now = Instant::now();
        match result {
            Ok((base, found)) => {
                device.succeeded();
                if device.add_sunspec(base, &found, now)
                    && device
                        .context
                        .publish_points(&device.point_infos())
                        .await
                        .is_err()
                {
                    return false;
                }
            }
            Err(sunspec::DiscoveryError::Refused(reason)) => {
                // The device answers but shows no usable chain: asked again every
                // `backoff_max`.
                device.succeeded();
                tracing::warn!(device = %device.context.device, error = %reason, "SunSpec discovery failed");
                if let Some(state) = device.sunspec.as_mut() {
                    state.error = Some(format!(
                        "{}: SunSpec discovery: {reason}",
                        device.context.device
                    ));
                    state.due = now + device.config.backoff_max;
                }
            }
            Err(sunspec::DiscoveryError::Link(failure)) => {
                let reason = format!("SunSpec discovery: {}", failure.describe());
                tracing::warn!(device = %device.context.device, error = %reason, "SunSpec discovery failed");
                if let Some(state) = device.sunspec.as_mut() {
                    state.due = now + device.poll;
                }
                if !device.failed(&reason, now).await {
                    return false;
                }
                let points = device.config.points.len();
                for index in 0..points {
                    if !device
                        .publish(
                            index,
                            None,
                            Quality::Bad(reason.clone()),
                            now,
                            SystemTime::now(),
                        )
                        .await
                    {
                        return false;
                    }
                }
            }
        }
        device.update_status().await
    }

    /// Waits out the silent interval, runs one transaction for device `d` and updates the
    /// bus timing. A link failure closes the connection.
    async fn transact(&mut self, d: usize, op: &Op) -> Result<Reply, Failure> {
        let Some(device) = self.devices.get(d) else {
            return Err(Failure::Link("no such device".into()));
        };
        let Some(connection) = self.connection.as_mut() else {
            return Err(Failure::Link(
                self.link_error
                    .clone()
                    .unwrap_or_else(|| "not connected".into()),
            ));
        };
        sleep_until(self.free_at).await;
        let started = Instant::now();
        let result = call(connection, device.config.unit, op, device.config.timeout).await;
        let finished = Instant::now();
        self.free_at = finished + self.silent + device.config.turnaround;
        let tcp = matches!(self.link, Link::Tcp { .. });
        let metrics = device.context.metrics();
        match &result {
            Ok(_) => metrics.request_ok(finished - started),
            Err(Failure::Timeout(_)) => metrics.request_failed(ErrorKind::Timeout),
            Err(Failure::Exception(code)) => {
                metrics.request_failed(ErrorKind::Exception);
                metrics.exception(u8::from(*code));
            }
            Err(Failure::Link(_)) => metrics.request_failed(ErrorKind::Io),
            Err(Failure::Garbled { .. }) => metrics.request_failed(ErrorKind::Frame),
            Err(Failure::Unexpected(_)) => metrics.request_failed(ErrorKind::Decode),
        }
        // The link is busy from the request until the answer (or the timeout).
        device
            .context
            .bus_metrics()
            .request(finished - started, result.is_err());
        match &result {
            // A late answer would be taken for the next one's: start a fresh connection.
            Err(Failure::Timeout(_)) if tcp => self.connection = None,
            // Reopened at once (the link itself is fine): a fresh decoder for the next answer.
            Err(Failure::Garbled { .. }) => {
                tracing::debug!(link = %self.link.describe(), "garbled RTU answer, reopening the link");
                self.connection = None;
            }
            Err(Failure::Link(error)) => {
                tracing::warn!(link = %self.link.describe(), %error, "modbus link failed, reopening");
                self.connection = None;
            }
            _ => {}
        }
        result
    }

    /// Polls one planned read. `false` when the broker is gone (shutdown).
    async fn read(&mut self, d: usize, r: usize, due: Instant) -> bool {
        let Some((request, unit)) = self.devices.get_mut(d).and_then(|device| {
            let unit = device.config.unit;
            device.reads.get_mut(r).map(|read| {
                // The next poll on the original grid; skipped cycles are not made up.
                let now = Instant::now();
                let mut next = read.due + read.request.interval;
                while next <= now {
                    next += read.request.interval;
                }
                read.due = next;
                read.attempted = true;
                (read.request.clone(), unit)
            })
        }) else {
            return true;
        };
        if let Some(device) = self.devices.get(d) {
            device.context.metrics().poll();
        }
        let op = Op::Read {
            table: request.table,
            start: request.start,
            count: request.count,
        };
        let result = if request.count > MAX_REGISTERS_PER_REQUEST {
            // A SunSpec model block longer than one request (only those are): consecutive
            // requests cut between points.
            let ranges = match self.devices.get(d) {
                Some(device) => sunspec::chunks(
                    request.start,
                    request.count,
                    request.points.iter().filter_map(|&i| {
                        let point = device.config.points.get(i)?;
                        Some((point.address, point.data_type.width()))
                    }),
                ),
                None => Vec::new(),
            };
            sunspec::read_chunks(
                &mut BusRegisters {
                    bus: self,
                    device: d,
                },
                &ranges,
            )
            .await
            .map(Reply::Words)
        } else {
            self.transact(d, &op).await
        };
        let Some(device) = self.devices.get_mut(d) else {
            return true;
        };
        let timestamp = SystemTime::now();
        match result {
            Ok(reply) => {
                device.succeeded();
                let (words, bits) = match reply {
                    Reply::Words(words) => (words, Vec::new()),
                    Reply::Bits(bits) => (Vec::new(), bits),
                    Reply::Done => (Vec::new(), Vec::new()),
                };
                let mut short = false;
                for &index in &request.points {
                    let Some(point) = device.config.points.get(index) else {
                        continue;
                    };
                    let source = device
                        .sunspec
                        .as_ref()
                        .and_then(|s| s.sources.get(index).copied().flatten());
                    let value = match source {
                        Some(source) => {
                            if let (Some(address), Some(state)) =
                                (source.sf_address, device.sunspec.as_mut())
                            {
                                remember_scale_factor(state, &words, request.start, address);
                            }
                            sunspec::decode(&source, &words, request.start)
                        }
                        None => {
                            let offset = usize::from(point.address.saturating_sub(request.start));
                            let width = usize::from(point.data_type.width());
                            codec::decode_point(
                                point,
                                words.get(offset..offset + width).unwrap_or_default(),
                                bits.get(offset..offset + width).unwrap_or_default(),
                            )
                            .ok_or(sunspec::PointError::Short)
                        }
                    };
                    let (value, quality) = match value {
                        Ok(value) => (Some(value), Quality::Good),
                        Err(sunspec::PointError::Short) => {
                            short = true;
                            (
                                None,
                                Quality::Bad(format!("short response to {}", request.describe())),
                            )
                        }
                        // SunSpec "not implemented" and bad scale factors.
                        Err(error) => (None, Quality::Bad(error.to_string())),
                    };
                    if !device.publish(index, value, quality, due, timestamp).await {
                        return false;
                    }
                }
                if short {
                    // The transaction succeeded, its answer did not hold what was asked.
                    device.context.metrics().request_failed(ErrorKind::Decode);
                }
                if let Some(read) = device.reads.get_mut(r) {
                    read.error = short.then(|| {
                        format!(
                            "{}: short response to {}",
                            device.context.device,
                            request.describe()
                        )
                    });
                }
            }
            Err(Failure::Exception(ExceptionCode::IllegalDataAddress))
                if request.points.len() > 1 && !device.is_sunspec_read(&request) =>
            {
                // A merged read that covers an address the device does not have: read
                // its halves on their own, now, until the address is found; the rest of
                // the points keep working.
                device.succeeded();
                if let Some((first, second)) = plan::split(&request, &device.config.points) {
                    tracing::info!(device = %device.context.device, unit, request = %request.describe(), into = %format!("{} and {}", first.describe(), second.describe()), "illegal data address on a merged read: splitting it");
                    let now = Instant::now();
                    if let Some(read) = device.reads.get_mut(r) {
                        read.request = first;
                        read.due = now;
                    }
                    device.reads.push(Scheduled {
                        request: second,
                        due: now,
                        error: None,
                        attempted: false,
                    });
                }
            }
            Err(Failure::Exception(code)) => {
                device.succeeded();
                let sunspec_block = device.is_sunspec_read(&request);
                if code == ExceptionCode::IllegalDataAddress {
                    if sunspec_block {
                        // The model is no longer where the chain said: it may have changed.
                        if let Some(state) = device.sunspec.as_mut() {
                            tracing::info!(device = %device.context.device, request = %request.describe(), "illegal data address on a SunSpec model block: reading the model chain again");
                            state.discovered = false;
                            state.due = Instant::now();
                        }
                    }
                    // The address this point covers is not in the device's map: asked
                    // again only every `backoff_max`, not every poll.
                    let recheck = device.config.backoff_max.max(request.interval);
                    if let Some(read) = device.reads.get_mut(r) {
                        read.due = Instant::now() + recheck;
                    }
                }
                let reason = format!("{} reading {}", exception_name(code), request.describe());
                tracing::warn!(device = %device.context.device, unit, request = %request.describe(), exception = %exception_name(code), "modbus exception");
                if let Some(read) = device.reads.get_mut(r) {
                    read.error = Some(format!("{}: {reason}", device.context.device));
                }
                for &index in &request.points {
                    if !device
                        .publish(index, None, Quality::Bad(reason.clone()), due, timestamp)
                        .await
                    {
                        return false;
                    }
                }
            }
            Err(failure) => {
                let reason = format!(
                    "{} reading {} from unit {unit}",
                    failure.describe(),
                    request.describe()
                );
                tracing::warn!(device = %device.context.device, unit, request = %request.describe(), error = %failure.describe(), "modbus read failed");
                if !device.failed(&reason, due).await {
                    return false;
                }
                // The points of this request are bad; when the device is backed off, all are.
                let points: Vec<usize> = if device.retry_at.is_some() {
                    (0..device.config.points.len()).collect()
                } else {
                    request.points.clone()
                };
                for index in points {
                    if !device
                        .publish(index, None, Quality::Bad(reason.clone()), due, timestamp)
                        .await
                    {
                        return false;
                    }
                }
            }
        }
        device.update_status().await
    }

    /// Marks device `d` offline because the link is down. `false` on shutdown.
    async fn device_down(&mut self, d: usize, error: &str, now: Instant) -> bool {
        let Some(device) = self.devices.get_mut(d) else {
            return true;
        };
        device.failures = device.failures.max(1);
        device
            .context
            .metrics()
            .consecutive_failures(device.failures);
        device.last_failure = Some(format!("{}: {error}", device.context.device));
        let timestamp = SystemTime::now();
        for index in 0..device.config.points.len() {
            if !device
                .publish(index, None, Quality::Bad(error.to_owned()), now, timestamp)
                .await
            {
                return false;
            }
        }
        device.update_status().await
    }

    /// Carries out one write command and publishes its result.
    async fn write(&mut self, command: WriteCommand) {
        let d = command.device;
        match &command.request {
            Command::Point(request) => {
                let outcome = self.try_write(d, request).await;
                match &outcome {
                    WriteOutcome::Ok { value } => {
                        tracing::info!(device = %request.device, point = %request.point, %value, "point written")
                    }
                    WriteOutcome::Error { reason } => {
                        tracing::warn!(device = %request.device, point = %request.point, %reason, "write refused")
                    }
                }
                self.answer(d, request, &outcome).await;
            }
            Command::Points(request) => {
                let outcome = self.try_write_points(d, request).await;
                match &outcome.reason {
                    None => {
                        tracing::info!(device = %request.device, points = request.values.len(), "points written")
                    }
                    Some(reason) => {
                        tracing::warn!(device = %request.device, %reason, "device-level write failed")
                    }
                }
                self.answer_points(d, request, &outcome).await;
            }
        }
    }

    /// Answers `command` with an error without trying it.
    async fn refuse(&mut self, command: &WriteCommand, reason: String) {
        match &command.request {
            Command::Point(request) => {
                let outcome = WriteOutcome::Error { reason };
                self.answer(command.device, request, &outcome).await;
            }
            Command::Points(request) => {
                let outcome = PointsWriteOutcome::refused(reason);
                self.answer_points(command.device, request, &outcome).await;
            }
        }
    }

    /// Takes `&mut self` only so that the future stays `Send` (the connection is not `Sync`).
    async fn answer(&mut self, d: usize, request: &WriteRequest, outcome: &WriteOutcome) {
        if let Some(device) = self.devices.get(d) {
            let context = device.context.clone();
            if let Err(error) = context.publish_write_result(request, outcome).await {
                tracing::warn!(device = %context.device, %error, "cannot publish write result");
            }
        }
    }

    async fn answer_points(
        &mut self,
        d: usize,
        request: &PointsWriteRequest,
        outcome: &PointsWriteOutcome,
    ) {
        if let Some(device) = self.devices.get(d) {
            let context = device.context.clone();
            if let Err(error) = context.publish_points_write_result(request, outcome).await {
                tracing::warn!(device = %context.device, %error, "cannot publish write result");
            }
        }
    }

    async fn try_write(&mut self, d: usize, request: &WriteRequest) -> WriteOutcome {
        let error = |reason: String| WriteOutcome::Error { reason };
        let Some(device) = self.devices.get(d) else {
            return error("unknown device".into());
        };
        let Some(index) = device
            .config
            .points
            .iter()
            .position(|p| p.name == request.point)
        else {
            return error(format!(
                "device {} has no point named {:?}",
                device.context.device, request.point
            ));
        };
        let point = device.config.points[index].clone();
        let encoded = match device.encode_write(index, &request.value) {
            Ok(encoded) => encoded,
            Err(reason) => return error(reason),
        };
        if let Some(reason) = device.offline() {
            return error(reason);
        }
        let multiple = device.config.write_multiple;
        tracing::debug!(device = %device.context.device, point = %point.name, function = codec::write_function(&encoded, multiple), "writing");
        // One point is a plan of one step.
        let steps = match plan::plan_writes(&[(&point, encoded)], &device.config.limits, multiple) {
            Ok(steps) => steps,
            Err(reason) => return error(reason),
        };
        let Some(step) = steps.first() else {
            return error("nothing to write".into());
        };
        if let Err(reason) = self.write_step(d, step).await {
            return error(reason);
        }
        match self.read_back(d, step, &[index]).await.pop() {
            Some(Ok(value)) => WriteOutcome::Ok { value },
            Some(Err(reason)) => error(reason),
            None => error("written, but not read back".into()),
        }
    }

    /// Writes several points of device `d` in as few requests as their addresses allow.
    /// Every point is checked first: when one is refused, nothing is written. A request that
    /// fails stops the command; the points written before it stay written and say so.
    async fn try_write_points(
        &mut self,
        d: usize,
        request: &PointsWriteRequest,
    ) -> PointsWriteOutcome {
        let Some(device) = self.devices.get(d) else {
            return PointsWriteOutcome::refused("unknown device".into());
        };
        let checked: Vec<Result<(usize, codec::Encoded), String>> = request
            .values
            .iter()
            .map(|(name, value)| {
                let index = device
                    .config
                    .points
                    .iter()
                    .position(|p| &p.name == name)
                    .ok_or_else(|| {
                        format!(
                            "device {} has no point named {name:?}",
                            device.context.device
                        )
                    })?;
                device
                    .encode_write(index, value)
                    .map(|encoded| (index, encoded))
            })
            .collect();
        let not_written = |reason: String| PointOutcome::Error {
            reason,
            written: false,
        };
        let names = request.values.iter().map(|(name, _)| name.clone());
        if checked.iter().any(Result::is_err) {
            return PointsWriteOutcome::of(
                names
                    .zip(&checked)
                    .map(|(name, check)| {
                        let reason = match check {
                            Err(reason) => reason.clone(),
                            Ok(_) => "not written: another point of the command was refused".into(),
                        };
                        (name, not_written(reason))
                    })
                    .collect(),
            );
        }
        let checked: Vec<(usize, codec::Encoded)> = checked.into_iter().flatten().collect();
        if let Some(reason) = device.offline() {
            return PointsWriteOutcome::refused(reason);
        }
        let pairs: Vec<(&super::config::Point, codec::Encoded)> = checked
            .iter()
            .filter_map(|(index, encoded)| {
                Some((device.config.points.get(*index)?, encoded.clone()))
            })
            .collect();
        let steps =
            match plan::plan_writes(&pairs, &device.config.limits, device.config.write_multiple) {
                Ok(steps) => steps,
                Err(reason) => return PointsWriteOutcome::refused(reason),
            };
        tracing::debug!(device = %device.context.device, points = checked.len(), requests = steps.len(), "writing points");
        let mut outcomes: Vec<Option<PointOutcome>> = vec![None; checked.len()];
        let mut failed: Option<String> = None;
        for step in &steps {
            if let Some(reason) = &failed {
                for &p in step.points() {
                    outcomes[p] = Some(not_written(format!(
                        "not written: an earlier request failed ({reason})"
                    )));
                }
                continue;
            }
            if let Err(reason) = self.write_step(d, step).await {
                for &p in step.points() {
                    outcomes[p] = Some(not_written(reason.clone()));
                }
                failed = Some(reason);
                continue;
            }
            let indices: Vec<usize> = step.points().iter().map(|&p| checked[p].0).collect();
            let values = self.read_back(d, step, &indices).await;
            for (&p, value) in step.points().iter().zip(values) {
                outcomes[p] = Some(match value {
                    Ok(value) => PointOutcome::Ok { value },
                    Err(reason) => PointOutcome::Error {
                        reason,
                        written: true,
                    },
                });
            }
        }
        PointsWriteOutcome::of(
            names
                .zip(outcomes)
                .map(|(name, outcome)| {
                    (
                        name,
                        outcome.unwrap_or_else(|| not_written("not planned".into())),
                    )
                })
                .collect(),
        )
    }

    /// Carries out one planned write step (a bit's read-modify-write reads its register
    /// first); the reason when it fails.
    async fn write_step(&mut self, d: usize, step: &WriteStep) -> Result<(), String> {
        let op = match step {
            WriteStep::Write { op, .. } => op.clone(),
            &WriteStep::Bit {
                address,
                bit,
                value,
                ..
            } => {
                let read = Op::Read {
                    table: Table::Holding,
                    start: address,
                    count: 1,
                };
                let current = match self.transact(d, &read).await {
                    Ok(Reply::Words(words)) => match words.first() {
                        Some(word) => *word,
                        None => return Err("short response reading the register".into()),
                    },
                    Ok(_) => return Err("unexpected response reading the register".into()),
                    Err(failure) => return Err(self.write_failure(d, failure).await),
                };
                let mask = 1u16 << bit;
                let value = if value {
                    current | mask
                } else {
                    current & !mask
                };
                let multiple = self
                    .devices
                    .get(d)
                    .is_some_and(|device| device.config.write_multiple);
                // One register as FC06, or as FC16 for devices that only take that.
                if multiple {
                    Op::WriteRegisters {
                        address,
                        values: vec![value],
                    }
                } else {
                    Op::WriteRegister { address, value }
                }
            }
        };
        match self.transact(d, &op).await {
            Ok(_) => Ok(()),
            Err(failure) => Err(self.write_failure(d, failure).await),
        }
    }

    /// Reads back what a write step covers and publishes the value of each of its points
    /// (`indices` into the device's points); per point, the value the device now holds or
    /// why it is not known.
    async fn read_back(
        &mut self,
        d: usize,
        step: &WriteStep,
        indices: &[usize],
    ) -> Vec<Result<Value, String>> {
        let (table, start, count) = step.range();
        let read = Op::Read {
            table,
            start,
            count,
        };
        let readback = self.transact(d, &read).await;
        let (words, bits) = match readback {
            Ok(Reply::Words(words)) => (words, Vec::new()),
            Ok(Reply::Bits(bits)) => (Vec::new(), bits),
            Ok(Reply::Done) => (Vec::new(), Vec::new()),
            Err(failure) => {
                let reason = format!("written, but the read-back failed: {}", failure.describe());
                return indices.iter().map(|_| Err(reason.clone())).collect();
            }
        };
        let Some(device) = self.devices.get_mut(d) else {
            return indices
                .iter()
                .map(|_| Err("unknown device".into()))
                .collect();
        };
        let mut values = Vec::with_capacity(indices.len());
        for &index in indices {
            let Some(point) = device.config.points.get(index) else {
                values.push(Err("unknown point".into()));
                continue;
            };
            let value = match device.sunspec_source(index) {
                Some(source) => {
                    let sf = source.sf_address.and_then(|a| device.scale_factor(a));
                    sunspec::decode_with_scale(&source, &words, start, sf).map_err(|e| match e {
                        sunspec::PointError::Short => "written, but the read-back was short".into(),
                        e => format!("written, but the read-back is {e}"),
                    })
                }
                None => {
                    let offset = usize::from(point.address.saturating_sub(start));
                    let width = usize::from(point.data_type.width());
                    codec::decode_point(
                        point,
                        words.get(offset..offset + width).unwrap_or_default(),
                        bits.get(offset..offset + width).unwrap_or_default(),
                    )
                    .ok_or_else(|| "written, but the read-back was short".to_owned())
                }
            };
            let value = match value {
                Ok(value) => value,
                Err(reason) => {
                    values.push(Err(reason));
                    continue;
                }
            };
            let now = Instant::now();
            if let Some(reporter) = device.reporters.get_mut(index) {
                reporter.record(&Some(value.clone()), &Quality::Good, now);
            }
            let reading = Reading {
                device: device.context.device.clone(),
                point: point.name.clone(),
                value: Some(value.clone()),
                quality: Quality::Good,
                timestamp: SystemTime::now(),
            };
            let _ = device.context.publish_reading(&reading).await;
            values.push(Ok(value));
        }
        values
    }

    /// The reason a write request failed; a link-level failure counts against the device.
    async fn write_failure(&mut self, d: usize, failure: Failure) -> String {
        let reason = match &failure {
            Failure::Exception(code) => format!("device exception: {}", exception_name(*code)),
            Failure::Timeout(_) => format!("timeout: {}", failure.describe()),
            Failure::Link(error) => format!("link error: {error}"),
            Failure::Garbled { .. } => format!("link error: {}", failure.describe()),
            Failure::Unexpected(error) => format!("unexpected answer: {error}"),
        };
        if !matches!(failure, Failure::Exception(_) | Failure::Unexpected(_)) {
            if let Some(device) = self.devices.get_mut(d) {
                let _ = device.failed(&reason, Instant::now()).await;
                let _ = device.update_status().await;
            }
        }
        reason
    }
}

/// A bus seen as device `device`'s holding registers, for SunSpec discovery.
struct BusRegisters<'a> {
    bus: &'a mut Bus,
    device: usize,
}

impl sunspec::Registers for BusRegisters<'_> {
    async fn read(&mut self, start: u16, count: u16) -> Result<Vec<u16>, Failure> {
        let op = Op::Read {
            table: Table::Holding,
            start,
            count,
        };
        match self.bus.transact(self.device, &op).await? {
            Reply::Words(words) => Ok(words),
            Reply::Bits(_) | Reply::Done => Err(Failure::Unexpected(
                "an answer of another kind to a register read".into(),
            )),
        }
    }
}

impl Device {
    /// How SunSpec point `index` decodes; `None` for a configured point.
    fn sunspec_source(&self, index: usize) -> Option<sunspec::Source> {
        self.sunspec.as_ref()?.sources.get(index).copied().flatten()
    }

    /// The scale factor last read at register `address`.
    fn scale_factor(&self, address: u16) -> Option<i16> {
        self.sunspec.as_ref()?.scale_factors.get(&address).copied()
    }

    /// The registers or coil that write `value` to point `index`, after the checks a
    /// write must pass: the point is writable, the value fits its type (and range, after
    /// scale), and for a SunSpec point, is scaled by the scale factor last read and is not
    /// the value SunSpec reserves for "not implemented".
    fn encode_write(&self, index: usize, value: &Value) -> Result<codec::Encoded, String> {
        let point = self
            .config
            .points
            .get(index)
            .ok_or_else(|| "unknown point".to_owned())?;
        if !point.writable {
            return Err(format!("point {} is not writable", point.name));
        }
        let Some(source) = self.sunspec_source(index) else {
            return codec::encode(point, value).map_err(|e| e.0);
        };
        let mut scaled = point.clone();
        if let Some(address) = source.sf_address {
            let sf = self.scale_factor(address).ok_or_else(|| {
                format!(
                    "the scale factor of {} has not been read from the device yet",
                    point.name
                )
            })?;
            scaled.scale = 10f64.powi(i32::from(sf));
        }
        let encoded = codec::encode(&scaled, value).map_err(|e| e.0)?;
        if let (codec::Encoded::Registers(words), Some(reserved)) =
            (&encoded, sunspec::reserved(source.kind))
        {
            if words.as_slice() == reserved {
                let hex: Vec<String> = reserved.iter().map(|w| format!("{w:#06X}")).collect();
                return Err(format!(
                    "{value} would be register value {}, which SunSpec reserves for \"not implemented\"",
                    hex.join(" ")
                ));
            }
        }
        Ok(encoded)
    }

    /// The device's points as they are now (a SunSpec point with a scale factor is a
    /// float), for the announcement of its point set.
    fn point_infos(&self) -> Vec<crate::drivers::config::PointInfo> {
        let sources = self.sunspec.as_ref().map(|s| s.sources.as_slice());
        self.config
            .points
            .iter()
            .enumerate()
            .map(|(i, point)| {
                let mut info = crate::drivers::config::PointInfo::modbus(point);
                let source = sources.and_then(|s| s.get(i).copied().flatten());
                if source.is_some_and(|s| s.sf_address.is_some()) {
                    info.kind = crate::drivers::config::PointKind::Float;
                }
                info
            })
            .collect()
    }

    /// Adds the points of the SunSpec models found at `base`, and a read per model. When
    /// the points were built from another chain before, they are replaced; from the same
    /// chain, they are kept. Whether the points changed.
    fn add_sunspec(&mut self, base: u16, found: &[Found], now: Instant) -> bool {
        let ids: Vec<String> = found.iter().map(|f| f.id.to_string()).collect();
        let Some(state) = self.sunspec.as_mut() else {
            return false;
        };
        let rebuild = !state.found.is_empty();
        if rebuild && state.found == found {
            tracing::debug!(device = %self.context.device, base, "SunSpec model chain unchanged");
            state.discovered = true;
            state.error = None;
            return false;
        }
        if rebuild {
            tracing::info!(device = %self.context.device, base, models = %ids.join(", "), "SunSpec model chain changed: rebuilding its points");
            let configured = state.configured;
            self.reads
                .retain(|r| r.request.points.iter().all(|&i| i < configured));
            self.config.points.truncate(configured);
            self.reporters.truncate(configured);
            self.point_good.truncate(configured);
            state.sources.truncate(configured);
            state.scale_factors.clear();
        }
        state.found = found.to_vec();
        let blocks = sunspec::blocks(found);
        let mut added = 0;
        for block in blocks {
            if block.leftover > 0 {
                tracing::warn!(device = %self.context.device, model = block.model.id, address = block.found.address, repeats = block.repeats, unmapped_registers = block.leftover, "SunSpec model length is not a whole number of repeats (or more than {}): the rest is not read", sunspec::MAX_REPEATS);
            }
            let mut indices = Vec::new();
            for (mut point, source) in block.points {
                // A configured point of the same name wins.
                if self.config.points.iter().any(|p| p.name == point.name) {
                    continue;
                }
                if let Some(settings) = self
                    .config
                    .sunspec_settings
                    .iter()
                    .find(|s| s.name == point.name)
                {
                    point.report = settings.report;
                    point.min_interval = settings.min_interval;
                    point.max_interval = settings.max_interval;
                    if settings.writable && !source.read_write {
                        tracing::warn!(device = %self.context.device, point = %point.name, "writable is set, but SunSpec defines this point read-only: it stays read-only");
                    }
                    point.writable = settings.writable && source.read_write;
                    if settings.unit.is_some() {
                        point.unit.clone_from(&settings.unit);
                    }
                }
                indices.push(self.config.points.len());
                self.reporters.push(Reporter::new(&point));
                self.point_good.push(None);
                state.sources.resize(self.config.points.len(), None);
                state.sources.push(Some(source));
                self.config.points.push(point);
            }
            if indices.is_empty() {
                continue;
            }
            added += indices.len();
            self.reads.push(Scheduled {
                request: ReadRequest {
                    table: Table::Holding,
                    start: block.found.data_start(),
                    count: block.count,
                    interval: self.poll,
                    points: indices,
                },
                due: now,
                error: None,
                attempted: false,
            });
        }
        state.discovered = true;
        state.error = None;
        for settings in &self.config.sunspec_settings {
            if !self.config.points.iter().any(|p| p.name == settings.name) {
                tracing::warn!(device = %self.context.device, point = %settings.name, "no SunSpec point of this name on the device: its settings are unused");
            }
        }
        let units: Vec<(String, String)> = self
            .config
            .points
            .iter()
            .zip(&state.sources)
            .filter(|(_, source)| source.is_some())
            .filter_map(|(point, _)| Some((point.name.clone(), point.unit.clone()?)))
            .collect();
        self.context.add_units(units);
        tracing::info!(device = %self.context.device, base, models = %ids.join(", "), points = added, "SunSpec models found");
        true
    }

    /// Whether `request` reads a SunSpec model block (which is never split).
    fn is_sunspec_read(&self, request: &ReadRequest) -> bool {
        self.sunspec.as_ref().is_some_and(|s| {
            request
                .points
                .iter()
                .any(|&i| s.sources.get(i).is_some_and(Option::is_some))
        })
    }

    /// Why a write is refused at once: the device is backed off.
    fn offline(&self) -> Option<String> {
        let retry_at = self.retry_at?;
        (retry_at > Instant::now()).then(|| {
            let last = self.last_failure.clone().unwrap_or_default();
            format!("device offline ({last})")
        })
    }

    fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!(device = %self.context.device, "device answers again");
        }
        self.failures = 0;
        self.last_failure = None;
        self.context.metrics().consecutive_failures(0);
        if self.retry_at.take().is_some() {
            self.context.metrics().backoff(Duration::ZERO);
        }
        self.backoff.reset();
    }

    /// Counts a link-level failure; backs the device off after a few.
    async fn failed(&mut self, reason: &str, now: Instant) -> bool {
        self.failures += 1;
        self.last_failure = Some(format!("{}: {reason}", self.context.device));
        self.context.metrics().consecutive_failures(self.failures);
        if self.failures >= FAILURES_BEFORE_BACKOFF {
            let wait = self.backoff.next_delay();
            tracing::warn!(device = %self.context.device, failures = self.failures, retry_in = ?wait, "device backed off");
            self.retry_at = Some(now.max(Instant::now()) + wait);
            self.context.metrics().backoff(wait);
        }
        true
    }

    /// Offers a reading to the point's reporter and publishes it if it passes.
    async fn publish(
        &mut self,
        index: usize,
        value: Option<Value>,
        quality: Quality,
        at: Instant,
        timestamp: SystemTime,
    ) -> bool {
        let Some(reporter) = self.reporters.get_mut(index) else {
            return true;
        };
        if let Some(good) = self.point_good.get_mut(index) {
            *good = Some(matches!(quality, Quality::Good));
            let good_points = self.point_good.iter().filter(|g| **g == Some(true)).count();
            let bad_points = self
                .point_good
                .iter()
                .filter(|g| **g == Some(false))
                .count();
            self.context.metrics().points(good_points, bad_points);
        }
        if !reporter.offer(&value, &quality, at) {
            return true;
        }
        let Some(point) = self.config.points.get(index) else {
            return true;
        };
        let reading = Reading {
            device: self.context.device.clone(),
            point: point.name.clone(),
            value,
            quality,
            timestamp,
        };
        self.context.publish_reading(&reading).await.is_ok()
    }

    /// Publishes the device status when it changed.
    async fn update_status(&mut self) -> bool {
        let status = if self.failures > 0 {
            DeviceStatus::Offline {
                error: self.last_failure.clone().unwrap_or_default(),
            }
        } else if let Some(error) = self
            .sunspec
            .as_ref()
            .and_then(|s| s.error.clone())
            .or_else(|| self.reads.iter().find_map(|r| r.error.clone()))
        {
            DeviceStatus::Error { error }
        } else if self.sunspec.as_ref().is_some_and(|s| !s.discovered) {
            return true; // the SunSpec points are not known yet
        } else if self.reads.iter().all(|r| r.attempted) {
            DeviceStatus::Online
        } else {
            return true; // not every read tried yet: nothing to say
        };
        if self.published_status.as_ref() == Some(&status) {
            return true;
        }
        match self.context.publish_status(&status).await {
            Ok(()) => {
                self.published_status = Some(status);
                true
            }
            Err(_) => false,
        }
    }
}

/// Keeps the scale factor at register `address` from a block read for writes; forgets it
/// when the device no longer gives a valid one.
fn remember_scale_factor(state: &mut SunSpec, words: &[u16], start: u16, address: u16) {
    let word = address
        .checked_sub(start)
        .and_then(|from| words.get(usize::from(from)));
    match word.map(|w| sunspec::scale_factor(*w)) {
        Some(Ok(sf)) => {
            state.scale_factors.insert(address, sf);
        }
        Some(Err(_)) => {
            state.scale_factors.remove(&address);
        }
        None => {}
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// Turns `<point topic>/set` messages of one device into commands for its bus. A message
/// that cannot be parsed, or names a read-only or unknown point, is answered here, without
/// reaching the device. `points` are the device's configured points; a SunSpec device
/// (`found_later`) finds more at run time, so a name it was not configured with goes to
/// the bus, which knows them.
async fn forward_writes(
    context: DeviceContext,
    points: Vec<(String, bool)>,
    found_later: bool,
    device: usize,
    mut subscription: crate::broker::bus::InternalSubscription,
    tx: mpsc::Sender<WriteCommand>,
    shutdown: CancellationToken,
) {
    let access = |name: &str| {
        let configured = points.iter().find(|(point, _)| point == name);
        match configured {
            Some((_, true)) => Some(PointAccess::Writable),
            Some((_, false)) => Some(PointAccess::ReadOnly),
            None if found_later => Some(PointAccess::Writable),
            None => None,
        }
    };
    loop {
        let message: Message = tokio::select! {
            _ = shutdown.cancelled() => return,
            message = subscription.recv() => match message {
                Some(message) => message,
                None => return,
            },
        };
        let request = match context.sort_points_write(&message) {
            Some(Ok(request)) => Command::Points(request),
            Some(Err(refused)) => {
                context.refuse_points_write(refused).await;
                continue;
            }
            None => match context.sort_write(&message, access) {
                SortedWrite::Request(request) => Command::Point(request),
                SortedWrite::Refused(refused) => {
                    context.refuse_write(refused).await;
                    continue;
                }
                SortedWrite::NotMine => {
                    tracing::debug!(device = %context.device, topic = %message.topic, "write not for this device");
                    continue;
                }
            },
        };
        // Waits when the bus is busy: a command is never dropped.
        if tx.send(WriteCommand { device, request }).await.is_err() {
            return;
        }
    }
}
