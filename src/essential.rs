//! Tasks the gateway cannot run without: the broker's router and store thread, its
//! listeners, the uplinks' outbox threads and tasks. A panic in one of them would leave a
//! process that listens and serves nothing (every client refused, every message held) until
//! a watchdog notices. Instead it ends the process at once with [`PANIC_EXIT_CODE`], and the
//! service manager starts it again (`Restart=on-failure`).
//!
//! A panic in a task that serves one client or one device is not essential: tokio ends
//! only that task.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;

/// Exit status after a panic in an essential task (`EX_SOFTWARE`).
pub const PANIC_EXIT_CODE: i32 = 70;

/// Spawn an essential task: a panic in it ends the process.
pub(crate) fn spawn<F>(name: &'static str, future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(guard(name, future))
}

/// `future`, made essential: a panic in it ends the process (for a `JoinSet`).
pub(crate) async fn guard<F: Future>(name: &'static str, future: F) -> F::Output {
    match AssertUnwindSafe(future).catch_unwind().await {
        Ok(output) => output,
        Err(panic) => exit_after_panic(name, panic.as_ref()),
    }
}

/// Start an essential thread: a panic in it ends the process.
pub(crate) fn thread<F, T>(name: &str, body: F) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let task = name.to_owned();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(
            move || match std::panic::catch_unwind(AssertUnwindSafe(body)) {
                Ok(output) => output,
                Err(panic) => exit_after_panic(&task, panic.as_ref()),
            },
        )
}

fn exit_after_panic(task: &str, panic: &(dyn Any + Send)) -> ! {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    tracing::error!(
        task,
        panic = %message,
        exit_code = PANIC_EXIT_CODE,
        "an essential task panicked; exiting so that the service manager starts the gateway again"
    );
    std::process::exit(PANIC_EXIT_CODE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the child process: which essential kind to make panic.
    const CHILD: &str = "FIELDMQ_ESSENTIAL_PANIC_CHILD";

    /// Runs this very test again in a child process that makes an essential task (or
    /// thread) panic, and asserts how the child ended.
    fn child_exit_status(kind: &str, test_name: &str) -> std::process::ExitStatus {
        let exe = std::env::current_exe().expect("test binary");
        let output = std::process::Command::new(exe)
            .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, kind)
            .output()
            .expect("run the child");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("boom in an essential"),
            "the child panicked with our message: {stderr}"
        );
        output.status
    }

    #[test]
    fn a_panic_in_an_essential_task_ends_the_process_with_its_exit_code() {
        if std::env::var(CHILD).as_deref() == Ok("task") {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            runtime.block_on(async {
                let task = spawn("test-task", async { panic!("boom in an essential task") });
                let _ = task.await;
                // Not reached when the panic ended the process.
                std::process::exit(0);
            });
        }
        let status = child_exit_status(
            "task",
            "essential::tests::a_panic_in_an_essential_task_ends_the_process_with_its_exit_code",
        );
        assert_eq!(status.code(), Some(PANIC_EXIT_CODE));
    }

    #[test]
    fn a_panic_in_an_essential_thread_ends_the_process_with_its_exit_code() {
        if std::env::var(CHILD).as_deref() == Ok("thread") {
            let thread =
                thread("test-thread", || panic!("boom in an essential thread")).expect("thread");
            let _ = thread.join();
            std::process::exit(0);
        }
        let status = child_exit_status(
            "thread",
            "essential::tests::a_panic_in_an_essential_thread_ends_the_process_with_its_exit_code",
        );
        assert_eq!(status.code(), Some(PANIC_EXIT_CODE));
    }

    #[tokio::test]
    async fn an_essential_task_that_ends_normally_returns_its_output() {
        assert_eq!(spawn("test-ok", async { 42 }).await.expect("joined"), 42);
    }
}
