//! Read planning: the points of one device are merged into as few read requests as the
//! protocol limits, the device's `max_*_per_request` and `max_gap` allow. Points merge only
//! with points of the same table and the same poll interval. Planned once at start.
//!
//! Write planning, for a command that writes several points of one device: the same
//! merge without gaps, so adjacent registers go in one FC16 and adjacent coils in one FC15.

use std::collections::BTreeMap;
use std::time::Duration;

use super::bus::Op;
use super::codec::Encoded;
use super::config::{PlanLimits, Point, Table};

/// Most registers one FC16 request carries.
const MAX_WRITE_REGISTERS: u16 = 123;
/// Most coils one FC15 request carries.
const MAX_WRITE_COILS: u16 = 1968;

/// One read request and the points it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    pub table: Table,
    pub start: u16,
    /// Registers or bits.
    pub count: u16,
    pub interval: Duration,
    /// Indices into the device's points.
    pub points: Vec<usize>,
}

impl ReadRequest {
    /// `holding 100..=109`
    pub fn describe(&self) -> String {
        let last = u32::from(self.start) + u32::from(self.count).saturating_sub(1);
        format!("{} {}..={last}", self.table, self.start)
    }
}

/// Plans the reads of `points`; a point without its own poll interval uses `device_poll`.
pub fn plan(points: &[Point], device_poll: Duration, limits: &PlanLimits) -> Vec<ReadRequest> {
    let mut groups: BTreeMap<(Table, Duration), Vec<usize>> = BTreeMap::new();
    for (index, point) in points.iter().enumerate() {
        let interval = point.poll.unwrap_or(device_poll);
        groups
            .entry((point.table, interval))
            .or_default()
            .push(index);
    }
    let mut requests = Vec::new();
    for ((table, interval), mut members) in groups {
        let (max_count, max_gap) = if table.is_bits() {
            (u32::from(limits.max_bits), u32::from(limits.max_gap_bits))
        } else {
            (
                u32::from(limits.max_registers),
                u32::from(limits.max_gap_registers),
            )
        };
        members.sort_by_key(|&i| points.get(i).map(|p| (p.address, p.end())));
        let mut current: Option<(u32, u32, Vec<usize>)> = None;
        for index in members {
            let Some(point) = points.get(index) else {
                continue;
            };
            let (start, end) = (u32::from(point.address), point.end());
            current = match current.take() {
                Some((first, last, mut members))
                    if start <= last + max_gap && end.max(last) - first <= max_count =>
                {
                    members.push(index);
                    Some((first, end.max(last), members))
                }
                previous => {
                    if let Some(previous) = previous {
                        requests.push(request_of(table, interval, previous));
                    }
                    Some((start, end, vec![index]))
                }
            };
        }
        if let Some(last) = current {
            requests.push(request_of(table, interval, last));
        }
    }
    requests
}

/// `request` cut in two, each half with its points (in address order) and just the range
/// they cover; `None` for a request of one point. For a device that refuses a merged read
/// because it covers an address it does not have: the halves are read on their own until
/// the address is found.
pub fn split(request: &ReadRequest, points: &[Point]) -> Option<(ReadRequest, ReadRequest)> {
    if request.points.len() < 2 {
        return None;
    }
    let mut members = request.points.clone();
    members.sort_by_key(|&i| points.get(i).map(|p| (p.address, p.end())));
    let second = members.split_off(members.len() / 2);
    let half = |members: Vec<usize>| {
        let start = members
            .iter()
            .filter_map(|&i| points.get(i))
            .map(|p| u32::from(p.address))
            .min()?;
        let end = members
            .iter()
            .filter_map(|&i| points.get(i))
            .map(Point::end)
            .max()?;
        Some(request_of(
            request.table,
            request.interval,
            (start, end, members),
        ))
    };
    Some((half(members)?, half(second)?))
}

/// One step of a write of several points.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum WriteStep {
    /// One request carrying these points (indices into the command's points).
    Write { op: Op, points: Vec<usize> },
    /// A `bit` point: read-modify-write of the register that holds it, on its own.
    Bit {
        address: u16,
        bit: u8,
        value: bool,
        point: usize,
    },
}

