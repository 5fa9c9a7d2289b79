//! `fieldmq-docgen OUT`: the shell completions and man pages the .deb and
//! `systemd/install.sh` install, from the same command-line definition the `fieldmq` binary
//! parses (`fieldmq::cli::args`). Writes `OUT/fieldmq.bash`, `OUT/_fieldmq` (zsh),
//! `OUT/fieldmq.fish`, and `OUT/man/fieldmq.1` with a page per command
//! (`fieldmq-run.1`, ...), and prints each path.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;
use fieldmq::cli::args::Args;

/// The scripts written, by shell and file name.
const COMPLETIONS: [(Shell, &str); 3] = [
    (Shell::Bash, "fieldmq.bash"),
    (Shell::Zsh, "_fieldmq"),
    (Shell::Fish, "fieldmq.fish"),
];

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: fieldmq-docgen OUT_DIR");
        return ExitCode::from(2);
    };
    match write_all(Path::new(&out)) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("fieldmq-docgen: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Every completion script and man page under `out`; the paths written.
fn write_all(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out)?;
    let mut written = Vec::new();
    for (shell, name) in COMPLETIONS {
        let path = out.join(name);
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Args::command(), "fieldmq", &mut script);
        replace(&path, &script)?;
        written.push(path);
    }
    // Without the `help` command: the main page lists commands that have a page of their own.
    let man = out.join("man");
    if man.exists() {
        std::fs::remove_dir_all(&man)?;
    }
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(Args::command().disable_help_subcommand(true), &man)?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    pages.sort();
    written.extend(pages);
    Ok(written)
}

/// Writes `path` whole or not at all.
fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, path)
}
