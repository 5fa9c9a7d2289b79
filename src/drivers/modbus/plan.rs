//! Read planning: the points of one device are merged into as few read requests as the
//! protocol limits, the device's `max_*_per_request` and `max_gap` allow. Points merge only
//! with points of the same table and the same poll interval. Planned once at start.

use std::collections::BTreeMap;
use std::time::Duration;

use super::config::{PlanLimits, Point, Table};

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
