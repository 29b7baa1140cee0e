//! Scheduled jobs of the `storage` service (the cron entries it replaces).
//!
//! PLACEHOLDER: the interface the storage service drives; the body is being
//! written (issue 6).

use std::io;

use nix::unistd::Pid;

use crate::config::Job;
use crate::services::{Ctx, Report};
use crate::sys::process::ChildExit;

/// Timer ids `first_timer .. first_timer + max_timers()` and tokens
/// `first_token ..` (local to the storage service) belong to the jobs.
pub struct Jobs {
    _jobs: Vec<Job>,
}

impl Jobs {
    pub fn new(jobs: &[Job]) -> Jobs {
        Jobs {
            _jobs: jobs.to_vec(),
        }
    }
    pub fn max_timers(&self) -> usize {
        0
    }
    pub fn start(
        &mut self,
        _ctx: &mut Ctx<'_>,
        _first_timer: u32,
        _first_token: u64,
    ) -> io::Result<()> {
        Ok(())
    }
    pub fn on_timer(&mut self, _id: u32, _ctx: &mut Ctx<'_>) {}
    pub fn on_ready(&mut self, _local: u64, _ctx: &mut Ctx<'_>) {}
    pub fn on_child_exit(&mut self, _pid: Pid, _exit: ChildExit, _ctx: &mut Ctx<'_>) -> bool {
        false
    }
    pub fn report(&self, _report: &mut Report) {}
    pub fn stop(&mut self, _ctx: &mut Ctx<'_>) {}
}
