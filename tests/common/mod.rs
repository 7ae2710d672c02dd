//! Shared by the integration tests: the namespace lab, a server harness, process inspection.
#![allow(dead_code)] // each test binary uses only part of it

pub mod backends;
pub mod lab;
pub mod procs;
pub mod raw;
pub mod requests;
pub mod server;
