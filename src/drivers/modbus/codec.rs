//! Registers to values and back: every [`DataType`] in every byte/word [`Order`], then
//! scale and offset. Pure functions, so the tables in the tests spell out the hex.

use super::config::{DataType, Order, Point};
use crate::model::Value;

/// Why a write value cannot be encoded for a point. The message is the user's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EncodeError(pub String);

/// What a write puts on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoded {
    /// A coil (FC05).
    Coil(bool),
    /// One bit of a holding register: read, change the bit, write the register back.
    Bit { bit: u8, value: bool },
    /// Holding registers (FC06 for one, FC16 for more).
    Registers(Vec<u16>),
}

/// The big-endian bytes of `words` read in `order` (word swap reverses the words, byte swap
/// swaps the two bytes of each).
pub fn ordered_bytes(words: &[u16], order: Order) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(words.len() * 2);
    let mut push = |word: u16| {
        let [high, low] = word.to_be_bytes();
        if order.byte_swap() {
            bytes.extend_from_slice(&[low, high]);
        } else {
            bytes.extend_from_slice(&[high, low]);
        }
    };
    if order.word_swap() {
        words.iter().rev().copied().for_each(&mut push);
    } else {
        words.iter().copied().for_each(&mut push);
    }
    bytes
}

/// The inverse of [`ordered_bytes`]: registers that read back as `bytes` (big-endian).
pub fn words_from_bytes(bytes: &[u8], order: Order) -> Vec<u16> {
    let mut words: Vec<u16> = bytes
        .chunks(2)
        .map(|pair| {
            let high = pair.first().copied().unwrap_or(0);
            let low = pair.get(1).copied().unwrap_or(0);
            if order.byte_swap() {
                u16::from_be_bytes([low, high])
            } else {
                u16::from_be_bytes([high, low])
            }
        })
        .collect();
    if order.word_swap() {
        words.reverse();
    }
    words
}

fn array<const N: usize>(bytes: &[u8]) -> Option<[u8; N]> {
    bytes.get(..N)?.try_into().ok()
}

/// A raw (unscaled) number or text decoded from registers.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw {
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Text(String),
}

/// Decodes the registers of a register-table point. `words` must hold exactly the point's
/// registers; `None` when it does not (a short response).
pub fn decode_registers(data_type: DataType, order: Order, words: &[u16]) -> Option<Raw> {
    if words.len() != usize::from(data_type.width()) {
        return None;
    }
    // 16-bit values honour only the byte swap.
    let order16 = if order.byte_swap() {
        Order::Badc
    } else {
        Order::Abcd
    };
    Some(match data_type {
        DataType::Bool => return None,
        DataType::Bit(bit) => Raw::Bool(words.first()? >> bit & 1 == 1),
        DataType::U16 => Raw::Unsigned(u64::from(u16::from_be_bytes(array(&ordered_bytes(
            words, order16,
        ))?))),
        DataType::I16 => Raw::Signed(i64::from(i16::from_be_bytes(array(&ordered_bytes(
            words, order16,
        ))?))),
        DataType::U32 => Raw::Unsigned(u64::from(u32::from_be_bytes(array(&ordered_bytes(
            words, order,
        ))?))),
        DataType::I32 => Raw::Signed(i64::from(i32::from_be_bytes(array(&ordered_bytes(
            words, order,
        ))?))),
        DataType::U64 => Raw::Unsigned(u64::from_be_bytes(array(&ordered_bytes(words, order))?)),
        DataType::I64 => Raw::Signed(i64::from_be_bytes(array(&ordered_bytes(words, order))?)),
        DataType::F32 => Raw::Float(f32_to_f64(f32::from_be_bytes(array(&ordered_bytes(
            words, order,
        ))?))),
        DataType::F64 => Raw::Float(f64::from_be_bytes(array(&ordered_bytes(words, order))?)),
        DataType::String { .. } => {
            let bytes = ordered_bytes(words, order16);
            let text: String = bytes
                .iter()
                .take_while(|b| **b != 0)
                .map(|b| {
                    if b.is_ascii() {
                        char::from(*b)
                    } else {
                        char::REPLACEMENT_CHARACTER
                    }
                })
                .collect();
            Raw::Text(text.trim_end().to_owned())
        }
    })
}

