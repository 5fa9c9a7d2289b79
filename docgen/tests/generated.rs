//! What the packages install: `scripts/generate-completions.sh` (with this package's
//! `fieldmq-docgen`) writes a completion script for bash, zsh and fish that offers every
//! command of `fieldmq`, a man page per command, and the .deb's assets in Cargo.toml install
//! each of them where the shells and `man` look.

use std::path::Path;
use std::process::Command;

use clap::CommandFactory;
use fieldmq::cli::args::Args;

/// The commands of `fieldmq`, `help` aside.
fn commands() -> Vec<String> {
    let names: Vec<String> = Args::command()
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    for expected in ["run", "check", "passwd", "status", "reload"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    names
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read the output")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Runs the script into a new directory: (the directory, its stdout).
fn generate() -> (tempfile::TempDir, String) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tempfile::tempdir().expect("tempdir");
    let run = Command::new("bash")
        .arg(repo.join("scripts/generate-completions.sh"))
        .args(["--docgen", env!("CARGO_BIN_EXE_fieldmq-docgen"), "--out"])
        .arg(out.path())
        .output()
        .expect("run generate-completions.sh");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    (out, String::from_utf8_lossy(&run.stdout).into_owned())
}

fn gunzip(path: &Path) -> String {
    let run = Command::new("gzip")
        .arg("-dc")
        .arg(path)
        .output()
        .expect("gzip -dc");
    assert!(run.status.success(), "gzip -dc {}", path.display());
    String::from_utf8(run.stdout).expect("a page is UTF-8")
}

#[test]
fn every_shell_gets_a_script_that_offers_every_command() {
    let (out, printed) = generate();
    assert_eq!(
        names_in(out.path()),
        ["_fieldmq", "fieldmq.bash", "fieldmq.fish", "man"]
    );
    for file in ["fieldmq.bash", "_fieldmq", "fieldmq.fish"] {
        assert!(printed.contains(file), "{file} is named in {printed}");
    }
    let read = |name: &str| std::fs::read_to_string(out.path().join(name)).expect(name);
    let bash = read("fieldmq.bash");
    assert!(
        bash.contains("complete -F _fieldmq"),
        "a bash completion script"
    );
    let zsh = read("_fieldmq");
    assert!(
        zsh.starts_with("#compdef fieldmq"),
        "a zsh completion function"
    );
    let fish = read("fieldmq.fish");
    assert!(
        fish.contains("complete -c fieldmq"),
        "a fish completion script"
    );
    for command in commands() {
        assert!(
            bash.contains(&format!("fieldmq,{command})"))
                || bash.contains(&format!("fieldmq__{command}")),
            "bash offers `{command}`"
        );
        assert!(
            zsh.contains(&format!("'{command}:")),
            "zsh offers `{command}`"
        );
        assert!(
            fish.contains(&format!("-a \"{command}\"")),
            "fish offers `{command}`"
        );
    }
    // Options of a command, too.
    assert!(bash.contains("--log-format"), "run's --log-format");
}

#[test]
fn a_man_page_per_command_and_the_main_page_lists_them() {
    let (out, _) = generate();
    let man = out.path().join("man");
    // A page per command, and one per subcommand of a command that has them
    // (`fieldmq-profiles-list.1`).
    let mut pages: Vec<String> = Args::command()
        .get_subcommands()
        .flat_map(|c| {
            std::iter::once(format!("fieldmq-{}.1.gz", c.get_name())).chain(
                c.get_subcommands()
                    .filter(|s| s.get_name() != "help")
                    .map(|s| format!("fieldmq-{}-{}.1.gz", c.get_name(), s.get_name()))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    pages.push("fieldmq.1.gz".to_owned());
    pages.sort();
    assert_eq!(names_in(&man), pages, "a page per command, compressed");

    let main = gunzip(&man.join("fieldmq.1.gz"));
    assert!(main.contains(".TH fieldmq 1"), "a roff page for section 1");
    assert!(
        main.contains(".SH NAME") && main.contains(".SH SUBCOMMANDS"),
        "{main}"
    );
    let listed = &main[main.find(".SH SUBCOMMANDS").expect("subcommands")..];
    for command in commands() {
        assert!(
            listed.contains(&format!("fieldmq\\-{}(1)", command.replace('-', "\\-"))),
            "the man page lists `{command}`"
        );
    }
    let run = gunzip(&man.join("fieldmq-run.1.gz"));
    assert!(
        run.contains("log\\-format"),
        "fieldmq-run(1) documents --log-format"
    );
}

#[test]
fn the_deb_installs_every_generated_file_where_shells_and_man_look() {
    let (out, _) = generate();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest: toml::Table = std::fs::read_to_string(repo.join("Cargo.toml"))
        .expect("read Cargo.toml")
        .parse()
        .expect("Cargo.toml is TOML");
    let assets = manifest["package"]["metadata"]["deb"]["assets"]
        .as_array()
        .expect("deb assets");
    let installs = |source: &str| -> Option<(String, String)> {
        assets.iter().find_map(|asset| {
            let asset = asset.as_array()?;
            (asset[0].as_str()? == source).then(|| {
                (
                    asset[1].as_str().unwrap_or_default().to_owned(),
                    asset[2].as_str().unwrap_or_default().to_owned(),
                )
            })
        })
    };
    for (file, destination) in [
        (
            "fieldmq.bash",
            "usr/share/bash-completion/completions/fieldmq",
        ),
        ("_fieldmq", "usr/share/zsh/vendor-completions/_fieldmq"),
        (
            "fieldmq.fish",
            "usr/share/fish/vendor_completions.d/fieldmq.fish",
        ),
        ("man/*.1.gz", "usr/share/man/man1/"),
    ] {
        assert_eq!(
            installs(&format!("target/generated/{file}")),
            Some((destination.to_owned(), "644".to_owned())),
            "the .deb installs {file} at /{destination}"
        );
        // Each asset names what the script writes.
        let written = match file.strip_prefix("man/") {
            Some(_) => names_in(&out.path().join("man"))
                .iter()
                .all(|p| p.ends_with(".1.gz")),
            None => out.path().join(file).is_file(),
        };
        assert!(written, "the script writes {file}");
    }
}
