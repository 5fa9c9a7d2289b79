//! The `[gateway]` table: the gateway's identity, where its files live, logging, runtime
//! threads and the shutdown deadline. Every part reads it; it belongs to no part.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::check::Checker;
use super::raw::S;

pub(crate) const DEFAULT_DATA_DIR: &str = "/var/lib/fieldmq";
const DEFAULT_LOG_LEVEL: &str = "info";
const DEFAULT_STATUS_TOPIC: &str = "fieldmq/{gateway}/status";
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    /// Default cloud client id and the `{gateway}` topic variable.
    pub id: String,
    /// Where SQLite files live.
    pub data_dir: PathBuf,
    /// `tracing` filter, e.g. "info" or "fieldmq=debug"; `RUST_LOG` overrides it.
    pub log_level: String,
    /// Retained gateway status topic, `{gateway}` already substituted.
    /// Default `fieldmq/{gateway}/status`.
    pub status_topic: String,
    /// How long a graceful stop may take before the gateway exits anyway. Default 10s.
    pub shutdown_timeout: Duration,
    /// Threads of the async runtime (connections, devices, uplinks); `None`: one less
    /// than the machine has cores (see [`GatewayConfig::runtime_threads`]).
    pub worker_threads: Option<usize>,
}

impl GatewayConfig {
    /// How many runtime threads to start: as configured, or one less than the cores (at
    /// least one). The broker's store runs on a thread of its own that is busy whenever
    /// persistent sessions take messages; leaving it a core spares the cross-core wake-ups
    /// of a runtime that spreads one connection's work over every core (measured on two
    /// cores: 12-20% less CPU per durably queued message, docs/benchmarks.md).
    pub fn runtime_threads(&self) -> usize {
        self.worker_threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |cores| cores.get().saturating_sub(1).max(1))
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGateway {
    pub(crate) id: Option<S<String>>,
    pub(crate) data_dir: Option<S<String>>,
    pub(crate) log_level: Option<S<String>>,
    pub(crate) status_topic: Option<S<String>>,
    pub(crate) shutdown_timeout: Option<S<String>>,
    pub(crate) worker_threads: Option<S<i64>>,
}

impl Checker<'_> {
    /// The `[gateway]` table. Sets the `{gateway}` substitution and the data directory the
    /// later sections use.
    pub(crate) fn gateway(&mut self, raw: S<RawGateway>) -> Option<GatewayConfig> {
        let span = raw.span();
        let raw = raw.into_inner();
        let id = match &raw.id {
            Some(id) => {
                if self.name(id, "gateway.id") {
                    self.gateway_id = id.get_ref().clone();
                }
                id.get_ref().clone()
            }
            None => {
                self.missing(span, "gateway.id".into(), Some("add id = \"my-gateway\": it names the gateway in topics and is the default cloud client id"));
                String::new()
            }
        };
        let data_dir = match &raw.data_dir {
            Some(dir) if dir.get_ref().is_empty() => {
                self.d
                    .error(Some(dir.span()), "gateway.data_dir", "must not be empty");
                PathBuf::from(DEFAULT_DATA_DIR)
            }
            Some(dir) => self.path(dir.get_ref()),
            None => PathBuf::from(DEFAULT_DATA_DIR),
        };
        self.data_dir = data_dir.clone();
        let log_level = match &raw.log_level {
            Some(level) => {
                if let Err(error) = crate::cli::logging::parse_filter(level.get_ref()) {
                    self.d
                        .error(
                            Some(level.span()),
                            "gateway.log_level",
                            format!("invalid log filter {:?}: {error}", level.get_ref()),
                        )
                        .hint = Some("use a level (error, warn, info, debug, trace) or a filter like \"info,fieldmq=debug\"".into());
                }
                level.get_ref().clone()
            }
            None => DEFAULT_LOG_LEVEL.to_owned(),
        };
        let status_topic = match &raw.status_topic {
            Some(topic) => self.topic(topic, "gateway.status_topic"),
            None => self.substitute(DEFAULT_STATUS_TOPIC),
        };
        let shutdown_timeout = self.positive_duration(
            &raw.shutdown_timeout,
            "gateway.shutdown_timeout",
            DEFAULT_SHUTDOWN_TIMEOUT,
        );
        let worker_threads = raw.worker_threads.as_ref().map(|_| {
            let n = self.integer(&raw.worker_threads, "gateway.worker_threads", 1, 256, 1);
            usize::try_from(n).unwrap_or(1)
        });
        Some(GatewayConfig {
            id,
            data_dir,
            log_level,
            status_topic,
            shutdown_timeout,
            worker_threads,
        })
    }
}
