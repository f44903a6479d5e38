//! A recorded history of lock operations and fenced writes, and the checker that verifies
//! on it, for every key:
//!
//! 1. no token is granted twice;
//! 2. tokens follow real time: a grant completed before another acquire was invoked has
//!    the lower token;
//! 3. the tokens of accepted writes never decrease;
//! 4. every accepted write carries a token granted to its writer;
//! 5. a read-modify-write counter ends at exactly the number of accepted increments.
//!
//! Overlaps of belief (two clients believing they hold a key at once) are counted, not
//! failed: under pauses they are expected, and the fence is what keeps the data safe.

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
    /// What the holder's client knows of a TTL grant's lease: it runs on the store at
    /// least until `until_us` (the grant's safe deadline, measured from before the request
    /// that won it was sent), unless released earlier.
    LeaseBound {
        /// Client id.
        client: String,
        /// Key.
        key: String,
        /// Token.
        token: u64,
        /// The lower bound of the lease's end, on the history's clock.
        until_us: u64,
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
    /// The holder's guard reported the lock lost.
    Lost {
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
    /// The kinds of the violations found.
    pub kinds: std::collections::BTreeSet<Violation>,
}

/// The invariant a violation breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Violation {
    /// A token was granted twice for one key.
    TokenGrantedTwice,
    /// A grant completed before another acquire was invoked, yet its token is not lower.
    TokensOutOfOrder,
    /// The tokens of accepted writes went down.
    WritesWentBackwards,
    /// An accepted write carried a token its writer was not granted.
    ForeignToken,
    /// A read-modify-write counter ended below its number of accepted increments.
    LostUpdate,
}

impl CheckReport {
    /// No violations.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    fn push(&mut self, kind: Violation, detail: String) {
        self.kinds.insert(kind);
        self.violations.push(detail);
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
                    report.push(Violation::TokenGrantedTwice, format!(
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
                        report.push(Violation::WritesWentBackwards, format!(
                            "accepted writes on {key} went backwards: token {prev_token} at {prev_at} us, then token {token} at {} us by {client}",
                            st.at_us
                        ));
                    }
                }
                last_accepted.insert(key.clone(), (*token, st.at_us));
                match owner.get(&(key.clone(), *token)) {
                    Some(o) if o == client => {}
                    Some(o) => report.push(Violation::ForeignToken, format!(
                        "write on {key} with token {token} by {client}, but {token} was granted to {o}"
                    )),
                    None => report.push(Violation::ForeignToken, format!(
                        "write on {key} with token {token} by {client}, a token never granted"
                    )),
                }
            }
            Event::AcquireFailed { .. }
            | Event::AcquireUnknown { .. }
            | Event::LeaseBound { .. }
            | Event::Lost { .. } => {}
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
                    report.push(Violation::TokensOutOfOrder, format!(
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
            report.push(Violation::LostUpdate, format!(
                "lost update on {key}: the counter ends at {value} but the fence accepted {accepted} increments"
            ));
        }
    }
    report
}

/// What a TTL lease lets us conclude from a history, beyond the checker's invariants.
#[derive(Debug, Default, Serialize)]
pub struct LeaseFindings {
    /// The store granted a key to a second client while the first client's lease was
    /// certainly still running (before the first acquire was invoked plus one lease) and
    /// before the first holder began to release: the store lost or ignored the first grant
    /// (a failover without replica acknowledgement, a restart without persistence).
    pub double_grants: Vec<String>,
    /// A grant reached its client after a grant with a higher token had reached its
    /// client: it was delivered after the store had moved on (its lease was over).
    pub stale_deliveries: Vec<String>,
}

