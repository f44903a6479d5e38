//! Deferred renewal. A guard's renewal task is spawned only when its first renewal (or,
//! with renewal off, its safe deadline) comes due. Most locks are released before then, so
//! they cost no task of their own and no wake-up of another worker thread at grant and
//! release, which was the largest cost of a short lock cycle on a two-core machine; one
//! timer task per runtime serves them all.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};

/// What runs when an entry comes due (given the time it fired); it should only spawn.
pub(crate) type Starter = Box<dyn FnOnce(Instant) + Send>;

/// The per-runtime timer that starts renewal tasks when they come due.
#[derive(Debug)]
pub(crate) struct Scheduler {
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Default)]
struct State {
    due: BTreeMap<(Instant, u64), Starter>,
    seq: u64,
    /// The earliest entry the timer task will wake for; `None` while it waits for work.
    sleeping_until: Option<Instant>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("due", &self.due.len())
            .field("sleeping_until", &self.sleeping_until)
            .field("task", &self.task)
            .finish()
    }
}

/// A guard's place in the schedule; cancel it when the guard stops.
#[derive(Debug)]
pub(crate) struct Ticket {
    sched: Arc<Scheduler>,
    key: (Instant, u64),
}

impl Ticket {
    /// Removes the entry (nothing happens if it already fired). What it would have started
    /// is dropped here, before this returns.
    pub(crate) fn cancel(self) {
        let starter = crate::lock(&self.sched.state).due.remove(&self.key);
        drop(starter);
    }
}

impl Scheduler {
    /// The scheduler of the current runtime (`None` outside one).
    pub(crate) fn current() -> Option<Arc<Self>> {
        static ALL: OnceLock<Mutex<HashMap<tokio::runtime::Id, Arc<Scheduler>>>> = OnceLock::new();
        let id = tokio::runtime::Handle::try_current().ok()?.id();
        let mut all = crate::lock(ALL.get_or_init(Default::default));
        if !all.contains_key(&id) {
            // Forget the schedulers of runtimes that are gone (their timer task ended)
            // and that have nothing left to start.
            all.retain(|_, s| {
                let st = crate::lock(&s.state);
                !(st.due.is_empty() && st.task.as_ref().is_some_and(JoinHandle::is_finished))
            });
        }
        Some(
            all.entry(id)
                .or_insert_with(|| {
                    Arc::new(Self {
                        state: Mutex::new(State::default()),
                        wake: Notify::new(),
                    })
                })
                .clone(),
        )
    }

    /// Runs `start` at `at` unless the ticket is cancelled first.
    pub(crate) fn schedule(self: &Arc<Self>, at: Instant, start: Starter) -> Ticket {
        let mut st = crate::lock(&self.state);
        st.seq += 1;
        let key = (at, st.seq);
        st.due.insert(key, start);
        let alive = st.task.as_ref().is_some_and(|t| !t.is_finished());
        if !alive {
            st.task = Some(tokio::spawn(Self::run(self.clone())));
        } else if st.sleeping_until.is_none_or(|s| at < s) {
            self.wake.notify_one();
        }
        Ticket {
            sched: self.clone(),
            key,
        }
    }

    async fn run(self: Arc<Self>) {
        loop {
            let now = Instant::now();
            let (fired, next) = {
                let mut st = crate::lock(&self.state);
                let mut fired = Vec::new();
                while let Some(entry) = st.due.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    fired.push(entry.remove());
                }
                let next = st.due.first_key_value().map(|(k, _)| k.0);
                st.sleeping_until = next;
                (fired, next)
            };
            for start in fired {
                start(now);
            }
            match next {
                Some(at) => {
                    tokio::select! {
                        () = sleep_until(at) => {}
                        () = self.wake.notified() => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::memory::MemoryStore;
    use crate::{LockClient, LockOptions, LockStatus};

    fn pending() -> usize {
        Scheduler::current().map_or(0, |s| crate::lock(&s.state).due.len())
    }

    /// Released guards leave nothing in the schedule, and never started a task.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn released_guards_leave_no_entries() {
        let client = LockClient::new(MemoryStore::new().connect())
            .with_options(LockOptions::default().lease(Duration::from_secs(30)));
        let before = pending();
        for i in 0..200 {
            let g = client.acquire(&format!("k{i}")).await.expect("acquire");
            assert_eq!(pending(), before + 1);
            g.release().await.expect("release");
        }
        let dropped = client.acquire("dropped").await.expect("acquire");
        drop(dropped);
        assert_eq!(pending(), before);
    }

    /// A guard held past several renewal periods is renewed by a task started when the
    /// first renewal came due, and stays held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deferred_renewal_keeps_the_lock() {
        let client = LockClient::new(MemoryStore::new().connect())
            .with_options(LockOptions::default().lease(Duration::from_millis(300)));
        let g = client.acquire("k").await.expect("acquire");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(g.status(), LockStatus::Held);
        assert!(
            client.try_acquire("k").await.is_err(),
            "the lock was let go"
        );
        g.release().await.expect("release");
    }

    /// With renewal off, the guard turns Lost at its deadline, seen by a watcher.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_renewal_the_watch_sees_lost() {
        let client = LockClient::new(MemoryStore::new().connect()).with_options(
            LockOptions::default()
                .lease(Duration::from_millis(200))
                .auto_renew(false),
        );
        let g = client.acquire("k").await.expect("acquire");
        let mut w = g.watch();
        let seen = tokio::time::timeout(
            Duration::from_secs(2),
            w.wait_for(|s| matches!(s, LockStatus::Lost(_))),
        )
        .await;
        assert!(matches!(seen, Ok(Ok(_))), "no Lost published");
    }
}
