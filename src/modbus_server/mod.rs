//! Modbus TCP servers for SCADA systems and PLCs (`[[modbus_servers]]`): each answers
//! reads from a register image ([`image`]) that an in-process bus subscription keeps
//! current with the mapped points' readings, and turns writes into the points' own
//! write-back (`<point topic>/set`, answered on a reply topic of its own) or a publish on
//! the mapped topic.
//!
//! It owns the listener, one task per connection (tokio-modbus' TCP server, each
//! connection capped by `max_connections` and closed after `idle_timeout` without
//! progress) and the task that feeds the image and routes write results. A reply never
//! waits on a device for a read; a write waits at most `write_timeout`. Connections,
//! requests by function, exceptions and writes are counted in its
//! [`ModbusServerMetrics`] (atomics: the request path takes no lock for them).

pub mod config;
pub mod image;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

use self::config::{MapEntry, ModbusServerConfig, Source};
use self::image::Image;
use crate::broker::bus::{BrokerHandle, InternalSubscribeOptions};
use crate::drivers::config::DeviceConfig;
use crate::drivers::modbus::codec;
use crate::drivers::modbus::config::Table;
use crate::metrics::{ModbusServerMetrics, OpenConnection};
use crate::model::{Message, MessageProperties, QoS, Value};

pub use self::config::BadQuality;

/// The most registers one write may carry (FC16).
const MAX_WRITE_REGISTERS: usize = 123;
/// The most coils one write may carry (FC15).
const MAX_WRITE_COILS: usize = 1968;

/// Why a server did not start.
#[derive(Debug, thiserror::Error)]
pub enum ModbusServerError {
    #[error("cannot listen on {addr}: {source}{}", privileged_hint(*addr, source))]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot subscribe to the mapped topics: {0}")]
    Bus(#[from] crate::broker::bus::BusError),
}

/// Port 502 is privileged: say what the service needs when that is why the bind failed.
fn privileged_hint(addr: SocketAddr, error: &io::Error) -> &'static str {
    if error.kind() == io::ErrorKind::PermissionDenied && addr.port() < 1024 {
        " (a port below 1024 needs CAP_NET_BIND_SERVICE: add AmbientCapabilities= and \
         CapabilityBoundingSet=CAP_NET_BIND_SERVICE in a drop-in, see systemd/fieldmq.service)"
    } else {
        ""
    }
}

/// The last payload of each topic a server serves (readings are not retained, so a
/// restarted server starts from these).
pub type LastPayloads = HashMap<String, Bytes>;

/// A running server: its bound address, and its task (which ends on cancellation).
pub struct ModbusServer {
    pub local_addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for ModbusServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModbusServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl ModbusServer {
    /// Waits until the server has stopped (its token cancelled); the last payload of each
    /// topic it served, for the server that replaces it.
    pub async fn wait(self) -> LastPayloads {
        let _ = self.task.await;
        std::mem::take(
            &mut *self
                .shared
                .last
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }
}

/// The results of writes under way, by correlation id.
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<(), String>>>>>;

/// What every connection of one server shares.
struct Shared {
    name: String,
    image: RwLock<Image>,
    unit_ids: Vec<u8>,
    write_timeout: Duration,
    /// Per entry, the topic its writes go to (a point's `/set`, or the mapped topic).
    write_topics: Vec<String>,
    reply_topic: String,
    pending: Pending,
    next_id: AtomicU64,
    broker: BrokerHandle,
    /// The last payload of each mapped topic.
    last: Mutex<LastPayloads>,
    metrics: ModbusServerMetrics,
}

/// The name of server number `index` of the configuration (its metrics' `server` label).
pub fn server_name(index: usize) -> String {
    format!("modbus-server-{index}")
}

/// The topic entry `entry` takes its value from.
fn value_topic(entry: &MapEntry, devices: &[DeviceConfig], gateway: &str) -> Option<String> {
    match &entry.source {
        Source::Topic(topic) => Some(topic.clone()),
        Source::Point { device, point } => devices
            .iter()
            .find(|d| &d.name == device)
            .map(|d| d.point_topic(gateway, point)),
    }
}

/// What a server is started with, beside its configuration.
pub struct StartWith<'a> {
    pub devices: &'a [DeviceConfig],
    pub gateway: &'a str,
    pub broker: BrokerHandle,
    /// The last payloads of the server it replaces, or nothing.
    pub seed: &'a LastPayloads,
    pub metrics: ModbusServerMetrics,
}

/// Starts server number `index` of the configuration, its image filled from `with.seed`.
/// It runs until `shutdown` is cancelled.
pub async fn start(
    config: &ModbusServerConfig,
    index: usize,
    with: StartWith<'_>,
    shutdown: CancellationToken,
) -> Result<ModbusServer, ModbusServerError> {
    let StartWith {
        devices,
        gateway,
        broker,
        seed,
        metrics,
    } = with;
    let name = server_name(index);
    let listener =
        TcpListener::bind(config.bind)
            .await
            .map_err(|source| ModbusServerError::Bind {
                addr: config.bind,
                source,
            })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| ModbusServerError::Bind {
            addr: config.bind,
            source,
        })?;

