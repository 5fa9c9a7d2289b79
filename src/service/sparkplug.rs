//! The shape of the devices a Sparkplug uplink presents: each device's points with their
//! local topics, Sparkplug datatypes (mapped from the point types) and units. Built here,
//! where the whole configuration meets, so that the uplink knows no driver. The points a
//! driver finds at run time (a SunSpec device's models) and announces on the bus are added
//! by [`add_point_sets`]; an uplink whose shape changes that way restarts, and its new
//! session births the node and its devices with them.

use std::collections::HashMap;

use crate::config::GatewayConfig;
use crate::drivers::config::{DeviceConfig, DriverConfig, PayloadFormat, PointInfo, PointKind};
use crate::drivers::modbus::config::DataType as ModbusType;
use crate::drivers::simulated::config::Waveform;
use crate::model::Value;
use crate::uplink::config::UplinkConfig;
use crate::uplink::sparkplug::proto::DataType;
use crate::uplink::sparkplug::{SparkplugDevice, SparkplugPoint};

/// Give every Sparkplug uplink the devices of the configuration.
pub(crate) fn fill_devices(
    uplinks: &mut [UplinkConfig],
    devices: &[DeviceConfig],
    gateway: &GatewayConfig,
) {
    // The node reads the readings back from the local broker: only the payloads it can
    // read (an `influx` line or a template's own shape are for other consumers).
    let shaped: Vec<SparkplugDevice> = devices
        .iter()
        .filter(|d| matches!(d.payload, PayloadFormat::Json | PayloadFormat::Plain))
        .map(|d| device(d, gateway))
        .collect();
    for uplink in uplinks {
        if let Some(sparkplug) = uplink.sparkplug.as_mut() {
            sparkplug.devices = shaped.clone();
        }
    }
}

/// Adds to every Sparkplug uplink's devices the points their drivers announced
/// (`discovered`, by device name) that the configuration does not give.
pub(crate) fn add_point_sets(
    uplinks: &mut [UplinkConfig],
    devices: &[DeviceConfig],
    gateway: &GatewayConfig,
    discovered: &HashMap<String, Vec<PointInfo>>,
) {
    for sparkplug in uplinks.iter_mut().filter_map(|u| u.sparkplug.as_mut()) {
        for shaped in &mut sparkplug.devices {
            let Some(device) = devices.iter().find(|d| d.name == shaped.name) else {
                continue;
            };
            for point in discovered.get(&device.name).into_iter().flatten() {
                if shaped.points.iter().any(|p| p.name == point.name) {
                    continue;
                }
                shaped.points.push(SparkplugPoint {
                    name: point.name.clone(),
                    topic: device.point_topic(&gateway.id, &point.name),
                    datatype: match point.kind {
                        PointKind::Bool => DataType::Boolean,
                        PointKind::Integer => DataType::Int64,
                        PointKind::Float => DataType::Double,
                        PointKind::Text => DataType::String,
                    },
                    unit: point.unit.clone(),
                    writable: point.writable,
                });
            }
            if shaped.points_filter.is_some()
                && shaped
                    .points
                    .iter()
                    .any(|p| p.name.contains(['/', '+', '#']))
            {
                shaped.points_filter = None;
            }
        }
    }
}

