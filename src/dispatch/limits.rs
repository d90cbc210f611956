//! Per-key limits (SPEC §4 `throttle`, `cap`): a rate limit that makes calls
//! wait, a bulkhead that bounds calls in flight, and a cap that rejects calls
//! beyond a count per sliding window. Every action whose key (`throttle.key`,
//! default the URL host) is the same shares one `KeyLimits`.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::units::Rate;

/// The limits declared for one key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitSpec {
    pub rate: Option<Rate>,
    pub burst: u32,
    pub max_concurrency: Option<u32>,
    pub cap: Option<CapSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapSpec {
    pub max_calls: u64,
    pub per: Duration,
}

impl LimitSpec {
    pub fn is_empty(&self) -> bool {
        self.rate.is_none() && self.max_concurrency.is_none() && self.cap.is_none()
    }

    /// Merges the limits another action declares for the same key. Each
    /// aspect applies to the whole key; two actions declaring one aspect
    /// differently is a configuration error (which one would win is a guess).
    pub fn merge(&mut self, other: &LimitSpec) -> Result<(), String> {
        fn one<T: PartialEq + Copy + std::fmt::Debug>(
            mine: &mut Option<T>,
            theirs: Option<T>,
            what: &str,
        ) -> Result<(), String> {
            match (*mine, theirs) {
                (Some(a), Some(b)) if a != b => Err(format!(
                    "{what} differs from another action with the same key"
                )),
                (None, Some(b)) => {
                    *mine = Some(b);
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        if self.rate.is_some() && other.rate.is_some() && self.burst != other.burst {
            return Err("throttle.burst differs from another action with the same key".into());
        }
        if self.rate.is_none() {
            self.burst = other.burst;
        }
        one(&mut self.rate, other.rate, "throttle.rate")?;
        one(
            &mut self.max_concurrency,
            other.max_concurrency,
            "throttle.max_concurrency",
        )?;
        one(&mut self.cap, other.cap, "cap")?;
        Ok(())
    }
}

/// See [`KeyLimits::try_enter`].
#[derive(Debug)]
pub enum Slot {
    /// No bulkhead.
    Unbounded,
    /// Held until dropped.
    Taken(OwnedSemaphorePermit),
    /// Every slot is taken: wait with [`KeyLimits::enter`].
    Busy,
}

/// The live limits of one key.
pub struct KeyLimits {
    pub key: String,
    /// What these limits were built from.
    pub spec: LimitSpec,
    rate: Option<DefaultDirectRateLimiter>,
    bulkhead: Option<Arc<Semaphore>>,
    cap: Option<Mutex<CapWindow>>,
}

impl std::fmt::Debug for KeyLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLimits")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl KeyLimits {
    pub fn new(key: String, spec: &LimitSpec) -> KeyLimits {
        let rate = spec.rate.map(|r| {
            let burst = NonZeroU32::new(spec.burst.max(1)).unwrap_or(NonZeroU32::MIN);
            let quota = Quota::with_period(r.interval()).map(|q| q.allow_burst(burst));
            RateLimiter::direct(quota.unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN)))
        });
        KeyLimits {
            key,
            spec: *spec,
            rate,
            bulkhead: spec
                .max_concurrency
                .map(|n| Arc::new(Semaphore::new(n.max(1) as usize))),
            cap: spec
                .cap
                .map(|c| Mutex::new(CapWindow::new(c.max_calls, c.per, Instant::now()))),
        }
    }

    /// Waits for a rate permit; returns how long it waited.
    pub async fn throttle(&self) -> Duration {
        match &self.rate {
            None => Duration::ZERO,
            Some(limiter) => {
                let start = Instant::now();
                limiter.until_ready().await;
                start.elapsed()
            }
        }
    }

    /// Takes a rate permit if one is free now.
    pub fn try_throttle(&self) -> bool {
        self.rate
            .as_ref()
            .is_none_or(|limiter| limiter.check().is_ok())
    }

    /// Takes one call from the cap; false when the cap is reached.
    pub fn take_cap(&self) -> bool {
        match &self.cap {
            None => true,
            Some(window) => match window.lock() {
                Ok(mut w) => w.try_acquire(Instant::now()),
                Err(poisoned) => poisoned.into_inner().try_acquire(Instant::now()),
            },
        }
    }

