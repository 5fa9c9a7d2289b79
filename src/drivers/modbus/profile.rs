//! Device profiles: a device's register map in a TOML file of its own, so that a known
//! meter or inverter is `profile = "eastron-sdm630"` instead of forty typed points.
//!
//! The profiles in the repository's `profiles/` folder are built into the binary; a file
//! `profiles/<name>.toml` next to the configuration file (so `/etc/fieldmq/profiles/` for
//! the packaged service) adds a profile or replaces a built-in one of the same name. A
//! profile's points use the device point keys; the device's own `points` replace profile
//! points of the same name and add the rest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::config::{PlanLimits, Point, RawModbusPoint};
use crate::config::{parse_toml, Checker, ConfigError, S};

/// The profiles built into the binary, by name.
const BUILT_IN: &[(&str, &str)] = &[
    ("abb-b23", include_str!("../../../profiles/abb-b23.toml")),
    (
        "carlo-gavazzi-em24",
        include_str!("../../../profiles/carlo-gavazzi-em24.toml"),
    ),
    (
        "eastron-sdm120",
        include_str!("../../../profiles/eastron-sdm120.toml"),
    ),
    (
        "eastron-sdm630",
        include_str!("../../../profiles/eastron-sdm630.toml"),
    ),
    (
        "eastron-sdm72d",
        include_str!("../../../profiles/eastron-sdm72d.toml"),
    ),
    (
        "finder-7m38",
        include_str!("../../../profiles/finder-7m38.toml"),
    ),
    (
        "growatt-inverter",
        include_str!("../../../profiles/growatt-inverter.toml"),
    ),
    (
        "janitza-umg96",
        include_str!("../../../profiles/janitza-umg96.toml"),
    ),
    (
        "orno-or-we-517",
        include_str!("../../../profiles/orno-or-we-517.toml"),
    ),
    (
        "schneider-iem3000",
        include_str!("../../../profiles/schneider-iem3000.toml"),
    ),
];

/// A validated profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    pub description: String,
    pub manufacturer: Option<String>,
    pub model: Option<String>,
    /// The manufacturer's document the register map was written from.
    pub source: Option<String>,
    pub points: Vec<Point>,
    /// Planning limits the device's manual allows, the defaults of devices with this profile.
    pub limits: ProfileLimits,
    /// `built in`, or the file it was read from.
    pub origin: String,
}

/// `max_gap` and `max_registers_per_request` of a profile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProfileLimits {
    pub max_gap: Option<u16>,
    pub max_registers: Option<u16>,
}

/// Why a profile cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("unknown profile {name:?}{}", hint.as_ref().map(|h| format!(" (did you mean {h:?}?)")).unwrap_or_default())]
    Unknown { name: String, hint: Option<String> },
    #[error("profile name {0:?} may hold only letters, digits, `-`, `_` and `.`")]
    BadName(String),
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("profile {name} is invalid:\n{error}")]
    Invalid { name: String, error: ConfigError },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    description: Option<S<String>>,
    manufacturer: Option<S<String>>,
    model: Option<S<String>>,
    source: Option<S<String>>,
    max_gap: Option<S<i64>>,
    max_registers_per_request: Option<S<i64>>,
    points: Option<S<Vec<S<RawModbusPoint>>>>,
}

/// The folder of local profiles for a configuration file in `config_dir`.
pub fn local_dir(config_dir: &Path) -> PathBuf {
    config_dir.join("profiles")
}

/// Every profile's name and origin: the local ones (in `local`, when given) and the built-in
/// ones they do not replace, sorted by name.
pub fn list(local: Option<&Path>) -> Vec<(String, String)> {
    let mut all: HashMap<String, String> = BUILT_IN
        .iter()
        .map(|(name, _)| ((*name).to_owned(), "built in".to_owned()))
        .collect();
    if let Some(dir) = local {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "toml") {
                    if let Some(name) = path.file_stem().and_then(|s| s.to_str()) {
                        all.insert(name.to_owned(), path.display().to_string());
                    }
                }
            }
        }
    }
    let mut all: Vec<(String, String)> = all.into_iter().collect();
    all.sort();
    all
}

