//! SunSpec: finding a device's information models and turning their registers into
//! points, for `profile = "sunspec"` and `fieldmq probe --sunspec`.
//!
//! A SunSpec device holds the marker `SunS` (0x5375 0x6E53) in holding registers at one
//! of the base addresses 0, 40000 or 50000, followed by a chain of models: each starts with
//! its id and its length (registers after those two), and the chain ends with id 0xFFFF.
//! [`Walk`] follows the chain one header at a time and refuses, with a [`ChainError`], a
//! chain that runs past register 65535, holds more than [`MAX_MODELS`] models, or never
//! ends: whatever the device answers, discovery ends.
//!
//! The models fieldmq knows ([`known_models`]) become points named `<prefix>_<SunSpec point>`
//! (`inverter_W`, `meter_TotWhImp`, `common_SN`); a second model with the same prefix gets
//! `<prefix>2_...`. A model's repeating group ([`Repeat`]: 160's MPPT modules, 711's
//! controls, 714's DC ports) is mapped as many times as the model's length holds whole
//! repeats (at most [`MAX_REPEATS`]), as `<prefix>_<n>_<point>` (`mppt_1_DCV`); a partial
//! last repeat is not read. Each model is read as one block (a block longer than one request, as
//! model 701's, in consecutive requests cut between points, see [`chunks`]), so a value
//! and its scale factor come from the same poll; [`decode`] applies the scale factor (value × 10^sf) and reports
//! the SunSpec "not implemented" values (0x8000, 0xFFFF, ...) as an error, which the
//! driver publishes as bad quality.

mod models;

use std::time::Duration;

use super::bus::{exception_name, Failure};
use super::config::{DataType, Order, Point, Report, Table, MAX_REGISTERS_PER_REQUEST};
use crate::model::Value;

/// Where the `SunS` marker may be, in the order they are tried.
pub const BASES: [u16; 3] = [40000, 0, 50000];
/// `SunS` in two registers.
pub const MARKER: [u16; 2] = [0x5375, 0x6E53];
/// The model id that ends the chain.
pub const END: u16 = 0xFFFF;
/// More models than any device holds: a longer chain is taken for garbage.
pub const MAX_MODELS: usize = 256;
/// At most this many repeats of a model's repeating group are mapped (MPPT modules, DC
/// ports); a model whose length says more gets this many, and a warning.
pub const MAX_REPEATS: u16 = 64;

/// The type of a SunSpec point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    U16,
    I16,
    U32,
    I32,
    U64,
    /// Accumulators: 0 means "not implemented".
    Acc32,
    Acc64,
    Enum16,
    Bits16,
    Bits32,
    F32,
    /// A scale factor (i16 power of ten); not published itself.
    Sf,
    /// ASCII text of this many registers.
    Str(u16),
}

impl Kind {
    /// Registers the point occupies.
    pub fn width(self) -> u16 {
        match self {
            Kind::U16 | Kind::I16 | Kind::Enum16 | Kind::Bits16 | Kind::Sf => 1,
            Kind::U32 | Kind::I32 | Kind::Acc32 | Kind::Bits32 | Kind::F32 => 2,
            Kind::U64 | Kind::Acc64 => 4,
            Kind::Str(registers) => registers,
        }
    }

    /// The SunSpec type name: `uint16`, `acc32`, `sunssf`, `string(16)`.
    pub fn name(self) -> String {
        match self {
            Kind::U16 => "uint16".into(),
            Kind::I16 => "int16".into(),
            Kind::U32 => "uint32".into(),
            Kind::I32 => "int32".into(),
            Kind::U64 => "uint64".into(),
            Kind::Acc32 => "acc32".into(),
            Kind::Acc64 => "acc64".into(),
            Kind::Enum16 => "enum16".into(),
            Kind::Bits16 => "bitfield16".into(),
            Kind::Bits32 => "bitfield32".into(),
            Kind::F32 => "float32".into(),
            Kind::Sf => "sunssf".into(),
            Kind::Str(registers) => format!("string({registers})"),
        }
    }

    fn data_type(self) -> DataType {
        match self {
            Kind::U16 | Kind::Enum16 | Kind::Bits16 => DataType::U16,
            Kind::I16 | Kind::Sf => DataType::I16,
            Kind::U32 | Kind::Acc32 | Kind::Bits32 => DataType::U32,
            Kind::I32 => DataType::I32,
            Kind::U64 | Kind::Acc64 => DataType::U64,
            Kind::F32 => DataType::F32,
            Kind::Str(registers) => DataType::String { registers },
        }
    }
}

/// One point of a model's fixed block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointDef {
    /// Registers after the model's ID and L.
    pub offset: u16,
    /// The SunSpec point id (`W`, `PhVphA`, `TotWhImp`).
    pub name: &'static str,
    pub kind: Kind,
    /// SunSpec units (`W`, `Pct`, `C`); empty when none.
    pub unit: &'static str,
    /// The scale-factor point of the same model; empty when none.
    pub sf: &'static str,
    /// The model defines it read-write (a setting or a control): the driver writes it
    /// when the configuration makes it `writable`.
    pub read_write: bool,
}

/// A SunSpec information model, as far as fieldmq maps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Model {
    pub id: u16,
    /// What it is, for `probe` and logs.
    pub name: &'static str,
    /// The first part of its points' names.
    pub prefix: &'static str,
    /// Registers of its fixed block (after ID and L).
    pub fixed: u16,
    pub points: &'static [PointDef],
    /// The group repeated after the fixed block, when fieldmq maps it.
    pub repeat: Option<Repeat>,
}

/// A model's repeating group (model 160's MPPT modules): as many repeats follow the fixed
/// block as the model's length holds, `(L - fixed) / length`. Its points are named
/// `<prefix>_<n>_<point>` (`mppt_1_DCA`), n from 1; their offsets count from the start of
/// the repeat and their scale factors are points of the fixed block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repeat {
    /// Registers of one repeat.
    pub length: u16,
    pub points: &'static [PointDef],
}

/// The model with this id, when fieldmq maps it.
pub fn model(id: u16) -> Option<&'static Model> {
    models::MODELS.iter().find(|m| m.id == id)
}

