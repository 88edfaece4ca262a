//! Time as the coordinator sees it. Deadlines use a monotonic instant;
//! what is persisted (fence deadlines, history) uses wall-clock
//! milliseconds derived from that same instant, so a simulation with
//! tokio's paused time sees both move together, and a clock stepped while
//! the coordinator runs does not shorten a fence.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    origin: Instant,
    origin_ms: i64,
}

impl Clock {
    /// Wall-clock time now, then monotonic from here.
    pub fn system() -> Self {
        let origin_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Self::starting_at(origin_ms)
    }

    /// A clock that reads `origin_ms` now (simulations).
    pub fn starting_at(origin_ms: i64) -> Self {
        Self {
            origin: Instant::now(),
            origin_ms,
        }
    }

    pub fn now(&self) -> Instant {
        Instant::now()
    }

    pub fn wall_ms(&self) -> i64 {
        self.origin_ms + self.origin.elapsed().as_millis() as i64
    }

    /// The wall-clock time of an instant.
    pub fn wall_ms_at(&self, at: Instant) -> i64 {
        if at >= self.origin {
            self.origin_ms + (at - self.origin).as_millis() as i64
        } else {
            self.origin_ms - (self.origin - at).as_millis() as i64
        }
    }
}
