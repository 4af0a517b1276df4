//! Passing requests to the app: the pool of app processes (`app.command`; `pool` chooses one
//! per request) or a server started elsewhere (`app.upstream`).
//!
//! Owns sending to the app (on the connections of `conn_pool`, over a Unix socket or TCP),
//! what changes in a request and its response on the way (hop-by-hop headers, the
//! `X-Forwarded-*` headers), `app.concurrency`, `app.buffer_requests`, upgrades (`app.upgrades`,
//! the tunnel and its idle timeout), the one retry on a new connection when a pooled one turns
//! out dead, and the 502/503 answers when the app cannot answer. Bodies stream both ways; the
//! request pipeline (`request`) still owns admission, the request timeout and the permits.
//!
//! A request to the app outlives its client (`request_guard`: `Exchange` and `Guarded` finish
//! it on a task of their own), so the app slot a response holds (`pool::AppPermit`) goes back
//! when the app is done with the request, not when the client leaves. This module sees the
//! worker only through `context::WorkerContext`.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, FORWARDED, HOST,
    PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use hyper::http::request::Parts;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::app::appconn::AppStream;
use crate::app::conn_pool::{ConnPool, Exchange as Sent, Outgoing, Pooled};
use crate::app::pool::{AppPermit, AppPool, NoApp};
use crate::config::{AppConfig, Trusted, Upstream};
use crate::http::activity::ClientConnection;
use crate::http::client_body::{ClientBody, ClientBodyError};
use crate::http::context::WorkerContext;
use crate::http::response::{text, AppHold, Body, BoxError};
use crate::shm::scoreboard::coarse_monotonic_ms;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");
const HTTP: HeaderValue = HeaderValue::from_static("http");

/// Headers that describe one hop and never pass through (RFC 9110 7.6.1), plus the non-standard
/// ones that clients still send, and h2c's `HTTP2-Settings` (RFC 7540 3.2.1: connection-specific).
const HOP_BY_HOP: [HeaderName; 10] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    HTTP2_SETTINGS,
];

/// How long an idle pooled connection to the app is kept. Shorter than the idle timeout of
/// common app servers (uvicorn 5 s, gunicorn 2 s), so that the worker drops a connection before
/// the app does and never sends a request into one that the app is closing.
const POOL_IDLE: Duration = Duration::from_millis(1500);
/// How many times a request that an app process of the pool refused goes to another one.
const MOVE_TRIES: u32 = 3;

/// A response body of known length up to this size is read whole before the response goes out:
/// the client gets head and body in one write, however the app split them, and a body that
/// breaks off becomes a 502 instead of a cut connection.
const SMALL_BODY: u64 = 16 * 1024;

/// An answer given instead of the app's (boxed: a response is large, and this is the rare
/// path).
type Refused = Box<Response<Body>>;

/// What it takes to send an idempotent request again.
type Replay = (Method, Uri, HeaderMap, Full<Bytes>);

/// What the worker proxies to, for the life of the worker.
pub(crate) struct Proxy {
    /// Idle connections to the app (static: the connections' tasks outlive a request).
    conns: &'static ConnPool,
    concurrency: Option<Semaphore>,
    buffer_requests: bool,
    kill_on_timeout: bool,
    max_body_bytes: u64,
    /// `max_body_bytes` as the body limiters take it.
    max_body: usize,
    trusted: Trusted,
    /// The app processes (`app.command`); `None` for `app.upstream`.
    pool: Option<AppPool>,
    /// Where requests go, for a connection outside the pool (the retry of a request that met
    /// a pooled connection the app had closed).
    upstream: Arc<Upstream>,
    /// `app.upgrades`, in lower case.
    upgrades: Vec<String>,
    /// `app.upgrade_idle_timeout`.
    upgrade_idle: Duration,
    /// For messages: where requests go.
    target: String,
    /// When a 502 was last logged (coarse ms), and how many went unlogged since: an app or
    /// upstream that is down must not turn every request into a log line.
    last_502_log_ms: AtomicU64,
    unlogged_502: AtomicU64,
}

