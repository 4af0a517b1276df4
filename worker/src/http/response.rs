//! Response bodies and the worker's own responses.
//!
//! Owns the one body type every response is made with (a static/full body, the streamed,
//! size-limited request body of `/echo`, or the app's body with its app slot and pooled
//! connection), and the precomputed pieces of the responses the worker writes itself
//! (`X-Worker-Id`, 413/503/504 bodies). Nothing here allocates on the hot path: values are
//! built once at start. The request's guard, which keeps the permits as long as the response,
//! travels beside the body (`request_guard::Guarded`); this module does not know it. It must
//! not decide *when* to answer what; `request` does.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Limited;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};

use crate::config::ByteSize;
use crate::http::client_body::ClientBody;

pub(crate) use crate::http::client_body::BoxError;

pub(crate) const X_WORKER_ID: HeaderName = HeaderName::from_static("x-worker-id");
pub(crate) const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
/// The status logged and counted for a request whose client left before its response went out.
pub(crate) const CLIENT_GONE: u16 = 499;
const RETRY_AFTER_1S: HeaderValue = HeaderValue::from_static("1");

/// What the app's streamed response body holds until it is sent (the app side's: its app slot
/// and the pooled connection it comes on): given back as a whole when the body is dropped, or,
/// once the body has been read to its end, through `body_ended` (a connection that carried a
/// whole response can serve another). Boxed: only a response too large to be read whole
/// (`proxy::SMALL_BODY`) streams.
pub(crate) trait AppHold: Send {
    /// The body was read to its end.
    fn body_ended(self: Box<Self>);
    /// The ticket of the app process answering (`pool::AppLease::ticket`; 0: none), for
    /// `app.kill_on_timeout`.
    fn ticket(&self) -> u64;
}

/// The body of every response this worker makes: what is sent, without the request's guard
/// (`request_guard::Guarded` carries both to hyper).
pub(crate) struct Body {
    kind: Kind,
}

enum Kind {
    Full(Option<Bytes>),
    Stream(ClientBody<Limited<Incoming>>),
    /// The app's response body, with what it holds until it is sent (`AppHold`), and whether
    /// its last frame has been read: hyper's `is_end_stream` says so only for a body of known
    /// length, never for a chunked one, whose connection could then not be reused.
    Proxied {
        body: Incoming,
        hold: Option<Box<dyn AppHold>>,
        ended: bool,
    },
}

impl Body {
    pub(crate) fn full(data: Bytes) -> Body {
        Body {
            kind: Kind::Full(Some(data)),
        }
    }

    pub(crate) fn empty() -> Body {
        Body {
            kind: Kind::Full(None),
        }
    }

    /// The app's response body, streamed through, holding `hold` until it is sent.
    pub(crate) fn proxied(body: Incoming, hold: Box<dyn AppHold>) -> Body {
        Body {
            kind: Kind::Proxied {
                body,
                hold: Some(hold),
                ended: false,
            },
        }
    }

    /// The request body streamed back, cut off with an error past `worker.max_body_bytes` or
    /// when the client stalls (`worker.client_timeout`).
    pub(crate) fn stream(body: ClientBody<Limited<Incoming>>) -> Body {
        Body {
            kind: Kind::Stream(body),
        }
    }

    /// The whole body is here (nothing more to produce, only to send).
    pub(crate) fn is_complete(&self) -> bool {
        matches!(self.kind, Kind::Full(_))
    }

    /// The app's body, which the app has not finished sending.
    pub(crate) fn is_unfinished_app_body(&self) -> bool {
        matches!(&self.kind, Kind::Proxied { .. }) && !hyper::body::Body::is_end_stream(self)
    }

