//! Health checks (`limits.health_paths`): a load balancer's or orchestrator's probe is answered
//! whatever the limits say, so that a busy host is not taken out of rotation for being busy.
//!
//! A `GET` or `HEAD` of one of those paths (exactly, whatever its query) skips the client's rate,
//! the worker's and the host's caps, their queue and the cluster-wide cap, and goes to the app
//! (or the built-in app) at once. What keeps that from being a way around the limits: only those
//! paths and methods, and at most `MAX_IN_FLIGHT` of them at a time in each worker (more get
//! 503 at once), so a flood of them holds a few app slots at most.

use std::sync::atomic::{AtomicU32, Ordering};

use hyper::{Method, Request};

/// Health checks one worker serves at a time, past the limits.
pub(crate) const MAX_IN_FLIGHT: u32 = 8;

/// The health paths.
pub(crate) struct HealthPaths {
    paths: Box<[String]>,
}

/// What a request is to the limits.
pub(crate) enum Exempt {
    /// Not a health check: the limits apply.
    No,
    /// A health check, past the limits, holding its place among `MAX_IN_FLIGHT`.
    Yes(HealthPermit),
    /// A health check over `MAX_IN_FLIGHT` in this worker.
    Over,
}

/// A health check's place among this worker's `MAX_IN_FLIGHT`, given back when dropped (with
/// the request's guard, once its response is sent).
pub(crate) struct HealthPermit(&'static AtomicU32);

impl Drop for HealthPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HealthPaths {
    pub(crate) fn new(paths: &[String]) -> HealthPaths {
        HealthPaths {
            paths: paths.into(),
        }
    }

    /// Whether `req` is a health check, and if so its permit (or `Over`), counted in
    /// `in_flight`: the worker's record (`Slot::health_inflight`, shown by `status --json`).
    pub(crate) fn check<B>(&self, req: &Request<B>, in_flight: &'static AtomicU32) -> Exempt {
        if self.paths.is_empty()
            || !matches!(*req.method(), Method::GET | Method::HEAD)
            || !self.paths.iter().any(|p| p == req.uri().path())
        {
            return Exempt::No;
        }
        let taken = in_flight.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < MAX_IN_FLIGHT).then_some(n + 1)
        });
        match taken {
            Ok(_) => Exempt::Yes(HealthPermit(in_flight)),
            Err(_) => Exempt::Over,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, target: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(target)
            .body(())
            .unwrap()
    }

    #[test]
    fn probes_are_get_and_head_of_the_paths_exactly_and_at_most_eight_at_once() {
        let health = HealthPaths::new(&["/healthz".to_string()]);
        let count: &'static AtomicU32 = Box::leak(Box::new(AtomicU32::new(0)));
        let exempt =
            |m: Method, t: &str| matches!(health.check(&request(m, t), count), Exempt::Yes(_));
        assert!(exempt(Method::GET, "/healthz"));
        assert!(exempt(Method::HEAD, "/healthz?verbose=1"));
        assert!(!exempt(Method::POST, "/healthz"));
        assert!(!exempt(Method::GET, "/healthz/deep"));
        assert!(!exempt(Method::GET, "/"));
        let held: Vec<_> = (0..MAX_IN_FLIGHT)
            .map(
                |_| match health.check(&request(Method::GET, "/healthz"), count) {
                    Exempt::Yes(permit) => permit,
                    _ => panic!("a place among the first eight"),
                },
            )
            .collect();
        assert!(matches!(
            health.check(&request(Method::GET, "/healthz"), count),
            Exempt::Over
        ));
        assert_eq!(count.load(Ordering::Relaxed), MAX_IN_FLIGHT);
        drop(held);
        assert_eq!(count.load(Ordering::Relaxed), 0);
        assert!(exempt(Method::GET, "/healthz"), "places come back");
        let none = HealthPaths::new(&[]);
        assert!(matches!(
            none.check(&request(Method::GET, "/healthz"), count),
            Exempt::No
        ));
    }
}