/// Every model fieldmq maps.
pub fn known_models() -> &'static [Model] {
    models::MODELS
}

/// Whether `name` is a point name that discovery can give a SunSpec device: the
/// `<prefix>_<point>` of a mapped model's point (`inverter_W`), of its n-th model of that
/// prefix (`meter2_W`), or of the n-th repeat of its repeating group (`mppt_1_DCV`,
/// `mppt2_3_DCA`). Scale factors are not points.
pub fn is_point_name(name: &str) -> bool {
    known_models().iter().any(|model| {
        let Some(rest) = name.strip_prefix(model.prefix) else {
            return false;
        };
        // `<prefix><nth>_`: the second and later models of a prefix.
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let (nth, rest) = rest.split_at(digits);
        if !nth.is_empty() && !is_count_from(nth, 2) {
            return false;
        }
        let Some(rest) = rest.strip_prefix('_') else {
            return false;
        };
        let named = |points: &[PointDef], point: &str| {
            points.iter().any(|p| p.kind != Kind::Sf && p.name == point)
        };
        if named(model.points, rest) {
            return true;
        }
        // `<n>_<point>` of a repeat, n from 1.
        let (Some(repeat), Some((n, point))) = (model.repeat, rest.split_once('_')) else {
            return false;
        };
        is_count_from(n, 1) && named(repeat.points, point)
    })
}

/// Whether `digits` is a number of at least `first`, written without leading zeros (as
/// point names count models and repeats).
fn is_count_from(digits: &str, first: u16) -> bool {
    !digits.starts_with('0')
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.parse::<u16>().is_ok_and(|n| n >= first)
}

/// A name for each point a SunSpec device can have, its first model's and first repeat's
/// (`inverter_W`, `mppt_1_DCV`), for the suggestions of a configuration error.
pub fn point_names() -> Vec<String> {
    let mut names = Vec::new();
    for model in known_models() {
        for def in model.points.iter().filter(|p| p.kind != Kind::Sf) {
            names.push(format!("{}_{}", model.prefix, def.name));
        }
        for def in model.repeat.iter().flat_map(|r| r.points) {
            names.push(format!("{}_1_{}", model.prefix, def.name));
        }
    }
    names
}

/// The mapped models and their points, as `fieldmq profiles show sunspec` prints them.
pub fn render_models() -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "sunspec: SunSpec devices; the points come from the models the device holds\n\
         points are named <prefix>_<point>, registers count from the model's first register after ID and L\n\
         read-write points are written when the device's points make them writable\n",
    );
    for model in known_models() {
        let _ = writeln!(
            out,
            "model {} {} (prefix {}, {} registers):",
            model.id, model.name, model.prefix, model.fixed
        );
        let repeated = model.repeat.iter().flat_map(|r| {
            r.points
                .iter()
                .map(move |def| (format!("{}_<n>_{}", model.prefix, def.name), def))
        });
        let points = model
            .points
            .iter()
            .filter(|p| p.kind != Kind::Sf)
            .map(|def| (format!("{}_{}", model.prefix, def.name), def))
            .chain(repeated);
        for (name, def) in points {
            let unit = unit(def.unit)
                .map(|u| format!(" [{u}]"))
                .unwrap_or_default();
            let sf = if def.sf.is_empty() {
                String::new()
            } else {
                format!(" × 10^{}", def.sf)
            };
            let access = if def.read_write { "  read-write" } else { "" };
            let _ = writeln!(
                out,
                "  {name:<28} {:>3}  {}{sf}{unit}{access}",
                def.offset,
                def.kind.name()
            );
        }
        if let Some(repeat) = model.repeat {
            let _ = writeln!(
                out,
                "  <n> = 1, 2, ...: one per {} registers after the fixed block (offsets within each)",
                repeat.length
            );
        }
    }
    out
}

/// A model found on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub id: u16,
    /// Address of its ID register.
    pub address: u16,
    /// Registers after ID and L, as the device says.
    pub length: u16,
}

impl Found {
    /// The first register after ID and L.
    pub fn data_start(&self) -> u16 {
        self.address.saturating_add(2)
    }

    /// The mapped part of the model: its fixed block (or less, when the device's model is
    /// shorter) and the whole repeats of its repeating group that its length holds.
    /// `None` for a model fieldmq does not map.
    pub fn layout(&self) -> Option<Layout> {
        let model = model(self.id)?;
        let fixed = model.fixed.min(self.length);
        let rest = self.length - fixed;
        let (repeats, leftover) = match model.repeat {
            Some(repeat) if repeat.length > 0 => {
                let whole = rest / repeat.length;
                let repeats = whole.min(MAX_REPEATS);
                (repeats, rest - repeats * repeat.length)
            }
            _ => (0, 0),
        };
        let count = fixed + model.repeat.map_or(0, |r| repeats * r.length);
        (count > 0).then_some(Layout {
            model,
            count,
            repeats,
            leftover,
        })
    }
}

/// What of a found model fieldmq reads, see [`Found::layout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub model: &'static Model,
    /// Registers read from the model's first register after ID and L.
    pub count: u16,
    /// Whole repeats of the repeating group mapped.
    pub repeats: u16,
    /// Registers of the repeating part not mapped: a partial last repeat, or the repeats
    /// past [`MAX_REPEATS`]. 0 for a model without a mapped repeating group.
    pub leftover: u16,
}

/// Why a model chain cannot be followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("no SunSpec marker \"SunS\" in holding registers 40000, 0 or 50000")]
    NoMarker,
    #[error("model {id} at register {address} with length {length} runs past register 65535")]
    PastEnd { id: u16, address: u16, length: u16 },
    #[error("the model chain reaches register 65535 without its end marker (0xFFFF)")]
    NoEnd,
    #[error("more than {MAX_MODELS} models without the end marker (0xFFFF): not a model chain")]
    TooMany,
}

/// Follows a model chain one header at a time. Addresses only grow, so a chain cannot loop:
/// it ends at the end marker, at register 65535 or after [`MAX_MODELS`] models.
#[derive(Debug, Clone)]
pub struct Walk {
    pub base: u16,
    next: u32,
    models: Vec<Found>,
    done: bool,
}