/// At most one "the app did not answer" line per this many ms; the rest are counted.
const BAD_GATEWAY_LOG_EVERY_MS: u64 = 1000;

impl Proxy {
    /// A proxy to `target` (`app.upstream`), or with `pool`, to the app processes.
    pub(crate) fn new(
        config: &AppConfig,
        trusted: Trusted,
        max_body_bytes: u64,
        target: Upstream,
        pool: Option<AppPool>,
    ) -> Proxy {
        let described = match pool {
            Some(_) => "the app processes".to_string(),
            None => target.to_string(),
        };
        let upstream = Arc::new(target);
        Proxy {
            conns: Box::leak(Box::new(ConnPool::new(POOL_IDLE))),
            concurrency: (config.concurrency > 0)
                .then(|| Semaphore::new(config.concurrency as usize)),
            buffer_requests: config.buffer_requests,
            kill_on_timeout: config.kill_on_timeout,
            max_body_bytes,
            max_body: usize::try_from(max_body_bytes).unwrap_or(usize::MAX),
            trusted,
            pool,
            upstream,
            upgrades: config
                .upgrades
                .iter()
                .map(|p| p.to_ascii_lowercase())
                .collect(),
            upgrade_idle: config.upgrade_idle_timeout,
            target: described,
            last_502_log_ms: AtomicU64::new(0),
            unlogged_502: AtomicU64::new(0),
        }
    }

    fn warn_bad_gateway(&self, why: &str) {
        let now = coarse_monotonic_ms();
        let last = self.last_502_log_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < BAD_GATEWAY_LOG_EVERY_MS {
            self.unlogged_502.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.last_502_log_ms.store(now.max(1), Ordering::Relaxed);
        let unlogged = self.unlogged_502.swap(0, Ordering::Relaxed);
        warn!(
            app = %self.target,
            error = %why,
            more_502_not_logged = unlogged,
            "the app did not answer; 502 (logged at most once a second)"
        );
    }

    /// Whether a request that passes `worker.request_timeout` kills its app process: the
    /// request then carries a ticket (see `timed_out`).
    pub(crate) fn kills_on_timeout(&self) -> bool {
        self.kill_on_timeout && self.pool.is_some()
    }

    /// Called when a request to the app passed `worker.request_timeout`, with the ticket
    /// its app slot wrote (`AppLease::ticket`).
    pub(crate) fn timed_out(&self, worker: &WorkerContext, ticket: u64) {
        if self.kills_on_timeout() {
            crate::app::pool::kill_app_of(worker.admission.board(), ticket);
        }
    }

    /// Turns the client's request into the app's, taking its headers out of `head` (which the
    /// pipeline keeps, for its logs), and returns the future that answers it.
    pub(crate) fn forward(
        &'static self,
        worker: &'static WorkerContext,
        head: &mut Parts,
        body: Incoming,
        peer: Option<IpAddr>,
        client: ClientConnection,
        ticket: Option<Arc<AtomicU64>>,
    ) -> impl Future<Output = Response<Body>> + Send + 'static {
        let mut headers = std::mem::take(&mut head.headers);
        // Only HTTP/1.1 upgrades, to the protocols `app.upgrades` allows: any other `Upgrade`
        // goes with the hop-by-hop headers and the request is a plain one (RFC 9110 7.8 lets a
        // server ignore it). h2c never passes: a tunnel past every limit to an app that takes it.
        let upgrade_to = (head.version == Version::HTTP_11 && is_upgrade(&headers))
            .then(|| self.allowed_upgrade(&headers))
            .flatten();
        let upgrade = upgrade_to
            .is_some()
            .then(|| head.extensions.remove::<OnUpgrade>());
        strip_hop_by_hop(&mut headers);
        if let Some(protocol) = upgrade_to {
            headers.insert(UPGRADE, protocol);
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        }
        // HTTP/2 clients name the host in the URI only.
        if !headers.contains_key(HOST) {
            if let Some(authority) = head.uri.authority() {
                if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                    headers.insert(HOST, v);
                }
            }
        }
        self.set_forwarded(&mut headers, peer);

