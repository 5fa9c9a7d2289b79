//! A per-listener budget for log lines about sockets that never became MQTT connections
//! (failed TLS or WebSocket handshakes, sockets refused by a limit). A scanner or a
//! misconfigured client can cause thousands of them a minute; the journal gets at most
//! [`LINES_PER_WINDOW`] lines per [`WINDOW`] and listener, and the first line of the next
//! window says how many were left out.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Lines allowed per window and listener.
pub(crate) const LINES_PER_WINDOW: u32 = 10;
/// The window.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub(crate) struct LogLimit {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    window_start: Instant,
    lines: u32,
    suppressed: u64,
}

impl LogLimit {
    pub(crate) fn new() -> LogLimit {
        LogLimit {
            state: Mutex::new(State {
                window_start: Instant::now(),
                lines: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being the lines left out since the last
    /// one logged; `None` when this one is to be left out (it is counted).
    pub(crate) fn allow(&self) -> Option<u64> {
        let Ok(mut state) = self.state.lock() else {
            // A panic while holding this lock cannot leave it inconsistent; log anyway.
            return Some(0);
        };
        let now = Instant::now();
        if now.duration_since(state.window_start) >= WINDOW {
            state.window_start = now;
            state.lines = 0;
        }
        if state.lines < LINES_PER_WINDOW {
            state.lines += 1;
            Some(std::mem::take(&mut state.suppressed))
        } else {
            state.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn at_most_the_budget_per_window_and_the_next_line_counts_what_was_left_out() {
        let limit = LogLimit::new();
        for _ in 0..LINES_PER_WINDOW {
            assert_eq!(limit.allow(), Some(0));
        }
        for _ in 0..25 {
            assert_eq!(limit.allow(), None);
        }
        tokio::time::advance(WINDOW / 2).await;
        assert_eq!(limit.allow(), None, "still the same window");
        tokio::time::advance(WINDOW / 2).await;
        assert_eq!(
            limit.allow(),
            Some(26),
            "the next window reports the 26 left out"
        );
        assert_eq!(limit.allow(), Some(0));
    }
}
