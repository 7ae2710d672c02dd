//! Event sources besides the gRPC API.

pub mod tcpinfo;
