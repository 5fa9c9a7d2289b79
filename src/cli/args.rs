//! The command line's definition: every command, argument and flag of `fieldmq`. The binary
//! parses it; the completion scripts and man pages are generated from the same definition on
//! the build machine (`docgen/`), so the product binary carries no generator.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use super::logging::LogArgs;
use super::Endpoint;

/// `fieldmq` and its global flags.
#[derive(Parser)]
#[command(
    name = "fieldmq",
    version,
    propagate_version = true,
    about = "Edge gateway: field devices to MQTT, with durable cloud uplinks"
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

/// Where and how `sub` and `pub` connect.
#[derive(clap::Args, Clone)]
pub struct ConnectArgs {
    /// Broker host.
    #[arg(short = 'H', long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port.
    #[arg(short, long, default_value_t = 1883)]
    pub port: u16,
    /// User name.
    #[arg(short, long)]
    pub username: Option<String>,
    #[arg(short = 'P', long, env = "FIELDMQ_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// QoS 0, 1 or 2.
    #[arg(short, long, default_value_t = 0)]
    pub qos: u8,
}

impl ConnectArgs {
    pub fn endpoint(&self, role: &str) -> Endpoint {
        Endpoint {
            host: self.host.clone(),
            port: self.port,
            username: self.username.clone(),
            password: self.password.clone(),
            client_id: format!("fieldmq-{role}-{}", std::process::id()),
        }
    }
}

/// The commands.
#[derive(Subcommand)]
pub enum Command {
    /// Run the gateway (the embedded demo configuration when no file is given).
    Run {
        /// The configuration file (TOML).
        #[arg(short, long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Validate a configuration file and print a summary (exit 0 valid, 2 invalid).
    Check {
        /// The configuration file (TOML).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Copy the broker store and every uplink outbox into the directory DEST (created if
    /// missing; files of the same name are replaced), from a running gateway (through its
    /// control socket) or a stopped one.
    Backup {
        /// The configuration file (TOML).
        #[arg(short, long)]
        config: PathBuf,
        dest: PathBuf,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Ask the running gateway to apply its configuration file again and print what
    /// changed (exit 0 applied, 1 refused, 2 no gateway answers). CONFIG names the data
    /// directory whose control socket to use.
    Reload {
        #[arg(short, long, default_value = "/etc/fieldmq/fieldmq.toml")]
        config: PathBuf,
    },
    /// Show what the running gateway is doing: devices and points, uplinks, clients and
    /// recent errors (asked through its control socket; no HTTP listener needed).
    Status {
        /// The configuration file the gateway runs with (default: the embedded demo's).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Print the whole status as JSON (the same document as `GET /api/v1/status`).
        #[arg(long)]
        json: bool,
    },
    /// Subscribe and print `topic payload` lines.
    Sub {
        #[command(flatten)]
        connect: ConnectArgs,
        /// Topic filters.
        #[arg(required = true)]
        topics: Vec<String>,
        /// Exit after this many messages.
        #[arg(short = 'n', long)]
        count: Option<u64>,
        /// Exit with an error when nothing more arrives within this time ("10s").
        #[arg(short = 'W', long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
    },
    /// Publish one message.
    Pub {
        #[command(flatten)]
        connect: ConnectArgs,
        topic: String,
        message: String,
        #[arg(short, long)]
        retain: bool,
    },
    /// Read a Modbus register range and print it in every type and byte order.
    Probe(crate::drivers::modbus::probe::ProbeArgs),
    /// Modbus device profiles: register maps a device uses with `profile = "NAME"`.
    Profiles {
        #[command(subcommand)]
        action: ProfilesAction,
    },
    /// Print a Mosquitto-compatible password file line (`$7$` PBKDF2-SHA512).
    ///
    /// The password comes from the argument, else FIELDMQ_NEW_PASSWORD, else a prompt on the
    /// terminal (twice, not echoed), else one line of standard input.
    Passwd {
        username: String,
        /// The password (better left out: arguments show in `ps` and in shell history).
        #[arg(env = "FIELDMQ_NEW_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
}

/// What `fieldmq profiles` does.
#[derive(Debug, Subcommand)]
pub enum ProfilesAction {
    /// List every profile: the built-in ones and those in profiles/ next to CONFIG.
    List {
        /// The configuration file whose profiles/ folder to read as well.
        #[arg(short, long, default_value = "/etc/fieldmq/fieldmq.toml")]
        config: PathBuf,
    },
    /// Print one profile's points (table, address, type, unit).
    Show {
        name: String,
        /// The configuration file whose profiles/ folder to read as well.
        #[arg(short, long, default_value = "/etc/fieldmq/fieldmq.toml")]
        config: PathBuf,
    },
}
