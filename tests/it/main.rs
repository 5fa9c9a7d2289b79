//! The integration tests: one binary, one module per part of the product, and the shared
//! harness in [`util`] (the real `fieldmq` binary as a child process, an in-process broker,
//! Mosquitto as the cloud, certificates, MQTT clients and a shaping proxy).
//!
//! Run one module with `cargo test --test it uplink::`.

mod util;

mod acl;
mod backup;
mod broker;
mod broker_tls;
mod check;
mod cli;
mod config;
mod deploy;
mod diagnostics;
mod durability;
mod fault_injection;
mod full_disk;
mod gateway;
mod hardening;
mod homeassistant;
mod http;
mod idle_memory;
mod listener_limits;
mod metrics;
mod modbus;
mod modbus_server;
mod mqtt5;
mod mqttjs;
mod payloads;
mod protocol_strict;
mod reload;
mod retained;
mod serial;
mod sparkplug;
mod status;
mod sunspec;
mod tools;
mod uplink;
mod writes;