        // The app sees the client's path and query as they came, in origin form.
        let uri = match head.uri.path_and_query() {
            Some(_) if head.uri.authority().is_none() => head.uri.clone(),
            Some(pq) => Uri::from(pq.clone()),
            None => Uri::from_static("/"),
        };
        let method = head.method.clone();
        async move {
            self.send(
                worker,
                method,
                uri,
                headers,
                body,
                upgrade.flatten(),
                client,
                ticket,
            )
            .await
        }
    }

    /// The protocols of the request's `Upgrade` that `app.upgrades` allows, as the header to
    /// pass on; `None` if there are none.
    fn allowed_upgrade(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let offered = headers.get(UPGRADE)?.to_str().ok()?;
        let mut allowed = String::new();
        for protocol in offered.split(',').map(str::trim) {
            let name = protocol.split('/').next().unwrap_or("").trim();
            if name.eq_ignore_ascii_case("h2c")
                || !self.upgrades.iter().any(|u| name.eq_ignore_ascii_case(u))
            {
                continue;
            }
            if !allowed.is_empty() {
                allowed.push_str(", ");
            }
            allowed.push_str(protocol);
        }
        if allowed.is_empty() {
            debug!(
                upgrade = offered,
                "Upgrade not in app.upgrades; passed on as a plain request"
            );
            return None;
        }
        HeaderValue::from_str(&allowed).ok()
    }

    #[allow(clippy::too_many_arguments)]
    async fn send(
        &'static self,
        worker: &'static WorkerContext,
        method: hyper::Method,
        uri: Uri,
        headers: HeaderMap,
        body: Incoming,
        client_upgrade: Option<OnUpgrade>,
        client: ClientConnection,
        ticket: Option<Arc<AtomicU64>>,
    ) -> Response<Body> {
        let mut permit = match self.take_app_slot(worker, ticket.as_deref()).await {
            Ok(taken) => taken,
            Err(refused) => return *refused,
        };
        // The client left while the request waited for the app: nothing to send it for.
        if client.gone() {
            return text(
                StatusCode::from_u16(crate::http::response::CLIENT_GONE).expect("a valid status"),
                Bytes::new(),
            );
        }
        let body = match self.outgoing_body(worker, body).await {
            Ok(body) => body,
            Err(refused) => return *refused,
        };
        // Never an upgrade (the client may already have its 101). A request that may have
        // reached the app is sent again only if its method is idempotent (not a POST without
        // a body either); one that never reached an app process of the pool (a refused
        // connect) goes to another one whatever its method and body (see `send_moving`).
        let replay: Option<Replay> = match &body {
            Either::Right(full) if client_upgrade.is_none() && method.is_idempotent() => {
                Some((method.clone(), uri.clone(), headers.clone(), full.clone()))
            }
            _ => None,
        };
        let req = outgoing(method, uri, headers, body);
        let sent = match self
            .send_moving(worker, req, replay.as_ref(), &mut permit, ticket.as_deref())
            .await
        {
            Ok(sent) => sent,
            Err(refused) => return *refused,
        };
        let (res, conn) = match self.answered(worker, sent, &permit) {
            Ok(answered) => answered,
            Err(failed) => return *failed,
        };
        self.pass_back(worker, res, conn, client_upgrade, client, permit)
            .await
    }

    /// Waits its turn for an app slot (first come, first served, host-wide with app
    /// processes) within the request timeout: the permit, which names the app process chosen;
    /// `Err` with the answer when none can be had.
    async fn take_app_slot(
        &'static self,
        worker: &'static WorkerContext,
        ticket: Option<&AtomicU64>,
    ) -> Result<AppPermit, Refused> {
        let lease = match &self.pool {
            Some(pool) => match pool.acquire(worker.admission.board()).await {
                Ok(lease) => {
                    if let Some(ticket) = &ticket {
                        ticket.store(lease.ticket(), Ordering::Relaxed);
                    }
                    Some(lease)
                }
                Err(NoApp::Failing) => {
                    return Err(unavailable("every app process keeps failing to start").into())
                }
            },
            None => None,
        };
        let sem = match &self.concurrency {
            Some(s) if self.pool.is_none() => match s.acquire().await {
                Ok(p) => Some(p),
                Err(_) => return Err(unavailable("the app is stopping").into()),
            },
            _ => None,
        };
        Ok(AppPermit { _sem: sem, lease })
    }

    /// The request's body as it goes to the app: none, read whole (`app.buffer_requests`), or
    /// streamed; `Err` with the answer when the client's body is refused or fails.
    async fn outgoing_body(
        &self,
        worker: &'static WorkerContext,
        body: Incoming,
    ) -> Result<Outgoing, Refused> {
        // No body, or one read whole: the request can be sent again if the pooled connection
        // it went out on turns out dead (below). A streamed body cannot.
        let empty = hyper::body::Body::is_end_stream(&body);
        let body = ClientBody::new(
            Limited::new(body, self.max_body),
            worker.limits.body_timing(),
        );
        Ok(if empty {
            Either::Right(Full::new(Bytes::new()))
        } else if self.buffer_requests {
            match body.collect().await {
                Ok(collected) => Either::Right(Full::new(collected.to_bytes())),
                Err(e) if caused_by_body_limit(&e) => {
                    return Err(too_large(self.max_body_bytes).into())
                }
                Err(e) => return Err(client_body_failed(&e).into()),
            }
        } else {
            // A body without Content-Length (chunked) is cut off at the limit as it streams.
            Either::Left(body)
        })
    }

    /// Sends the request, once more on a fresh connection if the pooled one was dead (and it
    /// may be replayed), and to another app process (at most `MOVE_TRIES` times) if the chosen
    /// one refused the connection; `Err` with the answer when no app process can be had. The
    /// response comes with the pooled connection that carries its body (none for a
    /// connection of its own).
    async fn send_moving(
        &'static self,
        worker: &'static WorkerContext,
        mut req: Request<Outgoing>,
        replay: Option<&Replay>,
        permit: &mut AppPermit,
        ticket: Option<&AtomicU64>,
    ) -> Result<Result<(Response<Incoming>, Option<Pooled>), BoxError>, Refused> {
        let mut moved = 0;
        loop {
            let target = || match &permit.lease {
                Some(lease) => Arc::new(lease.upstream()),
                None => Arc::clone(&self.upstream),
            };
            let (unsent, e) = match self.conns.send(permit.ticket(), target, req).await {
                Sent::Answered(res, conn) => return Ok(Ok((res, Some(conn)))),
                Sent::NotSent(unsent, e) => (unsent, e),
                Sent::Failed(e) => {
                    let Some((method, uri, headers, body)) =
                        replay.filter(|_| dead_connection(&*e))
                    else {
                        return Ok(Err(e));
                    };
                    // A pooled connection the app had closed (uvicorn closes after an
                    // exception once its 500 is out, without saying so): once more, on a
                    // connection of its own. It may have reached the app (which may have died
                    // of it), so it never goes to another app process.
                    debug!(
                        error = %error_chain(&*e),
                        "the app's pooled connection was dead; sending again on a new one"
                    );
                    let again = outgoing(
                        method.clone(),
                        uri.clone(),
                        headers.clone(),
                        Either::Right(body.clone()),
                    );
                    let target = target();
                    return Ok(self.send_fresh(&target, again).await.map(|res| (res, None)));
                }
            };
            // An app process of the pool that refused the connection died (its host has not
            // noticed yet) or lost its socket: no new request goes to it from now on, and the
            // request, which never reached it, goes to another one.
            let (Some(lease), Some(pool)) = (&permit.lease, &self.pool) else {
                return Ok(Err(e));
            };
            if !never_sent(&*e) {
                return Ok(Err(e));
            }
            lease.unreachable();
            if moved == MOVE_TRIES {
                return Ok(Err(e));
            }
            moved += 1;
            debug!(
                error = %error_chain(&*e),
                "an app process refused the connection; sending to another one"
            );
            lease.slot().app_failed();
            permit.lease = None;
            let lease = match pool.acquire(worker.admission.board()).await {
                Ok(lease) => lease,
                Err(NoApp::Failing) => {
                    return Err(unavailable("every app process keeps failing to start").into())
                }
            };
            if let Some(ticket) = &ticket {
                ticket.store(lease.ticket(), Ordering::Relaxed);
            }
            permit.lease = Some(lease);
            req = *unsent;
        }
    }

    /// The app's response, counted as an answer in the worker's and the app process's
    /// records; or, if it did not answer, the response that says why (413, the client's own
    /// body failing, 502).
    fn answered<T>(
        &self,
        worker: &'static WorkerContext,
        sent: Result<T, BoxError>,
        permit: &AppPermit,
    ) -> Result<T, Refused> {
        match sent {
            Ok(res) => {
                worker.admission.slot().app_answered();
                if let Some(lease) = &permit.lease {
                    lease.slot().app_answered();
                }
                Ok(res)
            }
            Err(e) if caused_by_body_limit(&*e) => Err(too_large(self.max_body_bytes).into()),
            Err(e) => {
                // The client's side of the body failed (it broke off or stalled): not the app.
                if let Some(fault) = find_cause::<ClientBodyError>(&*e) {
                    return Err(client_body_failed(fault).into());
                }
                let why = error_chain(&*e);
                worker.admission.slot().app_failed();
                if let Some(lease) = &permit.lease {
                    lease.slot().app_failed();
                }
                self.warn_bad_gateway(&why);
                Err(bad_gateway(format!("the app did not answer: {why}")).into())
            }
        }
    }

    /// The app's response on its way to the client: a 101 hands both connections to a tunnel;
    /// otherwise the hop-by-hop headers go, and a small body is read whole (see `SMALL_BODY`).
    async fn pass_back(
        &'static self,
        worker: &'static WorkerContext,
        mut res: Response<Incoming>,
        conn: Option<Pooled>,
        client_upgrade: Option<OnUpgrade>,
        client: ClientConnection,
        permit: AppPermit,
    ) -> Response<Body> {
        if res.status() == StatusCode::SWITCHING_PROTOCOLS {
            match client_upgrade {
                Some(upgraded) => {
                    let app = hyper::upgrade::on(&mut res);
                    // The client's connection runs the tunnel once hyper hands it over: it
                    // stays counted under worker.max_connections, and a draining worker waits
                    // for it up to `server.graceful_timeout` before it exits.
                    let copy = Box::pin(tunnel(upgraded, app, self.upgrade_idle));
                    if let Err(copy) = client.set_tunnel(copy) {
                        let hold = worker.drain_watch.get().map(|tx| tx.subscribe());
                        tokio::spawn(async move {
                            copy.await;
                            drop(hold);
                        });
                    }
                    // Upgrade and Connection belong to this 101: they stay.
                    let (parts, _) = res.into_parts();
                    return Response::from_parts(parts, Body::empty());
                }
                None => return bad_gateway("the app switched protocols unasked".to_string()),
            }
        }
        let (mut parts, body) = res.into_parts();
        // Transfer-Encoding wins over Content-Length (the body was read as chunked), and the
        // length it contradicts must not go on to the client (RFC 9112 6.3).
        if parts.headers.contains_key(TRANSFER_ENCODING) {
            parts.headers.remove(CONTENT_LENGTH);
        }
        strip_hop_by_hop(&mut parts.headers);
        let small = hyper::body::Body::size_hint(&body)
            .exact()
            .is_some_and(|n| n > 0 && n <= SMALL_BODY);
        if small {
            // The permit is released when the app has sent everything.
            return match body.collect().await {
                Ok(collected) => {
                    if let Some(conn) = conn {
                        conn.give_back();
                    }
                    Response::from_parts(parts, Body::full(collected.to_bytes()))
                }
                Err(e) => {
                    let why = error_chain(&e);
                    self.warn_bad_gateway(&why);
                    bad_gateway(format!("the app's response broke off: {why}"))
                }
            };
        }
        Response::from_parts(parts, Body::proxied(body, Box::new(Held { permit, conn })))
    }

    /// Sends `req` on a new connection of its own, outside the pool (closed after its
    /// response).
    async fn send_fresh(
        &self,
        target: &Upstream,
        req: Request<Outgoing>,
    ) -> Result<Response<Incoming>, BoxError> {
        let stream = AppStream::connect(target).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Outgoing>(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "connection to the app (retry) ended with an error");
            }
        });
        Ok(sender.send_request(req).await?)
    }

    /// `X-Forwarded-For`, `-Proto`, `-Host`: passed on from a trusted peer (the peer appended to
    /// the first), replaced for anyone else, who could otherwise pose as any client.
    fn set_forwarded(&self, headers: &mut HeaderMap, peer: Option<IpAddr>) {
        // A unix: listener's clients are local processes allowed by the socket's mode.
        let trusted = peer.is_none_or(|ip| self.trusted.contains(ip));
        if !trusted {
            for name in [
                X_FORWARDED_FOR,
                X_FORWARDED_PROTO,
                X_FORWARDED_HOST,
                X_REAL_IP,
                FORWARDED,
            ] {
                headers.remove(name);
            }
        }
        if let Some(ip) = peer {
            let ip = ip.to_canonical().to_string();
            let value = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
                Some(prior) if !prior.trim().is_empty() => format!("{prior}, {ip}"),
                _ => ip,
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(X_FORWARDED_FOR, v);
            }
        }
        if !headers.contains_key(X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, HTTP);
        }
        if !headers.contains_key(X_FORWARDED_HOST) {
            if let Some(host) = headers.get(HOST).cloned() {
                headers.insert(X_FORWARDED_HOST, host);
            }
        }
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes the hop-by-hop headers, and those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the (few) names finds out whether there is anything to remove: most
    // requests and responses carry none, and every `remove` is a hashed lookup.
    let present = headers.keys().any(|k| HOP_BY_HOP.iter().any(|h| h == k));
    if !present {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        // Connection may name extra hop-by-hop fields, never the ones a message is read by.
        if name != HOST && name != CONTENT_LENGTH {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Copies bytes both ways between an upgraded client connection and the app's, until either
/// side closes or no byte has passed either way for `idle` (`app.upgrade_idle_timeout`).
async fn tunnel(client: OnUpgrade, app: OnUpgrade, idle: Duration) {
    // Bounded: an upgrade that hyper never completes must not hold the connection for ever.
    let (client, app) =
        match tokio::time::timeout(idle, async { tokio::try_join!(client, app) }).await {
            Ok(Ok(both)) => both,
            Ok(Err(e)) => {
                debug!(error = %e, "upgrade did not complete");
                return;
            }
            Err(_) => {
                debug!(app.upgrade_idle_timeout = ?idle, "upgrade did not complete in time");
                return;
            }
        };
    let last = AtomicU64::new(coarse_monotonic_ms());
    let mut client = Watched {
        io: TokioIo::new(client),
        last: &last,
    };
    let mut app = Watched {
        io: TokioIo::new(app),
        last: &last,
    };
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    let copy = tokio::io::copy_bidirectional(&mut client, &mut app);
    let mut copy = std::pin::pin!(copy);
    loop {
        let quiet = coarse_monotonic_ms().saturating_sub(last.load(Ordering::Relaxed));
        if quiet >= idle_ms {
            debug!(
                app.upgrade_idle_timeout = ?idle,
                "upgraded connection idle; closed"
            );
            return;
        }
        tokio::select! {
            done = &mut copy => {
                match done {
                    Ok((up, down)) => debug!(
                        bytes.up = up,
                        bytes.down = down,
                        "upgraded connection closed"
                    ),
                    Err(e) => debug!(error = %e, "upgraded connection ended with an error"),
                }
                return;
            }
            _ = tokio::time::sleep(Duration::from_millis(idle_ms - quiet)) => {}
        }
    }
}

/// One side of a tunnel, noting when it last received bytes.
struct Watched<'a, T> {
    io: T,
    last: &'a AtomicU64,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.last.store(coarse_monotonic_ms(), Ordering::Relaxed);
        }
        res
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// What a streamed response of the app holds until it is sent: the app slot, and the pooled
/// connection it comes on, which goes back to the pool once the body has ended.
struct Held {
    permit: AppPermit,
    conn: Option<Pooled>,
}

impl AppHold for Held {
    fn body_ended(self: Box<Self>) {
        let Held { permit, conn } = *self;
        if let Some(conn) = conn {
            conn.give_back();
        }
        drop(permit);
    }

    fn ticket(&self) -> u64 {
        self.permit.ticket()
    }
}

/// The request as it goes to the app.
fn outgoing(method: Method, uri: Uri, headers: HeaderMap, body: Outgoing) -> Request<Outgoing> {
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
}

/// Whether sending failed on a connection that the app had closed or reset, before any byte of
/// a response: hyper's "connection closed before message completed", a reset or a broken pipe
/// (not a failed connect: a new connection would meet the same).
fn dead_connection(e: &(dyn std::error::Error + 'static)) -> bool {
    if find_cause::<hyper::Error>(e).is_some_and(|h| h.is_incomplete_message() || h.is_canceled()) {
        return true;
    }
    find_cause::<io::Error>(e).is_some_and(|io| {
        matches!(
            io.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::UnexpectedEof
        )
    })
}

/// The error and its causes, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Whether sending failed at the connect, so that the app never saw the request: nothing
/// listens on its socket (refused), or the socket file is gone.
fn never_sent(e: &(dyn std::error::Error + 'static)) -> bool {
    find_cause::<io::Error>(e).is_some_and(|io| {
        matches!(
            io.kind(),
            io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
        )
    })
}

/// Whether sending failed because the request body passed `worker.max_body_bytes`.
/// The first error of type `T` in `e`'s chain of causes.
fn find_cause<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(found) = c.downcast_ref::<T>() {
            return Some(found);
        }
        cause = c.source();
    }
    None
}

fn caused_by_body_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    find_cause::<http_body_util::LengthLimitError>(e).is_some()
}