impl WriteStep {
    /// The table, start and count the step writes (a bit: its register).
    pub(super) fn range(&self) -> (Table, u16, u16) {
        match self {
            WriteStep::Write { op, .. } => {
                let (table, address) = match op {
                    Op::WriteCoil { address, .. } | Op::WriteCoils { address, .. } => {
                        (Table::Coil, *address)
                    }
                    Op::WriteRegister { address, .. } | Op::WriteRegisters { address, .. } => {
                        (Table::Holding, *address)
                    }
                    Op::Read { table, start, .. } => (*table, *start),
                };
                (table, address, op_len(op))
            }
            WriteStep::Bit { address, .. } => (Table::Holding, *address, 1),
        }
    }

    /// The command's points this step writes.
    pub(super) fn points(&self) -> &[usize] {
        match self {
            WriteStep::Write { points, .. } => points,
            WriteStep::Bit { point, .. } => std::slice::from_ref(point),
        }
    }
}

/// Plans a write of several points, each with its encoded value: points whose registers
/// (or coils) are adjacent merge into one FC16 (FC15) request within `limits` and the
/// protocol's write limits; the rest go one request each (FC06 and FC05 for a lone register
/// or coil unless `write_multiple`), a `bit` point as its own read-modify-write. Steps come
/// in table and address order. An error when two points write the same register or coil.
pub(super) fn plan_writes(
    points: &[(&Point, Encoded)],
    limits: &PlanLimits,
    write_multiple: bool,
) -> Result<Vec<WriteStep>, String> {
    let mut steps: Vec<(Table, u16, WriteStep)> = Vec::new();
    // The points that merge, without their poll intervals (a write has none), and where
    // each came from.
    let mut mergeable = Vec::new();
    let mut origin = Vec::new();
    for (index, (point, encoded)) in points.iter().enumerate() {
        match encoded {
            Encoded::Bit { bit, value } => steps.push((
                Table::Holding,
                point.address,
                WriteStep::Bit {
                    address: point.address,
                    bit: *bit,
                    value: *value,
                    point: index,
                },
            )),
            Encoded::Coil(_) | Encoded::Registers(_) => {
                mergeable.push(Point {
                    poll: None,
                    ..(*point).clone()
                });
                origin.push(index);
            }
        }
    }
    let write_limits = PlanLimits {
        max_registers: limits.max_registers.min(MAX_WRITE_REGISTERS),
        max_bits: limits.max_bits.min(MAX_WRITE_COILS),
        max_gap_registers: 0,
        max_gap_bits: 0,
    };
    for request in plan(&mergeable, Duration::ZERO, &write_limits) {
        let len = usize::from(request.count);
        // Which point writes each register / coil of the request.
        let mut owners: Vec<Option<usize>> = vec![None; len];
        let mut words = vec![0u16; len];
        let mut coils = vec![false; len];
        let mut members = Vec::new();
        for &m in &request.points {
            let (Some(&index), Some(point)) = (origin.get(m), mergeable.get(m)) else {
                continue;
            };
            let offset = usize::from(point.address - request.start);
            let width = match &points[index].1 {
                Encoded::Coil(value) => {
                    if let Some(slot) = coils.get_mut(offset) {
                        *slot = *value;
                    }
                    1
                }
                Encoded::Registers(registers) => {
                    for (slot, word) in words.iter_mut().skip(offset).zip(registers) {
                        *slot = *word;
                    }
                    registers.len()
                }
                Encoded::Bit { .. } => 0,
            };
            for slot in offset..offset + width {
                match owners.get_mut(slot) {
                    Some(Some(other)) => {
                        let name = |i: usize| points.get(i).map_or("?", |(p, _)| p.name.as_str());
                        return Err(format!(
                            "points {} and {} both write {} {}",
                            name(*other),
                            name(index),
                            request.table,
                            usize::from(request.start) + slot
                        ));
                    }
                    Some(owner) => *owner = Some(index),
                    None => return Err(format!("point {} does not fit its request", point.name)),
                }
            }
            members.push(index);
        }
        if owners.iter().any(Option::is_none) {
            return Err(format!("a gap in the write of {}", request.describe()));
        }
        let address = request.start;
        let op = match request.table {
            Table::Coil => match coils.as_slice() {
                [value] if !write_multiple => Op::WriteCoil {
                    address,
                    value: *value,
                },
                _ => Op::WriteCoils {
                    address,
                    values: coils,
                },
            },
            _ => match words.as_slice() {
                [value] if !write_multiple => Op::WriteRegister {
                    address,
                    value: *value,
                },
                _ => Op::WriteRegisters {
                    address,
                    values: words,
                },
            },
        };
        steps.push((
            request.table,
            address,
            WriteStep::Write {
                op,
                points: members,
            },
        ));
    }
    // A bit whose register another point of the same command writes: which value wins
    // would depend on the order.
    for (_, _, step) in &steps {
        let WriteStep::Bit { address, point, .. } = step else {
            continue;
        };
        let clash = steps.iter().find_map(|(_, _, other)| match other {
            WriteStep::Write {
                points: members, ..
            } => {
                let (table, start, count) = other.range();
                (table == Table::Holding
                    && (u32::from(start)..u32::from(start) + u32::from(count))
                        .contains(&u32::from(*address)))
                .then(|| members.first().copied())
                .flatten()
            }
            WriteStep::Bit { .. } => None,
        });
        if let Some(other) = clash {
            let name = |i: usize| points.get(i).map_or("?", |(p, _)| p.name.as_str());
            return Err(format!(
                "points {} and {} both write holding {address}",
                name(other),
                name(*point)
            ));
        }
    }
    steps.sort_by_key(|(table, start, _)| (*table, *start));
    Ok(steps.into_iter().map(|(_, _, step)| step).collect())
}

