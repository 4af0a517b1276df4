//! The strict HTTP edge (RFC 9110/9112, as nginx): what a request must look like before
//! anything else in the worker, the limits included, looks at it.
//!
//! Owns the checks that hyper leaves to the server: exactly one `Host` on HTTP/1.1 (400
//! otherwise); the authority of an absolute-form target wins over `Host`, which is rewritten to
//! it (RFC 9112 3.2.2), so the app and the limits see the host the request was routed by;
//! `CONNECT` is 405 (nothing here tunnels); a `Transfer-Encoding` other than `chunked` alone is
//! 501 (hyper would decode `gzip, chunked` as chunked and pass the body on still gzipped);
//! header names with an underscore are dropped (WSGI/ASGI servers fold `X_Forwarded_For` into
//! `X-Forwarded-For`: a way past the forwarded headers the proxy guards). It must not know
//! about admission, apps or connections.
//!
//! The common request (one Host, a body of known length, no underscore) costs one header lookup
//! and one pass over the header names, and allocates nothing.

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, ALLOW, HOST, TRANSFER_ENCODING};
use hyper::{Method, Request, Response, StatusCode, Version};
use tracing::debug;

use crate::http::response::{text, Body};

/// What a 405 for `CONNECT` says the server takes (it must say something, RFC 9110 15.5.6).
const ALLOW_NOT_CONNECT: HeaderValue =
    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS");

/// Why a request is refused at the edge. Small, so that the common `Ok` costs nothing to move;
/// the response is built only for a refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Malformed {
    NoHost,
    TwoHosts,
    BadAuthority,
    Connect,
    TransferCoding,
}

impl Malformed {
    #[cold]
    pub(crate) fn response(self) -> Response<Body> {
        let (status, why): (StatusCode, &'static [u8]) = match self {
            Malformed::NoHost => (
                StatusCode::BAD_REQUEST,
                b"HTTP/1.1 request without a Host header\n",
            ),
            Malformed::TwoHosts => (StatusCode::BAD_REQUEST, b"more than one Host header\n"),
            Malformed::BadAuthority => (
                StatusCode::BAD_REQUEST,
                b"request target with an invalid authority\n",
            ),
            Malformed::Connect => (
                StatusCode::METHOD_NOT_ALLOWED,
                b"CONNECT is not supported: this server is no tunnel\n",
            ),
            Malformed::TransferCoding => (
                StatusCode::NOT_IMPLEMENTED,
                b"transfer coding not supported: only Transfer-Encoding: chunked\n",
            ),
        };
        let mut res = text(status, Bytes::from_static(why));
        if self == Malformed::Connect {
            res.headers_mut().insert(ALLOW, ALLOW_NOT_CONNECT);
        }
        res
    }
}

/// Checks `req` and makes it what the rest of the worker sees (Host from an absolute-form
/// target, no underscored header names), or says why it is refused.
pub(crate) fn check<B: hyper::body::Body>(req: &mut Request<B>) -> Result<(), Malformed> {
    if req.method() == Method::CONNECT {
        return Err(Malformed::Connect);
    }
    let http1 = req.version() < Version::HTTP_2;
    if http1 {
        host(req)?;
        // A body of known length (Content-Length, or none at all) came without a transfer
        // coding: hyper reads chunked first. Only the others need the header looked up.
        if req.body().size_hint().exact().is_none() {
            if let Some(te) = req.headers().get(TRANSFER_ENCODING) {
                transfer_encoding(te, req.headers())?;
            }
        }
    } else if req.headers().get_all(HOST).iter().nth(1).is_some() {
        // HTTP/2 names the host in `:authority`; a request may still carry Host, once.
        return Err(Malformed::TwoHosts);
    }
    if req.headers().keys().any(|k| k.as_str().contains('_')) {
        drop_underscored(req.headers_mut());
    }
    Ok(())
}

