//! supervisor: pre-fork process supervisor and HTTP worker manager.

mod config;

fn main() {}
