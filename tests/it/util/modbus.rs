//! A tokio-modbus TCP server on loopback for any test device: the device is a
//! `tokio_modbus::server::Service`, cloned for every connection.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_modbus::{ExceptionCode, Response, SlaveRequest};

/// What a test device answers with.
pub(crate) type Answer = Result<Option<Response>, ExceptionCode>;

/// Serve `device` on `addr` (port 0 for a free one) until the task is aborted; returns the
/// bound address and the server task.
pub(crate) async fn serve_tcp<D>(device: D, addr: SocketAddr) -> (SocketAddr, JoinHandle<()>)
where
    D: tokio_modbus::server::Service<
            Request = SlaveRequest<'static>,
            Response = Option<Response>,
            Exception = ExceptionCode,
            Future = Pin<Box<dyn Future<Output = Answer> + Send>>,
        > + Clone
        + Send
        + Sync
        + 'static,
{
    let listener = TcpListener::bind(addr)
        .await
        .expect("bind the Modbus test device");
    let addr = listener.local_addr().expect("local address");
    let server = tokio_modbus::server::tcp::Server::new(listener);
    let task = tokio::spawn(async move {
        let on_connected = move |stream, _peer| {
            let service = device.clone();
            async move { Ok(Some((service, stream))) }
        };
        let _ = server.serve(&on_connected, |_error| {}).await;
    });
    (addr, task)
}
