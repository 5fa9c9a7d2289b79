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

/// A device of holding registers for any unit id, with two switches: reads that reach
/// `refuse_from` answer "illegal data address", and a `mute` device answers nothing (the
/// client times out).
#[derive(Debug, Default)]
pub(crate) struct Registers {
    pub(crate) holding: std::collections::HashMap<u16, u16>,
    pub(crate) refuse_from: Option<u16>,
    pub(crate) mute: bool,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct RegisterDevice(pub(crate) std::sync::Arc<std::sync::Mutex<Registers>>);

impl RegisterDevice {
    pub(crate) fn with(registers: &[(u16, u16)]) -> RegisterDevice {
        let device = RegisterDevice::default();
        device.set(|r| r.holding.extend(registers.iter().copied()));
        device
    }

    pub(crate) fn set(&self, change: impl FnOnce(&mut Registers)) {
        change(&mut self.0.lock().expect("device state"));
    }
}

impl tokio_modbus::server::Service for RegisterDevice {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn call(&self, request: Self::Request) -> Self::Future {
        let registers = self.0.lock().expect("device state");
        let answer = match request.request {
            _ if registers.mute => Ok(None),
            tokio_modbus::Request::ReadHoldingRegisters(start, count) => {
                let end = u32::from(start) + u32::from(count);
                match registers.refuse_from {
                    Some(from) if end > u32::from(from) => Err(ExceptionCode::IllegalDataAddress),
                    _ => Ok(Some(Response::ReadHoldingRegisters(
                        (start..start + count)
                            .map(|a| registers.holding.get(&a).copied().unwrap_or(0))
                            .collect(),
                    ))),
                }
            }
            _ => Err(ExceptionCode::IllegalFunction),
        };
        Box::pin(std::future::ready(answer))
    }
}

/// A test device served on 127.0.0.1 by a runtime of its own, for tests that run the
/// gateway as a child process; it stops when dropped.
pub(crate) struct BackgroundDevice {
    pub(crate) addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl BackgroundDevice {
    pub(crate) fn start(device: RegisterDevice) -> BackgroundDevice {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the test device");
        let (addr, _task) = runtime.block_on(serve_tcp(device, ([127, 0, 0, 1], 0).into()));
        BackgroundDevice {
            addr,
            _runtime: runtime,
        }
    }
}

/// A small SunSpec inverter's holding registers, every register of the chain present:
/// `SunS` at 40000, model 103 at 40002 (W = 1500 W at 40016 with W_SF = 0, Hz = 50.01 at
/// 40018 with Hz_SF = -2), model 123 at 40054 (WMaxLimPct = 100.0 % at 40059 with
/// WMaxLimPct_SF = -1 at 40077), and the end marker at 40080.
pub(crate) fn sunspec_inverter_registers() -> Vec<(u16, u16)> {
    let mut registers: Vec<(u16, u16)> = (40000..=40081).map(|a| (a, 0)).collect();
    for (address, value) in [
        (40000, 0x5375),
        (40001, 0x6E53),
        (40002, 103),
        (40003, 50),
        (40004 + 12, 1500),
        (40004 + 14, 5001),
        (40004 + 15, 0xFFFE),
        (40054, 123),
        (40055, 24),
        (40056 + 3, 1000),
        (40056 + 21, 0xFFFF),
        (40080, 0xFFFF),
    ] {
        registers[usize::from(address - 40000)] = (address, value);
    }
    registers
}