/// The profile `name`: `local/<name>.toml` when it exists, else the built-in one.
pub fn find(name: &str, local: Option<&Path>) -> Result<Profile, ProfileError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || name.starts_with('.')
    {
        return Err(ProfileError::BadName(name.to_owned()));
    }
    if let Some(dir) = local {
        let path = dir.join(format!("{name}.toml"));
        if path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(|error| ProfileError::Read {
                path: path.clone(),
                error,
            })?;
            return parse(name, &text, &path, path.display().to_string());
        }
    }
    match BUILT_IN.iter().find(|(built_in, _)| *built_in == name) {
        Some((_, text)) => parse(
            name,
            text,
            Path::new(&format!("<built-in profile {name}>")),
            "built in".to_owned(),
        ),
        None => {
            let known = list(local);
            let names: Vec<&str> = known.iter().map(|(n, _)| n.as_str()).collect();
            Err(ProfileError::Unknown {
                name: name.to_owned(),
                hint: crate::config::closest(name, &names).map(str::to_owned),
            })
        }
    }
}

/// Parse and validate a profile's text; diagnostics name `source` and the line.
pub fn parse(
    name: &str,
    text: &str,
    source: &Path,
    origin: String,
) -> Result<Profile, ProfileError> {
    let invalid = |error| ProfileError::Invalid {
        name: name.to_owned(),
        error,
    };
    let (diagnostics, root) = parse_toml(text, source).map_err(invalid)?;
    let root_span = root.span();
    let mut checker = Checker::new(diagnostics, source);
    let raw = checker.deserialize::<RawProfile>(root, "");
    let profile = raw.and_then(|raw| {
        let text = |value: &Option<S<String>>| value.as_ref().map(|v| v.get_ref().clone());
        let mut v = checker.device_check();
        let mut points = Vec::new();
        match &raw.points {
            Some(list) if !list.get_ref().is_empty() => {
                let mut names = HashMap::new();
                let limits = PlanLimits::default();
                for (index, point) in list.get_ref().iter().enumerate() {
                    if let Some(point) =
                        v.point(point, &format!("points[{index}]"), &limits, &mut names)
                    {
                        points.push(point);
                    }
                }
            }
            Some(list) => {
                v.error(
                    Some(list.span()),
                    "points".to_owned(),
                    "a profile needs at least one point",
                );
            }
            None => v.missing(root_span.clone(), "points".to_owned(), None),
        }
        if let Some(error) = overlap(&points) {
            v.error(None, "points".to_owned(), error);
        }
        let mut limit = |value: &Option<S<i64>>, key: &str| {
            let value = value.as_ref()?;
            match u16::try_from(*value.get_ref()) {
                Ok(n) if n <= 125 && (key == "max_gap" || n >= 1) => Some(n),
                _ => {
                    v.error(
                        Some(value.span()),
                        key.to_owned(),
                        format!(
                            "{} is out of range, expected {} to 125",
                            value.get_ref(),
                            u8::from(key != "max_gap")
                        ),
                    );
                    None
                }
            }
        };
        let limits = ProfileLimits {
            max_gap: limit(&raw.max_gap, "max_gap"),
            max_registers: limit(&raw.max_registers_per_request, "max_registers_per_request"),
        };
        v.ok.then(|| Profile {
            name: name.to_owned(),
            description: text(&raw.description).unwrap_or_default(),
            manufacturer: text(&raw.manufacturer),
            model: text(&raw.model),
            source: text(&raw.source),
            points,
            limits,
            origin,
        })
    });
    checker.finish(profile).map_err(invalid)
}

impl Profile {
    /// The profile as `fieldmq profiles show` prints it: what it is, where it is from, and
    /// one line per point.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "{}: {}", self.name, self.description);
        for (label, value) in [
            ("manufacturer", &self.manufacturer),
            ("model", &self.model),
            ("source", &self.source),
        ] {
            if let Some(value) = value {
                let _ = writeln!(out, "{label}: {value}");
            }
        }
        let _ = writeln!(out, "from: {}", self.origin);
        let _ = writeln!(
            out,
            "{} points (0-based protocol addresses):",
            self.points.len()
        );
        for point in &self.points {
            let scale = if point.is_unscaled() {
                String::new()
            } else {
                format!(
                    " ×{}{}",
                    point.scale,
                    if point.offset == 0.0 {
                        String::new()
                    } else {
                        format!(" {:+}", point.offset)
                    }
                )
            };
            let _ = writeln!(
                out,
                "  {:<28} {:<8} {:>5}  {}:{}{scale}{}{}",
                point.name,
                point.table.name(),
                point.address,
                point.data_type.name(),
                point.order.name(),
                point
                    .unit
                    .as_deref()
                    .map(|u| format!(" [{u}]"))
                    .unwrap_or_default(),
                if point.writable { " writable" } else { "" },
            );
        }
        out
    }
}

