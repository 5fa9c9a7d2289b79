//! The gateway's log: which lines (`RUST_LOG` when set, else `-v`/`-q`, else the
//! configuration's `log_level`) and how they look (text for a person, with no timestamps
//! under journald, which adds its own; or one JSON object a line for a log collector).

use std::io::IsTerminal;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The log flags of the commands that run the gateway.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LogArgs {
    /// More detail in the log: -v debug, -vv trace (RUST_LOG, when set, wins).
    #[arg(short, long, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Only warnings and errors in the log (RUST_LOG, when set, wins).
    #[arg(short, long)]
    pub quiet: bool,
    /// `text` for a person, `json` for a log collector (one object a line, with `level`,
    /// `message`, `target` and the event's fields).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogArgs {
    /// The filter directives the flags ask for, or `configured` when they ask for nothing.
    pub fn directives<'a>(&self, configured: &'a str) -> &'a str {
        match (self.quiet, self.verbose) {
            (true, _) => "warn",
            (false, 0) => configured,
            (false, 1) => "debug",
            (false, _) => "trace",
        }
    }
}

/// Install the process's log subscriber (once; a second call changes nothing). `configured`
/// is the configuration's `log_level`, or the command's own default.
pub fn init(args: &LogArgs, configured: &str) {
    let wanted = args.directives(configured);
    // An unset or empty RUST_LOG leaves the choice to the flags; a malformed one is
    // reported once the log works, and the flags apply.
    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let (filter, rust_log_error) = match rust_log.as_deref().map(parse_filter) {
        Some(Ok(filter)) => (filter, None),
        Some(Err(error)) => (fallback(wanted), Some(error)),
        None => (fallback(wanted), None),
    };
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match args.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Text => {
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(!under_journald && std::io::stderr().is_terminal());
            if under_journald {
                registry.with(layer.without_time()).try_init()
            } else {
                registry.with(layer).try_init()
            }
        }
    };
    if installed.is_ok() {
        if let Some(error) = rust_log_error {
            tracing::warn!(%error, level = wanted, "RUST_LOG is not a valid filter; ignored");
        }
    }
}

/// The levels a directive may name.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// A log filter: a level (`info`), or targets with levels and a default
/// (`info,fieldmq::uplink=debug`), as `RUST_LOG` is commonly written. A bare word must be a
/// level (a misspelt `inof` is an error, not a target); span and field directives
/// (`[span{field=value}]`) are not part of it.
pub fn parse_filter(directives: &str) -> Result<Targets, String> {
    for directive in directives.split(',').map(str::trim) {
        if !directive.contains('=') && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{directive:?} is not a level ({}); a target's level is written target=level",
                LEVELS.join(", ")
            ));
        }
    }
    directives
        .trim()
        .parse::<Targets>()
        .map_err(|error| error.to_string())
}

/// `directives` as a filter; the configuration's `log_level` was checked at load, so "info"
/// is only the answer to a value that cannot happen.
fn fallback(directives: &str) -> Targets {
    parse_filter(directives).unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(verbose: u8, quiet: bool) -> LogArgs {
        LogArgs {
            verbose,
            quiet,
            log_format: LogFormat::Text,
        }
    }

    #[test]
    fn no_flag_keeps_the_configured_level() {
        assert_eq!(
            args(0, false).directives("fieldmq=debug,info"),
            "fieldmq=debug,info"
        );
    }

    #[test]
    fn filters_take_levels_and_targets_and_refuse_nonsense() {
        assert!(parse_filter("info").is_ok());
        assert!(parse_filter("warn,fieldmq::uplink=debug").is_ok());
        assert!(parse_filter(" debug ").is_ok());
        let filter = parse_filter("warn,fieldmq::uplink=debug").expect("valid");
        assert!(filter.would_enable("fieldmq::uplink::run", &tracing::Level::DEBUG));
        assert!(!filter.would_enable("fieldmq::broker", &tracing::Level::INFO));
        assert!(parse_filter("loud").is_err());
        assert!(parse_filter("fieldmq=chatty").is_err());
        assert!(parse_filter("info,").is_err());
        assert!(parse_filter("WARN").is_ok());
    }

    #[test]
    fn each_v_adds_detail_and_quiet_keeps_warnings_and_errors() {
        assert_eq!(args(1, false).directives("info"), "debug");
        assert_eq!(args(2, false).directives("info"), "trace");
        assert_eq!(args(5, false).directives("info"), "trace");
        assert_eq!(args(0, true).directives("debug"), "warn");
    }
}
