//! Modbus register decoding: every data type in every byte/word order on registers taken
//! from the input, with scale and offset from the input, then the write encoding of the
//! decoded value. Also the byte-order round trip of the register helpers.
#![no_main]

use std::time::Duration;

use fieldmq::drivers::modbus::codec::{
    decode_point, decode_registers, encode, ordered_bytes, words_from_bytes,
};
use fieldmq::drivers::modbus::config::{DataType, Order, Point, Report, Table};
use libfuzzer_sys::fuzz_target;

fn data_type(selector: u8, width: u8) -> DataType {
    match selector % 11 {
        0 => DataType::Bool,
        1 => DataType::Bit(width % 16),
        2 => DataType::U16,
        3 => DataType::I16,
        4 => DataType::U32,
        5 => DataType::I32,
        6 => DataType::U64,
        7 => DataType::I64,
        8 => DataType::F32,
        9 => DataType::F64,
        _ => DataType::String {
            registers: u16::from(width % 32) + 1,
        },
    }
}

fn f64_at(data: &[u8], at: usize) -> Option<f64> {
    Some(f64::from_le_bytes(data.get(at..at + 8)?.try_into().ok()?))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (head, rest) = data.split_at(3);
    let data_type = data_type(head[0], head[1]);
    let order = Order::ALL[usize::from(head[2] % 4)];
    // Scale and offset: the unscaled default or two f64 from the input.
    let (scale, offset, rest) = if head[2] & 0x80 != 0 && rest.len() >= 16 {
        (
            f64_at(rest, 0).unwrap_or(1.0),
            f64_at(rest, 8).unwrap_or(0.0),
            &rest[16..],
        )
    } else {
        (1.0, 0.0, rest)
    };
    let words: Vec<u16> = rest
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
        .collect();
    let bits: Vec<bool> = rest.iter().map(|b| b & 1 == 1).collect();

    // Byte order helpers: words to bytes and back is the identity.
    let bytes = ordered_bytes(&words, order);
    assert_eq!(bytes.len(), words.len() * 2);
    assert_eq!(words_from_bytes(&bytes, order), words);
    let _ = words_from_bytes(rest, order);

    let width = usize::from(data_type.width());
    let point = Point {
        name: "p".into(),
        table: if data_type == DataType::Bool {
            Table::Coil
        } else {
            Table::Holding
        },
        address: 0,
        data_type,
        order,
        scale,
        offset,
        unit: None,
        poll: None,
        report: Report::Always,
        min_interval: Duration::ZERO,
        max_interval: None,
        writable: true,
    };
    for every in Order::ALL {
        let decoded = decode_registers(data_type, every, &words);
        let exact = data_type != DataType::Bool && words.len() == width;
        assert_eq!(
            decoded.is_some(),
            exact,
            "{data_type:?} on {} words",
            words.len()
        );
    }
    // As a read response sliced to the point (a short one gives None).
    let slice = &words[..words.len().min(width)];
    if let Some(value) = decode_point(&point, slice, &bits) {
        let _ = encode(&point, &value);
    }
});
