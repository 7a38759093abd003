//! The edge's listener and its connections: a listen backlog, a cap on open
//! connections, a deadline on request headers (counted from accept for a
//! connection's first request; it also closes idle keep-alive connections), TCP_NODELAY on every socket, and the descriptor
//! limit raised at startup.
//!
//! At the cap, a new connection takes the place of the oldest connection
//! that has not yet sent a whole request (a slow or silent client), so slow
//! clients holding every place cannot lock out the ones that send requests
//! at once. When every place holds a connection that has, the new one is
//! answered 503 and closed at once: it never hangs.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::observe::outage::Outage;

/// Descriptors kept back from connections for backends, plugin files and logs.
const RESERVED_DESCRIPTORS: u64 = 256;
/// How long a new connection waits for the place of an evicted one.
const EVICTION_WAIT: Duration = Duration::from_millis(100);

/// What bounds the edge's connections.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Holds a connection's place under the cap. Requests carry it in their
/// extensions, so an upgraded WebSocket keeps its place for as long as it is open.
#[derive(Clone)]
pub struct ConnectionSlot {
    _permit: Arc<OwnedSemaphorePermit>,
}

/// Connections that may not have sent a whole request yet, oldest first.
struct Waiting {
    queue: Mutex<VecDeque<Arc<Newcomer>>>,
    /// Past this length, entries no longer waiting are swept out.
    sweep_at: usize,
}

/// One connection until its first request is in (or it ends).
struct Newcomer {
    /// Set once its first request's headers are in, or it has closed:
    /// from then on it is not evicted.
    settled: AtomicBool,
    evict: CancellationToken,
}

impl Newcomer {
    fn settled(&self) -> bool {
        self.settled.load(Ordering::Relaxed)
    }
}

impl Waiting {
    fn new(max_connections: usize) -> Self {
        Self {
            queue: Mutex::default(),
            sweep_at: max_connections.saturating_mul(2).max(64),
        }
    }

    fn push(&self, newcomer: Arc<Newcomer>) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        while queue.front().is_some_and(|n| n.settled()) {
            queue.pop_front();
        }
        // Rarely, so an accept costs O(1) on average.
        if queue.len() >= self.sweep_at {
            queue.retain(|n| !n.settled());
        }
        queue.push_back(newcomer);
    }

    /// Closes the oldest connection still waiting for its first request;
    /// false when there is none.
    fn evict_oldest(&self) -> bool {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(oldest) = queue.pop_front() {
            if !oldest.settled() {
                oldest.evict.cancel();
                return true;
            }
        }
        false
    }
}

/// Binds `addr` with a listen backlog of `backlog` connections.
pub fn bind(addr: SocketAddr, backlog: std::num::NonZeroU32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog.get())
}

/// Raises the soft limit on open descriptors to the hard limit; returns the
/// limit in force.
pub fn raise_descriptor_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(err) => {
            tracing::warn!(%err, "cannot raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    }
}

/// The connection cap for `descriptors` open files when none is configured.
pub fn default_max_connections(descriptors: u64) -> usize {
    usize::try_from(descriptors.saturating_sub(RESERVED_DESCRIPTORS).max(64)).unwrap_or(usize::MAX)
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops
/// accepting and waits up to `grace` for open connections to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send,
    grace: Duration,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header_timeout);
    let accept_failures = Outage::default();
    let waiting = Waiting::new(limits.max_connections);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if accept_failures.succeeded().is_some() {
                        tracing::info!("accepting connections again");
                    }
                    stream
                }
                Err(err) => {
                    // Out of descriptors: wait for some to be freed instead of spinning.
                    if accept_failures.failed().is_some() {
                        tracing::error!(%err, "cannot accept connections");
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            // Full: take the place of the oldest connection still silent.
            Err(_) if waiting.evict_oldest() => {
                match tokio::time::timeout(EVICTION_WAIT, slots.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        refuse(stream);
                        continue;
                    }
                }
            }
            Err(_) => {
                refuse(stream);
                continue;
            }
        };
        let slot = ConnectionSlot {
            _permit: Arc::new(permit),
        };
        let newcomer = Arc::new(Newcomer {
            settled: AtomicBool::new(false),
            evict: CancellationToken::new(),
        });
        waiting.push(newcomer.clone());
        let first_request = newcomer.clone();
        let service = router.clone().map_request(move |mut request: Request<_>| {
            first_request.settled.store(true, Ordering::Relaxed);
            request.extensions_mut().insert(slot.clone());
            request.map(axum::body::Body::new)
        });
        let service = TowerToHyperService::new(service);
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            // hyper's header deadline starts at a request's first byte; a
            // connection that never sends one is closed at the same deadline
            // counted from accept, as nginx's client_header_timeout does.
            let silent = async {
                tokio::time::sleep(header_timeout).await;
                if newcomer.settled() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = connection => {}
                // Dropping the connection closes its socket and frees its place.
                () = newcomer.evict.cancelled() => {}
                () = silent => {}
            }
            newcomer.settled.store(true, Ordering::Relaxed);
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; closing remaining connections");
    }
}

/// Answers a connection over the cap with a 503 in the OpenAI shape and
/// closes it, without waiting for its request.
fn refuse(stream: TcpStream) {
    const BODY: &str = r#"{"error":{"message":"the gateway is at its connection limit; retry shortly","type":"ServiceUnavailableError","param":null,"code":503}}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    // A fresh socket's send buffer takes this whole; if not, closing is enough.
    let _ = stream.try_write(response.as_bytes());
    tracing::debug!("connection refused: at the connection limit");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn newcomer() -> Arc<Newcomer> {
        Arc::new(Newcomer {
            settled: AtomicBool::new(false),
            evict: CancellationToken::new(),
        })
    }

    #[test]
    fn only_connections_still_waiting_are_evicted_oldest_first() {
        let waiting = Waiting::new(2);
        let (closed, silent, served) = (newcomer(), newcomer(), newcomer());
        for n in [&closed, &silent, &served] {
            waiting.push(n.clone());
        }
        closed.settled.store(true, Ordering::Relaxed);
        served.settled.store(true, Ordering::Relaxed);
        assert!(waiting.evict_oldest());
        assert!(silent.evict.is_cancelled() && !closed.evict.is_cancelled());
        assert!(!waiting.evict_oldest(), "nothing left waiting");
        assert!(!served.evict.is_cancelled());
    }

    #[test]
    fn settled_connections_do_not_pile_up() {
        let waiting = Waiting::new(32);
        let silent = newcomer();
        waiting.push(silent.clone());
        for _ in 0..10_000 {
            let n = newcomer();
            waiting.push(n.clone());
            n.settled.store(true, Ordering::Relaxed);
        }
        let len = waiting.queue.lock().unwrap().len();
        assert!(len <= waiting.sweep_at + 1, "{len}");
    }
}
