//! End-to-end tests: the real `supervisor` binary, real sockets, real worker processes.

mod access_log;
mod app;
mod cli;
mod cluster;
mod config_bounds;
mod control;
mod docs;
mod edge;
mod examples;
mod lifecycle;
mod limits;
mod metrics;
mod papercuts;
mod privileges;
mod proxy_faults;
mod queue;
mod ratelimit;
mod recycling;
mod redis_ha;
mod reload;
mod runtime_dir;
mod serving;
mod systemd;
mod upgrade;
mod util;
mod worker_config;
