//! The broker store's rows: a run's bytes decoded into records (each re-encoded and decoded
//! again), and the MQTT 5 properties JSON kept with retained and queued messages.
#![no_main]

use fieldmq::fuzzing::{fuzz_decode_properties, fuzz_store_row};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fuzz_store_row(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = fuzz_decode_properties(text);
    }
});
