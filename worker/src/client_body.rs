//! A request body as the client sends it, with `worker.client_timeout` between its frames.
//!
//! Owns the body-side half of the client timeout (the connection's socket wrapper owns the
//! write side, see `connection`): a client that announced a body and then sends nothing keeps
//! its request, and the request its permits, for as long as it likes unless someone stops
//! waiting. hyper has no such timeout. Every error this body yields is the client's (its body
//! broke off, was malformed, or stalled) and comes out as a [`ClientBodyError`], so that the
//! proxy can tell it from the app's failures.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::response::BoxError;

/// The client's request body failed: it stalled past `worker.client_timeout`, or broke off.
#[derive(Debug)]
pub(crate) enum ClientBodyError {
    Stalled(Duration),
    Broken(BoxError),
}

impl fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientBodyError::Stalled(t) => write!(
                f,
                "the client sent no byte of its request body for {t:?} (worker.client_timeout)"
            ),
            ClientBodyError::Broken(e) => write!(f, "the client's request body broke off: {e}"),
        }
    }
}

impl StdError for ClientBodyError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            ClientBodyError::Stalled(_) => None,
            ClientBodyError::Broken(e) => Some(e.as_ref()),
        }
    }
}

/// `inner` (the client's body), failing with [`ClientBodyError::Stalled`] when no frame comes
/// for `timeout` while one is awaited.
pub(crate) struct ClientBody<B> {
    inner: B,
    timeout: Duration,
    /// Armed while a frame is awaited; allocated at the first wait and reset after that.
    stall: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl<B> ClientBody<B> {
    pub(crate) fn new(inner: B, timeout: Duration) -> ClientBody<B> {
        ClientBody {
            inner,
            timeout,
            stall: None,
            waiting: false,
        }
    }
}

impl<B> Body for ClientBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                Poll::Ready(frame.map(|f| f.map_err(|e| ClientBodyError::Broken(e.into()))))
            }
            Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    let deadline = Instant::now() + this.timeout;
                    match &mut this.stall {
                        Some(sleep) => sleep.as_mut().reset(deadline),
                        None => this.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                let sleep = this.stall.as_mut().expect("armed above");
                if sleep.as_mut().poll(cx).is_ready() {
                    this.waiting = false;
                    return Poll::Ready(Some(Err(ClientBodyError::Stalled(this.timeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
