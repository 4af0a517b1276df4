//! End-to-end tests: the real `supervisor` binary, real sockets, real worker processes.

mod app;
mod cli;
mod cluster;
mod control;
mod examples;
mod lifecycle;
mod limits;
mod queue;
mod ratelimit;
mod recycling;
mod redis_ha;
mod serving;
mod util;
