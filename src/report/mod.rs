//! Everything edgekeeper tells people: the field log, the status snapshot,
//! the Prometheus file and alerts.
//!
//! What it is: sinks that services and the core write into. What it is not:
//! a source of events; nothing here is registered with the reactor.

pub mod alerts;
pub mod log;
pub mod metrics;
pub mod status;