fn device(device: &DeviceConfig, gateway: &GatewayConfig) -> SparkplugDevice {
    let topic = |point: &str| device.point_topic(&gateway.id, point);
    let points: Vec<SparkplugPoint> = match &device.driver {
        DriverConfig::Modbus(modbus) => modbus
            .points
            .iter()
            .map(|p| SparkplugPoint {
                name: p.name.clone(),
                topic: topic(&p.name),
                datatype: modbus_type(p.data_type, p.is_unscaled()),
                unit: p.unit.clone(),
                writable: p.writable,
            })
            .collect(),
        DriverConfig::Simulated(sim) => sim
            .points
            .iter()
            .map(|p| SparkplugPoint {
                name: p.name.clone(),
                topic: topic(&p.name),
                datatype: match &p.waveform {
                    Waveform::Constant { value } => match value {
                        Value::Bool(_) => DataType::Boolean,
                        Value::Int(_) => DataType::Int64,
                        Value::Float(_) => DataType::Double,
                        Value::Text(_) => DataType::String,
                    },
                    _ => DataType::Double,
                },
                unit: p.unit.clone(),
                writable: p.writable,
            })
            .collect(),
        // A frame's fields travel as one JSON text.
        DriverConfig::Serial(serial) => serial
            .rules
            .iter()
            .map(|rule| SparkplugPoint {
                name: rule.topic.clone(),
                topic: topic(&rule.topic),
                datatype: DataType::String,
                unit: None,
                writable: false,
            })
            .collect(),
    };
    let whole_level = device.topic.split('/').any(|level| level == "{point}");
    let single_level = points.iter().all(|p| !p.name.contains(['/', '+', '#']));
    let points_filter = (whole_level && single_level).then(|| topic("+"));
    SparkplugDevice {
        name: device.name.clone(),
        status_topic: device.status_topic(&gateway.status_topic),
        json: device.payload == PayloadFormat::Json,
        points_filter,
        write_topic: device.device_write_topic(&gateway.id),
        points,
    }
}

