//! The `fieldmq` binary: parse arguments, set up logging, call into the library, map
//! errors to exit codes.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fieldmq::cli::args::{Args, Command, ProfilesAction};
use fieldmq::cli::logging;
use fieldmq::cli::{self, passwd};
use fieldmq::service::config;

/// `fieldmq profiles list | show NAME`.
fn profiles(action: ProfilesAction) -> ExitCode {
    use fieldmq::drivers::modbus::config::SUNSPEC_PROFILE;
    use fieldmq::drivers::modbus::{profile, sunspec};
    let local = |config: &std::path::Path| {
        profile::local_dir(
            config
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new(".")),
        )
    };
    match action {
        ProfilesAction::List { config } => {
            let dir = local(&config);
            let mut rows = vec![(
                SUNSPEC_PROFILE.to_owned(),
                format!(
                    "SunSpec inverters and meters: points from the device's models ({} models mapped)",
                    sunspec::known_models().len()
                ),
                "built in".to_owned(),
            )];
            for (name, origin) in profile::list(Some(&dir)) {
                let about = match profile::find(&name, Some(&dir)) {
                    Ok(found) => format!("{} ({} points)", found.description, found.points.len()),
                    Err(error) => format!(
                        "INVALID: {}",
                        error.to_string().lines().next().unwrap_or_default()
                    ),
                };
                rows.push((name, about, origin));
            }
            rows.sort();
            for (name, about, origin) in rows {
                println!("{name:<26} {about}  [{origin}]");
            }
            ExitCode::SUCCESS
        }
        ProfilesAction::Show { name, .. } if name == SUNSPEC_PROFILE => {
            print!("{}", sunspec::render_models());
            ExitCode::SUCCESS
        }
        ProfilesAction::Show { name, config } => {
            match profile::find(&name, Some(&local(&config))) {
                Ok(found) => {
                    print!("{}", found.render());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("{error}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Check { config } => check(&config),
        Command::Backup { config, dest, log } => {
            logging::init(&log, "warn");
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
        Command::Reload { config } => reload(&config),
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
        Command::Profiles { action } => profiles(action),
        Command::Probe(args) => block_on(async move {
            let report = fieldmq::drivers::modbus::probe::probe(&args)
                .await
                .map_err(|e| e.to_string())?;
            print!("{report}");
            Ok(())
        }),
        Command::Passwd { username, password } => {
            let password = match password.map_or_else(new_password, Ok) {
                Ok(password) => password,
                Err(passwd::PasswordError::Io(error))
                    if error.kind() == std::io::ErrorKind::Interrupted =>
                {
                    eprintln!("interrupted; nothing written");
                    return ExitCode::from(130);
                }
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::FAILURE;
                }
            };
            println!("{}", fieldmq::broker::hash_password(&username, &password));
            ExitCode::SUCCESS
        }
        Command::Run { config, log } => {
            let (config, source) = match config {
                Some(path) => match config::load(&path) {
                    Ok(config) => {
                        let shown = std::path::absolute(&path).unwrap_or(path);
                        (config, shown.display().to_string())
                    }
                    Err(error) => {
                        eprintln!("{error}");
                        return ExitCode::from(2);
                    }
                },
                None => (config::demo(), "embedded demo".to_owned()),
            };
            logging::init(&log, &config.gateway.log_level);
            let threads = config.gateway.runtime_threads();
            // The first line says what runs, from which file, with its data where; the
            // listener lines follow once they are bound.
            let data_dir = &config.gateway.data_dir;
            tracing::info!(
                version = %env!("CARGO_PKG_VERSION"),
                config = %source,
                data_dir = %std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.clone()).display(),
                runtime_threads = threads,
                "starting fieldmq"
            );
            for warning in config.warnings() {
                tracing::warn!("{warning}");
            }
            block_on_threads(Some(threads), async {
                fieldmq::service::run_until_signal(config)
                    .await
                    .map_err(|e| e.to_string())
            })
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

/// `fieldmq reload`: 0 applied, 1 refused (or the gateway cannot reload now), 2 no gateway
/// answers (or the file names no data directory).
fn reload(path: &std::path::Path) -> ExitCode {
    use fieldmq::service::control::{self, ReloadOutcome};
    // Only the data directory is taken from the file (its control socket); the gateway
    // reads the file itself, and reports its errors.
    let Some(data_dir) = control::data_dir_of(path) else {
        eprintln!(
            "error: {}: cannot read the gateway's data directory from it (see `fieldmq check -c {}`)",
            path.display(),
            path.display()
        );
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(control::reload(&data_dir)) {
        Ok(ReloadOutcome::Applied(changes)) => {
            if changes.is_empty() {
                println!("reloaded: nothing changed");
            } else {
                println!("reloaded:");
                for change in changes {
                    println!("  {change}");
                }
            }
            ExitCode::SUCCESS
        }
        Ok(ReloadOutcome::Refused(errors)) => {
            eprintln!("reload refused, nothing changed:");
            for error in errors {
                eprintln!("  {error}");
            }
            ExitCode::from(1)
        }
        Ok(ReloadOutcome::NotNow(reason)) => {
            eprintln!("reload refused: {reason}");
            ExitCode::from(1)
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match config::load(path) {
        Ok(config) => {
            // What `run` would refuse once the file is valid (files that do not load, an
            // unset password variable, a data directory it cannot write) shows up here too.
            let findings = fieldmq::service::preflight::preflight(&config);
            for warning in &findings.warnings {
                println!("warning: {warning}");
            }
            if !findings.errors.is_empty() {
                for error in &findings.errors {
                    eprintln!("{error}");
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

/// The password for `passwd` when none was given: asked on the terminal, or read from a pipe.
fn new_password() -> Result<String, passwd::PasswordError> {
    use std::io::IsTerminal;
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        // rpassword answers Ctrl-C by raising SIGINT while the terminal is still without
        // echo; by default that kills the process before the terminal is restored. With a
        // handler registered, rpassword returns `Interrupted` and restores the terminal.
        let _ctrl_c = catch_ctrl_c();
        passwd::prompt_twice(|prompt| rpassword::prompt_password(prompt))
    } else {
        passwd::read_line(stdin.lock())
    }
}

/// Register a SIGINT handler (tokio's, so no other crate) for as long as the result lives;
/// `None` when it cannot be, and Ctrl-C then ends the process as usual.
fn catch_ctrl_c() -> Option<(tokio::runtime::Runtime, tokio::signal::unix::Signal)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .ok()?;
    let signal = {
        let _entered = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok()?
    };
    Some((runtime, signal))
}
