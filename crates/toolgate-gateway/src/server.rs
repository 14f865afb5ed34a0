//! Listeners: HTTP/1.1 and HTTP/2 (auto-detected), optional TLS, graceful drain on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower::{ServiceBuilder, ServiceExt};

use crate::answer::{json_response, Body, BoxError};
use crate::conn_io::{Counted, Exchanges, HeadDeadline, IdleIo};
use crate::Gateway;

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEAD_BACKSTOP_SECONDS: u64 = 5;

/// Tells the listeners to stop accepting and drain.
#[derive(Clone)]
pub struct Shutdown(Arc<watch::Sender<bool>>);

impl Shutdown {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

/// A started gateway.
pub struct Running {
    pub agent_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shutdown: Shutdown,
    listeners: Vec<JoinHandle<()>>,
    _watch: Option<crate::watch::FileWatch>,
}

impl Running {
    /// Waits until both listeners have stopped and drained.
    pub async fn wait(self) {
        for listener in self.listeners {
            let _ = listener.await;
        }
    }
}

impl Gateway {
    /// Binds both listeners and serves until `Running::shutdown` is triggered.
    #[allow(clippy::too_many_lines)] // start-up, not the request path
    pub async fn start(self: &Arc<Self>) -> Result<Running, String> {
        let tls = match &self.config.tls {
            Some(tls) => Some(tls_acceptor(&tls.cert, &tls.key)?),
            None => None,
        };
        let agent = TcpListener::bind(self.config.listen)
            .await
            .map_err(|e| format!("listen {}: {e}", self.config.listen))?;
        let admin = TcpListener::bind(self.config.admin_listen)
            .await
            .map_err(|e| format!("admin_listen {}: {e}", self.config.admin_listen))?;
        let agent_addr = agent.local_addr().map_err(|e| e.to_string())?;
        let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;
        // The gateway's own signal: listeners stop accepting, and open streams end.
        let stop_tx = self.closing.clone();
        let stop_rx = stop_tx.subscribe();
        let builder = self.connection_builder();

        let gateway = self.clone();
        // One limit for the whole agent listener: beyond it, requests are shed at once with a
        // 503, before any token, policy or signature work, so admitted ones keep their latency.
        let in_flight = Arc::new(Semaphore::new(self.config.limits.max_in_flight));
        let bounds = ConnectionBounds {
            idle: Duration::from_secs(self.config.limits.idle_seconds),
            max: self.config.limits.max_connections,
            drain: Duration::from_secs(self.config.limits.drain_seconds),
            head_read: Duration::from_secs(self.config.limits.header_read_seconds),
            refused: self.metrics.connections_refused.clone(),
        };
        let agent_loop = tokio::spawn(accept_loop(
            agent,
            bounds.clone(),
            tls,
            builder.clone(),
            stop_rx.clone(),
            move |peer| {
                let gateway = gateway.clone();
                let shed_metrics = gateway.metrics.clone();
                let handle = tower::service_fn(move |req: Request<Incoming>| {
                    // Boxed: the pipeline's future is large (about 11 KB), and hyper keeps room
                    // for one in every connection, idle or not; boxed, only calls in flight
                    // hold it, and it is not copied as it moves through the layers.
                    let call = Box::pin(gateway.clone().handle(req, peer));
                    async move { Ok::<_, std::convert::Infallible>(call.await) }
                });
                let shedding = ServiceBuilder::new()
                    .layer(LoadShedLayer::new())
                    .layer(GlobalConcurrencyLimitLayer::with_semaphore(
                        in_flight.clone(),
                    ))
                    .service(handle)
                    .map_result(move |result| {
                        // The only error below is `Overloaded`: the handler never fails.
                        Ok::<_, BoxError>(result.unwrap_or_else(|_| overloaded(&shed_metrics)))
                    });
                TowerToHyperService::new(shedding)
            },
        ));
        let gateway = self.clone();
        let admin_loop = tokio::spawn(accept_loop(
            admin,
            bounds,
            None,
            builder,
            stop_rx,
            move |_peer| {
                let gateway = gateway.clone();
                service_fn(move |req: Request<Incoming>| {
                    let gateway = gateway.clone();
                    async move { Ok::<_, std::convert::Infallible>(gateway.admin(req).await) }
                })
            },
        ));
        // A watcher that cannot start (no inotify room, a folder gone) does not stop the
        // gateway: it says so in the log and in toolgate_config_watch_active.
        let watch = self.watch_files().unwrap_or_else(|why| {
            tracing::warn!(
                "{why}: files are NOT watched; changes take effect only on POST /admin/reload or SIGHUP"
            );
            None
        });
        self.metrics.watching.set(i64::from(watch.is_some()));
        self.ready.store(true, Ordering::SeqCst);
        Ok(Running {
            agent_addr,
            admin_addr,
            shutdown: Shutdown(stop_tx),
            listeners: vec![agent_loop, admin_loop],
            _watch: watch,
        })
    }

