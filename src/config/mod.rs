//! The configuration document: one TOML file, parsed in two steps (raw serde structs with
//! spans, then validation into the types the gateway uses), with every problem collected
//! and reported together, each with file, line, column, key path and, where one helps, a
//! hint.
//!
//! This module knows no part of the gateway. It owns the document (TOML parsing with
//! recovery, key paths), the diagnostics, the generic checks (durations, sizes, names,
//! keywords, templates, topics, files) and the `[gateway]` table. Each part owns its own
//! section: `broker::config`, `drivers::config` (with each driver's `config`),
//! `uplink::config`, `store::config`; `service::config` assembles the whole file.

mod check;
mod document;
mod error;
mod gateway;
mod raw;

pub use document::diagnostic_at;
pub use error::{ConfigError, Diagnostic};
pub use gateway::GatewayConfig;

pub(crate) use check::{parse_duration, report_missing, Checker, Pem};
pub(crate) use document::parse_toml;
pub(crate) use error::{closest, Diagnostics};
pub(crate) use gateway::RawGateway;
pub(crate) use raw::{RawScalar, RawSize, S};