    let mut by_topic: HashMap<String, Vec<usize>> = HashMap::new();
    let mut write_topics = Vec::new();
    for (i, entry) in config.map.iter().enumerate() {
        let topic = value_topic(entry, devices, gateway).unwrap_or_default();
        write_topics.push(match entry.source {
            Source::Point { .. } => format!("{topic}/set"),
            Source::Topic(_) => topic.clone(),
        });
        if !topic.is_empty() {
            by_topic.entry(topic).or_default().push(i);
        }
    }
    let reply_topic = format!("{gateway}/{name}/write-result");
    let mut filters: Vec<(String, QoS)> = by_topic
        .keys()
        .map(|topic| (topic.clone(), QoS::AtLeastOnce))
        .collect();
    filters.push((reply_topic.clone(), QoS::AtLeastOnce));
    let mut subscription = broker
        .subscribe(
            &name,
            filters,
            InternalSubscribeOptions {
                capacity: 1024,
                send_retained: true,
                commit: false,
            },
        )
        .await?;

    let mut image = Image::new(config.map.clone(), config.bad_quality);
    let mut last = LastPayloads::new();
    for (topic, entries) in &by_topic {
        if let Some(payload) = seed.get(topic) {
            for &entry in entries {
                // A value that does not fit is reported when the next one arrives.
                let _ = image.update(entry, payload);
            }
            last.insert(topic.clone(), payload.clone());
        }
    }
    let shared = Arc::new(Shared {
        name: name.clone(),
        image: RwLock::new(image),
        unit_ids: config.unit_ids.clone(),
        write_timeout: config.write_timeout,
        write_topics,
        reply_topic: reply_topic.clone(),
        pending: Arc::new(Mutex::new(HashMap::new())),
        next_id: AtomicU64::new(1),
        broker,
        last: Mutex::new(last),
        metrics,
    });

    // The image's feed and the write results.
    let feed_shared = shared.clone();
    let feed_stop = shutdown.clone();
    let feed = tokio::spawn(async move {
        // Entries whose last value could not be served: warned once until one is served.
        let mut failing = std::collections::HashSet::new();
        loop {
            let message = tokio::select! {
                _ = feed_stop.cancelled() => break,
                message = subscription.recv() => match message {
                    Some(message) => message,
                    None => break,
                },
            };
            if *message.topic == *feed_shared.reply_topic {
                write_result(&feed_shared, &message);
                continue;
            }
            let Some(entries) = by_topic.get(&*message.topic) else {
                continue;
            };
            feed_shared
                .last
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(message.topic.to_string(), message.payload.clone());
            // No await while the lock is held.
            let mut image = feed_shared
                .image
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for &entry in entries {
                match image.update(entry, &message.payload) {
                    Ok(()) => {
                        failing.remove(&entry);
                    }
                    Err(error) => {
                        if failing.insert(entry) {
                            tracing::warn!(server = %feed_shared.name, topic = %message.topic, %error, "value not served (the entry reads as bad until a value fits)");
                        }
                    }
                }
            }
        }
    });

