//! SunSpec discovery and decoding on registers taken from the input: the model chain in a
//! register image (`walk_image`), the chain walker fed arbitrary headers, and every mapped
//! point of the models found decoded from the image. Discovery must end with models or an
//! error, never a panic or an endless walk; every point name it gives is one the
//! configuration check accepts for a SunSpec device, and an arbitrary name never panics it.
#![no_main]

use fieldmq::model::Value;
use fieldmq::drivers::modbus::sunspec::{
    blocks, chunks, decode, decode_with_scale, is_point_name, walk_image, Walk, MARKER,
    MAX_MODELS,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    // The input as a point name, as a Modbus server map entry gives it.
    let _ = is_point_name(&String::from_utf8_lossy(rest));
    let words: Vec<u16> = rest
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
        .collect();

    // The walker fed the words as (id, length) headers: it ends within MAX_MODELS + 1 steps.
    let mut walk = Walk::new(u16::from_be_bytes([selector, selector]));
    let mut steps = 0;
    for pair in words.chunks_exact(2) {
        match walk.next_header() {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
        if walk.feed(pair[0], pair[1]).is_err() {
            break;
        }
        steps += 1;
        assert!(steps <= MAX_MODELS + 1);
    }

    // The words as an image at a base, with the marker in front.
    let base = match selector % 3 {
        0 => 0u16,
        1 => 40000,
        _ => 50000,
    };
    let mut image = MARKER.to_vec();
    image.extend(&words);
    let Ok((found_base, found)) = walk_image(&image, base) else {
        return;
    };
    assert_eq!(found_base, base);
    let mut previous = None;
    for model in &found {
        assert!(previous.is_none_or(|p| p < model.address), "addresses grow");
        assert!(u32::from(model.address) + 2 + u32::from(model.length) <= 65_536);
        previous = Some(model.address);
    }
    for block in blocks(&found) {
        // The block (fixed part and whole repeats) lies within the model's length.
        assert!(block.count <= block.found.length);
        let start = block.found.data_start();
        let ranges = chunks(
            start,
            block.count,
            block.points.iter().map(|(_, s)| (s.address, s.kind.width())),
        );
        // In u32: a block may end at register 65535, one past it is 65536.
        let mut next = u32::from(start);
        for &(from, count) in &ranges {
            assert!(u32::from(from) == next && (1..=125).contains(&count), "{ranges:?}");
            next = u32::from(from) + u32::from(count);
        }
        assert_eq!(next, u32::from(start) + u32::from(block.count));
        let from = usize::from(start - base);
        let end = (from + usize::from(block.count)).min(image.len());
        let registers = image.get(from.min(end)..end).unwrap_or_default();
        for (point, source) in &block.points {
            assert_eq!(point.address, source.address);
            assert!(is_point_name(&point.name), "{}", point.name);
            if let Ok(Value::Float(x)) = decode(source, registers, start) {
                assert!(x.is_finite() || source.sf_address.is_none());
            }
            let sf = i16::from(selector as i8) % 11;
            if let Ok(Value::Float(x)) = decode_with_scale(source, registers, start, Some(sf)) {
                assert!(x.is_finite() || source.sf_address.is_none());
            }
        }
    }
});
