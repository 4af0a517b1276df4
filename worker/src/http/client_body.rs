//! A request body as the client sends it, with `worker.client_timeout` between its frames and
//! `worker.min_request_rate` over all of it.
//!
//! Owns the body-side half of the client timeout and of the minimum data rates (the
//! connection's socket wrapper owns the write side, see `connection`): a client that announced
//! a body and then sends nothing, or trickles it a byte now and then, keeps its request, and the
//! request its permits, for as long as it likes unless someone stops waiting. hyper has no such
//! timeout. Every error this body yields is the client's (its body broke off, was malformed,
//! stalled or came too slowly) and comes out as a [`ClientBodyError`], so that the proxy can
//! tell it from the app's failures.
//!
//! # The minimum rate (as Kestrel's `MinRequestBodyDataRate`)
//!
//! The rate is the bytes received divided by the time spent *waiting* for them: the clock runs
//! only while whoever reads the body (the app, through the proxy, or `/echo`) asks for the next
//! frame and none is there, so an app that reads slowly never counts against its client. It is
//! averaged, not judged per read, and not before `worker.min_rate_grace` of waiting: a client
//! may pause, as long as it makes up for it. The deadline is computed once per wait (bytes
//! received so far / rate, at least the grace), so the body costs one clock read per frame it
//! had to wait for and nothing more.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// The error of a body, a request's or a response's.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's request body failed: it stalled past `worker.client_timeout`, came slower
/// than `worker.min_request_rate`, or broke off.
#[derive(Debug)]
pub(crate) enum ClientBodyError {
    Stalled(Stall),
    Broken(BoxError),
}

/// How a client's body stalled; either way the answer is 408.
#[derive(Debug)]
pub(crate) enum Stall {
    /// No byte for `worker.client_timeout`.
    Silent(Duration),
    /// `received` bytes in `waited` of waiting: below `worker.min_request_rate` (`rate`, B/s).
    TooSlow {
        received: u64,
        waited: Duration,
        rate: u64,
    },
}

impl fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientBodyError::Stalled(Stall::Silent(t)) => write!(
                f,
                "the client sent no byte of its request body for {t:?} (worker.client_timeout)"
            ),
            ClientBodyError::Stalled(Stall::TooSlow {
                received,
                waited,
                rate,
            }) => write!(
                f,
                "the client sent its request body too slowly: {received} bytes in {:.1}s, \
                 below {rate} bytes/s (worker.min_request_rate)",
                waited.as_secs_f64()
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

/// What a request body is timed by: `worker.client_timeout`, `worker.min_request_rate` and
/// `worker.min_rate_grace`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BodyTiming {
    pub(crate) timeout: Duration,
    /// Bytes per second; 0: no minimum.
    pub(crate) min_rate: u64,
    pub(crate) grace: Duration,
}

impl BodyTiming {
    /// How much more waiting `received` bytes after `waited` of waiting allow before the
    /// average falls below the minimum rate; `None` without one.
    fn rate_allows(&self, received: u64, waited: Duration) -> Option<Duration> {
        if self.min_rate == 0 {
            return None;
        }
        // Whole milliseconds, saturating: a huge body simply earns a long allowance.
        let earned = Duration::from_millis(received.saturating_mul(1000) / self.min_rate);
        Some(earned.max(self.grace).saturating_sub(waited))
    }
}

/// `inner` (the client's body), failing with [`ClientBodyError::Stalled`] when no frame comes
/// for `timeout` while one is awaited, or the body comes slower than the minimum rate.
pub(crate) struct ClientBody<B> {
    inner: B,
    timing: BodyTiming,
    /// Armed while a frame is awaited; allocated at the first wait and reset after that.
    stall: Option<Pin<Box<Sleep>>>,
    /// When the current wait began; `None` while no frame is awaited.
    waiting: Option<Instant>,
    /// Whether the armed deadline is the rate's (rather than `timeout`).
    rate_deadline: bool,
    /// Data bytes received so far, and the time spent waiting for them.
    received: u64,
    waited: Duration,
    /// A frame read ahead by `first_frame`, handed out next.
    ahead: Option<Frame<Bytes>>,
}

impl<B> ClientBody<B> {
    pub(crate) fn new(inner: B, timing: BodyTiming) -> ClientBody<B> {
        ClientBody {
            inner,
            timing,
            stall: None,
            waiting: None,
            rate_deadline: false,
            received: 0,
            waited: Duration::ZERO,
            ahead: None,
        }
    }
}

