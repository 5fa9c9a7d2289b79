//! `GET /metrics`: the registry as OpenMetrics text (or the Prometheus text format for a
//! client that does not ask for OpenMetrics in `Accept`). The broker's counters and the reload
//! history are read at scrape time, so nothing on the broker's hot path counts twice.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::HttpContext;
use crate::broker::{BrokerStats, ListenerSnapshot};
use crate::metrics::{BrokerSnapshot, Format, HistogramSample, ListenerSample};

/// The longest a scrape waits for the broker's router; past it the broker's families are
/// those of the last scrape.
const BROKER_STATS_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) fn routes(context: HttpContext) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(context)
}

async fn metrics(State(context): State<HttpContext>, headers: HeaderMap) -> Response {
    let format = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .map(Format::from_accept)
        .unwrap_or(Format::PrometheusText);
    match tokio::time::timeout(BROKER_STATS_TIMEOUT, context.broker.stats()).await {
        Ok(Ok(stats)) => context
            .metrics
            .set_broker(snapshot(&stats, &context.listeners.snapshot())),
        Ok(Err(error)) => tracing::debug!(%error, "metrics: no broker statistics"),
        Err(_) => tracing::warn!("metrics: the broker router did not answer in time"),
    }
    let reloads = context.reloader.history();
    context
        .metrics
        .set_reloads(reloads.succeeded, reloads.failed);
    match context.metrics.encode(format) {
        Ok(text) => ([(header::CONTENT_TYPE, format.content_type())], text).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response(),
    }
}

fn snapshot(stats: &BrokerStats, listeners: &[ListenerSnapshot]) -> BrokerSnapshot {
    BrokerSnapshot {
        listeners: listeners
            .iter()
            .map(|l| ListenerSample {
                url: l.url.clone(),
                connections: l.connections,
                handshakes: l.handshakes,
                accepted: l.accepted,
                refused_over_handshakes: l.refused_over_handshakes,
                refused_over_address: l.refused_over_address,
                failed_handshakes: l.failed_handshakes,
            })
            .collect(),
        clients_connected: stats.clients_connected as u64,
        sessions: stats.sessions as u64,
        subscriptions: stats.subscriptions as u64,
        retained: stats.retained as u64,
        messages_received: stats.messages_received,
        messages_received_by_qos: stats.messages_received_by_qos,
        payload_bytes_received_by_qos: stats.payload_bytes_received_by_qos,
        messages_sent_by_qos: stats.messages_sent_by_qos,
        payload_bytes_sent_by_qos: stats.payload_bytes_sent_by_qos,
        messages_dropped: stats.messages_dropped,
        publishes_denied: stats.publishes_denied,
        slow_clients_disconnected: stats.slow_clients_disconnected,
        messages_queued: stats.messages_queued,
        bytes_queued: stats.bytes_queued,
        bytes_received: stats.bytes_received,
        bytes_sent: stats.bytes_sent,
        store_bytes: stats.store_bytes,
        // No commit yet (or no store file): no histogram rather than an empty one.
        store_commits: (!stats.store_commits.buckets.is_empty()).then(|| HistogramSample {
            buckets: stats
                .store_commits
                .buckets
                .iter()
                .map(|(bound_us, count)| (*bound_us as f64 / 1e6, *count))
                .collect(),
            count: stats.store_commits.count,
            sum: stats.store_commits.sum_us as f64 / 1e6,
        }),
    }
}
