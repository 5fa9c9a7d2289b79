//! The `fieldmq` binary: parse arguments, set up logging, call into the library, map
//! errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fieldmq::cli::{self, Endpoint};
use fieldmq::service::config;

#[derive(Parser)]
#[command(
    name = "fieldmq",
    version,
    about = "Edge gateway: field devices to MQTT, with durable cloud uplinks"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ConnectArgs {
    /// Broker host.
    #[arg(short = 'H', long, default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(short, long, default_value_t = 1883)]
    port: u16,
    #[arg(short, long)]
    username: Option<String>,
    #[arg(short = 'P', long, env = "FIELDMQ_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// QoS 0, 1 or 2.
    #[arg(short, long, default_value_t = 0)]
    qos: u8,
}

impl ConnectArgs {
    fn endpoint(&self, role: &str) -> Endpoint {
        Endpoint {
            host: self.host.clone(),
            port: self.port,
            username: self.username.clone(),
            password: self.password.clone(),
            client_id: format!("fieldmq-{role}-{}", std::process::id()),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the embedded demo configuration when no file is given).
    Run {
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and print a summary (exit 0 valid, 2 invalid).
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Copy the broker store and every uplink outbox into the directory DEST (created if
    /// missing; files of the same name are replaced), from a running gateway (through its
    /// control socket) or a stopped one.
    Backup {
        #[arg(short, long)]
        config: PathBuf,
        dest: PathBuf,
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
    Probe(fieldmq::drivers::modbus::probe::ProbeArgs),
    /// Print a Mosquitto-compatible password file line (`$7$` PBKDF2-SHA512).
    Passwd {
        username: String,
        /// The password (read from the FIELDMQ_NEW_PASSWORD environment variable if absent).
        #[arg(env = "FIELDMQ_NEW_PASSWORD", hide_env_values = true)]
        password: String,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Check { config } => check(&config),
        Command::Backup { config, dest } => {
            let config = match config::load(&config) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("{error}");
                    return ExitCode::from(2);
                }
            };
            block_on(async move {
                let copied = fieldmq::service::control::backup(&config, &dest)
                    .await
                    .map_err(|e| e.to_string())?;
                for file in copied {
                    println!("{}", file.display());
                }
                Ok(())
            })
        }
        Command::Status { config, json } => {
            let config = match config {
                Some(path) => match config::load(&path) {
                    Ok(config) => config,
                    Err(error) => {
                        eprintln!("{error}");
                        return ExitCode::from(2);
                    }
                },
                None => config::demo(),
            };
            block_on(async move {
                let data_dir = &config.gateway.data_dir;
                let (text, snapshot) = fieldmq::service::control::status(data_dir)
                    .await
                    .map_err(|e| e.to_string())?;
                if json {
                    println!("{text}");
                } else {
                    print!("{}", fieldmq::status::render_text(&snapshot));
                }
                Ok(())
            })
        }
        Command::Probe(args) => block_on(async move {
            let report = fieldmq::drivers::modbus::probe::probe(&args)
                .await
                .map_err(|e| e.to_string())?;
            print!("{report}");
            Ok(())
        }),
        Command::Passwd { username, password } => {
            println!("{}", fieldmq::broker::hash_password(&username, &password));
            ExitCode::SUCCESS
        }
        Command::Run { config } => {
            let config = match config {
                Some(path) => match config::load(&path) {
                    Ok(config) => config,
                    Err(error) => {
                        eprintln!("{error}");
                        return ExitCode::from(2);
                    }
                },
                None => config::demo(),
            };
            init_logging(&config.gateway.log_level);
            for warning in config.warnings() {
                tracing::warn!("{warning}");
            }
            let mut exit = fieldmq::service::Exit::Stopped;
            let threads = config.gateway.runtime_threads();
            tracing::info!(runtime_threads = threads, "starting");
            let code = block_on_threads(Some(threads), async {
                exit = fieldmq::service::run_until_signal(config)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            });
            if exit == fieldmq::service::Exit::Restart {
                return ExitCode::from(fieldmq::service::RESTART_EXIT_CODE);
            }
            code
        }
        Command::Sub {
            connect,
            topics,
            count,
            timeout,
        } => block_on(async move {
            cli::subscribe(
                &connect.endpoint("sub"),
                &topics,
                connect.qos,
                count,
                timeout,
                std::io::stdout(),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        }),
        Command::Pub {
            connect,
            topic,
            message,
            retain,
        } => block_on(async move {
            cli::publish(
                &connect.endpoint("pub"),
                &topic,
                message.as_bytes(),
                connect.qos,
                retain,
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| e.to_string())
        }),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match config::load(path) {
        Ok(config) => {
            // What an uplink reads at start (certificates, keys, password sources) is
            // checked here too, so a bad file shows up before the gateway runs.
            let problems: Vec<String> = config
                .uplinks
                .iter()
                .flat_map(|uplink| {
                    fieldmq::uplink::check(uplink)
                        .into_iter()
                        .map(move |e| format!("uplinks[{}]: {e}", uplink.name))
                })
                .collect();
            if !problems.is_empty() {
                for problem in &problems {
                    eprintln!("{}: {problem}", path.display());
                }
                eprintln!("{}: invalid", path.display());
                return ExitCode::from(2);
            }
            println!("{}: ok", path.display());
            println!("{}", config.summary());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            eprintln!("{}: invalid", path.display());
            ExitCode::from(2)
        }
    }
}

fn block_on(work: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    block_on_threads(None, work)
}

/// Run `work` on a multi-threaded runtime with `threads` workers (tokio's default: one per
/// core).
fn block_on_threads(
    threads: Option<usize>,
    work: impl std::future::Future<Output = Result<(), String>>,
) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = threads {
        builder.worker_threads(threads);
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Logs for people reading journalctl: no colours and no timestamps under systemd (the
/// journal adds its own), `RUST_LOG` overrides the configured level.
fn init_logging(level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!under_journald && std::io::stderr().is_terminal());
    if under_journald {
        builder.without_time().init();
    } else {
        builder.init();
    }
}
