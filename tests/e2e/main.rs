//! End-to-end tests: the real `supervisor` binary, real sockets, real worker processes.

mod access_log;
mod app;
mod cli;
mod cluster;
mod control;
mod docs;
mod edge;
mod examples;
mod lifecycle;
mod limits;
mod metrics;
mod privileges;
mod queue;
mod ratelimit;
mod recycling;
mod redis_ha;
mod serving;
mod systemd;
mod upgrade;
mod util;
