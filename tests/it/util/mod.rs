//! The harness every test module shares.
//!
//! - [`gateway`]: the real `fieldmq` binary as a child process (config in a temp dir,
//!   readiness from its log, SIGTERM/SIGKILL/SIGSTOP);
//! - [`http`]: a raw HTTP/1.1 client for the gateway's HTTP listener;
//! - [`modbus`]: a tokio-modbus TCP server on loopback for a test device;
//! - [`mqtt`]: the broker in-process, rumqttc clients of both versions, raw MQTT bytes;
//! - [`cloud`]: Mosquitto on loopback as the cloud broker;
//! - [`pki`]: one certificate authority builder (rcgen) for servers and clients;
//! - [`proxy`]: an MQTT-aware TCP proxy that cuts, holds back and refuses;
//! - [`skip`]: skipping what this machine lacks, never under CI;
//! - [`v5`]: an MQTT 5 client that keeps what it received.

pub(crate) mod cloud;
pub(crate) mod gateway;
pub(crate) mod http;
pub(crate) mod modbus;
pub(crate) mod mqtt;
pub(crate) mod pki;
pub(crate) mod proxy;
pub(crate) mod skip;
pub(crate) mod v5;

/// A free TCP port on 127.0.0.1 (bound and released; the small race with another process
/// taking it meanwhile is acceptable in tests).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("free port")
}