/// RFC 9112 3.2: one Host on HTTP/1.1 (HTTP/1.0 may have none); an absolute-form target's
/// authority replaces it.
fn host<B>(req: &mut Request<B>) -> Result<(), Malformed> {
    let (one, two) = {
        let mut hosts = req.headers().get_all(HOST).iter();
        (hosts.next().is_some(), hosts.next().is_some())
    };
    if two {
        return Err(Malformed::TwoHosts);
    }
    if let Some(authority) = req.uri().authority() {
        // Absolute form (`GET http://a.example/x`): the target names the host.
        let value =
            HeaderValue::from_str(authority.as_str()).map_err(|_| Malformed::BadAuthority)?;
        req.headers_mut().insert(HOST, value);
        return Ok(());
    }
    if !one && req.version() == Version::HTTP_11 {
        return Err(Malformed::NoHost);
    }
    Ok(())
}

/// RFC 9112 6.1: `chunked` is the only transfer coding served; any other (or a list of them)
/// is 501 rather than a body passed on still encoded.
fn transfer_encoding(first: &HeaderValue, headers: &HeaderMap) -> Result<(), Malformed> {
    let alone = headers.get_all(TRANSFER_ENCODING).iter().nth(1).is_none();
    let chunked = first
        .to_str()
        .is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
    if alone && chunked {
        return Ok(());
    }
    Err(Malformed::TransferCoding)
}

/// Removes the header fields whose names hold an underscore.
#[cold]
fn drop_underscored(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .cloned()
        .collect();
    for name in names {
        debug!(
            header = name.as_str(),
            "header name with an underscore dropped"
        );
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body whose length is unknown, as a chunked one is.
    struct Unsized;

    impl hyper::body::Body for Unsized {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(None)
        }
    }

    fn req(raw: &[(&str, &str)], uri: &str, version: Version) -> Request<Unsized> {
        let mut b = Request::builder().uri(uri).version(version);
        for (k, v) in raw {
            b = b.header(*k, *v);
        }
        b.body(Unsized).unwrap()
    }

    fn status(r: Result<(), Malformed>) -> u16 {
        r.err().map_or(200, |m| m.response().status().as_u16())
    }

    #[test]
    fn host_rules() {
        let v11 = Version::HTTP_11;
        assert_eq!(status(check(&mut req(&[("host", "a")], "/", v11))), 200);
        assert_eq!(status(check(&mut req(&[], "/", v11))), 400);
        assert_eq!(status(check(&mut req(&[], "/", Version::HTTP_10))), 200);
        let two = [("host", "a"), ("host", "b")];
        assert_eq!(status(check(&mut req(&two, "/", v11))), 400);
        // HTTP/2 names the host in :authority.
        assert_eq!(status(check(&mut req(&[], "/", Version::HTTP_2))), 200);
        assert_eq!(status(check(&mut req(&two, "/", Version::HTTP_2))), 400);
        let mut abs = req(&[("host", "b.example")], "http://a.example/x", v11);
        assert_eq!(status(check(&mut abs)), 200);
        assert_eq!(abs.headers()[HOST], "a.example");
    }

    #[test]
    fn connect_transfer_codings_and_underscores() {
        let v11 = Version::HTTP_11;
        let mut c = req(&[("host", "a")], "a.example:443", v11);
        *c.method_mut() = Method::CONNECT;
        assert_eq!(status(check(&mut c)), 405);
        for (te, want) in [
            ("chunked", 200),
            ("Chunked ", 200),
            ("gzip, chunked", 501),
            ("gzip", 501),
            ("chunked, chunked", 501),
        ] {
            let r = req(&[("host", "a"), ("transfer-encoding", te)], "/", v11);
            assert_eq!(status(check(&mut { r })), want, "{te}");
        }
        let two = [
            ("host", "a"),
            ("transfer-encoding", "gzip"),
            ("transfer-encoding", "chunked"),
        ];
        assert_eq!(status(check(&mut req(&two, "/", v11))), 501);
        let mut u = req(
            &[("host", "a"), ("x_forwarded_for", "1.2.3.4"), ("x-ok", "1")],
            "/",
            v11,
        );
        assert_eq!(status(check(&mut u)), 200);
        assert!(!u.headers().contains_key("x_forwarded_for"));
        assert!(u.headers().contains_key("x-ok"));
    }
}