/// An f32 as the f64 with the same shortest decimal form (21.7, not 21.700000762939453).
pub fn f32_to_f64(x: f32) -> f64 {
    if !x.is_finite() {
        return f64::from(x);
    }
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// Applies the point's scale and offset. Unscaled integers stay integers.
pub fn scaled(raw: Raw, point: &Point) -> Value {
    match raw {
        Raw::Bool(b) => Value::Bool(b),
        Raw::Text(t) => Value::Text(t),
        Raw::Unsigned(n) if point.is_unscaled() => match i64::try_from(n) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::Float(n as f64),
        },
        Raw::Signed(i) if point.is_unscaled() => Value::Int(i),
        Raw::Float(x) if point.is_unscaled() => Value::Float(x),
        Raw::Unsigned(n) => Value::Float(tidy(n as f64 * point.scale + point.offset)),
        Raw::Signed(i) => Value::Float(tidy(i as f64 * point.scale + point.offset)),
        Raw::Float(x) => Value::Float(tidy(x * point.scale + point.offset)),
    }
}

/// Rounds away binary noise of a scale such as 0.1 (215 * 0.1 = 21.500000000000004) by
/// keeping 12 significant digits, far more than any field device measures.
pub(crate) fn tidy(x: f64) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    format!("{x:.11e}").parse().unwrap_or(x)
}

/// Decodes a point from the registers or bits of a read response (already sliced to the
/// point). `None` when the response is too short.
pub fn decode_point(point: &Point, words: &[u16], bits: &[bool]) -> Option<Value> {
    let raw = match point.data_type {
        DataType::Bool => Raw::Bool(*bits.first()?),
        data_type => decode_registers(data_type, point.order, words)?,
    };
    Some(scaled(raw, point))
}