impl Walk {
    /// A walk of the chain after the marker at `base`.
    pub fn new(base: u16) -> Walk {
        Walk {
            base,
            next: u32::from(base) + 2,
            models: Vec::new(),
            done: false,
        }
    }

    /// The address of the next model header (two registers: id, length); `Ok(None)` once
    /// the end marker was read.
    pub fn next_header(&self) -> Result<Option<u16>, ChainError> {
        if self.done {
            return Ok(None);
        }
        if self.models.len() >= MAX_MODELS {
            return Err(ChainError::TooMany);
        }
        // The header's two registers must fit.
        match u16::try_from(self.next) {
            Ok(address) if address < u16::MAX => Ok(Some(address)),
            _ => Err(ChainError::NoEnd),
        }
    }

    /// Takes the header read at [`Walk::next_header`].
    pub fn feed(&mut self, id: u16, length: u16) -> Result<(), ChainError> {
        let Some(address) = self.next_header()? else {
            return Ok(());
        };
        if id == END {
            self.done = true;
            return Ok(());
        }
        let next = u32::from(address) + 2 + u32::from(length);
        if next > 65_536 {
            return Err(ChainError::PastEnd {
                id,
                address,
                length,
            });
        }
        self.models.push(Found {
            id,
            address,
            length,
        });
        self.next = next;
        Ok(())
    }

    /// Whether the end marker was read.
    pub fn is_done(&self) -> bool {
        self.done
    }

    pub fn models(&self) -> &[Found] {
        &self.models
    }

    /// Where the end marker is (or the next header would be).
    pub fn end_address(&self) -> u32 {
        self.next
    }
}

/// The chain in a register image: `registers[i]` is holding register `start + i`. For
/// tests and fuzzing; the driver reads header by header. A header outside the image is
/// [`ChainError::NoEnd`].
pub fn walk_image(registers: &[u16], start: u16) -> Result<(u16, Vec<Found>), ChainError> {
    let at = |address: u32| {
        address
            .checked_sub(u32::from(start))
            .and_then(|i| registers.get(usize::try_from(i).ok()?))
            .copied()
    };
    let base = BASES
        .into_iter()
        .find(|&b| at(u32::from(b)) == Some(MARKER[0]) && at(u32::from(b) + 1) == Some(MARKER[1]))
        .ok_or(ChainError::NoMarker)?;
    let mut walk = Walk::new(base);
    while let Some(address) = walk.next_header()? {
        let (Some(id), Some(length)) = (at(u32::from(address)), at(u32::from(address) + 1)) else {
            return Err(ChainError::NoEnd);
        };
        walk.feed(id, length)?;
    }
    Ok((base, walk.models))
}

/// Holding registers of one device, as discovery reads them (the bus task, or `probe`).
pub(super) trait Registers {
    async fn read(&mut self, start: u16, count: u16) -> Result<Vec<u16>, Failure>;
}

/// Why discovery found no model chain.
#[derive(Debug)]
pub(super) enum DiscoveryError {
    /// The device answered, but with no usable chain (no marker, a broken chain, an
    /// exception while walking it).
    Refused(String),
    /// No answer: a timeout or a broken link.
    Link(Failure),
}

/// Finds the `SunS` marker (trying [`BASES`] in turn; a base the device refuses is
/// skipped) and walks the model chain: the base and the models found.
pub(super) async fn discover<R: Registers>(
    registers: &mut R,
) -> Result<(u16, Vec<Found>), DiscoveryError> {
    let mut base = None;
    for candidate in BASES {
        match registers.read(candidate, 2).await {
            Ok(words) if words == MARKER => {
                base = Some(candidate);
                break;
            }
            Ok(_) | Err(Failure::Exception(_)) => continue,
            Err(failure) => return Err(DiscoveryError::Link(failure)),
        }
    }
    let refused = |error: ChainError| DiscoveryError::Refused(error.to_string());
    let base = base.ok_or_else(|| refused(ChainError::NoMarker))?;
    let mut walk = Walk::new(base);
    while let Some(address) = walk.next_header().map_err(refused)? {
        let words = registers
            .read(address, 2)
            .await
            .map_err(|failure| match failure {
                Failure::Exception(code) => DiscoveryError::Refused(format!(
                    "{} reading the model header at register {address}",
                    exception_name(code)
                )),
                other => DiscoveryError::Link(other),
            })?;
        let [id, length] = words[..] else {
            return Err(DiscoveryError::Refused(format!(
                "short response reading the model header at register {address}"
            )));
        };
        walk.feed(id, length).map_err(refused)?;
    }
    Ok((base, walk.models))
}

/// The requests that read `count` registers from `start` when that is more than one
/// request holds: consecutive `(start, count)` ranges of at most 125 registers, cut before
/// a point (`(address, width)`) that would not fit, so no value is torn across two.
pub fn chunks(
    start: u16,
    count: u16,
    points: impl IntoIterator<Item = (u16, u16)>,
) -> Vec<(u16, u16)> {
    let max = u32::from(MAX_REGISTERS_PER_REQUEST);
    let end = u32::from(start) + u32::from(count);
    let mut cuts = Vec::new();
    let mut begin = u32::from(start);
    let mut points: Vec<(u32, u32)> = points
        .into_iter()
        .map(|(address, width)| (u32::from(address), u32::from(address) + u32::from(width)))
        .filter(|&(address, point_end)| address >= begin && point_end <= end)
        .collect();
    points.sort_unstable();
    for (address, point_end) in points {
        if point_end - begin > max && address > begin {
            cuts.push((begin, address - begin));
            begin = address;
        }
    }
    while end - begin > max {
        cuts.push((begin, max));
        begin += max;
    }
    if end > begin {
        cuts.push((begin, end - begin));
    }
    cuts.into_iter()
        .filter_map(|(a, n)| Some((u16::try_from(a).ok()?, u16::try_from(n).ok()?)))
        .collect()
}

/// Reads the ranges of [`chunks`] one after the other; the registers of all of them. A
/// short answer ends the read there: the points after it are short.
pub(super) async fn read_chunks<R: Registers>(
    registers: &mut R,
    ranges: &[(u16, u16)],
) -> Result<Vec<u16>, Failure> {
    let mut words = Vec::new();
    for &(start, count) in ranges {
        let mut part = registers.read(start, count).await?;
        let short = part.len() < usize::from(count);
        part.truncate(usize::from(count));
        words.extend(part);
        if short {
            break;
        }
    }
    Ok(words)
}

