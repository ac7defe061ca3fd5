//! The HTTP surface. Handlers are thin: extract, call one `Vault` method, map the result
//! (errors through [`errors`] only).

mod admin;
mod approvals;
mod errors;
mod mcp;
mod my_account;
mod oauth;
mod ops;
mod proxy;
mod ui;
mod web;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{any, delete, get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use latchkey_core::Vault;
use latchkey_demo::DemoProvider;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

#[derive(Clone)]
pub struct AppState {
    pub vault: Arc<Vault>,
    pub metrics: PrometheusHandle,
    /// Cookies get `Secure` when served over TLS.
    pub tls: bool,
    /// The dashboard's last verification of the audit chain.
    pub ui: Arc<ui::ChainCache>,
    /// The credential-injecting proxy's client and limits.
    pub proxy: Arc<proxy::Proxy>,
}

pub use proxy::ProxyLimits;

impl AppState {
    /// `extra_root_pem`: a CA the proxy trusts besides the system's (the local CA, so that
    /// the demo provider's API is reachable over TLS); `outbound`: what the proxy may reach.
    pub fn new(
        vault: Arc<Vault>,
        tls: bool,
        limits: ProxyLimits,
        extra_root_pem: Option<&[u8]>,
        outbound: latchkey_upstream::guard::OutboundPolicy,
    ) -> Result<Self, String> {
        Ok(Self {
            vault,
            metrics: prometheus(),
            tls,
            ui: Arc::default(),
            proxy: limits.shared(extra_root_pem, outbound)?,
        })
    }
}

/// One Prometheus recorder per process (tests run several servers in one process).
fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            const BUCKETS: &[f64] = &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), BUCKETS)
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; then we render an empty set.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Per-request facts the handlers need: request id and the client's address.
#[derive(Clone, Debug)]
pub struct RequestMeta {
    pub request_id: String,
    pub client_ip: Option<IpAddr>,
}

pub fn router(state: AppState, demo: Option<&DemoProvider>) -> Router {
    // The browser's pages outside the dashboard: refusals before a handler runs are pages too.
    let pages = Router::new()
        .route("/approvals", get(approvals::to_dashboard))
        .route("/approvals/{id}", get(approvals::to_dashboard_one))
        .route("/authorize", get(web::authorize))
        .route("/connected-accounts/connect", get(web::connect_ticket))
        .route("/", get(web::home))
        .route("/login", get(web::login_page).post(web::login))
        .route("/login/totp", get(web::totp_page).post(web::totp))
        .route("/logout", post(web::logout))
        .route("/account", get(web::account))
        .route("/connect/{connection}/callback", get(web::connect_callback))
        .route("/connect/{connection}", get(web::connect_start))
        .layer(middleware::map_response(ui::page_for_bare_errors));
    let mut app = Router::new()
        .route("/oauth/token", post(oauth::token))
        .route("/oauth/revoke", post(oauth::revoke))
        .route("/bc-authorize", post(approvals::bc_authorize))
        .route("/userinfo", get(oauth::userinfo).post(oauth::userinfo))
        .route(
            "/me/v1/connected-accounts/connect",
            post(my_account::connect),
        )
        .route(
            "/me/v1/connected-accounts/complete",
            post(my_account::complete),
        )
        .route(
            "/me/v1/connected-accounts/accounts",
            get(my_account::accounts),
        )
        .route(
            "/me/v1/connected-accounts/accounts/{id}",
            delete(my_account::delete),
        )
        .route(
            "/me/v1/connected-accounts/connections",
            get(my_account::connections),
        )
        .route("/.well-known/openid-configuration", get(ops::discovery))
        .route("/.well-known/jwks.json", get(ops::jwks))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .merge(pages)
        .route("/proxy/{connection}", any(proxy::proxy))
        .route("/proxy/{connection}/{*path}", any(proxy::proxy))
        .nest("/api/v1", admin::router())
        .nest("/ui", ui::router())
        .with_state(state.clone())
        .merge(mcp::router(state.clone()));
    if let Some(demo) = demo {
        app = app.nest("/demo", demo.router());
    }
    app.route_layer(middleware::from_fn(record_metrics))
        .fallback(errors::not_found)
        .layer(middleware::from_fn_with_state(state, common_headers))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            errors::panic_response,
        ))
}

/// Request id, client address, security headers.
async fn common_headers(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| latchkey_crypto::secrets::random_token(12));
    let client_ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    req.extensions_mut().insert(RequestMeta {
        request_id: request_id.clone(),
        client_ip,
    });
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        h.insert(HeaderName::from_static("x-request-id"), v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.entry(header::CONTENT_SECURITY_POLICY).or_insert(HeaderValue::from_static(
        "default-src 'none'; img-src 'self' data:; style-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ));
    if state.tls {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    resp
}

/// Request counts and latency by route template (never by raw path: ids would explode labels).
async fn record_metrics(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_default();
    let method = req.method().as_str().to_owned();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("latchkey_http_requests_total", "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("latchkey_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    resp
}

/// How long a shutdown waits for the requests in flight before it cuts them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Accept connections (TLS when configured) and serve `app` on each until `shutdown`. Then
/// stop accepting, let each connection finish the request it is serving (keep-alive ends),
/// and return once all are done or after [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    tower::ServiceExt::oneshot(app.clone(), req.map(axum::body::Body::new))
                },
            );
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let result = match acceptor {
                Some(acceptor) => {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => {
                            let conn =
                                builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                            watcher.watch(conn).await
                        }
                        _ => return,
                    }
                }
                None => {
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let open = graceful.count();
    tracing::info!(
        connections = open,
        "shutting down: no new connections; finishing the requests in flight"
    );
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = SHUTDOWN_GRACE.as_secs(),
            "requests still in flight after the grace period are cut"
        );
    }
    Ok(())
}
