//! Serving the host: the epoll loop over the vsock connection, one
//! invocation at a time (its process, started cheaply, in a cgroup of its
//! own).

pub mod cgroup;
pub mod invoke;
pub mod server;
pub mod spawn;