/// How the driver decodes one SunSpec point: where it and its scale factor are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub kind: Kind,
    pub address: u16,
    /// The scale factor's register.
    pub sf_address: Option<u16>,
    /// The model defines the point read-write.
    pub read_write: bool,
}

/// The points of one model found on a device, read together as one block.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub found: Found,
    pub model: &'static Model,
    /// Registers read: `found.data_start()` onwards.
    pub count: u16,
    /// Repeats of the model's repeating group mapped, and the registers after them that
    /// are not (see [`Layout`]).
    pub repeats: u16,
    pub leftover: u16,
    pub points: Vec<(Point, Source)>,
}

/// The blocks of the mapped models in `found`, with their points: `<prefix>_<point>` for
/// the fixed block, `<prefix>_<n>_<point>` for the n-th repeat of its repeating group; the
/// n-th model of a prefix gets `<prefix><n>` (`meter2_W`, `mppt2_1_DCA`). Scale factors are
/// not points of their own; nor are points past the model's length on this device.
pub fn blocks(found: &[Found]) -> Vec<Block> {
    let mut seen: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    for f in found {
        let Some(layout) = f.layout() else {
            continue;
        };
        let model = layout.model;
        let nth = seen.iter().filter(|p| **p == model.prefix).count() + 1;
        seen.push(model.prefix);
        let prefix = if nth == 1 {
            model.prefix.to_owned()
        } else {
            format!("{}{nth}", model.prefix)
        };
        let fixed = model.points.iter().map(|def| (0, 0, def));
        let repeated = model.repeat.iter().flat_map(|repeat| {
            (1..=layout.repeats).flat_map(move |n| {
                let at = model.fixed + (n - 1) * repeat.length;
                repeat.points.iter().map(move |def| (n, at, def))
            })
        });
        let mut points = Vec::new();
        for (n, at, def) in fixed.chain(repeated) {
            let offset = at + def.offset;
            if def.kind == Kind::Sf || offset + def.kind.width() > layout.count {
                continue;
            }
            let Some(address) = f.data_start().checked_add(offset) else {
                continue;
            };
            // Scale factors are in the fixed block, for the repeats too.
            let sf_address = match model
                .points
                .iter()
                .find(|p| !def.sf.is_empty() && p.name == def.sf)
            {
                Some(sf) if sf.offset < layout.count => f.data_start().checked_add(sf.offset),
                // A scale factor outside the device's block: the value cannot be scaled.
                Some(_) => continue,
                None => None,
            };
            let name = match n {
                0 => format!("{prefix}_{}", def.name),
                n => format!("{prefix}_{n}_{}", def.name),
            };
            let point = Point {
                name,
                table: Table::Holding,
                address,
                data_type: def.kind.data_type(),
                order: Order::Abcd,
                scale: 1.0,
                offset: 0.0,
                unit: unit(def.unit),
                poll: None,
                report: Report::Always,
                min_interval: Duration::ZERO,
                max_interval: None,
                writable: false,
            };
            let source = Source {
                kind: def.kind,
                address,
                sf_address,
                read_write: def.read_write,
            };
            points.push((point, source));
        }
        out.push(Block {
            found: *f,
            model,
            count: layout.count,
            repeats: layout.repeats,
            leftover: layout.leftover,
            points,
        });
    }
    out
}

/// SunSpec units as published: `Pct` is `%`, `C` is `°C`; the rest as SunSpec writes them.
fn unit(sunspec: &str) -> Option<String> {
    match sunspec {
        "" => None,
        "Pct" => Some("%".into()),
        "C" => Some("°C".into()),
        other => Some(other.to_owned()),
    }
}

/// Why a point has no value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PointError {
    #[error("not implemented by the device")]
    NotImplemented,
    #[error("scale factor not implemented by the device")]
    ScaleNotImplemented,
    #[error("scale factor {0} out of range (-10 to 10)")]
    ScaleOutOfRange(i16),
    #[error("short response")]
    Short,
}

/// Decodes a point from the registers of its block read (`words[i]` is register
/// `start + i`): the raw value, "not implemented" markers, then the scale factor.
pub fn decode(source: &Source, words: &[u16], start: u16) -> Result<Value, PointError> {
    let raw = match decode_raw(source, words, start)? {
        Raw::Value(value) => return Ok(value),
        Raw::Integer(raw) => raw,
    };
    let Some(sf_address) = source.sf_address else {
        return Ok(integer(raw));
    };
    let sf_word = register(words, start, sf_address, 1)
        .and_then(|w| w.first().copied())
        .ok_or(PointError::Short)?;
    Ok(scaled(raw, scale_factor(sf_word)?))
}

/// Decodes a point whose scale factor is known already (`sf`: the one last read, for the
/// read-back of a write that read only the point's own registers).
pub fn decode_with_scale(
    source: &Source,
    words: &[u16],
    start: u16,
    sf: Option<i16>,
) -> Result<Value, PointError> {
    match (decode_raw(source, words, start)?, sf) {
        (Raw::Value(value), _) => Ok(value),
        (Raw::Integer(raw), Some(sf)) => Ok(scaled(raw, sf)),
        (Raw::Integer(raw), None) => Ok(integer(raw)),
    }
}

/// A scale-factor register's value, when it can scale: 0x8000 is "not implemented", and
/// one outside -10..=10 is taken for garbage.
pub fn scale_factor(word: u16) -> Result<i16, PointError> {
    if word == 0x8000 {
        return Err(PointError::ScaleNotImplemented);
    }
    let sf = word as i16;
    if !(-10..=10).contains(&sf) {
        return Err(PointError::ScaleOutOfRange(sf));
    }
    Ok(sf)
}