    let connections = Arc::new(Semaphore::new(config.max_connections));
    let idle_timeout = config.idle_timeout;
    let max_connections = config.max_connections;
    let server = tokio_modbus::server::tcp::Server::new(listener);
    let serve_shared = shared.clone();
    let task = tokio::spawn(async move {
        let on_connected = move |stream: TcpStream, peer: SocketAddr| {
            let accepted = match connections.clone().try_acquire_owned() {
                Ok(permit) => {
                    tracing::debug!(server = %serve_shared.name, %peer, "Modbus client connected");
                    let _ = stream.set_nodelay(true);
                    let open = serve_shared.metrics.connected();
                    Some((
                        Service {
                            shared: serve_shared.clone(),
                        },
                        Connection::new(stream, (permit, open), idle_timeout),
                    ))
                }
                Err(_) => {
                    serve_shared.metrics.refused();
                    tracing::warn!(server = %serve_shared.name, %peer, max_connections, "Modbus client refused: max_connections reached");
                    None
                }
            };
            std::future::ready(Ok(accepted))
        };
        // Bounded by the token: an accept error (out of file descriptors) pauses and
        // serves again; cancelling drops every connection task with the server.
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                result = server.serve(&on_connected, |error| {
                    tracing::debug!(%error, "Modbus connection closed");
                }) => {
                    if let Err(error) = result {
                        tracing::warn!(%error, "Modbus server: accept failed");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        }
        let _ = feed.await;
    });
    tracing::info!(server = %name, addr = %local_addr, "Modbus TCP server listening");
    Ok(ModbusServer {
        local_addr,
        shared,
        task,
    })
}

/// Routes a write result from the reply topic to the write waiting for it.
fn write_result(shared: &Shared, message: &Message) {
    let Some(id) = message
        .properties
        .as_deref()
        .and_then(|p| p.correlation_data.as_ref())
        .and_then(|data| <[u8; 8]>::try_from(data.as_ref()).ok())
        .map(u64::from_be_bytes)
    else {
        return;
    };
    let Some(waiter) = shared
        .pending
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .remove(&id)
    else {
        return;
    };
    let result = match serde_json::from_slice::<serde_json::Value>(&message.payload) {
        Ok(body) if body.get("status").and_then(|s| s.as_str()) == Some("ok") => Ok(()),
        Ok(body) => Err(body
            .get("reason")
            .and_then(|r| r.as_str())
            .unwrap_or("write failed")
            .to_owned()),
        Err(_) => Err("unreadable write result".to_owned()),
    };
    let _ = waiter.send(result);
}

type Answer = Result<Option<Response>, ExceptionCode>;

/// The tokio-modbus service of one connection.
#[derive(Clone)]
struct Service {
    shared: Arc<Shared>,
}

impl tokio_modbus::server::Service for Service {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn call(&self, request: Self::Request) -> Self::Future {
        let metrics = &self.shared.metrics;
        let function = request.request.function_code().value();
        metrics.request(function);
        let write = matches!(function, 5 | 6 | 15 | 16);
        let answer = self.answer(request);
        let metrics = metrics.clone();
        Box::pin(async move {
            let answer = answer.await;
            if let Err(code) = &answer {
                metrics.exception(u8::from(*code));
            }
            if write {
                metrics.write(answer.is_ok());
            }
            answer
        })
    }
}

impl Service {
    fn answer(
        &self,
        request: SlaveRequest<'static>,
    ) -> Pin<Box<dyn Future<Output = Answer> + Send>> {
        let shared = self.shared.clone();
        let unit = request.slave;
        if !shared.unit_ids.is_empty() && !shared.unit_ids.contains(&unit) {
            return Box::pin(std::future::ready(Err(ExceptionCode::GatewayTargetDevice)));
        }
        match request.request {
            Request::ReadHoldingRegisters(start, count) => Box::pin(std::future::ready(
                read_words(&shared, Table::Holding, unit, start, count)
                    .map(|words| Some(Response::ReadHoldingRegisters(words))),
            )),
            Request::ReadInputRegisters(start, count) => Box::pin(std::future::ready(
                read_words(&shared, Table::Input, unit, start, count)
                    .map(|words| Some(Response::ReadInputRegisters(words))),
            )),
            Request::ReadCoils(start, count) => Box::pin(std::future::ready(
                read_bits(&shared, Table::Coil, unit, start, count)
                    .map(|bits| Some(Response::ReadCoils(bits))),
            )),
            Request::ReadDiscreteInputs(start, count) => Box::pin(std::future::ready(
                read_bits(&shared, Table::Discrete, unit, start, count)
                    .map(|bits| Some(Response::ReadDiscreteInputs(bits))),
            )),
            Request::WriteSingleRegister(address, word) => Box::pin(async move {
                write(
                    &shared,
                    Table::Holding,
                    unit,
                    address,
                    Data::Words(vec![word]),
                )
                .await?;
                Ok(Some(Response::WriteSingleRegister(address, word)))
            }),
            Request::WriteMultipleRegisters(address, words) => {
                let words = words.into_owned();
                Box::pin(async move {
                    if words.is_empty() || words.len() > MAX_WRITE_REGISTERS {
                        return Err(ExceptionCode::IllegalDataValue);
                    }
                    let count = words.len() as u16;
                    write(&shared, Table::Holding, unit, address, Data::Words(words)).await?;
                    Ok(Some(Response::WriteMultipleRegisters(address, count)))
                })
            }
            Request::WriteSingleCoil(address, bit) => Box::pin(async move {
                write(&shared, Table::Coil, unit, address, Data::Bits(vec![bit])).await?;
                Ok(Some(Response::WriteSingleCoil(address, bit)))
            }),
            Request::WriteMultipleCoils(address, bits) => {
                let bits = bits.into_owned();
                Box::pin(async move {
                    if bits.is_empty() || bits.len() > MAX_WRITE_COILS {
                        return Err(ExceptionCode::IllegalDataValue);
                    }
                    let count = bits.len() as u16;
                    write(&shared, Table::Coil, unit, address, Data::Bits(bits)).await?;
                    Ok(Some(Response::WriteMultipleCoils(address, count)))
                })
            }
            _ => Box::pin(std::future::ready(Err(ExceptionCode::IllegalFunction))),
        }
    }
}

fn read_words(
    shared: &Shared,
    table: Table,
    unit: u8,
    start: u16,
    count: u16,
) -> Result<Vec<u16>, ExceptionCode> {
    shared
        .image
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .read_words(table, unit, start, count)
}

fn read_bits(
    shared: &Shared,
    table: Table,
    unit: u8,
    start: u16,
    count: u16,
) -> Result<Vec<bool>, ExceptionCode> {
    shared
        .image
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .read_bits(table, unit, start, count)
}

/// What a write request carries.
enum Data {
    Words(Vec<u16>),
    Bits(Vec<bool>),
}

/// A client's write: every entry it covers must be covered whole and writable (else
/// exception 2 or 1, before anything is written); each entry's value then goes to its
/// point's write-back or its topic, in address order. A refused or timed-out write
/// answers exception 4 (the entries before it were written).
async fn write(
    shared: &Arc<Shared>,
    table: Table,
    unit: u8,
    address: u16,
    data: Data,
) -> Result<(), ExceptionCode> {
    let count = match &data {
        Data::Words(words) => words.len(),
        Data::Bits(bits) => bits.len(),
    };
    let count = u16::try_from(count).map_err(|_| ExceptionCode::IllegalDataValue)?;
    // The values to write, decoded while the image is locked (no await under the lock).
    let mut writes: Vec<(usize, Value, bool)> = Vec::new();
    {
        let image = shared
            .image
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let covered = image.covered(table, unit, address, count)?;
        for part in covered {
            let entry = &image.entries()[part.entry];
            if !part.whole {
                return Err(ExceptionCode::IllegalDataAddress);
            }
            if !entry.writable {
                return Err(ExceptionCode::IllegalFunction);
            }
            let offset = usize::from(entry.address - address);
            let width = usize::from(entry.width());
            let value = match &data {
                Data::Words(words) => {
                    codec::decode_point(&entry.point(), &words[offset..offset + width], &[])
                }
                Data::Bits(bits) => {
                    codec::decode_point(&entry.point(), &[], &bits[offset..offset + width])
                }
            }
            .ok_or(ExceptionCode::IllegalDataValue)?;
            let is_point = matches!(entry.source, Source::Point { .. });
            writes.push((part.entry, value, is_point));
        }
    }
    for (entry, value, is_point) in writes {
        let topic = shared.write_topics[entry].clone();
        let result = if is_point {
            write_point(shared, topic, &value).await
        } else {
            publish_value(shared, topic, &value).await
        };
        if let Err(reason) = result {
            tracing::warn!(server = %shared.name, topic = %shared.write_topics[entry], %value, %reason, "Modbus write refused");
            return Err(ExceptionCode::ServerDeviceFailure);
        }
    }
    Ok(())
}

/// Publishes `value` on a point's `/set` topic and waits for its result on the reply topic.
async fn write_point(shared: &Arc<Shared>, topic: String, value: &Value) -> Result<(), String> {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    shared
        .pending
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .insert(id, tx);
    let payload = serde_json::to_string(value).unwrap_or_default();
    let mut message = Message::internal(
        &format!("{}-write", shared.name),
        topic,
        payload,
        QoS::AtLeastOnce,
        false,
    );
    message.properties = Some(Arc::new(MessageProperties {
        response_topic: Some(shared.reply_topic.clone()),
        correlation_data: Some(Bytes::copy_from_slice(&id.to_be_bytes())),
        content_type: Some("application/json".to_owned()),
        ..MessageProperties::default()
    }));
    let outcome = async {
        shared
            .broker
            .publish(message)
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(shared.write_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("the server is stopping".to_owned()),
            Err(_) => Err(format!(
                "no result within {}",
                humantime::format_duration(shared.write_timeout)
            )),
        }
    }
    .await;
    shared
        .pending
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .remove(&id);
    outcome
}

/// Publishes `value` as plain text, retained, on a mapped topic.
async fn publish_value(shared: &Arc<Shared>, topic: String, value: &Value) -> Result<(), String> {
    let message = Message::internal(
        &format!("{}-write", shared.name),
        topic,
        value.to_string(),
        QoS::AtLeastOnce,
        true,
    );
    match tokio::time::timeout(shared.write_timeout, shared.broker.publish(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("the broker did not take the message in time".to_owned()),
    }
}

/// A client's TCP stream with its place among `max_connections` and an idle deadline:
/// reading or writing that makes no progress for `idle` fails with `TimedOut`, which
/// ends the connection (a client that connects and never sends, or never reads).
struct Connection {
    stream: TcpStream,
    /// Its place among `max_connections`, and its count among the open connections.
    _permit: (OwnedSemaphorePermit, OpenConnection),
    idle: Duration,
    /// The last read or write that moved bytes.
    last_progress: Instant,
    /// Fires at `idle` after some earlier progress; when it does, it is moved on to
    /// `last_progress + idle` unless that has passed. The timer is touched once per idle
    /// period, not once per request.
    deadline: Pin<Box<Sleep>>,
}

impl Connection {
    fn new(
        stream: TcpStream,
        permit: (OwnedSemaphorePermit, OpenConnection),
        idle: Duration,
    ) -> Connection {
        Connection {
            stream,
            _permit: permit,
            idle,
            last_progress: Instant::now(),
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn progress(&mut self) {
        self.last_progress = Instant::now();
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        // Bounded: after a reset the deadline lies in the future, so the second poll
        // registers the timer and returns pending.
        for _ in 0..2 {
            if self.deadline.as_mut().poll(cx).is_pending() {
                return false;
            }
            let due = self.last_progress + self.idle;
            if due <= Instant::now() {
                return true;
            }
            self.deadline.as_mut().reset(due);
        }
        false
    }
}

fn idle_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "idle timeout")
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.progress();
                Poll::Ready(result)
            }
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Ready(result) => {
                this.progress();
                Poll::Ready(result)
            }
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_flush(cx) {
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(idle_error())),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_privileged_port_names_the_capability() {
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        let error = ModbusServerError::Bind {
            addr: "0.0.0.0:502".parse().unwrap(),
            source: denied,
        };
        assert!(
            error.to_string().contains("CAP_NET_BIND_SERVICE"),
            "{error}"
        );
        let in_use = ModbusServerError::Bind {
            addr: "0.0.0.0:5020".parse().unwrap(),
            source: io::Error::from(io::ErrorKind::AddrInUse),
        };
        assert!(
            !in_use.to_string().contains("CAP_NET_BIND_SERVICE"),
            "{in_use}"
        );
    }
}
