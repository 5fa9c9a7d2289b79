//! The register image: the registers and bits a Modbus server answers from, one slot per
//! map entry, filled from the values its entries' topics carry. Reads never wait on a
//! device: they copy what the image holds now.
//!
//! Invariants: an entry's slot holds exactly its width in registers (or one bit), or
//! nothing (bad quality, not yet known, or a value its type cannot hold); every address
//! of an entry maps back to it, and no address maps to two entries (config refuses
//! overlaps).

use std::collections::HashMap;

use tokio_modbus::ExceptionCode;

use super::config::{sentinel_value, BadQuality, MapEntry};
use crate::drivers::modbus::codec::{self, Encoded};
use crate::drivers::modbus::config::Table;
use crate::drivers::parse_write_value;
use crate::model::Value;

/// The most registers one read may ask for (the protocol's limit for FC03/FC04).
pub const MAX_READ_REGISTERS: u16 = 125;
/// The most bits one read may ask for (FC01/FC02).
pub const MAX_READ_BITS: u16 = 2000;

/// What one entry holds now.
#[derive(Debug, Clone, PartialEq)]
enum Slot {
    /// No good value: not received yet, quality bad, or not encodable in the entry's type.
    Bad,
    Words(Vec<u16>),
    Bit(bool),
}

/// The image of one server.
#[derive(Debug)]
pub struct Image {
    entries: Vec<MapEntry>,
    slots: Vec<Slot>,
    /// Per table and unit ([`ANY_UNIT`] for an entry of every unit), each covered address →
    /// (entry index, offset in the entry).
    addresses: HashMap<(u8, u16, u16), (usize, u16)>,
    /// The words a bad entry reads as, when the server answers bad values with a sentinel.
    sentinels: Vec<Option<Vec<u16>>>,
}

/// The unit key of an entry without `unit`: past every unit id.
const ANY_UNIT: u16 = 256;

fn unit_key(unit: Option<u8>) -> u16 {
    unit.map_or(ANY_UNIT, u16::from)
}

fn table_key(table: Table) -> u8 {
    match table {
        Table::Coil => 0,
        Table::Discrete => 1,
        Table::Holding => 2,
        Table::Input => 3,
    }
}

/// The entries a request touches, each with the part of it the request covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Covered {
    pub entry: usize,
    /// Whether the request covers the whole entry.
    pub whole: bool,
}

impl Image {
    pub fn new(entries: Vec<MapEntry>, bad_quality: BadQuality) -> Image {
        let mut addresses = HashMap::new();
        for (index, entry) in entries.iter().enumerate() {
            for offset in 0..entry.width() {
                let address = u32::from(entry.address) + u32::from(offset);
                if let Ok(address) = u16::try_from(address) {
                    addresses.insert(
                        (table_key(entry.table), unit_key(entry.unit), address),
                        (index, offset),
                    );
                }
            }
        }
        let sentinels = entries
            .iter()
            .map(|entry| match bad_quality {
                BadQuality::Exception => None,
                BadQuality::Sentinel(_) if entry.table.is_bits() => Some(vec![0]),
                BadQuality::Sentinel(sentinel) => {
                    match codec::encode(&entry.point(), &sentinel_value(sentinel, entry.data_type))
                    {
                        Ok(Encoded::Registers(words)) => Some(words),
                        // Checked when the configuration was loaded.
                        _ => Some(vec![0; usize::from(entry.width())]),
                    }
                }
            })
            .collect();
        Image {
            slots: vec![Slot::Bad; entries.len()],
            entries,
            addresses,
            sentinels,
        }
    }

    pub fn entries(&self) -> &[MapEntry] {
        &self.entries
    }

    /// Stores a message's payload as entry `index`'s value: a JSON reading
    /// (`{"value":..,"quality":..}`) or a bare value. A bad reading, an unreadable
    /// payload or a value the entry's type cannot hold leaves the entry bad; the error
    /// says why.
    pub fn update(&mut self, index: usize, payload: &[u8]) -> Result<(), String> {
        let Some(entry) = self.entries.get(index) else {
            return Ok(());
        };
        let slot = match reading_value(payload) {
            Ok(Some(value)) => match codec::encode(&entry.point(), &value) {
                Ok(Encoded::Registers(words)) => Ok(Slot::Words(words)),
                Ok(Encoded::Coil(bit) | Encoded::Bit { value: bit, .. }) => Ok(Slot::Bit(bit)),
                Err(error) => Err(error.0),
            },
            Ok(None) => Ok(Slot::Bad),
            Err(error) => Err(error),
        };
        let (slot, result) = match slot {
            Ok(slot) => (slot, Ok(())),
            Err(error) => (Slot::Bad, Err(error)),
        };
        if let Some(current) = self.slots.get_mut(index) {
            *current = slot;
        }
        result
    }

