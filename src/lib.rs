//! edgekeeper: one small daemon that keeps an ARM edge device in order.
//!
//! It replaces four scripts such devices grow (a log mover, a frame monitor,
//! a /proc-scanning cgroup daemon, a disk-maintenance daemon) with one
//! single-threaded epoll loop. Module map:
//!
//! - [`config`]: the JSON-with-comments config, its defaults, units and
//!   validation with key paths.
//! - [`reactor`]: epoll, one timerfd driving a deadline queue, signalfd.
//! - [`daemon`]: `edgekeeper run`: start-up, dispatch, reload, stop.
//! - [`demo`]: `edgekeeper demo`: a sandbox where the real daemon works.
//! - [`services`]: the interface every service implements, and the services.
//! - [`report`]: field log, status snapshot, Prometheus file, alerts.
//! - [`state`]: what survives a restart (`state_dir/state.json`).
//! - [`sys`]: the platform layer, the only place with `unsafe`.
//! - [`watch`]: the recursive watch table (wd ↔ parent + name).

pub mod config;
pub mod daemon;
pub mod demo;
pub mod reactor;
pub mod report;
pub mod services;
pub mod state;
pub mod sys;
pub mod watch;
