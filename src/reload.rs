//! A request to apply the configuration file again, and what came of it. Shared by the
//! triggers (SIGHUP, `fieldmq reload` through the control socket, `POST /api/v1/reload`)
//! and by the service that applies it, so that none of them depends on the others.
//!
//! The service owns the one receiver and applies requests one at a time; every trigger
//! holds a [`Reloader`] and waits for the [`ReloadReport`].

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// How many reload requests may wait while one is being applied.
const PENDING_REQUESTS: usize = 8;

/// What one reload did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReloadReport {
    /// True when the new file was valid and applied (possibly with nothing to change).
    pub applied: bool,
    /// One line per change made: "device boiler: restarted", "listener 0.0.0.0:8883: added".
    pub changes: Vec<String>,
    /// Why nothing was changed: every error found in the file, or the keys that cannot
    /// change while the gateway runs.
    pub errors: Vec<String>,
    /// When the reload finished, in seconds since the Unix epoch.
    pub finished_at: u64,
}

impl ReloadReport {
    /// A reload that applied `changes`.
    pub fn applied(changes: Vec<String>) -> Self {
        Self {
            applied: true,
            changes,
            errors: Vec::new(),
            finished_at: unix_now(),
        }
    }

    /// A reload that changed nothing because of `errors`.
    pub fn refused(errors: Vec<String>) -> Self {
        Self {
            applied: false,
            changes: Vec::new(),
            errors,
            finished_at: unix_now(),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Counts and the last outcome, for the status API and the metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadHistory {
    pub succeeded: u64,
    pub failed: u64,
    pub last: Option<ReloadReport>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReloadError {
    #[error("the gateway is stopping")]
    Stopping,
    #[error("too many reloads are waiting; try again")]
    Busy,
}

/// One request: the service answers it with [`ReloadRequest::answer`].
#[derive(Debug)]
pub struct ReloadRequest {
    reply: oneshot::Sender<ReloadReport>,
    history: Arc<Mutex<ReloadHistory>>,
}

impl ReloadRequest {
    /// Record the outcome and send it to whoever asked (who may have gone: that is fine).
    pub fn answer(self, report: ReloadReport) {
        if let Ok(mut history) = self.history.lock() {
            if report.applied {
                history.succeeded += 1;
            } else {
                history.failed += 1;
            }
            history.last = Some(report.clone());
        }
        let _ = self.reply.send(report);
    }
}

/// The triggers' side: cheap to clone.
#[derive(Debug, Clone)]
pub struct Reloader {
    requests: mpsc::Sender<ReloadRequest>,
    history: Arc<Mutex<ReloadHistory>>,
}

impl Reloader {
    /// A reloader and the receiver the service applies requests from.
    pub fn new() -> (Self, mpsc::Receiver<ReloadRequest>) {
        let (requests, receiver) = mpsc::channel(PENDING_REQUESTS);
        let reloader = Self {
            requests,
            history: Arc::default(),
        };
        (reloader, receiver)
    }

    /// Ask for a reload and wait for its report.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let (reply, answer) = oneshot::channel();
        let request = ReloadRequest {
            reply,
            history: self.history.clone(),
        };
        self.requests
            .try_send(request)
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => ReloadError::Busy,
                mpsc::error::TrySendError::Closed(_) => ReloadError::Stopping,
            })?;
        answer.await.map_err(|_| ReloadError::Stopping)
    }

    /// Reloads so far and the last outcome.
    pub fn history(&self) -> ReloadHistory {
        self.history
            .lock()
            .map(|history| history.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answered_request_is_counted_and_returned() {
        let (reloader, mut requests) = Reloader::new();
        let service = tokio::spawn(async move {
            let first = requests.recv().await.expect("first request");
            first.answer(ReloadReport::refused(vec!["line 3: bad".into()]));
            let second = requests.recv().await.expect("second request");
            second.answer(ReloadReport::applied(vec!["device a: added".into()]));
        });
        let refused = reloader.reload().await.expect("answered");
        assert!(!refused.applied);
        assert_eq!(refused.errors, vec!["line 3: bad".to_owned()]);
        let applied = reloader.reload().await.expect("answered");
        assert!(applied.applied);
        service.await.expect("service task");
        let history = reloader.history();
        assert_eq!((history.succeeded, history.failed), (1, 1));
        assert_eq!(history.last, Some(applied));
    }

    #[tokio::test]
    async fn a_gone_service_means_stopping() {
        let (reloader, requests) = Reloader::new();
        drop(requests);
        assert_eq!(reloader.reload().await, Err(ReloadError::Stopping));
    }
}
