//! The limits beyond one request's own: `admission` (the worker's and the host's caps and the
//! queue, through the scoreboard), `cluster` (the cluster-wide cap and the clients' rates in a
//! shared Redis) and `redis_target` (where that Redis is: a URL or Sentinel).

pub(crate) mod admission;
pub mod cluster;
pub(crate) mod redis_target;
