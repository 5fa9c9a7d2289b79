//! The operator's command line: its definition ([`args`]), the log set-up ([`logging`]), the
//! password prompt of `fieldmq passwd` ([`passwd`]), and small MQTT tools built into the
//! binary so a bare machine can watch and poke the broker (`fieldmq sub` and `fieldmq pub`,
//! ordinary MQTT clients on rumqttc).

pub mod args;
pub mod logging;
pub mod passwd;

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot connect to {host}:{port}: {reason}")]
    Connect {
        host: String,
        port: u16,
        reason: String,
    },
    #[error("the broker refused the connection: {0:?}")]
    Refused(rumqttc::ConnectReturnCode),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("invalid QoS {0}, expected 0, 1 or 2")]
    BadQos(u8),
    #[error("{0}")]
    Client(#[from] rumqttc::ClientError),
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub client_id: String,
}

fn qos(value: u8) -> Result<QoS, ToolError> {
    rumqttc::qos(value).map_err(|_| ToolError::BadQos(value))
}

fn options(endpoint: &Endpoint) -> MqttOptions {
    let mut options = MqttOptions::new(&endpoint.client_id, &endpoint.host, endpoint.port);
    options.set_keep_alive(Duration::from_secs(30));
    if let Some(user) = &endpoint.username {
        options.set_credentials(user, endpoint.password.clone().unwrap_or_default());
    }
    options
}

fn connect_error(endpoint: &Endpoint, error: rumqttc::ConnectionError) -> ToolError {
    match error {
        rumqttc::ConnectionError::ConnectionRefused(code) => ToolError::Refused(code),
        other => ToolError::Connect {
            host: endpoint.host.clone(),
            port: endpoint.port,
            reason: other.to_string(),
        },
    }
}

/// Subscribe and print `topic payload` lines until `count` messages (if given) have
/// arrived or `timeout` (if given) has passed.
pub async fn subscribe(
    endpoint: &Endpoint,
    filters: &[String],
    qos_level: u8,
    count: Option<u64>,
    timeout: Option<Duration>,
    mut out: impl std::io::Write,
) -> Result<u64, ToolError> {
    let qos = qos(qos_level)?;
    let (client, mut eventloop) = AsyncClient::new(options(endpoint), 64);
    // One SUBSCRIBE for all filters: a retained message that arrives means every filter
    // is in place.
    client
        .subscribe_many(
            filters
                .iter()
                .map(|filter| rumqttc::SubscribeFilter::new(filter.clone(), qos)),
        )
        .await?;
    let mut received = 0u64;
    let run = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let payload = String::from_utf8_lossy(&publish.payload);
                    let _ = writeln!(out, "{} {}", publish.topic, payload);
                    let _ = out.flush();
                    received += 1;
                    if count.is_some_and(|c| received >= c) {
                        return Ok(());
                    }
                }
                Ok(_) => {}
                Err(error) => return Err(connect_error(endpoint, error)),
            }
        }
    };
    match timeout {
        Some(limit) => tokio::time::timeout(limit, run)
            .await
            .map_err(|_| ToolError::Timeout(limit))??,
        None => run.await?,
    }
    disconnect(&client, &mut eventloop).await;
    Ok(received)
}

/// Send DISCONNECT and drive the event loop until it is out (bounded).
async fn disconnect(client: &AsyncClient, eventloop: &mut rumqttc::EventLoop) {
    if client.disconnect().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// Publish one message and wait until the broker has it (PUBACK/PUBCOMP for QoS 1/2).
pub async fn publish(
    endpoint: &Endpoint,
    topic: &str,
    payload: &[u8],
    qos_level: u8,
    retain: bool,
    timeout: Duration,
) -> Result<(), ToolError> {
    let qos = qos(qos_level)?;
    let (client, mut eventloop) = AsyncClient::new(options(endpoint), 8);
    client.publish(topic, qos, retain, payload.to_vec()).await?;
    client.disconnect().await?;
    let run = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => {}
                Err(error) => return Err(connect_error(endpoint, error)),
            }
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| ToolError::Timeout(timeout))?
}
