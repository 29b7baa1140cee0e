//! The platform layer: the only place in edgekeeper with `unsafe`.
//!
//! What it is: small, boring wrappers over Linux facilities that `nix` and
//! `std` do not cover the way the daemon needs them (no allocation, byte
//! file names, directory-relative calls), each unsafe block with a
//! `// SAFETY:` comment. What it is not: policy. Nothing here knows about
//! services, config or logs; errors are returned, never reported.

pub mod alloc;
pub mod cgroup;
pub mod clock;
pub mod dir;
pub mod fs;
pub mod inotify;
pub mod localtime;
pub mod lock;
pub mod mounts;
pub mod named_child;
pub mod notify;
pub mod pattern;
pub mod proc_connector;
pub mod process;
pub mod procfs;
pub mod writeback;
