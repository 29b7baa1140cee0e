//! A small queue of deadlines, each with an owner-chosen id.
//!
//! What it is: a fixed-capacity list of `(when, TimerId)`; scheduling an id
//! that is already queued moves it, so each id is pending at most once. The
//! reactor arms its one timerfd for [`Deadlines::earliest`]. Capacity is set
//! at start; nothing allocates afterwards. What it is not: a timer wheel.
//! Services keep their own per-item bookkeeping and queue one deadline each,
//! so a linear scan over a few dozen entries is all this needs.

use crate::sys::clock::Instant;

/// Who a deadline belongs to and what it means to them. The reactor does not
/// interpret it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerId {
    pub owner: u16,
    pub id: u32,
}

#[derive(Debug)]
pub struct QueueFull;

pub struct Deadlines {
    entries: Vec<(Instant, TimerId)>,
}

impl Deadlines {
    pub fn with_capacity(capacity: usize) -> Deadlines {
        Deadlines {
            entries: Vec::with_capacity(capacity),
        }
    }

    /// Queues `id` at `at`, replacing an earlier schedule of the same id.
    pub fn schedule(&mut self, at: Instant, id: TimerId) -> Result<(), QueueFull> {
        if let Some(e) = self.entries.iter_mut().find(|e| e.1 == id) {
            e.0 = at;
            return Ok(());
        }
        if self.entries.len() == self.entries.capacity() {
            return Err(QueueFull);
        }
        self.entries.push((at, id));
        Ok(())
    }

    pub fn cancel(&mut self, id: TimerId) {
        if let Some(i) = self.entries.iter().position(|e| e.1 == id) {
            self.entries.swap_remove(i);
        }
    }

    pub fn is_scheduled(&self, id: TimerId) -> bool {
        self.entries.iter().any(|e| e.1 == id)
    }

    pub fn earliest(&self) -> Option<Instant> {
        self.entries.iter().map(|e| e.0).min()
    }

    /// Removes and returns the earliest deadline that is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<TimerId> {
        let (i, _) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.0 <= now)
            .min_by_key(|(_, e)| e.0)?;
        Some(self.entries.swap_remove(i).1)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: TimerId = TimerId { owner: 0, id: 1 };
    const B: TimerId = TimerId { owner: 1, id: 1 };
    const C: TimerId = TimerId { owner: 1, id: 2 };

    #[test]
    fn due_deadlines_come_out_in_time_order() {
        let mut q = Deadlines::with_capacity(4);
        let t = Instant::from_nanos(1_000);
        q.schedule(t.after_millis(3), A).unwrap();
        q.schedule(t.after_millis(1), B).unwrap();
        q.schedule(t.after_millis(9), C).unwrap();
        assert_eq!(q.earliest(), Some(t.after_millis(1)));
        let now = t.after_millis(5);
        assert_eq!(q.pop_due(now), Some(B));
        assert_eq!(q.pop_due(now), Some(A));
        assert_eq!(q.pop_due(now), None);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn rescheduling_moves_instead_of_duplicating() {
        let mut q = Deadlines::with_capacity(1);
        let t = Instant::from_nanos(0);
        q.schedule(t.after_millis(10), A).unwrap();
        q.schedule(t.after_millis(2), A).unwrap();
        assert_eq!(q.len(), 1);
        assert_eq!(q.earliest(), Some(t.after_millis(2)));
        assert!(q.schedule(t, B).is_err(), "capacity is fixed");
        q.cancel(A);
        assert!(q.is_empty());
    }
}
