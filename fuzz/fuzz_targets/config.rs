//! The configuration loader (TOML parsing, then validation) on arbitrary text: errors are
//! fine, panics are not. A configuration that loads also renders its summary and warnings.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match fieldmq::service::config::parse(&text, Path::new("/etc/fieldmq/fuzz.toml")) {
        Ok(config) => {
            let _ = config.summary();
            let _ = config.warnings();
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
});