    fn connection_builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // hyper's own limit sits above ours, so oversized headers get our JSON 431 first.
        let header_room = (self.config.limits.max_header_bytes * 2).max(16 << 10);
        builder
            .http1()
            .timer(TokioTimer::new())
            // A backstop only: `HeadDeadline` ends slow heads first, with a 408.
            .header_read_timeout(Duration::from_secs(
                self.config.limits.header_read_seconds + HEAD_BACKSTOP_SECONDS,
            ))
            .max_buf_size(header_room + (64 << 10));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(header_room as u32)
            .max_concurrent_streams(self.config.limits.max_concurrent_streams);
        builder
    }
}

/// What a listener allows its connections.
#[derive(Clone)]
struct ConnectionBounds {
    /// No bytes either way for this long: closed.
    idle: Duration,
    /// Open connections at most; a new one beyond is closed at once.
    max: usize,
    /// At shutdown, how long open requests may take to finish.
    drain: Duration,
    /// An HTTP/1.1 request head must arrive within this (408 if begun, else closed).
    head_read: Duration,
    refused: prometheus::IntCounter,
}

#[allow(clippy::too_many_lines)] // one per listener: the connection-level layers in order
async fn accept_loop<F, S, E, Fut>(
    listener: TcpListener,
    bounds: ConnectionBounds,
    tls: Option<TlsAcceptor>,
    builder: auto::Builder<TokioExecutor>,
    mut stop: watch::Receiver<bool>,
    make_service: F,
) where
    F: Fn(SocketAddr) -> S,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Body>,
            Error = E,
            Future = Fut,
        > + Send
        + 'static,
    E: Into<BoxError> + 'static,
    Fut: Future<Output = Result<Response<Body>, E>> + Send + 'static,
{
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(bounds.max));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Ok(place) = open.clone().try_acquire_owned() else {
            bounds.refused.inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let stream = IdleIo::new(stream, bounds.idle);
        let exchanges = Arc::new(Exchanges::default());
        let service = Counted::new(make_service(peer), exchanges.clone());
        let head_read = bounds.head_read;
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _place = place;
            let result = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => {
                            let stream = HeadDeadline::new(stream, exchanges, head_read);
                            let conn = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .into_owned();
                            watcher.watch(conn).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    }
                }
                None => {
                    let stream = HeadDeadline::new(stream, exchanges, head_read);
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned();
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(bounds.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timed out; closing remaining connections");
    }
}

/// The answer to a request shed for overload (counted).
pub(crate) fn overloaded(metrics: &crate::metrics::Metrics) -> Response<Body> {
    metrics.shed.inc();
    let mut response = json_response(
        http::StatusCode::SERVICE_UNAVAILABLE,
        &serde_json::json!({"error": "overloaded"}),
    );
    response.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    response
}

pub(crate) fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<TlsAcceptor, String> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).map_err(|e| format!("{}: {e}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).map_err(|e| format!("{}: {e}", key.display()))?,
    ))
    .map_err(|e| format!("{}: {e}", key.display()))?
    .ok_or_else(|| format!("{}: no private key", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("TLS: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