/// Encodes a write value for `point`: the reverse of scale and offset, a range check for
/// the type, then the registers in the point's order.
pub fn encode(point: &Point, value: &Value) -> Result<Encoded, EncodeError> {
    let data_type = point.data_type;
    match data_type {
        DataType::Bool => return Ok(Encoded::Coil(as_bool(value)?)),
        DataType::Bit(bit) => {
            return Ok(Encoded::Bit {
                bit,
                value: as_bool(value)?,
            })
        }
        DataType::String { registers } => {
            let Value::Text(text) = value else {
                return Err(EncodeError(format!(
                    "expected text for a string point, got {value}"
                )));
            };
            if !text.is_ascii() {
                return Err(EncodeError("only ASCII text can be written".into()));
            }
            let capacity = usize::from(registers) * 2;
            if text.len() > capacity {
                return Err(EncodeError(format!(
                    "text of {} characters does not fit {registers} registers ({capacity} characters)",
                    text.len()
                )));
            }
            let mut bytes = text.as_bytes().to_vec();
            bytes.resize(capacity, 0);
            let order16 = if point.order.byte_swap() {
                Order::Badc
            } else {
                Order::Abcd
            };
            return Ok(Encoded::Registers(words_from_bytes(&bytes, order16)));
        }
        _ => {}
    }

    let number = match value {
        Value::Int(i) => Number::Int(*i),
        Value::Float(x) => Number::Float(*x),
        Value::Text(text) => match text.trim().parse::<i64>() {
            Ok(i) => Number::Int(i),
            Err(_) => match text.trim().parse::<f64>() {
                Ok(x) => Number::Float(x),
                Err(_) => return Err(EncodeError(format!("expected a number, got {text:?}"))),
            },
        },
        Value::Bool(_) => {
            return Err(EncodeError(format!(
                "expected a number for a {} point, got {value}",
                data_type.name()
            )))
        }
    };
    // The raw value the device should hold.
    let raw = match number {
        Number::Int(i) if point.is_unscaled() => Number::Int(i),
        Number::Int(i) => Number::Float((i as f64 - point.offset) / point.scale),
        Number::Float(x) if point.is_unscaled() => Number::Float(x),
        Number::Float(x) => Number::Float((x - point.offset) / point.scale),
    };
    if let Number::Float(x) = raw {
        if !x.is_finite() {
            return Err(EncodeError(format!("{value} is not a finite number")));
        }
    }
    let order16 = if point.order.byte_swap() {
        Order::Badc
    } else {
        Order::Abcd
    };
    let out_of_range = || {
        let range = match data_type {
            DataType::U16 => format!("0 to {}", u16::MAX),
            DataType::I16 => format!("{} to {}", i16::MIN, i16::MAX),
            DataType::U32 => format!("0 to {}", u32::MAX),
            DataType::I32 => format!("{} to {}", i32::MIN, i32::MAX),
            DataType::U64 => format!("0 to {}", u64::MAX),
            DataType::I64 => format!("{} to {}", i64::MIN, i64::MAX),
            DataType::F32 => format!("±{}", f32::MAX),
            _ => String::new(),
        };
        EncodeError(format!(
            "{value} is out of range for {} ({range})",
            data_type.name()
        ))
    };
    let words = match data_type {
        DataType::F32 => {
            let x = raw.as_f64();
            if x.abs() > f64::from(f32::MAX) {
                return Err(out_of_range());
            }
            words_from_bytes(&(x as f32).to_be_bytes(), point.order)
        }
        DataType::F64 => words_from_bytes(&raw.as_f64().to_be_bytes(), point.order),
        DataType::U16 => words_from_bytes(
            &u16::try_from(raw.integer().ok_or_else(out_of_range)?)
                .map_err(|_| out_of_range())?
                .to_be_bytes(),
            order16,
        ),
        DataType::I16 => words_from_bytes(
            &i16::try_from(raw.integer().ok_or_else(out_of_range)?)
                .map_err(|_| out_of_range())?
                .to_be_bytes(),
            order16,
        ),
        DataType::U32 => words_from_bytes(
            &u32::try_from(raw.integer().ok_or_else(out_of_range)?)
                .map_err(|_| out_of_range())?
                .to_be_bytes(),
            point.order,
        ),
        DataType::I32 => words_from_bytes(
            &i32::try_from(raw.integer().ok_or_else(out_of_range)?)
                .map_err(|_| out_of_range())?
                .to_be_bytes(),
            point.order,
        ),
        DataType::U64 => words_from_bytes(
            &u64::try_from(raw.integer().ok_or_else(out_of_range)?)
                .map_err(|_| out_of_range())?
                .to_be_bytes(),
            point.order,
        ),
        DataType::I64 => words_from_bytes(
            &i64::try_from(raw.integer().ok_or_else(out_of_range)?)
                .map_err(|_| out_of_range())?
                .to_be_bytes(),
            point.order,
        ),
        DataType::Bool | DataType::Bit(_) | DataType::String { .. } => return Err(out_of_range()),
    };
    Ok(Encoded::Registers(words))
}

#[derive(Debug, Clone, Copy)]
enum Number {
    Int(i64),
    Float(f64),
}

impl Number {
    fn as_f64(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Float(x) => x,
        }
    }

    /// The integer a register should hold: floats are rounded to the nearest integer
    /// (a scaled value rarely lands exactly), and must fit an i128.
    fn integer(self) -> Option<i128> {
        match self {
            Number::Int(i) => Some(i128::from(i)),
            Number::Float(x) => {
                let rounded = x.round();
                (rounded.abs() < 1.8e19).then_some(rounded as i128)
            }
        }
    }
}

