//! A recorded history of lock operations and fenced writes, and the checker that verifies
//! the safety invariants of `shared/guides/SAFETY.md` on it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// One recorded event.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Event {
    /// An acquire was invoked.
    AcquireInvoked {
        /// Operation id (pairs the invocation with its completion).
        op: u64,
        /// Client id.
        client: String,
        /// Key.
        key: String,
    },
    /// The acquire completed with a grant.
    Granted {
        /// Operation id.
        op: u64,
        /// Client id.
        client: String,
        /// Key.
        key: String,
        /// Token.
        token: u64,
    },
    /// The acquire definitely failed (contended, timeout that left nothing).
    AcquireFailed {
        /// Operation id.
        op: u64,
    },
    /// The acquire's outcome is unknown (cancelled or an ambiguous error): the lock may have
    /// been taken.
    AcquireUnknown {
        /// Operation id.
        op: u64,
    },
    /// The holder started releasing (its belief of holding ends here).
    ReleaseInvoked {
        /// Client id.
        client: String,
        /// Key.
        key: String,
        /// Token.
        token: u64,
    },
    /// A write on the fenced resource, with its outcome.
    Write {
        /// Client id.
        client: String,
        /// Key (resource name).
        key: String,
        /// Token offered.
        token: u64,
        /// Whether the fence accepted it.
        accepted: bool,
        /// For counter writes: the value written.
        value: u64,
    },
}

/// An event and when it happened (microseconds since the history began).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Stamped {
    /// Microseconds since the history began, on the monotonic clock.
    pub at_us: u64,
    /// The event.
    pub event: Event,
}

/// A thread-safe recorder.
#[derive(Debug)]
pub struct History {
    start: Instant,
    next_op: Mutex<u64>,
    events: Mutex<Vec<Stamped>>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    /// An empty history starting now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            next_op: Mutex::new(0),
            events: Mutex::new(Vec::new()),
        }
    }

    /// Records an event now.
    pub fn record(&self, event: Event) {
        let at_us = self.start.elapsed().as_micros() as u64;
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Stamped { at_us, event });
    }

    /// Records an acquire invocation and returns its operation id.
    pub fn invoke(&self, client: &str, key: &str) -> u64 {
        let op = {
            let mut n = self.next_op.lock().unwrap_or_else(|p| p.into_inner());
            *n += 1;
            *n
        };
        self.record(Event::AcquireInvoked {
            op,
            client: client.to_owned(),
            key: key.to_owned(),
        });
        op
    }

    /// A copy of the events so far.
    pub fn events(&self) -> Vec<Stamped> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Checks the invariants. `final_counters` maps each counter resource to its final
    /// value, for the lost-update check (the value must equal the number of accepted
    /// increments).
    pub fn check(&self, final_counters: &HashMap<String, u64>) -> CheckReport {
        check(&self.events(), final_counters)
    }
}

/// Checks a history recorded elsewhere (for example merged from several processes that
/// stamped their events on the same host-wide monotonic clock). Events must be in time
/// order.
pub fn check_events(events: &[Stamped], final_counters: &HashMap<String, u64>) -> CheckReport {
    check(events, final_counters)
}

/// What the checker found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    /// Grants seen.
    pub grants: usize,
    /// Writes the fence accepted.
    pub accepted_writes: usize,
    /// Writes the fence refused.
    pub refused_writes: usize,
    /// Pairs of clients that both believed they held the same key at once (reported, not
    /// failed: under pauses they are expected; the fence keeps the data safe).
    pub belief_overlaps: usize,
    /// Invariant violations, each with a short excerpt.
    pub violations: Vec<String>,
}

