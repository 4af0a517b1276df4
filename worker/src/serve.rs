//! Serving HTTP, top down: `server` (the accept loops and the drain), `connection` (one client
//! connection under hyper, its idle timers), `request` (the path of one request: the checks in
//! order, the request timeout, panics), `request_guard` (what a request holds until its
//! response is sent), `state` (what every connection and request of the worker shares), and
//! what they use on the way: `access_log`, `edge` (the strict HTTP checks), `client_rate`
//! (`limits.rate` on the request path), `health` (`limits.health_paths`, past the limits). The app side (`app`) is below: it sees only
//! `http::context`.

pub mod access_log;
pub(crate) mod client_rate;
pub(crate) mod connection;
pub(crate) mod edge;
pub(crate) mod health;
pub(crate) mod request;
pub(crate) mod request_guard;
pub(crate) mod server;
pub(crate) mod state;