fn as_bool(value: &Value) -> Result<bool, EncodeError> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::Int(0) => Ok(false),
        Value::Int(1) => Ok(true),
        Value::Text(text) => match text.trim().to_ascii_lowercase().as_str() {
            "true" | "on" | "1" => Ok(true),
            "false" | "off" | "0" => Ok(false),
            _ => Err(EncodeError(format!(
                "expected true/false, on/off or 1/0, got {text:?}"
            ))),
        },
        other => Err(EncodeError(format!(
            "expected true/false, on/off or 1/0, got {other}"
        ))),
    }
}

/// The function code a write uses, for logs and docs.
pub fn write_function(encoded: &Encoded, multiple: bool) -> &'static str {
    match (encoded, multiple) {
        (Encoded::Coil(_), false) => "FC05 write single coil",
        (Encoded::Coil(_), true) => "FC15 write multiple coils",
        (Encoded::Bit { .. }, false) => "FC03 + FC06 read-modify-write",
        (Encoded::Bit { .. }, true) => "FC03 + FC16 read-modify-write",
        (Encoded::Registers(words), false) if words.len() == 1 => "FC06 write single register",
        (Encoded::Registers(_), _) => "FC16 write multiple registers",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::drivers::modbus::config::{Report, Table};

    fn point(data_type: DataType, order: Order) -> Point {
        Point {
            name: "p".into(),
            table: Table::Holding,
            address: 0,
            data_type,
            order,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            poll: None,
            report: Report::Always,
            min_interval: Duration::ZERO,
            max_interval: None,
            writable: true,
        }
    }

    #[test]
    fn orders_move_bytes_and_words() {
        let words = [0x4142, 0x4344];
        assert_eq!(ordered_bytes(&words, Order::Abcd), b"ABCD");
        assert_eq!(ordered_bytes(&words, Order::Cdab), b"CDAB");
        assert_eq!(ordered_bytes(&words, Order::Badc), b"BADC");
        assert_eq!(ordered_bytes(&words, Order::Dcba), b"DCBA");
        for order in Order::ALL {
            assert_eq!(
                words_from_bytes(&ordered_bytes(&words, order), order),
                words
            );
        }
    }

    #[test]
    fn scale_and_offset_apply_and_reverse() {
        let mut p = point(DataType::I16, Order::Abcd);
        p.scale = 0.1;
        p.offset = -40.0;
        // 0x0267 = 615 -> 61.5 - 40 = 21.5
        assert_eq!(decode_point(&p, &[0x0267], &[]), Some(Value::Float(21.5)));
        assert_eq!(
            encode(&p, &Value::Float(21.5)),
            Ok(Encoded::Registers(vec![0x0267]))
        );
    }

    #[test]
    fn out_of_range_and_wrong_kind_writes_are_refused() {
        let p = point(DataType::U16, Order::Abcd);
        assert!(encode(&p, &Value::Int(70_000)).is_err());
        assert!(encode(&p, &Value::Int(-1)).is_err());
        assert!(encode(&p, &Value::Bool(true)).is_err());
        assert!(encode(&p, &Value::Text("abc".into())).is_err());
        assert_eq!(
            encode(&p, &Value::Text("65535".into())),
            Ok(Encoded::Registers(vec![0xFFFF]))
        );
        let f = point(DataType::F32, Order::Cdab);
        assert!(encode(&f, &Value::Float(1e39)).is_err());
        assert_eq!(
            encode(&f, &Value::Float(25.0)),
            Ok(Encoded::Registers(vec![0x0000, 0x41C8]))
        );
        let c = point(DataType::Bool, Order::Abcd);
        assert_eq!(
            encode(&c, &Value::Text("on".into())),
            Ok(Encoded::Coil(true))
        );
        assert!(encode(&c, &Value::Int(2)).is_err());
    }
}
