//! Per-identity request rate limits: one token bucket (GCRA) per identity name.
//!
//! A stream counts as one request when it opens. The limit protects the coordinator from one
//! misbehaving or compromised identity; the global concurrency limit and load shedding of the
//! server protect it from all of them together.

use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use llmchain_proto::ApiError;

/// Identities tracked before idle buckets are dropped.
const MAX_TRACKED: usize = 100_000;

/// Requests per second and burst allowed to each identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: NonZeroU32,
    /// Requests that may arrive at once after a quiet period.
    pub burst: NonZeroU32,
}

impl Default for RateLimit {
    fn default() -> Self {
        // An agent's sync opens one FetchBlob per tensor (about 300 for SmolLM2) at once.
        RateLimit { per_second: NonZeroU32::new(200).unwrap(), burst: NonZeroU32::new(1000).unwrap() }
    }
}

/// The buckets of every identity.
pub struct RateLimiters {
    limit: RateLimit,
    buckets: DefaultKeyedRateLimiter<String>,
}

impl std::fmt::Debug for RateLimiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiters").field("limit", &self.limit).finish_non_exhaustive()
    }
}

impl RateLimiters {
    /// Buckets that allow `limit` to each identity.
    pub fn new(limit: RateLimit) -> Self {
        RateLimiters {
            limit,
            buckets: RateLimiter::keyed(Quota::per_second(limit.per_second).allow_burst(limit.burst)),
        }
    }

    /// Takes one token from `name`'s bucket, or refuses with `RESOURCE_EXHAUSTED`.
    pub fn check(&self, name: &str) -> Result<(), ApiError> {
        if self.buckets.len() > MAX_TRACKED {
            self.buckets.retain_recent();
        }
        self.buckets.check_key(&name.to_string()).map_err(|_| {
            ApiError::ResourceExhausted(format!(
                "identity {name} exceeded its rate limit of {} requests per second (burst {})",
                self.limit.per_second, self.limit.burst
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_identity_has_its_own_bucket() {
        let limit = RateLimit { per_second: NonZeroU32::new(1).unwrap(), burst: NonZeroU32::new(3).unwrap() };
        let limiters = RateLimiters::new(limit);
        for _ in 0..3 {
            limiters.check("agent-1").unwrap();
        }
        let err = limiters.check("agent-1").unwrap_err();
        assert!(matches!(err, ApiError::ResourceExhausted(ref m) if m.contains("agent-1")), "{err}");
        // Another identity is not affected by agent-1's burst.
        limiters.check("agent-2").unwrap();
    }
}