impl CheckReport {
    /// No violations.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

fn check(events: &[Stamped], final_counters: &HashMap<String, u64>) -> CheckReport {
    let mut report = CheckReport::default();
    let mut invoked: HashMap<u64, (u64, String, String)> = HashMap::new();
    // key -> list of (invoked_at, granted_at, token, client)
    let mut grants: BTreeMap<String, Vec<(u64, u64, u64, String)>> = BTreeMap::new();
    // (key, token) -> client
    let mut owner: HashMap<(String, u64), String> = HashMap::new();
    let mut beliefs: BTreeMap<String, Vec<(u64, u64, String)>> = BTreeMap::new();
    let mut open: HashMap<(String, u64), (u64, String)> = HashMap::new();
    let mut last_accepted: HashMap<String, (u64, u64)> = HashMap::new();
    let mut accepted_per_key: HashMap<String, u64> = HashMap::new();
    let end = events.last().map(|e| e.at_us).unwrap_or(0);

    for st in events {
        match &st.event {
            Event::AcquireInvoked { op, client, key } => {
                invoked.insert(*op, (st.at_us, client.clone(), key.clone()));
            }
            Event::Granted {
                op,
                client,
                key,
                token,
            } => {
                report.grants += 1;
                let inv_at = invoked.get(op).map(|i| i.0).unwrap_or(st.at_us);
                if let Some(prev) = owner.insert((key.clone(), *token), client.clone()) {
                    report.violations.push(format!(
                        "token {token} for key {key} granted twice: to {prev} and to {client} (at {} us)",
                        st.at_us
                    ));
                }
                grants.entry(key.clone()).or_default().push((
                    inv_at,
                    st.at_us,
                    *token,
                    client.clone(),
                ));
                open.insert((key.clone(), *token), (st.at_us, client.clone()));
            }
            Event::ReleaseInvoked { key, token, .. } => {
                if let Some((from, client)) = open.remove(&(key.clone(), *token)) {
                    beliefs
                        .entry(key.clone())
                        .or_default()
                        .push((from, st.at_us, client));
                }
            }
            Event::Write {
                client,
                key,
                token,
                accepted,
                ..
            } => {
                if !accepted {
                    report.refused_writes += 1;
                    continue;
                }
                report.accepted_writes += 1;
                *accepted_per_key.entry(key.clone()).or_default() += 1;
                if let Some((prev_token, prev_at)) = last_accepted.get(key) {
                    if token < prev_token {
                        report.violations.push(format!(
                            "accepted writes on {key} went backwards: token {prev_token} at {prev_at} us, then token {token} at {} us by {client}",
                            st.at_us
                        ));
                    }
                }
                last_accepted.insert(key.clone(), (*token, st.at_us));
                match owner.get(&(key.clone(), *token)) {
                    Some(o) if o == client => {}
                    Some(o) => report.violations.push(format!(
                        "write on {key} with token {token} by {client}, but {token} was granted to {o}"
                    )),
                    None => report.violations.push(format!(
                        "write on {key} with token {token} by {client}, a token never granted"
                    )),
                }
            }
            Event::AcquireFailed { .. } | Event::AcquireUnknown { .. } => {}
        }
    }
    for ((key, _), (from, client)) in open {
        beliefs.entry(key).or_default().push((from, end, client));
    }

    // Tokens follow real time: a grant completed before another acquire was invoked has
    // the lower token.
    for (key, gs) in &grants {
        let mut by_grant = gs.clone();
        by_grant.sort_by_key(|g| g.1);
        for (i, a) in by_grant.iter().enumerate() {
            for b in &by_grant[i + 1..] {
                if a.1 < b.0 && a.2 >= b.2 {
                    report.violations.push(format!(
                        "key {key}: grant of token {} to {} completed at {} us, before {} invoked the acquire (at {} us) that got the lower or equal token {}",
                        a.2, a.3, a.1, b.3, b.0, b.2
                    ));
                }
            }
        }
    }

    for (key, mut spans) in beliefs {
        spans.sort_by_key(|s| s.0);
        for (i, a) in spans.iter().enumerate() {
            for b in &spans[i + 1..] {
                if b.0 >= a.1 {
                    break;
                }
                if a.2 != b.2 {
                    report.belief_overlaps += 1;
                    tracing::debug!(%key, "belief overlap");
                }
            }
        }
    }

    for (key, value) in final_counters {
        let accepted = accepted_per_key.get(key).copied().unwrap_or(0);
        if *value != accepted {
            report.violations.push(format!(
                "lost update on {key}: the counter ends at {value} but the fence accepted {accepted} increments"
            ));
        }
    }
    report
}

/// Formats a duration in milliseconds with one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(h: &History, client: &str, token: u64) {
        let op = h.invoke(client, "k");
        h.record(Event::Granted {
            op,
            client: client.into(),
            key: "k".into(),
            token,
        });
    }

    fn write(h: &History, client: &str, token: u64, accepted: bool) {
        h.record(Event::Write {
            client: client.into(),
            key: "k".into(),
            token,
            accepted,
            value: 0,
        });
    }

    #[test]
    fn clean_history_passes() {
        let h = History::new();
        grant(&h, "a", 1);
        write(&h, "a", 1, true);
        grant(&h, "b", 2);
        write(&h, "b", 2, true);
        // a's late write comes strictly after b's grant (microsecond stamps), so both
        // beliefs overlap.
        std::thread::sleep(std::time::Duration::from_millis(2));
        write(&h, "a", 1, false);
        let r = h.check(&HashMap::from([("k".to_owned(), 2)]));
        assert!(r.ok(), "{:?}", r.violations);
        assert_eq!((r.accepted_writes, r.refused_writes), (2, 1));
        assert_eq!(r.belief_overlaps, 1);
    }

    #[test]
    fn each_invariant_is_caught() {
        let h = History::new();
        grant(&h, "a", 5);
        // Events are stamped in microseconds: make "a's grant completed before b's acquire
        // was invoked" strictly true, or a tie leaves the real-time order undecided.
        std::thread::sleep(std::time::Duration::from_millis(2));
        grant(&h, "b", 5); // twice, and not increasing in real time
        write(&h, "b", 5, true);
        write(&h, "a", 4, true); // backwards, and never granted to a
        write(&h, "c", 9, true); // never granted
        let r = h.check(&HashMap::from([("k".to_owned(), 1)])); // lost updates
        let all = r.violations.join("\n");
        for needle in [
            "granted twice",
            "before",
            "went backwards",
            "never granted",
            "lost update",
        ] {
            assert!(all.contains(needle), "missing {needle}: {all}");
        }
    }
}
