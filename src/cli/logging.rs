//! The gateway's log: which lines (`RUST_LOG` when set, else `-v`/`-q`, else the
//! configuration's `log_level`) and how they look (text for a person, with no timestamps
//! under journald, which adds its own; or one JSON object a line for a log collector).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

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
    let (filter, rust_log_error) = match rust_log.as_deref().map(EnvFilter::try_new) {
        Some(Ok(filter)) => (filter, None),
        Some(Err(error)) => (fallback(wanted), Some(error)),
        None => (fallback(wanted), None),
    };
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match args.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => {
            let builder = builder.with_ansi(!under_journald && std::io::stderr().is_terminal());
            if under_journald {
                builder.without_time().try_init()
            } else {
                builder.try_init()
            }
        }
    };
    if installed.is_ok() {
        if let Some(error) = rust_log_error {
            tracing::warn!(%error, level = wanted, "RUST_LOG is not a valid filter; ignored");
        }
    }
}

/// `directives` as a filter; the configuration's `log_level` was checked at load, so "info"
/// is only the answer to a value that cannot happen.
fn fallback(directives: &str) -> EnvFilter {
    EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new("info"))
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
    fn each_v_adds_detail_and_quiet_keeps_warnings_and_errors() {
        assert_eq!(args(1, false).directives("info"), "debug");
        assert_eq!(args(2, false).directives("info"), "trace");
        assert_eq!(args(5, false).directives("info"), "trace");
        assert_eq!(args(0, true).directives("debug"), "warn");
    }
}