    /// A bulkhead slot if one is free now.
    pub fn try_enter(&self) -> Slot {
        match &self.bulkhead {
            None => Slot::Unbounded,
            Some(sem) => match sem.clone().try_acquire_owned() {
                Ok(permit) => Slot::Taken(permit),
                Err(tokio::sync::TryAcquireError::NoPermits) => Slot::Busy,
                // Never closed; behave as unbounded rather than block forever.
                Err(tokio::sync::TryAcquireError::Closed) => Slot::Unbounded,
            },
        }
    }

    /// Waits for a bulkhead slot (none when unbounded).
    pub async fn enter(&self) -> Option<OwnedSemaphorePermit> {
        match &self.bulkhead {
            None => None,
            Some(sem) => sem.clone().acquire_owned().await.ok(),
        }
    }
}

/// A sliding-window counter: the window `per` is split into buckets, and a
/// call is allowed while the calls in the buckets that overlap the last `per`
/// stay below `max_calls`. Counting the oldest, partly expired bucket in full
/// errs on the safe side: no window of length `per` ever holds more than
/// `max_calls` calls, at the price of rejecting slightly early at a boundary.
#[derive(Debug)]
pub struct CapWindow {
    max_calls: u64,
    bucket: Duration,
    buckets_per_window: u64,
    origin: Instant,
    /// (bucket index, calls) from oldest to newest.
    counts: VecDeque<(u64, u64)>,
    total: u64,
}

const BUCKETS: u32 = 100;

impl CapWindow {
    pub fn new(max_calls: u64, per: Duration, origin: Instant) -> CapWindow {
        let bucket = (per / BUCKETS).max(Duration::from_millis(1));
        let buckets_per_window = (per.as_nanos() / bucket.as_nanos()).max(1) as u64;
        CapWindow {
            max_calls,
            bucket,
            buckets_per_window,
            origin,
            counts: VecDeque::new(),
            total: 0,
        }
    }

    pub fn try_acquire(&mut self, now: Instant) -> bool {
        let index =
            (now.saturating_duration_since(self.origin).as_nanos() / self.bucket.as_nanos()) as u64;
        // Buckets [index - buckets_per_window, index] overlap (now - per, now].
        let oldest = index.saturating_sub(self.buckets_per_window);
        while let Some(&(i, n)) = self.counts.front() {
            if i >= oldest {
                break;
            }
            self.total -= n;
            self.counts.pop_front();
        }
        if self.total >= self.max_calls {
            return false;
        }
        match self.counts.back_mut() {
            Some((i, n)) if *i == index => *n += 1,
            _ => self.counts.push_back((index, 1)),
        }
        self.total += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_allows_max_calls_then_rejects_until_the_window_slides() {
        let t0 = Instant::now();
        let mut w = CapWindow::new(5, Duration::from_secs(10), t0);
        let results: Vec<bool> = (0..8)
            .map(|i| w.try_acquire(t0 + Duration::from_millis(i)))
            .collect();
        assert_eq!(
            results,
            vec![true, true, true, true, true, false, false, false]
        );
        assert!(!w.try_acquire(t0 + Duration::from_secs(9)));
        // A full window (plus the one boundary bucket) later, calls are allowed again.
        assert!(w.try_acquire(t0 + Duration::from_millis(10_200)));
    }

    #[test]
    fn no_window_ever_holds_more_than_max_calls() {
        let t0 = Instant::now();
        let per = Duration::from_millis(1000);
        let mut w = CapWindow::new(10, per, t0);
        let mut accepted = Vec::new();
        for step in 0..5000u64 {
            let at = t0 + Duration::from_millis(step);
            if w.try_acquire(at) {
                accepted.push(at);
            }
        }
        for (i, &start) in accepted.iter().enumerate() {
            let inside = accepted[i..]
                .iter()
                .take_while(|&&t| t < start + per)
                .count();
            assert!(inside <= 10, "{inside} calls within one window");
        }
        assert!(
            accepted.len() >= 40,
            "the cap should recover each window, got {}",
            accepted.len()
        );
    }

    #[test]
    fn merging_equal_limits_works_and_conflicts_are_errors() {
        let rate = Some(Rate {
            count: 10,
            per: Duration::from_secs(1),
        });
        let mut a = LimitSpec {
            rate,
            burst: 1,
            ..Default::default()
        };
        let b = LimitSpec {
            max_concurrency: Some(4),
            ..Default::default()
        };
        a.merge(&b).unwrap();
        assert_eq!(a.max_concurrency, Some(4));
        assert_eq!(a.rate, rate);
        let c = LimitSpec {
            rate: Some(Rate {
                count: 20,
                per: Duration::from_secs(1),
            }),
            burst: 1,
            ..Default::default()
        };
        assert!(a.merge(&c).is_err());
    }
}
