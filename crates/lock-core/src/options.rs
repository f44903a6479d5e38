//! Options for acquiring and holding a lock.

use std::time::Duration;

use crate::error::LockError;
use crate::key::HolderMeta;

/// The shortest lease accepted.
pub const MIN_LEASE: Duration = Duration::from_millis(50);
/// The longest operation timeout accepted (an hour): a store that has not answered by then
/// will not.
pub const MAX_OP_TIMEOUT: Duration = Duration::from_secs(3600);
/// The longest lease accepted (a day). Longer leases are almost always a bug: a crashed
/// holder would block the key for that long.
pub const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);

/// The margin taken off a lease of `lease` for clock drift between client and store:
/// 1% of the lease plus 2 ms (the figure Redlock uses).
pub fn drift_for(lease: Duration) -> Duration {
    lease / 100 + Duration::from_millis(2)
}

/// `Ok` if `lease` is within [`MIN_LEASE`]..=[`MAX_LEASE`]; else an
/// [`LockError::InvalidOptions`] that names it as `what`.
pub fn check_lease(what: &str, lease: Duration) -> Result<(), LockError> {
    if (MIN_LEASE..=MAX_LEASE).contains(&lease) {
        return Ok(());
    }
    Err(LockError::InvalidOptions(format!(
        "{what} {lease:?} is out of range ({MIN_LEASE:?} to {MAX_LEASE:?})"
    )))
}

/// How long `acquire` waits for a held key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WaitPolicy {
    /// Do not wait: a held key gives [`LockError::Contended`] at once.
    NoWait,
    /// Wait up to this long, then [`LockError::Timeout`].
    Timeout(Duration),
    /// Wait until granted (or the future is dropped).
    Forever,
}

/// Exponential backoff with full jitter, for backends that must poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backoff {
    /// First delay.
    pub min: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(5),
            max: Duration::from_millis(250),
        }
    }
}

impl Backoff {
    /// A backoff between `min` and `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max }
    }

    /// The delay before attempt `attempt + 1`: uniformly random in `[min, min * 2^attempt]`,
    /// capped at `max` ("full jitter", so waiters do not poll in step).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .min
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max)
            .max(self.min);
        let span = (ceiling - self.min).as_micros() as u64;
        let jitter = if span == 0 {
            0
        } else {
            rand::random::<u64>() % (span + 1)
        };
        self.min + Duration::from_micros(jitter)
    }
}

/// Options for one acquisition.
///
/// ```
/// use std::time::Duration;
/// use lock_core::{LockOptions, WaitPolicy};
/// let opts = LockOptions::default()
///     .lease(Duration::from_secs(10))
///     .wait(WaitPolicy::Timeout(Duration::from_secs(2)));
/// assert!(opts.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockOptions {
    /// Lease length (TTL backends). Default 30 s.
    pub lease: Duration,
    /// How long to wait for a held key. Default: up to 30 s.
    pub wait: WaitPolicy,
    /// Renew automatically while held. Default on.
    pub auto_renew: bool,
    /// Renewal period; default a third of the lease.
    pub renew_every: Option<Duration>,
    /// Poll pacing for backends that must poll.
    pub backoff: Backoff,
    /// Bound on every single store operation. Default 5 s.
    pub op_timeout: Duration,
    /// Holder metadata stored with the lease. Default: this host and pid.
    pub meta: HolderMeta,
}

impl Default for LockOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            wait: WaitPolicy::Timeout(Duration::from_secs(30)),
            auto_renew: true,
            renew_every: None,
            backoff: Backoff::default(),
            op_timeout: Duration::from_secs(5),
            meta: HolderMeta::this_process(),
        }
    }
}

impl LockOptions {
    /// Sets the lease length.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets the wait policy.
    #[must_use]
    pub fn wait(mut self, wait: WaitPolicy) -> Self {
        self.wait = wait;
        self
    }

    /// Turns automatic renewal on or off.
    #[must_use]
    pub fn auto_renew(mut self, on: bool) -> Self {
        self.auto_renew = on;
        self
    }

    /// Sets the renewal period.
    #[must_use]
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.renew_every = Some(every);
        self
    }

    /// Sets the poll backoff.
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the per-operation timeout.
    #[must_use]
    pub fn op_timeout(mut self, t: Duration) -> Self {
        self.op_timeout = t;
        self
    }

    /// Sets the holder metadata.
    #[must_use]
    pub fn meta(mut self, meta: HolderMeta) -> Self {
        self.meta = meta;
        self
    }

    /// Sets the holder label, keeping host and pid.
    #[must_use]
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.meta.label = Some(label.into());
        self
    }

    /// The renewal period in effect.
    pub fn renewal_period(&self) -> Duration {
        self.renewal_period_for(self.lease)
    }

    /// The renewal period for a lease of `lease` (after [`LockGuard::extend`](crate::LockGuard::extend)
    /// changed it): `renew_every` while it leaves room before the safe deadline, else a
    /// third of the lease.
    pub fn renewal_period_for(&self, lease: Duration) -> Duration {
        match self.renew_every {
            Some(every) if every + drift_for(lease) < lease => every,
            _ => lease / 3,
        }
    }

    /// Checks the options; called before any I/O.
    pub fn validate(&self) -> Result<(), LockError> {
        let bad = |m: String| Err(LockError::InvalidOptions(m));
        check_lease("lease", self.lease)?;
        if let Some(every) = self.renew_every {
            let room = self.lease.saturating_sub(drift_for(self.lease));
            if every.is_zero() || every >= room {
                return bad(format!(
                    "renew_every {every:?} must be greater than zero and shorter than the lease \
                     {:?} minus its drift margin {:?}: the lock would be lost before its first \
                     renewal",
                    self.lease,
                    drift_for(self.lease)
                ));
            }
        }
        if self.op_timeout.is_zero() || self.op_timeout > MAX_OP_TIMEOUT {
            return bad(format!(
                "op_timeout must be greater than zero and at most {MAX_OP_TIMEOUT:?}"
            ));
        }
        if self.backoff.min.is_zero() || self.backoff.min > self.backoff.max {
            return bad("backoff needs 0 < min <= max".into());
        }
        if let WaitPolicy::Timeout(t) = self.wait {
            if t > MAX_LEASE * 365 {
                return bad(format!(
                    "wait timeout {t:?} is absurd; use WaitPolicy::Forever"
                ));
            }
        }
        self.meta.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_catches_bad_leases() {
        let o = LockOptions::default();
        assert!(o.clone().lease(Duration::ZERO).validate().is_err());
        assert!(o
            .clone()
            .lease(Duration::from_millis(1))
            .validate()
            .is_err());
        assert!(o.clone().lease(MAX_LEASE * 2).validate().is_err());
        assert!(o
            .clone()
            .renew_every(Duration::from_secs(60))
            .validate()
            .is_err());
        assert!(o.validate().is_ok());
    }

    #[test]
    fn backoff_stays_in_bounds() {
        let b = Backoff::new(Duration::from_millis(2), Duration::from_millis(40));
        for a in 0..40 {
            let d = b.delay(a);
            assert!(d >= b.min && d <= b.max, "{d:?}");
        }
    }
}
