//! One task per listener: accept, cap the number of connections, and hand each socket to
//! its own connection task. Nothing slow happens in the accept loop.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::connection::{self, Settings};
use super::BrokerHandle;
use crate::config::ListenerConfig;

pub(crate) async fn run(
    socket: TcpListener,
    config: ListenerConfig,
    settings: Arc<Settings>,
    broker: BrokerHandle,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = socket.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        // Out of file descriptors and the like: wait a little instead of
                        // spinning on the same error.
                        tracing::warn!(listener = %config.bind, %error, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let permit = permits.clone().try_acquire_owned().ok();
                let settings = settings.clone();
                let router = broker.router.clone();
                let shutdown = shutdown.clone();
                connections.spawn(async move {
                    let over_quota = permit.is_none();
                    connection::serve(stream, peer, settings, router, shutdown, over_quota).await;
                    drop(permit);
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Connections see the same token and close themselves; wait for them.
    while connections.join_next().await.is_some() {}
}