/// Two points of one table that share a register (or bit): a mistake in a register map.
fn overlap(points: &[Point]) -> Option<String> {
    let mut sorted: Vec<&Point> = points.iter().collect();
    sorted.sort_by_key(|p| (p.table, p.address));
    sorted.windows(2).find_map(|pair| {
        let (a, b) = (pair[0], pair[1]);
        (a.table == b.table && a.end() > u32::from(b.address)).then(|| {
            format!(
                "points {} and {} overlap at {} address {}",
                a.name, b.name, b.table, b.address
            )
        })
    })
}

/// The points of a device with `profile`: the profile's, each replaced by a device point of
/// the same name, then the device's other points.
pub fn merge(profile: &[Point], device: Vec<Point>) -> Vec<Point> {
    let mut merged: Vec<Point> = profile
        .iter()
        .map(|p| {
            device
                .iter()
                .find(|d| d.name == p.name)
                .cloned()
                .unwrap_or_else(|| p.clone())
        })
        .collect();
    merged.extend(
        device
            .into_iter()
            .filter(|d| !profile.iter().any(|p| p.name == d.name)),
    );
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    const METER: &str = r#"
description = "A test meter"
manufacturer = "Test"
model = "T1"
source = "Test manual v1"
points = [
  { name = "voltage", table = "input", address = 0, type = "f32", unit = "V" },
  { name = "energy", table = "input", address = 2, type = "u32:CDAB", scale = 0.01, unit = "kWh" },
]
"#;

    #[test]
    fn every_file_in_profiles_is_built_in_and_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .expect("profiles/")
            .flatten()
            .filter_map(|e| {
                e.path()
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .map(str::to_owned)
            })
            .collect();
        files.sort();
        let built_in: Vec<String> = list(None).into_iter().map(|(name, _)| name).collect();
        assert_eq!(files, built_in);
        for name in built_in {
            let profile = find(&name, None).unwrap_or_else(|e| panic!("{e}"));
            assert!(!profile.description.is_empty(), "{name}");
            assert!(profile.source.is_some(), "{name} names its source");
        }
    }

    #[test]
    fn a_profile_parses_into_points() {
        let profile = parse("t1", METER, Path::new("t1.toml"), "test".into()).expect("valid");
        assert_eq!(profile.points.len(), 2);
        assert_eq!(profile.points[1].scale, 0.01);
        assert_eq!(profile.model.as_deref(), Some("T1"));
    }

    #[test]
    fn mistakes_in_a_profile_name_its_file_line_and_key() {
        let bad = METER.replace("type = \"f32\"", "type = \"f33\"");
        let error = parse("t1", &bad, Path::new("t1.toml"), "test".into())
            .expect_err("invalid")
            .to_string();
        assert!(error.contains("t1.toml:7:"), "{error}");
        assert!(error.contains("points[0].type"), "{error}");
        let overlapping = METER.replace("address = 2,", "address = 1,");
        let error = parse("t1", &overlapping, Path::new("t1.toml"), "test".into())
            .expect_err("overlap")
            .to_string();
        assert!(
            error.contains("points voltage and energy overlap at input address 1"),
            "{error}"
        );
        let unknown = format!("{METER}\nvendor = \"x\"\n");
        let error = parse("t1", &unknown, Path::new("t1.toml"), "test".into())
            .expect_err("unknown key")
            .to_string();
        assert!(error.contains("vendor"), "{error}");
    }

    #[test]
    fn a_local_file_is_found_and_names_cannot_leave_the_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("t1.toml"), METER).expect("write");
        let profile = find("t1", Some(dir.path())).expect("found");
        assert!(profile.origin.ends_with("t1.toml"), "{}", profile.origin);
        assert!(matches!(
            find("../t1", Some(dir.path())),
            Err(ProfileError::BadName(_))
        ));
        assert!(matches!(
            find("t2", Some(dir.path())),
            Err(ProfileError::Unknown { .. })
        ));
        assert!(list(Some(dir.path())).iter().any(|(name, _)| name == "t1"));
    }

    #[test]
    fn device_points_replace_profile_points_of_the_same_name_and_add_the_rest() {
        let profile = parse("t1", METER, Path::new("t1.toml"), "test".into()).expect("valid");
        let mut voltage = profile.points[0].clone();
        voltage.unit = Some("kV".into());
        let mut extra = profile.points[1].clone();
        extra.name = "extra".into();
        extra.address = 10;
        let merged = merge(&profile.points, vec![voltage, extra]);
        let names: Vec<&str> = merged.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["voltage", "energy", "extra"]);
        assert_eq!(merged[0].unit.as_deref(), Some("kV"));
    }
}
