//! The `storage` service: disk thresholds, retention, emergency cleanup,
//! orphans, log rotation and scheduled jobs.
//!
//! SKELETON (issue 6 in progress).

pub mod jobs;
pub mod rotate;
pub mod tree;

use std::io;

use nix::unistd::Pid;

use crate::config::{Config, Storage as StorageConfig};
use crate::services::{Ctx, Report, Service};
use crate::sys::process::ChildExit;

/// Timer ids of the storage service; the jobs own `JOBS_TIMER..`.
const CHECK: u32 = 0;
const ROTATE: u32 = 3;
pub const JOBS_TIMER: u32 = 1000;
/// Local tokens from here on belong to the jobs.
pub const JOBS_TOKEN: u64 = 1 << 32;
/// Bytes copied or compressed per rotation step.
const ROTATE_STEP_BYTES: usize = 256 * 1024;

pub struct Storage {
    config: StorageConfig,
    rotation: rotate::Rotation,
    jobs: jobs::Jobs,
}

impl Storage {
    pub fn new(config: &Config) -> Storage {
        let s = config.storage.clone().unwrap_or_else(|| {
            unreachable!("services::build makes Storage only for a storage block")
        });
        Storage {
            rotation: rotate::Rotation::new(&s.rotate),
            jobs: jobs::Jobs::new(&s.jobs),
            config: s,
        }
    }
}

impl Service for Storage {
    fn name(&self) -> &'static str {
        "storage"
    }
    fn max_timers(&self) -> usize {
        8 + self.jobs.max_timers()
    }
    fn start(&mut self, ctx: &mut Ctx<'_>) -> io::Result<()> {
        self.jobs.start(ctx, JOBS_TIMER, JOBS_TOKEN)?;
        let _ = ctx.schedule(ctx.now, CHECK);
        Ok(())
    }
    fn on_ready(&mut self, local: u64, ctx: &mut Ctx<'_>) {
        if local >= JOBS_TOKEN {
            self.jobs.on_ready(local - JOBS_TOKEN, ctx);
        }
    }
    fn on_timer(&mut self, id: u32, ctx: &mut Ctx<'_>) {
        match id {
            CHECK => {
                self.rotation.begin(ctx.wall);
                let _ = ctx.schedule(ctx.now, ROTATE);
                let every = self.config.check_every.as_millis();
                let _ = ctx.schedule(ctx.now.after_millis(every), CHECK);
            }
            ROTATE if self.rotation.step(ROTATE_STEP_BYTES, ctx.wall) => {
                let _ = ctx.schedule(ctx.now, ROTATE);
            }
            id if id >= JOBS_TIMER => self.jobs.on_timer(id - JOBS_TIMER, ctx),
            _ => {}
        }
    }
    fn on_child_exit(&mut self, pid: Pid, exit: ChildExit, ctx: &mut Ctx<'_>) -> bool {
        self.jobs.on_child_exit(pid, exit, ctx)
    }
    fn reload(&mut self, _config: &Config, _ctx: &mut Ctx<'_>) {}
    fn report(&self, report: &mut Report) {
        self.rotation.report(report);
        self.jobs.report(report);
    }
    fn stop(&mut self, ctx: &mut Ctx<'_>) {
        self.jobs.stop(ctx);
    }
}
