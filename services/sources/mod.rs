//! Event sources besides the gRPC API.

pub mod host_sockets;
pub mod tcpinfo;
