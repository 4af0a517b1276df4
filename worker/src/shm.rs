//! Shared memory between the master and the workers of a host: `shared_region` (a sealed
//! memfd mapped by every process), `scoreboard` (the host-wide counters and one record per
//! process) and `ratelimit` (the per-client rate table).

pub mod ratelimit;
pub mod scoreboard;
pub(crate) mod shared_region;