fn too_large(limit: u64) -> Response<Body> {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        Bytes::from(format!(
            "request body larger than the limit of {limit} bytes (worker.max_body_bytes)\n"
        )),
    )
}

/// The client's request body failed before the app answered: 408 if it stalled (the client
/// may try again), 400 if it broke off or was malformed. Logged at debug: the client's doing.
fn client_body_failed(fault: &ClientBodyError) -> Response<Body> {
    debug!(error = %fault, "request body failed on the client's side");
    let status = match fault {
        ClientBodyError::Stalled(_) => StatusCode::REQUEST_TIMEOUT,
        ClientBodyError::Broken(_) => StatusCode::BAD_REQUEST,
    };
    let mut res = text(status, Bytes::from(format!("{fault}\n")));
    res.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    res
}

fn bad_gateway(why: String) -> Response<Body> {
    text(StatusCode::BAD_GATEWAY, Bytes::from(format!("{why}\n")))
}

fn unavailable(why: &str) -> Response<Body> {
    let mut res = text(
        StatusCode::SERVICE_UNAVAILABLE,
        Bytes::from(format!("{why}\n")),
    );
    res.headers_mut()
        .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_go() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(TE, HeaderValue::from_static("trailers"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn upgrades_are_recognised() {
        let mut h = HeaderMap::new();
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&h), "Upgrade without Connection: upgrade");
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(is_upgrade(&h));
    }
}
