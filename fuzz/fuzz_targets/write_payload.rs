//! Write commands from LAN clients and the cloud: any bytes as the payload of a point's
//! `/set` and of a device-level `<device topic>/set` (a JSON object of points and values).
//! A malformed command must be an error, never a panic; an accepted device-level write
//! names at least one point and no point twice.
#![no_main]

use std::collections::HashSet;

use fieldmq::drivers::{parse_points_write, parse_write_value, MAX_POINTS_WRITE_PAYLOAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_write_value(data);
    if let Ok(points) = parse_points_write(data) {
        assert!(data.len() <= MAX_POINTS_WRITE_PAYLOAD);
        assert!(!points.is_empty(), "an accepted write names no point");
        let mut names = HashSet::new();
        for (name, _) in &points {
            assert!(names.insert(name), "{name:?} accepted twice");
        }
    }
});
