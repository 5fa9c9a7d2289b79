//! `GET /metrics`: the registry as OpenMetrics text. The broker's counters and the reload
//! history are read at scrape time, so nothing on the broker's hot path counts twice.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::HttpContext;
use crate::broker::BrokerStats;
use crate::metrics::{BrokerSnapshot, CONTENT_TYPE};

/// The longest a scrape waits for the broker's router; past it the broker's families are
/// those of the last scrape.
const BROKER_STATS_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) fn routes(context: HttpContext) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(context)
}

async fn metrics(State(context): State<HttpContext>) -> Response {
    match tokio::time::timeout(BROKER_STATS_TIMEOUT, context.broker.stats()).await {
        Ok(Ok(stats)) => context.metrics.set_broker(snapshot(&stats)),
        Ok(Err(error)) => tracing::debug!(%error, "metrics: no broker statistics"),
        Err(_) => tracing::warn!("metrics: the broker router did not answer in time"),
    }
    let reloads = context.reloader.history();
    context
        .metrics
        .set_reloads(reloads.succeeded, reloads.failed);
    match context.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response(),
    }
}

fn snapshot(stats: &BrokerStats) -> BrokerSnapshot {
    BrokerSnapshot {
        clients_connected: stats.clients_connected as u64,
        sessions: stats.sessions as u64,
        subscriptions: stats.subscriptions as u64,
        retained: stats.retained as u64,
        messages_received: stats.messages_received,
        messages_sent: stats.messages_sent,
        messages_dropped: stats.messages_dropped,
        publishes_denied: stats.publishes_denied,
        slow_clients_disconnected: stats.slow_clients_disconnected,
        messages_queued: stats.messages_queued,
        bytes_received: stats.bytes_received,
        bytes_sent: stats.bytes_sent,
        store_bytes: stats.store_bytes,
    }
}