    /// Reads the rest of the app's body and throws it away, within `limit`: `Err` with the
    /// ticket of its app process (`pool::AppLease::ticket`) if the app was still sending.
    pub(crate) async fn discard_app_body(&mut self, limit: Duration) -> Result<(), u64> {
        let Kind::Proxied { body, hold, ended } = &mut self.kind else {
            return Ok(());
        };
        let read = async {
            while let Some(frame) = http_body_util::BodyExt::frame(body).await {
                if frame.is_err() {
                    return false;
                }
            }
            true
        };
        match tokio::time::timeout(limit, read).await {
            Ok(read_to_end) => {
                *ended |= read_to_end;
                Ok(())
            }
            Err(_) => Err(hold.as_ref().map_or(0, |h| h.ticket())),
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // A pooled connection whose response was read to its end goes back to the pool.
        if let Kind::Proxied { body, hold, ended } = &mut self.kind {
            if *ended || hyper::body::Body::is_end_stream(body) {
                if let Some(hold) = hold.take() {
                    hold.body_ended();
                }
            }
        }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Stream(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
            Kind::Proxied { body, ended, .. } => {
                let polled = Pin::new(body).poll_frame(cx);
                if matches!(polled, Poll::Ready(None)) {
                    *ended = true;
                }
                polled.map_err(|e| Box::new(e) as BoxError)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(data) => data.is_none(),
            Kind::Stream(body) => body.is_end_stream(),
            Kind::Proxied { body, ended, .. } => *ended || body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Stream(body) => body.size_hint(),
            Kind::Proxied { body, .. } => body.size_hint(),
        }
    }
}

/// A `text/plain` response.
pub(crate) fn text(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut res = Response::new(Body::full(body));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, TEXT_PLAIN);
    res
}

/// The worker's own answers, built once.
pub(crate) struct Responses {
    worker_id: HeaderValue,
    too_large: Bytes,
    worker_limit: Bytes,
    timeout: Bytes,
    queue_full: Bytes,
    queue_timeout: Bytes,
    /// The host-wide cap is read from the scoreboard (the master writes it), so its message is
    /// cached with the cap it names and rebuilt only if the cap changes.
    host_limit: (u32, Bytes),
}

impl Responses {
    pub(crate) fn new(
        worker_id: u32,
        max_body: ByteSize,
        max_concurrent: u32,
        request_timeout: Duration,
        host_cap: u32,
        queue: u32,
        queue_timeout: Duration,
    ) -> Responses {
        // Leaked once per worker so that every response gets the value without a refcount.
        let id: &'static str = Box::leak(worker_id.to_string().into_boxed_str());
        Responses {
            worker_id: HeaderValue::from_static(id),
            too_large: Bytes::from(format!(
                "request body larger than the limit of {max_body} ({} bytes, worker.max_body_bytes)\n",
                max_body.bytes()
            )),
            worker_limit: Bytes::from(format!(
                "worker limit of {max_concurrent} concurrent requests reached (worker.max_concurrent)\n"
            )),
            timeout: Bytes::from(format!(
                "request took longer than {} (worker.request_timeout)\n",
                humantime_serde::re::humantime::format_duration(request_timeout)
            )),
            host_limit: (host_cap, host_limit_body(host_cap)),
            queue_full: Bytes::from(format!(
                "server busy and {queue} requests already waiting (limits.queue)\n"
            )),
            queue_timeout: Bytes::from(format!(
                "server busy: waited {} for a turn (limits.queue_timeout)\n",
                humantime_serde::re::humantime::format_duration(queue_timeout)
            )),
        }
    }

    pub(crate) fn worker_id(&self) -> &HeaderValue {
        &self.worker_id
    }

    /// 413: `Content-Length` above `worker.max_body_bytes`.
    pub(crate) fn too_large(&self) -> Response<Body> {
        text(StatusCode::PAYLOAD_TOO_LARGE, self.too_large.clone())
    }

    /// 503: `worker.max_concurrent` reached.
    pub(crate) fn worker_limit(&self) -> Response<Body> {
        unavailable(self.worker_limit.clone())
    }

    /// 503: the host-wide cap (currently `cap`) reached.
    pub(crate) fn host_limit(&self, cap: u32) -> Response<Body> {
        let body = if cap == self.host_limit.0 {
            self.host_limit.1.clone()
        } else {
            host_limit_body(cap)
        };
        unavailable(body)
    }

    /// 503: the cluster-wide cap (`cap`) reached.
    pub(crate) fn cluster_limit(&self, cap: u32) -> Response<Body> {
        unavailable(Bytes::from(format!(
            "cluster-wide limit of {cap} concurrent requests reached \
             (limits.cluster_max_concurrent_requests)\n"
        )))
    }

    /// 503: Redis does not answer and `limits.on_redis_error` is `closed`.
    pub(crate) fn redis_unavailable(&self) -> Response<Body> {
        unavailable(Bytes::from_static(
            b"redis is not answering and limits.on_redis_error is closed\n",
        ))
    }

    /// 503: `limits.queue` requests already waiting.
    pub(crate) fn queue_full(&self) -> Response<Body> {
        unavailable(self.queue_full.clone())
    }

    /// 503: waited `limits.queue_timeout` in the queue.
    pub(crate) fn queue_timeout(&self) -> Response<Body> {
        unavailable(self.queue_timeout.clone())
    }

    /// 504: `worker.request_timeout` passed.
    pub(crate) fn timeout(&self) -> Response<Body> {
        text(StatusCode::GATEWAY_TIMEOUT, self.timeout.clone())
    }

    pub(crate) fn internal_error(&self) -> Response<Body> {
        text(
            StatusCode::INTERNAL_SERVER_ERROR,
            Bytes::from_static(b"internal server error\n"),
        )
    }
}

pub(crate) fn host_cap(board: &crate::shm::scoreboard::Scoreboard) -> u32 {
    board.header().global_cap.load(Ordering::Relaxed)
}

fn host_limit_body(cap: u32) -> Bytes {
    Bytes::from(format!(
        "host-wide limit of {cap} concurrent requests reached (limits.max_concurrent_requests)\n"
    ))
}

fn unavailable(body: Bytes) -> Response<Body> {
    let mut res = text(StatusCode::SERVICE_UNAVAILABLE, body);
    // Overload is brief by nature; tell clients to retry soon rather than hammer or give up.
    res.headers_mut().insert(RETRY_AFTER, RETRY_AFTER_1S);
    res
}