/// How many registers or coils a write request covers.
fn op_len(op: &Op) -> u16 {
    match op {
        Op::WriteRegisters { values, .. } => u16::try_from(values.len()).unwrap_or(u16::MAX),
        Op::WriteCoils { values, .. } => u16::try_from(values.len()).unwrap_or(u16::MAX),
        Op::Read { count, .. } => *count,
        Op::WriteCoil { .. } | Op::WriteRegister { .. } => 1,
    }
}

fn request_of(
    table: Table,
    interval: Duration,
    (start, end, points): (u32, u32, Vec<usize>),
) -> ReadRequest {
    ReadRequest {
        table,
        // Validation keeps every point inside 0..=65535 and within the limits.
        start: u16::try_from(start).unwrap_or(u16::MAX),
        count: u16::try_from(end - start).unwrap_or(u16::MAX),
        interval,
        points,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::modbus::config::{DataType, Order, Report};

    fn point(table: Table, address: u16, data_type: DataType) -> Point {
        Point {
            name: format!("p{address}"),
            table,
            address,
            data_type,
            order: Order::Abcd,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            poll: None,
            report: Report::Always,
            min_interval: Duration::ZERO,
            max_interval: None,
            writable: false,
        }
    }

    const POLL: Duration = Duration::from_secs(1);

    #[test]
    fn a_request_splits_into_halves_that_cover_only_their_points() {
        let points: Vec<Point> = [0u16, 1, 10, 11, 12]
            .iter()
            .map(|&a| point(Table::Holding, a, DataType::U16))
            .collect();
        let limits = PlanLimits {
            max_gap_registers: 20,
            ..PlanLimits::default()
        };
        let requests = plan(&points, Duration::from_secs(1), &limits);
        assert_eq!(requests.len(), 1);
        let (a, b) = split(&requests[0], &points).expect("five points split");
        assert_eq!((a.start, a.count, a.points.clone()), (0, 2, vec![0, 1]));
        assert_eq!((b.start, b.count, b.points.clone()), (10, 3, vec![2, 3, 4]));
        let (c, d) = split(&a, &points).expect("two points split");
        assert_eq!((c.start, c.count, d.start, d.count), (0, 1, 1, 1));
        assert_eq!(split(&c, &points), None);
    }

    #[test]
    fn adjacent_points_merge_and_a_gap_splits_unless_allowed() {
        let points = vec![
            point(Table::Holding, 0, DataType::F32),
            point(Table::Holding, 2, DataType::F32),
            point(Table::Holding, 10, DataType::U16),
        ];
        let tight = plan(&points, POLL, &PlanLimits::default());
        assert_eq!(tight.len(), 2);
        assert_eq!((tight[0].start, tight[0].count), (0, 4));
        assert_eq!((tight[1].start, tight[1].count), (10, 1));
        let loose = plan(
            &points,
            POLL,
            &PlanLimits {
                max_gap_registers: 6,
                ..PlanLimits::default()
            },
        );
        assert_eq!(loose.len(), 1);
        assert_eq!((loose[0].start, loose[0].count), (0, 11));
        let loose_bits_only = plan(
            &points,
            POLL,
            &PlanLimits {
                max_gap_bits: 100,
                ..PlanLimits::default()
            },
        );
        assert_eq!(loose_bits_only.len(), 2);
    }

    #[test]
    fn requests_stay_within_the_limits_and_never_split_a_point() {
        // 500 contiguous f32 = 1000 registers. 125 is odd, so a request holds at most 62
        // whole floats (124 registers): 9 requests. Eight would split a float across two
        // requests, and a value that changes between them would read torn.
        let points: Vec<Point> = (0..500)
            .map(|i| point(Table::Holding, i * 2, DataType::F32))
            .collect();
        let requests = plan(&points, POLL, &PlanLimits::default());
        assert_eq!(requests.len(), 9);
        assert!(requests.iter().all(|r| r.count <= 125 && r.count % 2 == 0));
        assert_eq!(requests[0].count, 124);
        assert_eq!(requests.iter().map(|r| r.points.len()).sum::<usize>(), 500);
        let small = plan(
            &points,
            POLL,
            &PlanLimits {
                max_registers: 10,
                ..PlanLimits::default()
            },
        );
        assert_eq!(small.len(), 100);
        let coils: Vec<Point> = (0..4001)
            .map(|i| point(Table::Coil, i, DataType::Bool))
            .collect();
        let requests = plan(&coils, POLL, &PlanLimits::default());
        assert_eq!(
            requests.iter().map(|r| r.count).collect::<Vec<_>>(),
            vec![2000, 2000, 1]
        );
    }

    fn named(name: &str, table: Table, address: u16, data_type: DataType) -> Point {
        Point {
            name: name.into(),
            ..point(table, address, data_type)
        }
    }

    #[test]
    fn adjacent_registers_of_a_write_go_in_one_fc16_in_address_order() {
        // Given out of order: an f32 at 11..=12 between u16s at 10 and 13.
        let flow = named("flow", Table::Holding, 11, DataType::F32);
        let low = named("low", Table::Holding, 10, DataType::U16);
        let high = named("high", Table::Holding, 13, DataType::U16);
        let steps = plan_writes(
            &[
                (&flow, Encoded::Registers(vec![0x41AC, 0x0000])),
                (&high, Encoded::Registers(vec![7])),
                (&low, Encoded::Registers(vec![2])),
            ],
            &PlanLimits::default(),
            false,
        )
        .unwrap();
        assert_eq!(
            steps,
            vec![WriteStep::Write {
                op: Op::WriteRegisters {
                    address: 10,
                    values: vec![2, 0x41AC, 0x0000, 7]
                },
                points: vec![2, 0, 1],
            }]
        );
        assert_eq!(steps[0].range(), (Table::Holding, 10, 4));
    }

    #[test]
    fn a_gap_splits_a_write_and_lone_points_use_single_functions_unless_write_multiple() {
        let a = named("a", Table::Holding, 20, DataType::U16);
        let b = named("b", Table::Holding, 22, DataType::U16);
        let pump = named("pump", Table::Coil, 3, DataType::Bool);
        let fan = named("fan", Table::Coil, 4, DataType::Bool);
        let horn = named("horn", Table::Coil, 9, DataType::Bool);
        let points = [
            (&b, Encoded::Registers(vec![2])),
            (&a, Encoded::Registers(vec![1])),
            (&horn, Encoded::Coil(true)),
            (&fan, Encoded::Coil(false)),
            (&pump, Encoded::Coil(true)),
        ];
        let single = plan_writes(&points, &PlanLimits::default(), false).unwrap();
        assert_eq!(
            single,
            vec![
                WriteStep::Write {
                    op: Op::WriteCoils {
                        address: 3,
                        values: vec![true, false]
                    },
                    points: vec![4, 3],
                },
                WriteStep::Write {
                    op: Op::WriteCoil {
                        address: 9,
                        value: true
                    },
                    points: vec![2],
                },
                WriteStep::Write {
                    op: Op::WriteRegister {
                        address: 20,
                        value: 1
                    },
                    points: vec![1],
                },
                WriteStep::Write {
                    op: Op::WriteRegister {
                        address: 22,
                        value: 2
                    },
                    points: vec![0],
                },
            ]
        );
        let multiple = plan_writes(&points, &PlanLimits::default(), true).unwrap();
        let ops: Vec<Op> = multiple
            .into_iter()
            .filter_map(|step| match step {
                WriteStep::Write { op, .. } => Some(op),
                WriteStep::Bit { .. } => None,
            })
            .collect();
        assert_eq!(
            ops[1..],
            [
                Op::WriteCoils {
                    address: 9,
                    values: vec![true]
                },
                Op::WriteRegisters {
                    address: 20,
                    values: vec![1]
                },
                Op::WriteRegisters {
                    address: 22,
                    values: vec![2]
                },
            ]
        );
    }

    #[test]
    fn a_bit_point_is_its_own_read_modify_write_among_the_registers() {
        let valve = named("valve", Table::Holding, 5, DataType::Bit(3));
        let set = named("set", Table::Holding, 4, DataType::U16);
        let trim = named("trim", Table::Holding, 6, DataType::U16);
        let steps = plan_writes(
            &[
                (&trim, Encoded::Registers(vec![6])),
                (
                    &valve,
                    Encoded::Bit {
                        bit: 3,
                        value: true,
                    },
                ),
                (&set, Encoded::Registers(vec![4])),
            ],
            &PlanLimits::default(),
            false,
        )
        .unwrap();
        assert_eq!(
            steps,
            vec![
                WriteStep::Write {
                    op: Op::WriteRegister {
                        address: 4,
                        value: 4
                    },
                    points: vec![2],
                },
                WriteStep::Bit {
                    address: 5,
                    bit: 3,
                    value: true,
                    point: 1
                },
                WriteStep::Write {
                    op: Op::WriteRegister {
                        address: 6,
                        value: 6
                    },
                    points: vec![0],
                },
            ]
        );
    }

    #[test]
    fn a_write_stays_within_the_device_and_protocol_limits() {
        // 130 adjacent u16: FC16 takes 123 at most; a device limit of 10 makes 13 requests.
        let points: Vec<Point> = (0..130)
            .map(|i| named(&format!("r{i}"), Table::Holding, i, DataType::U16))
            .collect();
        let encoded: Vec<(&Point, Encoded)> = points
            .iter()
            .map(|p| (p, Encoded::Registers(vec![p.address])))
            .collect();
        let counts = |limits: &PlanLimits| -> Vec<(u16, u16)> {
            plan_writes(&encoded, limits, false)
                .unwrap()
                .iter()
                .map(|step| {
                    let (_, start, count) = step.range();
                    (start, count)
                })
                .collect()
        };
        assert_eq!(counts(&PlanLimits::default()), vec![(0, 123), (123, 7)]);
        let small = counts(&PlanLimits {
            max_registers: 10,
            ..PlanLimits::default()
        });
        assert_eq!(small.len(), 13);
        assert_eq!(small[12], (120, 10));
        // 2000 coils: FC15 takes 1968 at most.
        let coils: Vec<Point> = (0..2000)
            .map(|i| named(&format!("c{i}"), Table::Coil, i, DataType::Bool))
            .collect();
        let encoded: Vec<(&Point, Encoded)> =
            coils.iter().map(|p| (p, Encoded::Coil(true))).collect();
        let steps = plan_writes(&encoded, &PlanLimits::default(), false).unwrap();
        let ranges: Vec<(Table, u16, u16)> = steps.iter().map(WriteStep::range).collect();
        assert_eq!(
            ranges,
            vec![(Table::Coil, 0, 1968), (Table::Coil, 1968, 32)]
        );
    }

    #[test]
    fn two_points_on_the_same_register_are_refused() {
        let wide = named("wide", Table::Holding, 10, DataType::U32);
        let narrow = named("narrow", Table::Holding, 11, DataType::U16);
        let flag = named("flag", Table::Holding, 10, DataType::Bit(0));
        let error = plan_writes(
            &[
                (&wide, Encoded::Registers(vec![0, 1])),
                (&narrow, Encoded::Registers(vec![2])),
            ],
            &PlanLimits::default(),
            false,
        )
        .unwrap_err();
        assert_eq!(error, "points wide and narrow both write holding 11");
        let error = plan_writes(
            &[
                (&wide, Encoded::Registers(vec![0, 1])),
                (
                    &flag,
                    Encoded::Bit {
                        bit: 0,
                        value: true,
                    },
                ),
            ],
            &PlanLimits::default(),
            false,
        )
        .unwrap_err();
        assert_eq!(error, "points wide and flag both write holding 10");
    }

    #[test]
    fn tables_and_intervals_are_planned_apart() {
        let mut slow = point(Table::Holding, 1, DataType::U16);
        slow.poll = Some(Duration::from_secs(10));
        let points = vec![
            point(Table::Holding, 0, DataType::U16),
            slow,
            point(Table::Input, 0, DataType::U16),
        ];
        let requests = plan(&points, POLL, &PlanLimits::default());
        assert_eq!(requests.len(), 3);
        assert_eq!(requests[0].describe(), "holding 0..=0");
    }
}
