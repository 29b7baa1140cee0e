//! Rotation of other programs' logs (what logrotate did).
//!
//! PLACEHOLDER: the interface the storage service drives; the body is being
//! written (issue 6).

use crate::config::RotateRule;
use crate::services::Report;
use crate::sys::clock::WallTime;

pub struct Rotation {
    _rules: Vec<RotateRule>,
}

impl Rotation {
    pub fn new(rules: &[RotateRule]) -> Rotation {
        Rotation {
            _rules: rules.to_vec(),
        }
    }
    /// Starts a pass over every rule (no-op while one is under way).
    pub fn begin(&mut self, _now: WallTime) {}
    /// Does at most `budget_bytes` of copying/compressing; true while more
    /// of the pass remains (the caller schedules the next step at once).
    pub fn step(&mut self, _budget_bytes: usize, _now: WallTime) -> bool {
        false
    }
    pub fn report(&self, _report: &mut Report) {}
}
