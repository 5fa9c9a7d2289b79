//! Sparkplug B topics: `spBv1.0/<group>/<type>/<edge node>[/<device>]` and the primary
//! host's `spBv1.0/STATE/<host>`.

/// The namespace every Sparkplug B topic starts with.
pub const NAMESPACE: &str = "spBv1.0";

/// The message types of an edge node's topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    NBirth,
    NDeath,
    NData,
    NCmd,
    DBirth,
    DDeath,
    DData,
    DCmd,
}

impl MessageType {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::NBirth => "NBIRTH",
            MessageType::NDeath => "NDEATH",
            MessageType::NData => "NDATA",
            MessageType::NCmd => "NCMD",
            MessageType::DBirth => "DBIRTH",
            MessageType::DDeath => "DDEATH",
            MessageType::DData => "DDATA",
            MessageType::DCmd => "DCMD",
        }
    }
}

/// The topics of one edge node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTopics {
    group: String,
    node: String,
}

/// A command topic the node subscribes to, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandTopic<'a> {
    /// `NCMD/<node>`.
    Node,
    /// `DCMD/<node>/<device>`.
    Device(&'a str),
}

impl NodeTopics {
    pub fn new(group: &str, node: &str) -> NodeTopics {
        NodeTopics {
            group: group.to_owned(),
            node: node.to_owned(),
        }
    }

    /// A node-level topic (`NBIRTH`, `NDEATH`, `NDATA`, `NCMD`).
    pub fn node(&self, kind: MessageType) -> String {
        format!("{NAMESPACE}/{}/{}/{}", self.group, kind.as_str(), self.node)
    }

    /// A device-level topic (`DBIRTH`, `DDEATH`, `DDATA`, `DCMD`).
    pub fn device(&self, kind: MessageType, device: &str) -> String {
        format!(
            "{NAMESPACE}/{}/{}/{}/{device}",
            self.group,
            kind.as_str(),
            self.node
        )
    }

    /// The filters for the node's commands: `NCMD/<node>` and `DCMD/<node>/+`.
    pub fn command_filters(&self) -> [String; 2] {
        [
            self.node(MessageType::NCmd),
            format!(
                "{NAMESPACE}/{}/{}/{}/+",
                self.group,
                MessageType::DCmd.as_str(),
                self.node
            ),
        ]
    }

    /// Which command `topic` is, if it is one of this node's.
    pub fn parse_command<'t>(&self, topic: &'t str) -> Option<CommandTopic<'t>> {
        let mut levels = topic.split('/');
        if levels.next()? != NAMESPACE || levels.next()? != self.group {
            return None;
        }
        let kind = levels.next()?;
        if levels.next()? != self.node {
            return None;
        }
        let device = levels.next();
        if levels.next().is_some() {
            return None;
        }
        match (kind, device) {
            ("NCMD", None) => Some(CommandTopic::Node),
            ("DCMD", Some(device)) if !device.is_empty() => Some(CommandTopic::Device(device)),
            _ => None,
        }
    }
}

/// The primary host application's state topic (Sparkplug 3.0).
pub fn state_topic(host: &str) -> String {
    format!("{NAMESPACE}/STATE/{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_the_namespace_group_type_node_device_layout() {
        let topics = NodeTopics::new("plant1", "line1");
        assert_eq!(
            topics.node(MessageType::NBirth),
            "spBv1.0/plant1/NBIRTH/line1"
        );
        assert_eq!(
            topics.device(MessageType::DData, "meter"),
            "spBv1.0/plant1/DDATA/line1/meter"
        );
        assert_eq!(
            topics.command_filters(),
            [
                "spBv1.0/plant1/NCMD/line1".to_string(),
                "spBv1.0/plant1/DCMD/line1/+".to_string()
            ]
        );
        assert_eq!(state_topic("scada"), "spBv1.0/STATE/scada");
    }

    #[test]
    fn only_this_nodes_command_topics_parse() {
        let topics = NodeTopics::new("g", "n");
        assert_eq!(
            topics.parse_command("spBv1.0/g/NCMD/n"),
            Some(CommandTopic::Node)
        );
        assert_eq!(
            topics.parse_command("spBv1.0/g/DCMD/n/dev"),
            Some(CommandTopic::Device("dev"))
        );
        for other in [
            "spBv1.0/g/NCMD/other",
            "spBv1.0/h/NCMD/n",
            "spBv1.0/g/DCMD/n",
            "spBv1.0/g/DCMD/n/",
            "spBv1.0/g/DCMD/n/a/b",
            "spBv1.0/g/NDATA/n",
            "spBv1.0/g/NCMD/n/dev",
            "",
        ] {
            assert_eq!(topics.parse_command(other), None, "{other}");
        }
    }
}
