//! A circuit breaker per dependency client: after a run of failures it opens and calls are skipped at
//! once, so a dependency that hangs costs one timeout per cool-down, not one per request.
//!
//! Closed: calls go through; `threshold` failures in a row open it. Open: calls are refused until the
//! cool-down has passed; then one call is let through as a probe (half-open). The probe's success
//! closes it, its failure opens it for another cool-down. Every change of state is logged.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// States of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

/// See the module docs.
#[derive(Debug)]
pub struct CircuitBreaker {
    name: std::borrow::Cow<'static, str>,
    threshold: u32,
    cool_down: Duration,
    state: Mutex<State>,
}

impl CircuitBreaker {
    /// A closed breaker for dependency `name` that opens after `threshold` failures in a row and
    /// probes again after `cool_down`.
    pub fn new(
        name: impl Into<std::borrow::Cow<'static, str>>,
        threshold: u32,
        cool_down: Duration,
    ) -> Self {
        Self {
            name: name.into(),
            threshold: threshold.max(1),
            cool_down,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    /// Whether a call may go out now. When the cool-down is over, the first caller gets to probe and
    /// the others keep being refused until the probe reports.
    fn allow(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match *state {
            State::Closed { .. } => true,
            State::HalfOpen => false,
            State::Open { until } if Instant::now() >= until => {
                *state = State::HalfOpen;
                tracing::info!(dependency = %self.name, "circuit half-open: probing");
                true
            }
            State::Open { .. } => false,
        }
    }

    /// Reports how an allowed call went.
    pub fn record(&self, ok: bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let next = match (*state, ok) {
            (State::Closed { failures: 0 }, true) => return,
            (_, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            (_, false) => State::Open {
                until: Instant::now() + self.cool_down,
            },
        };
        match (*state, next) {
            (State::Closed { .. }, State::Closed { .. }) => {}
            (_, State::Closed { .. }) => {
                tracing::info!(
                    dependency = %self.name,
                    "circuit closed: calls go through again"
                );
            }
            (State::Closed { .. } | State::HalfOpen, State::Open { .. }) => tracing::warn!(
                dependency = %self.name,
                cool_down_ms = self.cool_down.as_millis() as u64,
                "circuit opened: calls are skipped until the cool-down has passed"
            ),
            _ => {}
        }
        *state = next;
    }

    /// An attempt at a call, if one may go out now (closed: always; open: once the cool-down has passed, one probe at a time). Report its outcome with
    /// [`Attempt::record`]; an attempt dropped unreported (the caller was cancelled: a client hung up,
    /// a sibling call failed) is not a verdict on the dependency, but if it was the half-open probe the
    /// next call probes instead, so the breaker never waits for a report that will not come.
    pub fn attempt(&self) -> Option<Attempt<'_>> {
        self.allow().then_some(Attempt {
            breaker: self,
            reported: false,
        })
    }

    /// A probe was abandoned: let the next call probe.
    fn abandon(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *state == State::HalfOpen {
            *state = State::Open {
                until: Instant::now(),
            };
        }
    }

    /// Whether calls are being skipped now.
    pub fn is_open(&self) -> bool {
        !matches!(
            *self.state.lock().unwrap_or_else(|e| e.into_inner()),
            State::Closed { .. }
        )
    }
}

/// A call let through by a [`CircuitBreaker`]; see [`CircuitBreaker::attempt`].
#[derive(Debug)]
pub struct Attempt<'a> {
    breaker: &'a CircuitBreaker,
    reported: bool,
}

impl Attempt<'_> {
    /// Reports how the call went.
    pub fn record(mut self, ok: bool) {
        self.reported = true;
        self.breaker.record(ok);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.reported {
            self.breaker.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_probes_after_the_cool_down_and_closes_on_success() {
        let breaker = CircuitBreaker::new("test", 3, Duration::from_millis(30));
        for _ in 0..2 {
            assert!(breaker.allow());
            breaker.record(false);
        }
        assert!(!breaker.is_open(), "two failures are not a run of three");
        assert!(breaker.allow());
        breaker.record(false);
        assert!(breaker.is_open());
        assert!(!breaker.allow(), "open: skipped at once");
        std::thread::sleep(Duration::from_millis(40));
        assert!(breaker.allow(), "the first call after the cool-down probes");
        assert!(!breaker.allow(), "one probe at a time");
        breaker.record(false);
        assert!(!breaker.allow(), "a failed probe opens it again");
        std::thread::sleep(Duration::from_millis(40));
        assert!(breaker.allow());
        breaker.record(true);
        assert!(!breaker.is_open());
        assert!(
            breaker.allow() && breaker.allow(),
            "closed: everything goes through"
        );
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_call_probe_instead_of_wedging_the_breaker() {
        let breaker = CircuitBreaker::new("test", 1, Duration::from_millis(10));
        breaker.attempt().unwrap().record(false);
        std::thread::sleep(Duration::from_millis(20));
        let probe = breaker.attempt().expect("the cool-down is over: a probe");
        assert!(breaker.attempt().is_none(), "one probe at a time");
        drop(probe); // cancelled before it reported
        let next = breaker.attempt().expect("the next call probes");
        next.record(true);
        assert!(!breaker.is_open());
        // An abandoned call while closed changes nothing.
        drop(breaker.attempt().unwrap());
        assert!(!breaker.is_open());
    }

    #[test]
    fn a_success_resets_the_run_of_failures() {
        let breaker = CircuitBreaker::new("test", 2, Duration::from_secs(60));
        breaker.record(false);
        breaker.record(true);
        breaker.record(false);
        assert!(!breaker.is_open());
    }
}
