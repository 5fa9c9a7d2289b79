#!/usr/bin/env python3
"""A Sparkplug B host application for tests/it/sparkplug.rs, built on pysparkplug (an
implementation independent of the gateway's).

It subscribes to every message of one group through a real MQTT broker, decodes each with
pysparkplug (aliases in data resolved through the last birth, as a host does) and prints
one JSON line per message on stdout. It reads commands as JSON lines on stdin:

    {"op": "state", "online": true}          publish spBv1.0/STATE/<host id> (retained)
    {"op": "rebirth", "node": "n"}           NCMD Node Control/Rebirth = true
    {"op": "dcmd", "node": "n", "device": "d", "metric": "m", "datatype": "INT16", "value": 5}
    {"op": "dcmd", "node": "n", "device": "d", "metrics": [{"metric": "m", "datatype": "INT16", "value": 5}, ...]}

Output lines: {"event": "ready"} once subscribed, {"event": "message", ...} per message,
{"event": "error", "text": ...} for a message it cannot decode.
"""

import argparse
import json
import sys
import threading
import time

import pysparkplug as psp
from pysparkplug import _protobuf as pb

out_lock = threading.Lock()


def emit(obj):
    with out_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def properties(raw_metric):
    """The metric's property set (pysparkplug keeps none of it) as {key: value}."""
    result = {}
    if not raw_metric.HasField("properties"):
        return result
    props = raw_metric.properties
    for key, value in zip(props.keys, props.values):
        field = value.WhichOneof("value")
        result[key] = getattr(value, field) if field else None
    return result


def describe(message, raw_payload):
    topic = message.topic
    payload = message.payload
    raw = pb.Payload.FromString(raw_payload)
    line = {
        "event": "message",
        "type": str(topic.message_type.value if hasattr(topic.message_type, "value") else topic.message_type),
        "group": topic.group_id,
        "node": topic.edge_node_id,
        "device": topic.device_id,
        "seq": getattr(payload, "seq", None),
        "timestamp": getattr(payload, "timestamp", None),
        "metrics": [],
    }
    metrics = getattr(payload, "metrics", None)
    if metrics is None and hasattr(payload, "bd_seq_metric"):
        metrics = (payload.bd_seq_metric,)
    for index, metric in enumerate(metrics or ()):
        raw_metric = raw.metrics[index] if index < len(raw.metrics) else None
        value = metric.value
        if isinstance(value, bytes):
            value = value.hex()
        line["metrics"].append(
            {
                "name": metric.name,
                "alias": metric.alias,
                "datatype": metric.datatype.name,
                "value": value,
                "timestamp": metric.timestamp,
                "is_historical": metric.is_historical,
                "is_null": metric.is_null,
                # Whether the message itself named the metric (births do; data uses aliases).
                "named": bool(raw_metric is not None and raw_metric.HasField("name")),
                "properties": properties(raw_metric) if raw_metric is not None else {},
            }
        )
    return line


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--host-id", default=None)
    args = parser.parse_args()

    client = psp.Client(client_id=f"sparkplug-host-{time.time_ns()}")
    if args.host_id:
        client.set_will(
            psp.Message(
                topic=psp.Topic(message_type=psp.MessageType.STATE, sparkplug_host_id=args.host_id),
                payload=psp.State(timestamp=psp.get_current_timestamp(), online=False),
                qos=psp.QoS.AT_LEAST_ONCE,
                retain=True,
            )
        )

    subscribed = threading.Event()

    raw_by_id = {}

    def wrap(callback_topic):
        def callback(_client, message):
            try:
                raw = raw_by_id.pop(id(message), None)
                emit(describe(message, raw if raw is not None else b""))
            except Exception as error:  # noqa: BLE001 - report, keep running
                emit({"event": "error", "text": f"{type(error).__name__}: {error}"})

        return callback

    # Keep the raw payload of each message for the property sets pysparkplug drops.
    original = client._handle_message

    def handle(mqtt_message):
        try:
            message = original(mqtt_message)
        except Exception as error:  # noqa: BLE001
            emit({"event": "error", "text": f"decode {mqtt_message.topic}: {type(error).__name__}: {error}"})
            raise
        raw_by_id[id(message)] = bytes(mqtt_message.payload)
        return message

    client._handle_message = handle

    def on_connect(_client):
        subscribed.set()

    for kind in (psp.MessageType.NBIRTH, psp.MessageType.NDEATH, psp.MessageType.NDATA):
        topic = psp.Topic(group_id=args.group, message_type=kind, edge_node_id=psp.SINGLE_LEVEL_WILDCARD)
        client.subscribe(topic, psp.QoS.AT_LEAST_ONCE, wrap(topic))
    for kind in (psp.MessageType.DBIRTH, psp.MessageType.DDEATH, psp.MessageType.DDATA):
        topic = psp.Topic(
            group_id=args.group,
            message_type=kind,
            edge_node_id=psp.SINGLE_LEVEL_WILDCARD,
            device_id=psp.SINGLE_LEVEL_WILDCARD,
        )
        client.subscribe(topic, psp.QoS.AT_LEAST_ONCE, wrap(topic))

    client.connect("127.0.0.1", port=args.port, blocking=False, callback=on_connect)
    if not subscribed.wait(10):
        emit({"event": "error", "text": "no connection to the broker"})
        return 1
    # The SUBACKs: a round trip after the subscribes (paho sends in order).
    time.sleep(0.2)
    emit({"event": "ready"})

    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            command = json.loads(line)
            op = command["op"]
            if op == "state":
                client.publish(
                    psp.Message(
                        topic=psp.Topic(message_type=psp.MessageType.STATE, sparkplug_host_id=args.host_id),
                        payload=psp.State(timestamp=psp.get_current_timestamp(), online=bool(command["online"])),
                        qos=psp.QoS.AT_LEAST_ONCE,
                        retain=True,
                    )
                )
            elif op == "rebirth":
                metric = psp.Metric(
                    timestamp=psp.get_current_timestamp(),
                    name="Node Control/Rebirth",
                    datatype=psp.DataType.BOOLEAN,
                    value=True,
                )
                client.publish(
                    psp.Message(
                        topic=psp.Topic(group_id=args.group, message_type=psp.MessageType.NCMD, edge_node_id=command["node"]),
                        payload=psp.NCmd(timestamp=psp.get_current_timestamp(), metrics=(metric,)),
                        qos=psp.QoS.AT_MOST_ONCE,
                        retain=False,
                    ),
                    include_dtypes=True,
                )
            elif op == "dcmd":
                # One metric, or several: "metrics": [{"metric":..,"datatype":..,"value":..}]
                metrics = tuple(
                    psp.Metric(
                        timestamp=psp.get_current_timestamp(),
                        name=spec["metric"],
                        datatype=psp.DataType[spec["datatype"]],
                        value=spec["value"],
                    )
                    for spec in command.get("metrics", [command])
                )
                client.publish(
                    psp.Message(
                        topic=psp.Topic(
                            group_id=args.group,
                            message_type=psp.MessageType.DCMD,
                            edge_node_id=command["node"],
                            device_id=command["device"],
                        ),
                        payload=psp.DCmd(timestamp=psp.get_current_timestamp(), metrics=metrics),
                        qos=psp.QoS.AT_MOST_ONCE,
                        retain=False,
                    ),
                    include_dtypes=True,
                )
            else:
                emit({"event": "error", "text": f"unknown op {op}"})
                continue
            emit({"event": "sent", "op": op})
        except Exception as error:  # noqa: BLE001
            emit({"event": "error", "text": f"command {line}: {type(error).__name__}: {error}"})
    client.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
