//! The app side: what answers a request once the serving path has admitted it. `builtin` (the
//! app served when none is configured), `proxy` (a request to the app processes or an
//! upstream) over `conn_pool` (idle connections to the app) and `appconn` (a connection to an
//! app's Unix socket), `pool` (which app process takes a request, host-wide), `child` (an app
//! process, started and watched by its host) and `output` (its output, logged as it wrote it). It sees its worker only through
//! `http::context`.

pub(crate) mod appconn;
pub(crate) mod builtin;
pub(crate) mod child;
pub(crate) mod conn_pool;
pub(crate) mod output;
pub(crate) mod pool;
pub(crate) mod proxy;