/// Checks a history whose grants are TTL leases of `lease` (the same for every client)
/// for double grants and stale deliveries (see [`LeaseFindings`]). Both conclusions are
/// sound: a lease on the store starts no earlier than its acquire was invoked (nor ends
/// before the client's [`Event::LeaseBound`]), and a grant with a lower token was issued
/// earlier.
pub fn lease_findings(events: &[Stamped], lease: Duration) -> LeaseFindings {
    let lease_us = lease.as_micros() as u64;
    let mut out = LeaseFindings::default();
    let mut invoked: HashMap<u64, u64> = HashMap::new();
    // Per key: (invoked, granted, token, client).
    let mut grants: BTreeMap<String, Vec<(u64, u64, u64, String)>> = BTreeMap::new();
    let mut released: HashMap<(String, u64), u64> = HashMap::new();
    let mut bound: HashMap<(String, u64), u64> = HashMap::new();
    for st in events {
        match &st.event {
            Event::AcquireInvoked { op, .. } => {
                invoked.insert(*op, st.at_us);
            }
            Event::Granted {
                op,
                client,
                key,
                token,
            } => {
                let inv = invoked.get(op).copied().unwrap_or(st.at_us);
                grants.entry(key.clone()).or_default().push((
                    inv,
                    st.at_us,
                    *token,
                    client.clone(),
                ));
            }
            Event::ReleaseInvoked { key, token, .. } => {
                released.entry((key.clone(), *token)).or_insert(st.at_us);
            }
            Event::LeaseBound {
                key,
                token,
                until_us,
                ..
            } => {
                bound.insert((key.clone(), *token), *until_us);
            }
            _ => {}
        }
    }
    for (key, mut gs) in grants {
        gs.sort_by_key(|g| g.1);
        let mut highest: Option<&(u64, u64, u64, String)> = None;
        for (i, a) in gs.iter().enumerate() {
            if let Some(h) = highest.filter(|h| h.2 > a.2) {
                out.stale_deliveries.push(format!(
                    "key {key}: token {} reached {} at {} us, after token {} had reached {} at {} us",
                    a.2, a.3, a.1, h.2, h.3, h.1
                ));
            }
            if highest.is_none_or(|h| a.2 > h.2) {
                highest = Some(a);
            }
            // The lease ran at least until the client's own bound, or else (no bound
            // recorded) until the acquire's invocation plus one lease.
            let lease_end = bound
                .get(&(key.clone(), a.2))
                .copied()
                .unwrap_or(0)
                .max(a.0 + lease_us);
            let a_end = released
                .get(&(key.clone(), a.2))
                .copied()
                .unwrap_or(u64::MAX)
                .min(lease_end);
            for b in &gs[i + 1..] {
                if b.3 != a.3 && b.1 < a_end {
                    out.double_grants.push(format!(
                        "key {key}: {} granted token {} at {} us while {}'s lease of token {} (acquire invoked at {} us) still ran and it had not released",
                        b.3, b.2, b.1, a.3, a.2, a.0
                    ));
                }
            }
        }
    }
    out
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

    fn at(at_us: u64, event: Event) -> Stamped {
        Stamped { at_us, event }
    }

    fn granted(op: u64, client: &str, token: u64) -> Event {
        Event::Granted {
            op,
            client: client.into(),
            key: "k".into(),
            token,
        }
    }

    fn invoked(op: u64, client: &str) -> Event {
        Event::AcquireInvoked {
            op,
            client: client.into(),
            key: "k".into(),
        }
    }

    fn release(client: &str, token: u64) -> Event {
        Event::ReleaseInvoked {
            client: client.into(),
            key: "k".into(),
            token,
        }
    }

    #[test]
    fn lease_findings_catch_double_grants_and_stale_deliveries() {
        let lease = Duration::from_millis(100);
        // Clean: b is granted after a released, c after a's lease ran out.
        let clean = [
            at(0, invoked(1, "a")),
            at(10, granted(1, "a", 1)),
            at(50, release("a", 1)),
            at(20, invoked(2, "b")),
            at(60, granted(2, "b", 2)),
            at(70, invoked(3, "c")),
            at(200_000, granted(3, "c", 3)),
        ];
        let mut clean = clean.to_vec();
        clean.sort_by_key(|e| e.at_us);
        let f = lease_findings(&clean, lease);
        assert!(f.double_grants.is_empty(), "{:?}", f.double_grants);
        assert!(f.stale_deliveries.is_empty(), "{:?}", f.stale_deliveries);
        // b granted 50 ms into a's lease, a never released: a double grant. Then a's
        // older grant 2 reaches c after b's 3: a stale delivery.
        let bad = [
            at(0, invoked(1, "a")),
            at(1_000, granted(1, "a", 1)),
            at(2_000, invoked(2, "c")),
            at(3_000, invoked(3, "b")),
            at(50_000, granted(3, "b", 3)),
            at(300_000, granted(2, "c", 2)),
        ];
        let f = lease_findings(&bad, lease);
        assert_eq!(f.double_grants.len(), 1, "{:?}", f.double_grants);
        assert_eq!(f.stale_deliveries.len(), 1, "{:?}", f.stale_deliveries);
        // A waiter invoked long before its grant: only its own lease bound shows that b's
        // grant came inside a's lease.
        let waited = [
            at(0, invoked(1, "a")),
            at(500_000, granted(1, "a", 1)),
            at(
                500_001,
                Event::LeaseBound {
                    client: "a".into(),
                    key: "k".into(),
                    token: 1,
                    until_us: 590_000,
                },
            ),
            at(550_000, invoked(2, "b")),
            at(560_000, granted(2, "b", 2)),
        ];
        let f = lease_findings(&waited, lease);
        assert_eq!(f.double_grants.len(), 1, "{:?}", f.double_grants);
        let mut without = waited.to_vec();
        without.remove(2);
        assert!(lease_findings(&without, lease).double_grants.is_empty());
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