    /// The entry (and offset in it) at `address` of `table` for `unit`: the unit's own
    /// entry, else an entry of every unit.
    fn locate(&self, table: Table, unit: u8, address: u16) -> Result<(usize, u16), ExceptionCode> {
        let table = table_key(table);
        self.addresses
            .get(&(table, u16::from(unit), address))
            .or_else(|| self.addresses.get(&(table, ANY_UNIT, address)))
            .copied()
            .ok_or(ExceptionCode::IllegalDataAddress)
    }

    /// The entries that `start..start + count` of `table` on `unit` touches, in address
    /// order, or exception 2 when any address in it is unmapped or past 65535.
    pub fn covered(
        &self,
        table: Table,
        unit: u8,
        start: u16,
        count: u16,
    ) -> Result<Vec<Covered>, ExceptionCode> {
        let end = u32::from(start) + u32::from(count);
        if end > 0x1_0000 {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        let mut covered: Vec<Covered> = Vec::new();
        let mut address = u32::from(start);
        // Bounded: each round moves past at least one address.
        while address < end {
            let a = u16::try_from(address).map_err(|_| ExceptionCode::IllegalDataAddress)?;
            let (index, offset) = self.locate(table, unit, a)?;
            let entry = &self.entries[index];
            let entry_end = entry.end();
            covered.push(Covered {
                entry: index,
                whole: offset == 0 && entry_end <= end,
            });
            address = entry_end;
        }
        Ok(covered)
    }

    /// Registers `start..start + count` of a register table on `unit`: exception 2 when
    /// any address is unmapped, else exception 4 when any value in it is bad (without a
    /// sentinel). One lookup per entry covered, not per register.
    pub fn read_words(
        &self,
        table: Table,
        unit: u8,
        start: u16,
        count: u16,
    ) -> Result<Vec<u16>, ExceptionCode> {
        if count == 0 || count > MAX_READ_REGISTERS {
            return Err(ExceptionCode::IllegalDataValue);
        }
        let end = u32::from(start) + u32::from(count);
        if end > 0x1_0000 {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        let mut words = Vec::with_capacity(usize::from(count));
        let mut bad = false;
        let mut address = u32::from(start);
        // Bounded: each round moves past at least one address.
        while address < end {
            let a = u16::try_from(address).map_err(|_| ExceptionCode::IllegalDataAddress)?;
            let (index, offset) = self.locate(table, unit, a)?;
            let take = self.entries[index].end().min(end) - address;
            let from = usize::from(offset);
            let to = from + take as usize;
            let source = match &self.slots[index] {
                Slot::Words(held) => Some(held.as_slice()),
                Slot::Bit(_) => None,
                Slot::Bad => match &self.sentinels[index] {
                    Some(sentinel) => Some(sentinel.as_slice()),
                    None => {
                        bad = true;
                        None
                    }
                },
            };
            match source.and_then(|held| held.get(from..to)) {
                Some(part) => words.extend_from_slice(part),
                None => words.resize(words.len() + (to - from), 0),
            }
            address += take;
        }
        if bad {
            return Err(ExceptionCode::ServerDeviceFailure);
        }
        Ok(words)
    }

    /// Bits `start..start + count` of a bit table on `unit`.
    pub fn read_bits(
        &self,
        table: Table,
        unit: u8,
        start: u16,
        count: u16,
    ) -> Result<Vec<bool>, ExceptionCode> {
        if count == 0 || count > MAX_READ_BITS {
            return Err(ExceptionCode::IllegalDataValue);
        }
        self.covered(table, unit, start, count)?;
        let mut bits = Vec::with_capacity(usize::from(count));
        for address in start..=start.saturating_add(count - 1) {
            let (index, _) = self.locate(table, unit, address)?;
            bits.push(match &self.slots[index] {
                Slot::Bit(bit) => *bit,
                Slot::Words(_) => false,
                Slot::Bad => match &self.sentinels[index] {
                    Some(_) => false,
                    None => return Err(ExceptionCode::ServerDeviceFailure),
                },
            });
        }
        Ok(bits)
    }
}

/// The value of a reading's payload: `Ok(None)` for a bad reading (JSON `quality` bad, or a
/// `null` value).
pub fn reading_value(payload: &[u8]) -> Result<Option<Value>, String> {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(payload)
    {
        if map.get("quality").and_then(|q| q.as_str()) == Some("bad") {
            return Ok(None);
        }
        return match map.get("value") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(value) => parse_write_value(value.to_string().as_bytes()).map(Some),
        };
    }
    parse_write_value(payload).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::modbus::config::{DataType, Order};
    use crate::modbus_server::config::Source;

    fn entry(table: Table, address: u16, data_type: DataType) -> MapEntry {
        MapEntry {
            unit: None,
            table,
            address,
            data_type,
            order: Order::Cdab,
            scale: 1.0,
            offset: 0.0,
            source: Source::Topic("t".into()),
            writable: true,
        }
    }

    #[test]
    fn a_float_is_served_in_its_order_and_a_bad_reading_answers_exception_4() {
        let mut image = Image::new(
            vec![entry(Table::Holding, 10, DataType::F32)],
            BadQuality::Exception,
        );
        assert_eq!(
            image.read_words(Table::Holding, 1, 10, 2),
            Err(ExceptionCode::ServerDeviceFailure)
        );
        image
            .update(0, br#"{"value":230.5,"ts":"x","quality":"good"}"#)
            .unwrap();
        // 230.5 = 0x43668000, CDAB: low word first.
        assert_eq!(
            image.read_words(Table::Holding, 1, 10, 2),
            Ok(vec![0x8000, 0x4366])
        );
        assert_eq!(image.read_words(Table::Holding, 1, 11, 1), Ok(vec![0x4366]));
        image
            .update(0, br#"{"value":null,"ts":"x","quality":"bad","error":"e"}"#)
            .unwrap();
        assert_eq!(
            image.read_words(Table::Holding, 1, 10, 2),
            Err(ExceptionCode::ServerDeviceFailure)
        );
    }

    #[test]
    fn unmapped_addresses_overflow_and_long_reads_are_refused() {
        let image = Image::new(
            vec![entry(Table::Holding, 65534, DataType::F32)],
            BadQuality::Sentinel(-1.0),
        );
        assert_eq!(
            image.read_words(Table::Holding, 1, 65533, 2),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            image.read_words(Table::Holding, 1, 65535, 2),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            image.read_words(Table::Holding, 1, 0, 126),
            Err(ExceptionCode::IllegalDataValue)
        );
        // The sentinel -1.0 as f32 CDAB.
        assert_eq!(
            image.read_words(Table::Holding, 1, 65534, 2),
            Ok(vec![0x0000, 0xBF80])
        );
    }

    #[test]
    fn a_unit_reads_its_own_entries_and_those_of_every_unit() {
        let mut meter1 = entry(Table::Holding, 0, DataType::U16);
        meter1.unit = Some(1);
        let mut meter2 = entry(Table::Holding, 0, DataType::U16);
        meter2.unit = Some(2);
        let shared = entry(Table::Holding, 1, DataType::U16);
        let mut image = Image::new(vec![meter1, meter2, shared], BadQuality::Exception);
        image.update(0, b"11").unwrap();
        image.update(1, b"22").unwrap();
        image.update(2, b"33").unwrap();
        assert_eq!(image.read_words(Table::Holding, 1, 0, 2), Ok(vec![11, 33]));
        assert_eq!(image.read_words(Table::Holding, 2, 0, 2), Ok(vec![22, 33]));
        assert_eq!(
            image.read_words(Table::Holding, 3, 0, 2),
            Err(ExceptionCode::IllegalDataAddress),
            "unit 3 has no address 0"
        );
        assert_eq!(image.read_words(Table::Holding, 3, 1, 1), Ok(vec![33]));
        assert_eq!(
            image.covered(Table::Holding, 2, 0, 1),
            Ok(vec![Covered {
                entry: 1,
                whole: true
            }])
        );
    }

    #[test]
    fn an_unmapped_address_outranks_a_bad_value_and_parts_of_entries_read_their_words() {
        let mut image = Image::new(
            vec![
                entry(Table::Holding, 0, DataType::U16),
                entry(Table::Holding, 1, DataType::U32),
            ],
            BadQuality::Exception,
        );
        // Entry 0 is bad (never received); address 3 is unmapped.
        assert_eq!(
            image.read_words(Table::Holding, 1, 0, 4),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            image.read_words(Table::Holding, 1, 0, 3),
            Err(ExceptionCode::ServerDeviceFailure)
        );
        image.update(0, b"5").unwrap();
        image.update(1, b"65539").unwrap();
        // 65539 = 0x0001_0003, CDAB: low word first.
        assert_eq!(
            image.read_words(Table::Holding, 1, 0, 3),
            Ok(vec![5, 0x0003, 0x0001])
        );
        assert_eq!(image.read_words(Table::Holding, 1, 2, 1), Ok(vec![0x0001]));
    }

    #[test]
    fn plain_payloads_and_bits() {
        let mut image = Image::new(
            vec![entry(Table::Coil, 3, DataType::Bool)],
            BadQuality::Exception,
        );
        image.update(0, b"on").unwrap();
        assert_eq!(image.read_bits(Table::Coil, 1, 3, 1), Ok(vec![true]));
        assert!(image.update(0, b"maybe").is_err());
        assert_eq!(
            image.read_bits(Table::Coil, 1, 3, 1),
            Err(ExceptionCode::ServerDeviceFailure)
        );
    }
}