/// The registers SunSpec reserves for "not implemented" in a point of `kind`: decoding
/// reports them as such, and a write never sets them. `None` for the kinds that mark it
/// otherwise (float NaN, accumulator 0) or not at all (text).
pub fn reserved(kind: Kind) -> Option<&'static [u16]> {
    match kind {
        Kind::U16 | Kind::Enum16 | Kind::Bits16 => Some(&[0xFFFF]),
        Kind::I16 | Kind::Sf => Some(&[0x8000]),
        Kind::U32 | Kind::Bits32 => Some(&[0xFFFF, 0xFFFF]),
        Kind::I32 => Some(&[0x8000, 0x0000]),
        Kind::U64 => Some(&[0xFFFF; 4]),
        Kind::Acc32 | Kind::Acc64 | Kind::F32 | Kind::Str(_) => None,
    }
}

/// A point's registers as read, before its scale factor.
enum Raw {
    /// Text and floats: no scale factor applies.
    Value(Value),
    Integer(i128),
}

fn register(words: &[u16], start: u16, address: u16, width: u16) -> Option<&[u16]> {
    let from = usize::from(address.checked_sub(start)?);
    words.get(from..from + usize::from(width))
}

fn decode_raw(source: &Source, words: &[u16], start: u16) -> Result<Raw, PointError> {
    let registers =
        register(words, start, source.address, source.kind.width()).ok_or(PointError::Short)?;
    let mut wide: u64 = 0;
    for word in registers.iter().take(4) {
        wide = wide << 16 | u64::from(*word);
    }
    let raw: i128 = match source.kind {
        Kind::Str(_) => {
            let text: String = registers
                .iter()
                .flat_map(|w| w.to_be_bytes())
                .take_while(|b| *b != 0)
                .map(|b| {
                    if b.is_ascii() {
                        char::from(b)
                    } else {
                        char::REPLACEMENT_CHARACTER
                    }
                })
                .collect();
            return Ok(Raw::Value(Value::Text(text.trim_end().to_owned())));
        }
        Kind::F32 => {
            let x = f32::from_bits(wide as u32);
            if x.is_nan() {
                return Err(PointError::NotImplemented);
            }
            return Ok(Raw::Value(Value::Float(super::codec::f32_to_f64(x))));
        }
        kind if reserved(kind).is_some_and(|r| registers == r) => {
            return Err(PointError::NotImplemented)
        }
        Kind::Acc32 | Kind::Acc64 if wide == 0 => return Err(PointError::NotImplemented),
        Kind::I16 | Kind::Sf => i128::from(wide as u16 as i16),
        Kind::I32 => i128::from(wide as u32 as i32),
        _ => i128::from(wide),
    };
    Ok(Raw::Integer(raw))
}

/// raw × 10^sf: an integer for 0, a float otherwise.
fn scaled(raw: i128, sf: i16) -> Value {
    if sf == 0 {
        return integer(raw);
    }
    Value::Float(super::codec::tidy(raw as f64 * 10f64.powi(i32::from(sf))))
}

