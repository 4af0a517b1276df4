//! supervisor's worker library: everything that runs inside a worker process (HTTP serving,
//! admission, the built-in app) plus the pieces the master shares with it (the configuration
//! shape and the scoreboard). Request code here never sees a pid; lifecycle lives in the binary.

#![deny(unsafe_code)]

pub mod config;
pub mod scoreboard;