impl<B> ClientBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Waits for the body's first frame (kept, and handed out first) or its end, so that a
    /// body that is malformed or stalls from the start fails before the response has begun and
    /// can still be answered with a status.
    pub(crate) async fn first_frame(&mut self) -> Result<(), ClientBodyError> {
        match std::future::poll_fn(|cx| Pin::new(&mut *self).poll_frame(cx)).await {
            Some(Ok(frame)) => {
                self.ahead = Some(frame);
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Ok(()),
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
        if let Some(frame) = this.ahead.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(since) = this.waiting.take() {
                    if this.timing.min_rate > 0 {
                        this.waited += since.elapsed();
                    }
                }
                if let Some(Ok(f)) = &frame {
                    if let Some(data) = f.data_ref() {
                        this.received += data.len() as u64;
                    }
                }
                Poll::Ready(frame.map(|f| f.map_err(|e| ClientBodyError::Broken(e.into()))))
            }
            Poll::Pending => {
                if this.waiting.is_none() {
                    let now = Instant::now();
                    this.waiting = Some(now);
                    let mut wait = this.timing.timeout;
                    this.rate_deadline = false;
                    if let Some(allowed) = this.timing.rate_allows(this.received, this.waited) {
                        if allowed < wait {
                            wait = allowed;
                            this.rate_deadline = true;
                        }
                    }
                    let deadline = now + wait;
                    match &mut this.stall {
                        Some(sleep) => sleep.as_mut().reset(deadline),
                        None => this.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                let sleep = this.stall.as_mut().expect("armed above");
                if sleep.as_mut().poll(cx).is_ready() {
                    let since = this.waiting.take().expect("waiting");
                    let stall = if this.rate_deadline {
                        this.waited += since.elapsed();
                        Stall::TooSlow {
                            received: this.received,
                            waited: this.waited,
                            rate: this.timing.min_rate,
                        }
                    } else {
                        Stall::Silent(this.timing.timeout)
                    };
                    return Poll::Ready(Some(Err(ClientBodyError::Stalled(stall))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        if self.ahead.is_none() {
            return hint;
        }
        // `Limited` says "exactly 0 more" once its limit is reached, while a chunked body may
        // still go on (and fail at the limit): with the frame read ahead added, that would
        // promise a complete body of that length.
        if hint.exact() == Some(0) && !self.inner.is_end_stream() {
            hint = SizeHint::new();
        }
        if let Some(data) = self.ahead.as_ref().and_then(Frame::data_ref) {
            let n = data.len() as u64;
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper.saturating_add(n));
            }
            hint.set_lower(hint.lower().saturating_add(n));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    /// A body whose frames a test sends, as a client would.
    struct Sent(mpsc::UnboundedReceiver<Bytes>);

    impl Body for Sent {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    const TIMING: BodyTiming = BodyTiming {
        timeout: Duration::from_secs(30),
        min_rate: 100,
        grace: Duration::from_secs(5),
    };

    /// Sends one byte every `every`, `n` times, while the body is read; returns what reading
    /// it ended with and when.
    async fn trickle(every: Duration, n: usize, timing: BodyTiming) -> (String, Duration) {
        let (tx, rx) = mpsc::unbounded_channel();
        let started = Instant::now();
        tokio::spawn(async move {
            for _ in 0..n {
                tokio::time::sleep(every).await;
                if tx.send(Bytes::from_static(b"x")).is_err() {
                    return;
                }
            }
        });
        let res = ClientBody::new(Sent(rx), timing).collect().await;
        let end = match res {
            Ok(c) => format!("complete {}", c.to_bytes().len()),
            Err(e) => e.to_string(),
        };
        (end, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_below_the_rate_fails_once_the_grace_has_passed() {
        // 1 byte/s against 100 bytes/s: judged at the end of the 5 s grace, not before.
        let (end, took) = trickle(Duration::from_secs(1), 100, TIMING).await;
        assert!(end.contains("worker.min_request_rate"), "{end}");
        assert!(end.contains("4 bytes in 5.0s"), "{end}");
        assert_eq!(took, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_the_rate_is_averaged_and_completes() {
        // 200 bytes 5 ms apart (200 bytes/s): complete.
        let (end, _) = trickle(Duration::from_millis(5), 200, TIMING).await;
        assert_eq!(end, "complete 200");
        // A pause longer than the grace is made up for by what came before it.
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            tx.send(Bytes::from(vec![b'x'; 1000])).unwrap();
            // 1000 bytes earn 10 s at 100 bytes/s: a 9 s pause is fine.
            tokio::time::sleep(Duration::from_secs(9)).await;
            tx.send(Bytes::from_static(b"y")).unwrap();
        });
        let got = ClientBody::new(Sent(rx), TIMING).collect().await.unwrap();
        assert_eq!(got.to_bytes().len(), 1001);
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_reader_does_not_ask_is_not_the_clients() {
        // The client sent everything at once; the reader takes its time between frames. Only
        // waiting counts, so a slow app never makes its client too slow.
        let (tx, rx) = mpsc::unbounded_channel();
        for _ in 0..3 {
            tx.send(Bytes::from_static(b"x")).unwrap();
        }
        drop(tx);
        let mut body = ClientBody::new(Sent(rx), TIMING);
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(60)).await;
            assert!(body.frame().await.unwrap().is_ok());
        }
        assert!(body.frame().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_minimum_only_client_timeout_applies() {
        let timing = BodyTiming {
            min_rate: 0,
            ..TIMING
        };
        let (end, took) = trickle(Duration::from_secs(20), 3, timing).await;
        assert_eq!(end, "complete 3");
        assert_eq!(took, Duration::from_secs(60));
        let (end, took) = trickle(Duration::from_secs(31), 3, timing).await;
        assert!(end.contains("worker.client_timeout"), "{end}");
        assert_eq!(took, Duration::from_secs(30));
    }
}
