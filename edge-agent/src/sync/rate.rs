//! A token-bucket rate limiter for received bytes (`--max-download-rate`).
//!
//! Chunks are charged after they arrive; the bucket may go into debt by up to one chunk, and
//! the receiver then sleeps the debt off, so the average rate holds whatever the chunk size.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Limits the average throughput of the callers of [`RateLimiter::acquire`] together.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// A limiter for `bytes_per_sec` (at least 1) with a burst of a tenth of a second.
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec.max(1) as f64;
        let burst = (rate / 10.0).max(1.0);
        RateLimiter { rate, burst, state: Mutex::new((burst, Instant::now())) }
    }

    /// The configured rate in bytes per second.
    pub fn bytes_per_sec(&self) -> u64 {
        self.rate as u64
    }

    /// How long a caller that just received `bytes` must wait; charges the bucket.
    fn charge(&self, bytes: u64) -> Duration {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (tokens, last) = &mut *state;
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        *tokens -= bytes as f64;
        if *tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-*tokens / self.rate) }
    }

    /// Accounts for `bytes` just received, sleeping as long as the rate requires.
    pub async fn acquire(&self, bytes: u64) {
        let wait = self.charge(bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debt_turns_into_waiting_time() {
        let l = RateLimiter::new(1000);
        // The burst (100 bytes) passes at once; 1000 more bytes cost a second, less what refilled
        // between the two calls, which the burst caps at 100 bytes (a tenth of a second) however
        // long a loaded machine takes between them.
        assert_eq!(l.charge(100), Duration::ZERO);
        let wait = l.charge(1000);
        assert!((0.9..=1.0).contains(&wait.as_secs_f64()), "{wait:?}");
    }
}
