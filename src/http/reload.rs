//! `POST /api/v1/reload`: asks the service to apply the configuration file again and
//! answers with its report.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

use crate::reload::{ReloadError, Reloader};

pub(super) fn routes(reloader: Reloader) -> Router {
    Router::new()
        .route("/api/v1/reload", post(reload))
        .with_state(reloader)
}

/// 200 with the report when applied, 422 when the file was refused, 503 when the gateway
/// is stopping or too many reloads wait.
async fn reload(State(reloader): State<Reloader>) -> Response {
    match reloader.reload().await {
        Ok(report) if report.applied => (StatusCode::OK, Json(report)).into_response(),
        Ok(report) => (StatusCode::UNPROCESSABLE_ENTITY, Json(report)).into_response(),
        Err(error @ (ReloadError::Stopping | ReloadError::Busy)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": error.to_string() })),
        )
            .into_response(),
    }
}
