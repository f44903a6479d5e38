//! Deferred renewal. A TTL guard's renewal task is spawned only when its first renewal (or,
//! with renewal off, its safe deadline) comes due. Most locks are released long before
//! that, so they cost no task of their own and no wake-up of another worker thread at
//! grant and release; one timer task per runtime serves them all.
//!
//! Measured on the in-memory backend (2 cores, multi-thread runtime): a guard that spawned
//! its renewal task at grant and aborted it at release cost about 40 µs per acquire +
//! release, almost all of it waking an idle worker; the deferred start costs a map insert
//! and a remove.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
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
        let starter = self.sched.lock().due.remove(&self.key);
        drop(starter);
    }
}

impl Scheduler {
    /// The scheduler of the current runtime (`None` outside one).
    pub(crate) fn current() -> Option<Arc<Self>> {
        static ALL: OnceLock<Mutex<HashMap<tokio::runtime::Id, Arc<Scheduler>>>> = OnceLock::new();
        let id = tokio::runtime::Handle::try_current().ok()?.id();
        let mut all = ALL
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !all.contains_key(&id) {
            // Forget the schedulers of runtimes that are gone (their timer task ended)
            // and that have nothing left to start.
            all.retain(|_, s| {
                let st = s.lock();
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

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `start` at `at` unless the ticket is cancelled first.
    pub(crate) fn schedule(self: &Arc<Self>, at: Instant, start: Starter) -> Ticket {
        let mut st = self.lock();
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
                let mut st = self.lock();
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

/// A task that starts at a set time unless it is stopped first: see [`spawn_at`].
///
/// Dropping it stops it too (a running task is aborted, not awaited).
#[derive(Debug)]
pub struct Deferred {
    state: Arc<Mutex<DeferredState>>,
}

#[derive(Debug)]
enum DeferredState {
    Waiting(Option<Ticket>),
    Running(JoinHandle<()>),
    Stopped,
}

/// Spawns `task` on the current Tokio runtime at `at`, unless the returned [`Deferred`] is
/// stopped or dropped first.
///
/// For background work that has nothing to do for a while, such as a connection probe
/// whose first check is due in a second: a lock released before then costs no task and
/// no wake-up of another worker thread (one timer task per runtime serves them all).
/// Outside a runtime nothing can run it: the task is dropped and the handle is stopped.
pub fn spawn_at<F>(at: Instant, task: F) -> Deferred
where
    F: Future<Output = ()> + Send + 'static,
{
    let state = Arc::new(Mutex::new(DeferredState::Waiting(None)));
    let Some(sched) = Scheduler::current() else {
        *lock_state(&state) = DeferredState::Stopped;
        return Deferred { state };
    };
    // Held across `schedule` so that an entry firing at once finds its ticket stored.
    let mut st = lock_state(&state);
    let weak = Arc::downgrade(&state);
    let ticket = sched.schedule(
        at,
        Box::new(move |_| {
            if let Some(state) = weak.upgrade() {
                let mut st = lock_state(&state);
                if matches!(*st, DeferredState::Waiting(_)) {
                    *st = DeferredState::Running(tokio::spawn(task));
                }
            }
        }),
    );
    if let DeferredState::Waiting(t) = &mut *st {
        *t = Some(ticket);
    }
    drop(st);
    Deferred { state }
}

fn lock_state(s: &Mutex<DeferredState>) -> std::sync::MutexGuard<'_, DeferredState> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

impl Deferred {
    /// Whether the task has started (it may have finished since).
    pub fn started(&self) -> bool {
        matches!(*lock_state(&self.state), DeferredState::Running(_))
    }

    /// Stops it. A task not yet started never starts, and its future (with everything it
    /// captured) is dropped before this returns; a running task is aborted and awaited.
    pub async fn stop(self) {
        let prev = std::mem::replace(&mut *lock_state(&self.state), DeferredState::Stopped);
        match prev {
            DeferredState::Waiting(Some(ticket)) => ticket.cancel(),
            DeferredState::Running(task) => {
                task.abort();
                let _ = task.await;
            }
            DeferredState::Waiting(None) | DeferredState::Stopped => {}
        }
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        let prev = std::mem::replace(&mut *lock_state(&self.state), DeferredState::Stopped);
        match prev {
            DeferredState::Waiting(Some(ticket)) => ticket.cancel(),
            DeferredState::Running(task) => task.abort(),
            DeferredState::Waiting(None) | DeferredState::Stopped => {}
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
        Scheduler::current().map_or(0, |s| s.lock().due.len())
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

    /// A deferred task stopped before it is due never runs, and what it captured is
    /// dropped by `stop`; one left alone starts on time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deferred_task_starts_on_time_or_never() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let ran = Arc::new(AtomicUsize::new(0));
        let captured = Arc::new(());
        let (r, c) = (ran.clone(), captured.clone());
        let early = spawn_at(Instant::now() + Duration::from_millis(200), async move {
            let _keep = c;
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert!(!early.started());
        assert_eq!(Arc::strong_count(&captured), 2);
        early.stop().await;
        assert_eq!(
            Arc::strong_count(&captured),
            1,
            "the future was not dropped"
        );
        let r = ran.clone();
        let due = Instant::now() + Duration::from_millis(50);
        let on_time = spawn_at(due, async move {
            assert!(Instant::now() >= due);
            r.fetch_add(10, Ordering::SeqCst);
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(on_time.started());
        assert_eq!(ran.load(Ordering::SeqCst), 10);
        on_time.stop().await;
    }
}
