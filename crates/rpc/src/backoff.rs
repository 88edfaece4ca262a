//! One policy for every loop that waits and tries again: exponential,
//! jittered (so clients that failed together do not come back in step),
//! capped. Built on backon: calls that give up use its `Retryable`; loops
//! that run until cancelled take their pauses from [`Backoff`].

use std::time::Duration;

pub use backon::Retryable;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Pauses from `min` doubling up to `max` (each plus up to as much again
/// in jitter), until `total` of waiting (`None`: no end).
pub fn policy(min: Duration, max: Duration, total: Option<Duration>) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .without_max_times()
        .with_total_delay(total)
        .with_jitter()
}

/// The pauses of [`policy`] for a loop that retries by hand: it ends
/// once `total` has been waited.
pub fn pauses(min: Duration, max: Duration, total: Duration) -> impl Iterator<Item = Duration> {
    policy(min, max, Some(total)).build()
}

/// The pauses of a loop that runs until cancelled: growing while attempts
/// fail, starting over after one succeeds.
pub struct Backoff {
    builder: ExponentialBuilder,
    pauses: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = policy(min, max, None);
        Self {
            builder,
            pauses: builder.build(),
            max,
        }
    }

    /// The pause before the next attempt.
    pub fn next_pause(&mut self) -> Duration {
        // Without a limit on times or total the policy never ends; the cap
        // stands in should that ever change.
        self.pauses.next().unwrap_or(self.max)
    }

    /// After a success: the next failure waits the shortest pause again.
    pub fn reset(&mut self) {
        self.pauses = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_cap_with_jitter_and_start_over_after_reset() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut b = Backoff::new(min, max);
        let pauses: Vec<Duration> = (0..12).map(|_| b.next_pause()).collect();
        assert!(pauses[0] >= min && pauses[0] < min * 2, "{pauses:?}");
        assert!(pauses.iter().all(|p| *p < max * 2), "{pauses:?}");
        assert!(pauses[11] >= max, "{pauses:?}");
        b.reset();
        assert!(b.next_pause() < min * 2);
    }
}