fn integer(raw: i128) -> Value {
    match i64::try_from(raw) {
        Ok(i) => Value::Int(i),
        Err(_) => Value::Float(raw as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_is_laid_out_without_overlaps_and_its_scale_factors_exist() {
        for model in known_models() {
            let mut end = 0;
            for def in model.points {
                assert!(
                    def.offset >= end,
                    "model {} point {} overlaps",
                    model.id,
                    def.name
                );
                end = def.offset + def.kind.width();
                if !def.sf.is_empty() {
                    let sf = model.points.iter().find(|p| p.name == def.sf);
                    assert_eq!(
                        sf.map(|p| p.kind),
                        Some(Kind::Sf),
                        "model {} {}",
                        model.id,
                        def.name
                    );
                }
            }
            assert!(
                end <= model.fixed,
                "model {} runs past its fixed block",
                model.id
            );
            let Some(repeat) = model.repeat else {
                continue;
            };
            let mut end = 0;
            for def in repeat.points {
                assert!(
                    def.offset >= end,
                    "model {} {} overlaps",
                    model.id,
                    def.name
                );
                assert_ne!(def.kind, Kind::Sf, "model {} {}", model.id, def.name);
                end = def.offset + def.kind.width();
                if !def.sf.is_empty() {
                    let sf = model.points.iter().find(|p| p.name == def.sf);
                    assert_eq!(sf.map(|p| p.kind), Some(Kind::Sf), "{}", def.name);
                }
            }
            assert_eq!(end, repeat.length, "model {} repeat length", model.id);
        }
        assert_eq!(
            model(160).and_then(|m| m.repeat).map(|r| r.length),
            Some(20)
        );
        assert_eq!(
            model(711).and_then(|m| m.repeat).map(|r| r.length),
            Some(10)
        );
        assert_eq!(
            model(714).and_then(|m| m.repeat).map(|r| r.length),
            Some(25)
        );
        for id in [
            1, 101, 102, 103, 111, 112, 113, 120, 121, 122, 123, 124, 160, 201, 202, 203, 204,
        ] {
            assert!(model(id).is_some(), "model {id} is mapped");
        }
        assert_eq!(model(103).map(|m| m.fixed), Some(50));
        assert_eq!(model(203).map(|m| m.fixed), Some(105));
    }

    fn image(base: u16, chain: &[(u16, u16)]) -> Vec<u16> {
        let mut words = vec![0u16; usize::from(base)];
        words.extend(MARKER);
        for &(id, length) in chain {
            words.extend([id, length]);
            words.extend(std::iter::repeat_n(0, usize::from(length)));
        }
        words.extend([END, 0]);
        words
    }

    #[test]
    fn a_chain_is_found_at_each_base_and_walked_to_its_end() {
        for base in [0u16, 40000, 50000] {
            let words = image(base, &[(1, 66), (103, 50), (64000, 10)]);
            let (found_base, models) = walk_image(&words, 0).expect("chain");
            assert_eq!(found_base, base);
            let ids: Vec<u16> = models.iter().map(|m| m.id).collect();
            assert_eq!(ids, [1, 103, 64000]);
            assert_eq!(models[1].address, base + 2 + 68);
            assert_eq!(models[1].data_start(), base + 72);
        }
    }

    #[test]
    fn a_broken_chain_ends_discovery_with_an_error() {
        assert_eq!(walk_image(&[0; 10], 0), Err(ChainError::NoMarker));
        // A length past the last register.
        let mut words = vec![0u16; 50000];
        words.extend(MARKER);
        words.extend([1, 65000]);
        assert!(matches!(
            walk_image(&words, 0),
            Err(ChainError::PastEnd { id: 1, .. })
        ));
        // No end marker: the image ends.
        let mut words = image(0, &[(1, 66)]);
        words.truncate(words.len() - 2);
        assert_eq!(walk_image(&words, 0), Err(ChainError::NoEnd));
        // Models of length 0 forever: stops after MAX_MODELS.
        let mut words = vec![0u16; 0];
        words.extend(MARKER);
        words.extend(std::iter::repeat_n([7u16, 0], 1000).flatten());
        assert_eq!(walk_image(&words, 0), Err(ChainError::TooMany));
        // A chain that runs to the last register without an end.
        let mut walk = Walk::new(50000);
        assert_eq!(walk.feed(1, 15_531), Ok(()));
        assert_eq!(walk.next_header(), Err(ChainError::NoEnd));
    }

    #[test]
    fn a_long_block_is_read_in_requests_cut_between_points() {
        // Model 701: 153 registers, u32 and u64 values near the cut.
        let found = Found {
            id: 701,
            address: 40002,
            length: 153,
        };
        let block = blocks(&[found]).pop().expect("701 is mapped");
        assert_eq!(block.count, 153);
        let ranges = chunks(
            found.data_start(),
            block.count,
            block
                .points
                .iter()
                .map(|(p, s)| (p.address, s.kind.width())),
        );
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0].0, 40004);
        assert_eq!(ranges[0].0 + ranges[0].1, ranges[1].0, "consecutive");
        assert_eq!(ranges[1].0 + ranges[1].1, 40004 + 153, "the whole block");
        assert!(ranges.iter().all(|r| r.1 <= 125));
        for (point, source) in &block.points {
            let (a, e) = (point.address, point.address + source.kind.width());
            assert!(
                ranges.iter().any(|r| a >= r.0 && e <= r.0 + r.1),
                "{} torn",
                point.name
            );
        }
        // Without points: plain cuts of 125.
        assert_eq!(chunks(0, 300, []), [(0, 125), (125, 125), (250, 50)]);
        assert_eq!(chunks(10, 5, [(10, 2)]), [(10, 5)]);
    }

    #[test]
    fn random_register_images_end_in_models_or_an_error() {
        // A small xorshift: many chains of short models, some with the end marker.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..500 {
            let mut words = MARKER.to_vec();
            let len = (next() % 600) as usize;
            words.extend((0..len).map(|_| match next() % 4 {
                0 => 0xFFFF,
                1 => (next() % 8) as u16,
                2 => [1, 101, 103, 113, 120, 160, 203, 713][(next() % 8) as usize],
                _ => next() as u16,
            }));
            if let Ok((base, found)) = walk_image(&words, 40000) {
                assert_eq!(base, 40000);
                for block in blocks(&found) {
                    let start = block.found.data_start();
                    let from = usize::from(start - base).min(words.len());
                    let end = (from + usize::from(block.count)).min(words.len());
                    for (_, source) in &block.points {
                        let _ = decode(source, &words[from..end], start);
                    }
                }
            }
        }
    }

    #[test]
    fn read_write_points_are_the_settings_and_controls_and_each_has_a_reserved_value() {
        for model in known_models() {
            for def in model
                .points
                .iter()
                .chain(model.repeat.iter().flat_map(|r| r.points))
            {
                if def.read_write {
                    // Settings and controls only, never the "not implemented" value.
                    assert!(
                        [121, 123, 124].contains(&model.id) || (702..=715).contains(&model.id),
                        "model {} {}",
                        model.id,
                        def.name
                    );
                    assert_ne!(def.kind, Kind::Sf, "model {} {}", model.id, def.name);
                    assert!(
                        reserved(def.kind).is_some(),
                        "model {} {}",
                        model.id,
                        def.name
                    );
                }
            }
        }
        let access = |id: u16, name: &str| {
            model(id)
                .and_then(|m| m.points.iter().find(|p| p.name == name))
                .map(|p| p.read_write)
        };
        assert_eq!(access(123, "WMaxLimPct"), Some(true));
        assert_eq!(access(123, "WMaxLimPct_SF"), Some(false));
        assert_eq!(access(121, "WMax"), Some(true));
        assert_eq!(access(124, "ChaState"), Some(false));
        assert_eq!(access(124, "InWRte"), Some(true));
        assert_eq!(access(103, "W"), Some(false));
        assert_eq!(access(704, "WSet"), Some(true));
        assert_eq!(access(704, "WSetRvrtRem"), Some(false));
        assert_eq!(access(701, "W"), Some(false));
        let droop = model(711).and_then(|m| m.repeat).expect("711 repeats");
        assert!(droop.points.iter().any(|p| p.name == "KOf" && p.read_write));
    }

    #[test]
    fn point_names_are_recognised_as_discovery_would_name_them() {
        for name in [
            "inverter_W",
            "common_SN",
            "meter2_TotWhImp",
            "mppt_1_DCV",
            "mppt2_12_DCA",
            "der_ctl_ac_WMaxLimPct",
            "controls_WMaxLimPct",
        ] {
            assert!(is_point_name(name), "{name}");
        }
        for name in [
            "inverter_W_SF",
            "inverter_w",
            "inverter",
            "inverter_",
            "inverter1_W",
            "inverter02_W",
            "meter0_W",
            "mppt_0_DCV",
            "mppt_01_DCV",
            "mppt_DCV",
            "mppt_1_",
            "inverter_1_W",
            "nosuch_W",
            "wattmeter_W",
            "ínverter_W",
        ] {
            assert!(!is_point_name(name), "{name}");
        }
        let names = point_names();
        assert!(names.iter().all(|n| is_point_name(n)), "{names:?}");
        assert!(names.contains(&"mppt_1_DCV".to_owned()));
    }

    #[test]
    fn a_read_back_decodes_with_the_scale_factor_last_read() {
        let source = Source {
            kind: Kind::U16,
            address: 10,
            sf_address: Some(30),
            read_write: true,
        };
        assert_eq!(
            decode_with_scale(&source, &[555], 10, Some(-1)),
            Ok(Value::Float(55.5))
        );
        assert_eq!(
            decode_with_scale(&source, &[555], 10, Some(0)),
            Ok(Value::Int(555))
        );
        assert_eq!(
            decode_with_scale(&source, &[0xFFFF], 10, Some(-1)),
            Err(PointError::NotImplemented)
        );
        assert_eq!(
            decode_with_scale(&source, &[], 10, Some(-1)),
            Err(PointError::Short)
        );
        assert_eq!(scale_factor(0xFFFF), Ok(-1));
        assert_eq!(scale_factor(0x8000), Err(PointError::ScaleNotImplemented));
        assert_eq!(scale_factor(11), Err(PointError::ScaleOutOfRange(11)));
    }

    #[test]
    fn scale_factors_apply_and_unimplemented_values_are_errors() {
        let source = |kind, sf| Source {
            kind,
            address: 10,
            sf_address: sf,
            read_write: false,
        };
        // W = 2305, W_SF = -1 -> 230.5
        assert_eq!(
            decode(&source(Kind::I16, Some(11)), &[2305, 0xFFFF], 10),
            Ok(Value::Float(230.5))
        );
        assert_eq!(
            decode(&source(Kind::U16, Some(11)), &[12, 2], 10),
            Ok(Value::Float(1200.0))
        );
        assert_eq!(
            decode(&source(Kind::U16, Some(11)), &[12, 0], 10),
            Ok(Value::Int(12))
        );
        assert_eq!(
            decode(&source(Kind::I16, Some(11)), &[0x8000, 0], 10),
            Err(PointError::NotImplemented)
        );
        assert_eq!(
            decode(&source(Kind::U16, None), &[0xFFFF], 10),
            Err(PointError::NotImplemented)
        );
        assert_eq!(
            decode(&source(Kind::U16, Some(11)), &[5, 0x8000], 10),
            Err(PointError::ScaleNotImplemented)
        );
        assert_eq!(
            decode(&source(Kind::U16, Some(11)), &[5, 300], 10),
            Err(PointError::ScaleOutOfRange(300))
        );
        assert_eq!(
            decode(&source(Kind::Acc32, None), &[0, 0], 10),
            Err(PointError::NotImplemented)
        );
        assert_eq!(
            decode(&source(Kind::Acc32, Some(12)), &[1, 0, 0xFFFD], 10),
            Ok(Value::Float(65.536))
        );
        assert_eq!(
            decode(&source(Kind::U32, None), &[0xFFFF, 0xFFFF], 10),
            Err(PointError::NotImplemented)
        );
        assert_eq!(
            decode(&source(Kind::I32, None), &[0x8000, 0], 10),
            Err(PointError::NotImplemented)
        );
        assert_eq!(
            decode(&source(Kind::F32, None), &[0x7FC0, 0], 10),
            Err(PointError::NotImplemented)
        );
        assert_eq!(
            decode(&source(Kind::F32, None), &[0x41C8, 0], 10),
            Ok(Value::Float(25.0))
        );
        assert_eq!(
            decode(&source(Kind::Str(2), None), &[0x5341, 0x4D00], 10),
            Ok(Value::Text("SAM".into()))
        );
        assert_eq!(
            decode(&source(Kind::U16, None), &[], 10),
            Err(PointError::Short)
        );
        assert_eq!(
            decode(&source(Kind::U16, None), &[1], 11),
            Err(PointError::Short)
        );
    }

    #[test]
    fn points_are_named_by_prefix_and_a_second_model_gets_a_number() {
        let found = [
            Found {
                id: 1,
                address: 40002,
                length: 66,
            },
            Found {
                id: 203,
                address: 40070,
                length: 105,
            },
            Found {
                id: 203,
                address: 40177,
                length: 105,
            },
            Found {
                id: 64000,
                address: 40284,
                length: 4,
            },
        ];
        let blocks = blocks(&found);
        assert_eq!(blocks.len(), 3);
        let names: Vec<&str> = blocks[1]
            .points
            .iter()
            .map(|(p, _)| p.name.as_str())
            .collect();
        assert!(names.contains(&"meter_TotWhImp"), "{names:?}");
        assert!(!names.iter().any(|n| n.ends_with("_SF")), "{names:?}");
        assert!(blocks[2].points.iter().any(|(p, _)| p.name == "meter2_W"));
        let (point, source) = blocks[1]
            .points
            .iter()
            .find(|(p, _)| p.name == "meter_W")
            .expect("W");
        assert_eq!(point.unit.as_deref(), Some("W"));
        // W is register 16 of model 203's block, W_SF register 20.
        assert_eq!((point.address, source.address), (40072 + 16, 40072 + 16));
        assert_eq!(source.sf_address, Some(40072 + 20));
    }

    /// Model 160 at 40002 with `modules` modules: the fixed block's scale factors, then
    /// each module's ID, IDStr, DCA, DCV, DCW, DCWH, Tms, Tmp, DCSt, DCEvt.
    fn mppt_image(modules: u16, extra: u16) -> (Found, Vec<u16>) {
        let length = 8 + 20 * modules + extra;
        let found = Found {
            id: 160,
            address: 40002,
            length,
        };
        // DCA_SF -2, DCV_SF -1, DCW_SF 0, DCWH_SF 1, Evt, N, TmsPer.
        let mut words = vec![0xFFFE, 0xFFFF, 0, 1, 0, 0, modules, 0];
        for n in 1..=modules {
            words.push(n);
            words.extend([0x5354, 0x5200 + (0x30 + n), 0, 0, 0, 0, 0, 0]); // "STR1"
            words.extend([1234 * n, 3500 + n, 400 * n]);
            words.extend([0, 1000 * n]);
            words.extend([0, 60]);
            words.push(0xFFFF - n + 1); // Tmp: -1, -2, ...
            words.push(4);
            words.extend([0, 0]);
        }
        words.extend(std::iter::repeat_n(0, usize::from(extra)));
        (found, words)
    }

    fn values(block: &Block, words: &[u16]) -> Vec<(String, Result<Value, PointError>)> {
        block
            .points
            .iter()
            .map(|(p, s)| (p.name.clone(), decode(s, words, block.found.data_start())))
            .collect()
    }

    #[test]
    fn model_160_maps_each_module_with_the_fixed_blocks_scale_factors() {
        for modules in [2u16, 3] {
            let (found, words) = mppt_image(modules, 0);
            let block = blocks(&[found]).pop().expect("160 is mapped");
            assert_eq!(block.count, 8 + 20 * modules);
            assert_eq!((block.repeats, block.leftover), (modules, 0));
            // Evt, N, TmsPer and ten points per module.
            assert_eq!(block.points.len(), usize::from(3 + 10 * modules));
            let got = values(&block, &words);
            let get = |name: &str| {
                got.iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_else(|| panic!("no point {name}"))
            };
            assert_eq!(get("mppt_N"), Ok(Value::Int(i64::from(modules))));
            assert_eq!(get("mppt_1_ID"), Ok(Value::Int(1)));
            assert_eq!(get("mppt_1_IDStr"), Ok(Value::Text("STR1".into())));
            assert_eq!(get("mppt_1_DCA"), Ok(Value::Float(12.34)));
            assert_eq!(get("mppt_1_DCV"), Ok(Value::Float(350.1)));
            assert_eq!(get("mppt_1_DCW"), Ok(Value::Int(400)));
            assert_eq!(get("mppt_1_DCWH"), Ok(Value::Float(10000.0)));
            assert_eq!(get("mppt_1_Tms"), Ok(Value::Int(60)));
            assert_eq!(get("mppt_1_Tmp"), Ok(Value::Int(-1)));
            assert_eq!(get("mppt_1_DCSt"), Ok(Value::Int(4)));
            assert_eq!(get("mppt_1_DCEvt"), Ok(Value::Int(0)));
            assert_eq!(get("mppt_2_IDStr"), Ok(Value::Text("STR2".into())));
            assert_eq!(get("mppt_2_DCA"), Ok(Value::Float(24.68)));
            assert_eq!(get("mppt_2_DCV"), Ok(Value::Float(350.2)));
            assert_eq!(get("mppt_2_DCWH"), Ok(Value::Float(20000.0)));
            let last = format!("mppt_{modules}_DCW");
            assert_eq!(get(&last), Ok(Value::Int(400 * i64::from(modules))));
            let (point, source) = &block.points[block.points.len() - 1];
            assert_eq!(point.name, format!("mppt_{modules}_DCEvt"));
            // The last module's DCEvt: its last two registers of the block.
            assert_eq!(source.address, 40004 + 8 + 20 * modules - 2);
            let (_, dca) = &block.points[3 + 2];
            assert_eq!(dca.sf_address, Some(40004), "DCA_SF of the fixed block");
            assert_eq!(block.points[3 + 2].0.unit.as_deref(), Some("A"));
        }
    }

    #[test]
    fn an_unimplemented_module_value_is_an_error_for_that_point_only() {
        let (found, mut words) = mppt_image(2, 0);
        words[8 + 20 + 9] = 0xFFFF; // module 2 DCA
        words[8 + 20 + 12] = 0; // module 2 DCWH, acc32 0
        words[8 + 20 + 13] = 0;
        let block = blocks(&[found]).pop().expect("160");
        let got = values(&block, &words);
        let get = |name: &str| got.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        assert_eq!(get("mppt_2_DCA"), Some(Err(PointError::NotImplemented)));
        assert_eq!(get("mppt_2_DCWH"), Some(Err(PointError::NotImplemented)));
        assert_eq!(get("mppt_1_DCA"), Some(Ok(Value::Float(12.34))));
        assert_eq!(get("mppt_2_DCV"), Some(Ok(Value::Float(350.2))));
    }

    #[test]
    fn a_partial_module_is_left_out_and_counted_as_leftover() {
        let (found, _) = mppt_image(2, 7);
        let layout = found.layout().expect("160");
        assert_eq!((layout.count, layout.repeats, layout.leftover), (48, 2, 7));
        let block = blocks(&[found]).pop().expect("160");
        assert!(block
            .points
            .iter()
            .all(|(p, _)| !p.name.starts_with("mppt_3_")));
        assert_eq!(block.points.len(), 23);
        // Too many modules: MAX_REPEATS of them.
        let many = Found {
            id: 160,
            address: 0,
            length: 8 + 20 * 100,
        };
        let layout = many.layout().expect("160");
        assert_eq!(layout.repeats, MAX_REPEATS);
        assert_eq!(layout.leftover, 20 * (100 - MAX_REPEATS));
        assert_eq!(layout.count, 8 + 20 * MAX_REPEATS);
        // Shorter than its fixed block: no modules.
        let short = Found {
            id: 160,
            address: 0,
            length: 5,
        };
        assert_eq!(short.layout().map(|l| (l.count, l.repeats)), Some((5, 0)));
        // A model without a repeating group ignores what follows its fixed block.
        let long = Found {
            id: 103,
            address: 0,
            length: 70,
        };
        assert_eq!(long.layout().map(|l| (l.count, l.leftover)), Some((50, 0)));
    }

    #[test]
    fn a_second_mppt_model_and_the_ports_of_714_are_named_by_repeat() {
        let found = [
            Found {
                id: 160,
                address: 40002,
                length: 48,
            },
            Found {
                id: 160,
                address: 40052,
                length: 28,
            },
            Found {
                id: 714,
                address: 40082,
                length: 18 + 25,
            },
        ];
        let blocks = blocks(&found);
        let names =
            |b: &Block| -> Vec<String> { b.points.iter().map(|(p, _)| p.name.clone()).collect() };
        assert!(names(&blocks[1]).contains(&"mppt2_1_DCV".to_owned()));
        let ports = names(&blocks[2]);
        assert!(ports.contains(&"der_dc_1_DCV".to_owned()), "{ports:?}");
        let (point, source) = blocks[2]
            .points
            .iter()
            .find(|(p, _)| p.name == "der_dc_1_Tmp")
            .expect("port Tmp");
        // Port 1 starts after the 18 registers of the fixed block; Tmp is its 21st.
        assert_eq!(point.address, 40084 + 18 + 21);
        assert_eq!(source.sf_address, Some(40084 + 17), "Tmp_SF");
    }
}
