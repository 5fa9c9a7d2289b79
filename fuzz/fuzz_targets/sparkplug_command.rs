//! Sparkplug commands from the cloud: any bytes as the payload of an NCMD, a DCMD (of a
//! device with points of several datatypes, and of an unknown device) or the primary
//! host's STATE, through the node's decoder. A malformed command must be an error, never a
//! panic; a decoded write names a point's `/set` topic.
#![no_main]

use std::sync::OnceLock;

use fieldmq::uplink::sparkplug::proto::DataType;
use fieldmq::uplink::sparkplug::{
    decode_inbound, Inbound, Shape, SparkplugConfig, SparkplugDevice, SparkplugPoint,
};
use libfuzzer_sys::fuzz_target;

fn shape() -> &'static Shape {
    static SHAPE: OnceLock<Shape> = OnceLock::new();
    SHAPE.get_or_init(|| {
        let point = |name: &str, datatype| SparkplugPoint {
            name: name.into(),
            topic: format!("gw/dev/{name}"),
            datatype,
            unit: None,
            writable: name != "ro",
        };
        Shape::new(SparkplugConfig {
            group_id: "g".into(),
            edge_node_id: "n".into(),
            primary_host: Some("scada".into()),
            devices: vec![SparkplugDevice {
                name: "dev".into(),
                status_topic: "gw/status/devices/dev".into(),
                json: true,
                points_filter: None,
                // A DCMD with several metrics takes the device-level write.
                write_topic: Some("gw/dev/set".into()),
                points: vec![
                    point("i8", DataType::Int8),
                    point("i16", DataType::Int16),
                    point("i32", DataType::Int32),
                    point("i64", DataType::Int64),
                    point("u16", DataType::UInt16),
                    point("u64", DataType::UInt64),
                    point("f", DataType::Float),
                    point("d", DataType::Double),
                    point("b", DataType::Boolean),
                    point("s", DataType::String),
                    point("ro", DataType::Double),
                ],
            }],
        })
    })
}

const TOPICS: [&str; 5] = [
    "spBv1.0/g/NCMD/n",
    "spBv1.0/g/DCMD/n/dev",
    "spBv1.0/g/DCMD/n/other",
    "spBv1.0/STATE/scada",
    "spBv1.0/g/NCMD/other",
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let topic = TOPICS[usize::from(selector) % TOPICS.len()];
    if let Ok(Inbound::Writes(writes)) = decode_inbound(shape(), topic, payload) {
        for write in writes {
            assert!(write.topic.starts_with("gw/dev/") && write.topic.ends_with("/set"));
            assert!(!write.topic.contains("/ro/"));
        }
    }
});
