//! Reconnect delays: exponential backoff with jitter, shared by every loop of the agent that
//! retries a link (the session, summary reports, MQTT sources and executors).

use std::time::Duration;

use rand::Rng;

/// Exponential backoff; each delay is drawn from the upper half of its step, so clients that
/// failed together do not retry together.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `min`, capped at `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff { min, max, attempt: 0 }
    }

    /// The next delay: uniform in `[d/2, d]` where `d = min · 2^attempt`, capped at `max`.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.min.saturating_mul(1u32 << self.attempt.min(16)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = d / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_their_jitter_up_to_the_cap_and_reset() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
        let mut b = Backoff::new(min, max);
        for step in [100u64, 200, 400, 800, 1000, 1000] {
            let d = b.next_delay();
            let full = Duration::from_millis(step);
            assert!(d >= full / 2 && d <= full, "{d:?} outside [{:?}, {full:?}]", full / 2);
        }
        b.reset();
        assert!(b.next_delay() <= min);
    }
}