/// A Modbus point's datatype: its register type, or Double once a scale or offset makes
/// the published value a fraction.
fn modbus_type(data_type: ModbusType, unscaled: bool) -> DataType {
    match data_type {
        ModbusType::Bool | ModbusType::Bit(_) => DataType::Boolean,
        ModbusType::String { .. } => DataType::String,
        ModbusType::F32 if unscaled => DataType::Float,
        _ if !unscaled => DataType::Double,
        ModbusType::U16 => DataType::UInt16,
        ModbusType::I16 => DataType::Int16,
        ModbusType::U32 => DataType::UInt32,
        ModbusType::I32 => DataType::Int32,
        ModbusType::U64 => DataType::UInt64,
        ModbusType::I64 => DataType::Int64,
        ModbusType::F32 => DataType::Float,
        ModbusType::F64 => DataType::Double,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn shaped(devices: &str) -> SparkplugDevice {
        let text = format!(
            "[gateway]\nid = \"gw\"\n[broker]\nallow_anonymous = true\n{devices}\n[[uplinks]]\nname = \"s\"\nurl = \"mqtt://127.0.0.1\"\n\
             [uplinks.sparkplug]\ngroup_id = \"g\"\n"
        );
        let config = crate::service::config::parse(&text, Path::new("t.toml")).expect("valid");
        config.uplinks[0]
            .sparkplug
            .as_ref()
            .expect("sparkplug")
            .devices[0]
            .clone()
    }

    #[test]
    fn a_device_gets_one_filter_only_where_point_is_a_whole_topic_level() {
        let point = "points = [{ name = \"p\", waveform = \"constant\", value = 1 }]";
        let whole = shaped(&format!(
            "[[devices]]\nname = \"d\"\ndriver = \"simulated\"\ntopic = \"site/{{device}}/{{point}}/v\"\n{point}"
        ));
        assert_eq!(whole.points_filter.as_deref(), Some("site/d/+/v"));
        assert_eq!(whole.points[0].topic, "site/d/p/v");
        assert_eq!(whole.points[0].datatype, DataType::Int64);
        let part = shaped(&format!(
            "[[devices]]\nname = \"d\"\ndriver = \"simulated\"\ntopic = \"site/{{device}}/x_{{point}}\"\n{point}"
        ));
        assert_eq!(part.points_filter, None);
        assert_eq!(part.points[0].topic, "site/d/x_p");
    }

    #[test]
    fn only_a_modbus_device_named_by_its_topic_prefix_has_a_device_level_write_topic() {
        let modbus = |topic: &str, point: &str| {
            shaped(&format!(
                "[[devices]]\nname = \"plc\"\ndriver = \"modbus-tcp\"\naddress = \"127.0.0.1:502\"\n\
                 topic = \"{topic}\"\npoints = [{{ name = \"{point}\", table = \"holding\", address = 0 }}]"
            ))
            .write_topic
        };
        let default = "{gateway}/{device}/{point}";
        assert_eq!(modbus(default, "p").as_deref(), Some("gw/plc/set"));
        assert_eq!(
            modbus("site/{device}/{point}/v", "p").as_deref(),
            Some("site/plc/set")
        );
        // Shared by every device, or the topic of a point's readings: none.
        assert_eq!(modbus("site/{point}", "p"), None);
        assert_eq!(modbus(default, "set"), None);
        let simulated = shaped(
            "[[devices]]\nname = \"d\"\ndriver = \"simulated\"\n\
             points = [{ name = \"p\", waveform = \"constant\", value = 1, writable = true }]",
        );
        assert_eq!(simulated.write_topic, None);
    }

    #[test]
    fn modbus_types_map_to_sparkplug_datatypes() {
        assert_eq!(modbus_type(ModbusType::U16, true), DataType::UInt16);
        assert_eq!(modbus_type(ModbusType::I32, true), DataType::Int32);
        assert_eq!(modbus_type(ModbusType::U16, false), DataType::Double);
        assert_eq!(modbus_type(ModbusType::F32, true), DataType::Float);
        assert_eq!(modbus_type(ModbusType::Bit(3), false), DataType::Boolean);
        assert_eq!(
            modbus_type(ModbusType::String { registers: 4 }, true),
            DataType::String
        );
    }

    #[test]
    fn announced_points_join_a_devices_shape_once_with_datatypes_from_their_kinds() {
        let text = "[gateway]\nid = \"gw\"\n[broker]\nallow_anonymous = true\n\
            [[devices]]\nname = \"inv\"\ndriver = \"modbus-tcp\"\naddress = \"127.0.0.1:502\"\nprofile = \"sunspec\"\n\
            points = [ { name = \"limit\", table = \"holding\", address = 40500, writable = true } ]\n\
            [[uplinks]]\nname = \"s\"\nurl = \"mqtt://127.0.0.1\"\n[uplinks.sparkplug]\ngroup_id = \"g\"\n";
        let config = crate::service::config::parse(text, Path::new("t.toml")).expect("valid");
        let point = |name: &str, kind, unit: Option<&str>| PointInfo {
            name: name.into(),
            unit: unit.map(str::to_owned),
            writable: false,
            kind,
        };
        let discovered = HashMap::from([(
            "inv".to_owned(),
            vec![
                point("limit", PointKind::Float, None),
                point("inverter_W", PointKind::Float, Some("W")),
                point("inverter_St", PointKind::Integer, None),
                point("common_SN", PointKind::Text, None),
            ],
        )]);
        let mut uplinks = config.uplinks.clone();
        add_point_sets(&mut uplinks, &config.devices, &config.gateway, &discovered);
        add_point_sets(&mut uplinks, &config.devices, &config.gateway, &discovered);
        let device = &uplinks[0].sparkplug.as_ref().expect("sparkplug").devices[0];
        let shaped: Vec<(&str, DataType)> = device
            .points
            .iter()
            .map(|p| (p.name.as_str(), p.datatype))
            .collect();
        assert_eq!(
            shaped,
            [
                ("limit", DataType::UInt16),
                ("inverter_W", DataType::Double),
                ("inverter_St", DataType::Int64),
                ("common_SN", DataType::String),
            ]
        );
        assert_eq!(device.points[1].topic, "gw/inv/inverter_W");
        assert_eq!(device.points[1].unit.as_deref(), Some("W"));
        assert!(device.points[0].writable);
    }
}
