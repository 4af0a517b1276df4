//! The HTTP pieces that the serving path and the app side share: `response` (response bodies
//! and the worker's own responses), `client_body` (a request body with its timeouts and
//! rates), `activity` (a connection's bookkeeping), `context` (the part of the worker's state
//! the app side reads).

pub(crate) mod activity;
pub(crate) mod client_body;
pub(crate) mod context;
pub(crate) mod response;
