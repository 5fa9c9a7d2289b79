//! `fieldmq check` finds what `fieldmq run` would refuse, without starting anything: an
//! unset password variable, a data directory it cannot create or write, password, ACL and
//! TLS files that do not load, each at the line of its key; and it warns (exit 0) about
//! anonymous clients on a listener the network reaches and serial ports that are missing.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::util::{gateway, pki};

/// The start of every config here: lines 1 to 5 (`data_dir` on line 3).
fn head(data_dir: &str) -> String {
    format!("[gateway]\nid = \"gw\"\ndata_dir = \"{data_dir}\"\n[broker]\nallow_anonymous = true\n")
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("fieldmq.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// `fieldmq check -c FILE` with `envs`: (exit code, stdout, stderr).
fn check(config: &Path, envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    gateway::run_within(
        &[OsStr::new("check"), OsStr::new("-c"), config.as_os_str()],
        envs,
        Duration::from_secs(20),
    )
}

/// Asserts exit 2 with a line `FILE:LINE:...: KEY: ...MESSAGE...` on stderr.
fn assert_refused(config: &Path, envs: &[(&str, &str)], line: usize, key: &str, message: &str) {
    let (code, stdout, stderr) = check(config, envs);
    assert_eq!(code, Some(2), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let at = format!("{}:{line}:", config.display());
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with(&at) && l.contains(&format!(" {key}: ")) && l.contains(message)),
        "expected {at} {key}: ...{message}... in:\n{stderr}"
    );
}

#[test]
fn an_unset_password_variable_is_refused_at_its_line_and_a_set_one_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let variable = "FIELDMQ_CHECK_TEST_PASSWORD_NOT_SET";
    let config = write(
        dir.path(),
        &format!(
            "{}[[uplinks]]\nname = \"cloud\"\nurl = \"mqtt://127.0.0.1:1\"\nusername = \"u\"\n\
             password_env = \"{variable}\"\nroutes = [ {{ out = \"gw/#\" }} ]\n",
            head("data")
        ),
    );
    assert_refused(&config, &[], 10, "uplinks[0].password_env", variable);
    let (code, stdout, stderr) = check(&config, &[(variable, "s3cret")]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
}

#[test]
fn a_data_directory_that_cannot_be_created_is_refused_and_a_new_one_is_left_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a-file"), "not a directory").expect("write");
    let config = write(dir.path(), &head("a-file/data"));
    assert_refused(&config, &[], 3, "gateway.data_dir", "cannot be created");

    // A directory that does not exist yet is fine, and the check leaves nothing behind.
    let config = write(dir.path(), &head("new/deeper/data"));
    let (code, stdout, stderr) = check(&config, &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(!dir.path().join("new").exists(), "check created new/");
    // One that exists keeps exactly what it had.
    std::fs::create_dir(dir.path().join("data")).expect("mkdir");
    std::fs::write(dir.path().join("data/keep"), "x").expect("write");
    let config = write(dir.path(), &head("data"));
    let (code, _, stderr) = check(&config, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("data"))
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, ["keep"]);
}

#[test]
fn password_and_acl_files_that_do_not_load_are_refused_at_their_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("passwd"), "no colon on this line\n").expect("write");
    std::fs::write(dir.path().join("acl"), "topic maybe #\n").expect("write");
    let config = write(
        dir.path(),
        &format!(
            "{}password_file = \"passwd\"\nacl_file = \"acl\"\n",
            head("data")
        ),
    );
    assert_refused(&config, &[], 6, "broker.password_file", "passwd");
    assert_refused(&config, &[], 7, "broker.acl_file", "acl");
}

#[test]
fn a_listener_key_that_does_not_match_its_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki::Pki::new();
    // A valid PEM key, but another certificate's.
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, &pki.client.key).expect("write key");
    let config = write(
        dir.path(),
        &format!(
            "{}[[broker.listeners]]\nbind = \"127.0.0.1:0\"\n\
             tls = {{ cert = \"{}\", key = \"{}\" }}\n",
            head("data"),
            pki.server_cert.display(),
            other_key.display()
        ),
    );
    assert_refused(&config, &[], 8, "broker.listeners[0].tls", "");
}

#[test]
fn anonymous_access_on_a_network_listener_is_a_warning_naming_the_listener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write(
        dir.path(),
        &format!(
            "{}[[broker.listeners]]\nbind = \"127.0.0.1:18830\"\n\
             [[broker.listeners]]\nbind = \"0.0.0.0:18831\"\n",
            head("data")
        ),
    );
    let (code, stdout, stderr) = check(&config, &[]);
    assert_eq!(code, Some(0), "a warning is not an error: {stderr}");
    let warnings: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stdout}");
    let at = format!("{}:9:", config.display());
    assert!(
        warnings[0].contains(&at)
            && warnings[0].contains("broker.listeners[1].bind")
            && warnings[0].contains("mqtt://0.0.0.0:18831")
            && warnings[0].contains("anonymous"),
        "{stdout}"
    );

    // With accounts (and no anonymous clients) the same listener is quiet.
    std::fs::write(
        dir.path().join("passwd"),
        format!("{}\n", fieldmq::broker::hash_password("user", "pw")),
    )
    .expect("passwd");
    let text = std::fs::read_to_string(&config).expect("read").replace(
        "allow_anonymous = true",
        "allow_anonymous = false\npassword_file = \"passwd\"",
    );
    std::fs::write(&config, text).expect("write");
    let (code, stdout, stderr) = check(&config, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stdout.contains("anonymous clients"), "{stdout}");
}

#[test]
fn a_missing_serial_port_is_a_warning_not_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write(
        dir.path(),
        &format!(
            "{}[[devices]]\nname = \"gps\"\ndriver = \"serial\"\nport = \"/dev/ttyFIELDMQ-none\"\n\
             parse = [ {{ match = '^(?P<v>.+)$', topic = \"line\" }} ]\n",
            head("data")
        ),
    );
    let (code, stdout, stderr) = check(&config, &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.lines().any(|l| l.starts_with("warning:")
            && l.contains("devices[0].port")
            && l.contains("/dev/ttyFIELDMQ-none")
            && l.contains("does not exist")),
        "{stdout}"
    );
}

/// Copies `from` into `to`, directories included.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let path = entry.expect("entry").path();
        let target = to.join(path.file_name().expect("a name"));
        if path.is_dir() {
            copy_tree(&path, &target);
        } else {
            std::fs::copy(&path, &target).expect("copy");
        }
    }
}

#[test]
fn every_example_passes_check_where_the_service_would_run() {
    // A copy of config/ whose data directories are writable here, with the password
    // variables the examples name set (as the service's environment would have them).
    let dir = tempfile::tempdir().expect("tempdir");
    let examples = dir.path().join("config");
    copy_tree(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config")),
        &examples,
    );
    let data = dir.path().join("var-lib-fieldmq");
    let envs = [
        ("FIELDMQ_MOSQUITTO_PASSWORD", "x"),
        ("FIELDMQ_DC_PASSWORD", "x"),
    ];
    let mut checked = 0;
    for entry in std::fs::read_dir(&examples).expect("list") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let text = text.replace("\"/var/lib/fieldmq\"", &format!("\"{}\"", data.display()));
        std::fs::write(&path, text).expect("write");
        let (code, stdout, stderr) = check(&path, &envs);
        assert_eq!(code, Some(0), "{}:\n{stdout}{stderr}", path.display());
        assert!(
            !stdout.contains("anonymous clients"),
            "{} serves anonymous clients to the network:\n{stdout}",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 5, "{checked} examples");
}
