//! The cases. Each returns `Ok(detail)` or `Err(why)`; timing assertions are generous
//! bounds only (speed claims live in the benchmark).

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lock_core::{
    Capabilities, Fenced, FencingToken, LeaseKind, LockError, LockGuard, LockStatus, LossReason,
    ReleaseOutcome, WaitPolicy,
};
use rand::Rng;
use tokio::time::{sleep, Instant};

use crate::history::{ms, Event, History};
use crate::{BoxFuture, Case, Ctx, Target};

macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(format!($($arg)*));
        }
    };
}

trait Ctx_<T> {
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T, E: Display> Ctx_<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

fn always(_: &Capabilities, _: &Target) -> Option<&'static str> {
    None
}

fn ttl_only(c: &Capabilities, _: &Target) -> Option<&'static str> {
    (c.lease != LeaseKind::Ttl)
        .then_some("the lease is the session: it is not renewed, extended or left stale while the session lives (session loss is covered by client_dropped_frees_key and vanishing_server_turns_guard_lost)")
}

fn session_only(c: &Capabilities, _: &Target) -> Option<&'static str> {
    (c.lease != LeaseKind::Session).then_some(
        "the lease is a TTL: covered by explicit_extend and stale_guard_cannot_touch_new_holder",
    )
}

fn session_with_cut(c: &Capabilities, t: &Target) -> Option<&'static str> {
    session_only(c, t).or_else(|| needs_cut(c, t))
}

fn fair_only(c: &Capabilities, _: &Target) -> Option<&'static str> {
    (!c.fair).then_some("the backend does not claim FIFO fairness")
}

fn needs_cut(_: &Capabilities, t: &Target) -> Option<&'static str> {
    t.cuttable
        .is_none()
        .then_some("the target offers no way to cut a client's connection")
}

fn needs_illegal(_: &Capabilities, t: &Target) -> Option<&'static str> {
    t.illegal_key
        .is_none()
        .then_some("the backend accepts every key the core accepts")
}

macro_rules! case {
    ($name:ident, $needs:expr) => {
        Case {
            name: stringify!($name),
            needs: $needs,
            run: |c| Box::pin($name(c)) as BoxFuture<'static, Result<String, String>>,
        }
    };
}

pub(crate) fn all() -> Vec<Case> {
    vec![
        case!(exclusion_fenced_counter, always),
        case!(try_acquire_held_is_contended, always),
        case!(wait_timeout_leaves_nothing, always),
        case!(release_then_reacquire_token_grows, always),
        case!(stale_guard_cannot_touch_new_holder, ttl_only),
        case!(release_is_idempotent, always),
        case!(holder_that_stops_renewing_loses_key, ttl_only),
        case!(auto_renewal_keeps_lock_through_long_work, always),
        case!(explicit_extend, ttl_only),
        case!(session_extend_is_refused_and_keeps_the_lock, session_only),
        case!(lost_session_guard_cannot_touch_new_holder, session_with_cut),
        case!(one_client_holds_many_keys, always),
        case!(release_racing_renewal_leaves_the_key_free, always),
        case!(release_wakes_waiter, always),
        case!(fifo_order, fair_only),
        case!(dropped_waiting_acquire_leaves_nothing, always),
        case!(client_dropped_frees_key, needs_cut),
        case!(many_keys_independent, always),
        case!(bad_input_rejected_and_writes_nothing, always),
        case!(illegal_backend_key_rejected, needs_illegal),
        case!(adversarial_names_are_independent_locks, always),
        case!(unreachable_server_errors_in_time, needs_cut),
        case!(vanishing_server_turns_guard_lost, needs_cut),
        case!(with_lock_returns_value_and_reports_loss, needs_cut),
        case!(release_whose_reply_is_lost_frees_the_key, needs_cut),
        case!(tokens_monotone_across_clients, always),
        case!(inspect_shows_holder, always),
        case!(randomized_history_passes_checker, always),
    ]
}

async fn exclusion_fenced_counter(c: Ctx) -> Result<String, String> {
    const TASKS: usize = 16;
    const ROUNDS: usize = 50;
    let key = c.key("k");
    let counter = Arc::new(Fenced::new(0u64));
    let order = Arc::new(Mutex::new(Vec::<u64>::new()));
    let refused = Arc::new(Mutex::new(0usize));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let client = c.client().await?;
        let (key, counter, order, refused) =
            (key.clone(), counter.clone(), order.clone(), refused.clone());
        let opts = client
            .options()
            .clone()
            .wait(WaitPolicy::Timeout(Duration::from_secs(60)));
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let g = client.acquire_with(&key, &opts).await.ctx("acquire")?;
                order
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(g.token().get());
                // A fenced read-modify-write: the read raises the fence, so no older
                // holder can write between it and the write.
                let wrote = match counter.read_with(g.token()) {
                    Ok(v) => {
                        tokio::task::yield_now().await;
                        counter.write(g.token(), v + 1).is_applied()
                    }
                    Err(_) => false,
                };
                if !wrote {
                    *refused.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                }
                g.release().await.ctx("release")?;
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await.ctx("task")??;
    }
    let total = counter.read();
    let refused = *refused.lock().unwrap_or_else(|p| p.into_inner());
    ensure!(refused == 0, "the fence refused {refused} writes");
    ensure!(
        total == (TASKS * ROUNDS) as u64,
        "counter ended at {total}, expected {}",
        TASKS * ROUNDS
    );
    let order = order.lock().unwrap_or_else(|p| p.into_inner()).clone();
    ensure!(
        order.windows(2).all(|w| w[0] < w[1]),
        "tokens did not strictly increase in grant order: {:?}",
        &order[..order.len().min(20)]
    );
    let per = started.elapsed() / (TASKS * ROUNDS) as u32;
    Ok(format!(
        "{} grants, {} per contended cycle",
        TASKS * ROUNDS,
        ms(per)
    ))
}

async fn try_acquire_held_is_contended(c: Ctx) -> Result<String, String> {
    let (a, b) = (c.client().await?, c.client().await?);
    let key = c.key("k");
    let g = a.acquire(&key).await.ctx("acquire")?;
    let t = Instant::now();
    match b.try_acquire(&key).await {
        Err(LockError::Contended { .. }) => {}
        Ok(_) => return Err("second holder granted".into()),
        Err(e) => return Err(format!("expected Contended, got {e}")),
    }
    let took = t.elapsed();
    ensure!(took < Duration::from_secs(2), "Contended took {took:?}");
    g.release().await.ctx("release")?;
    Ok(format!("Contended in {}", ms(took)))
}

async fn wait_timeout_leaves_nothing(c: Ctx) -> Result<String, String> {
    let (a, b) = (c.client().await?, c.client().await?);
    let key = c.key("k");
    let g = a.acquire(&key).await.ctx("acquire")?;
    let wait = Duration::from_millis(400);
    let opts = b.options().clone().wait(WaitPolicy::Timeout(wait));
    let t = Instant::now();
    match b.acquire_with(&key, &opts).await {
        Err(LockError::Timeout { .. }) => {}
        Ok(_) => return Err("granted while held".into()),
        Err(e) => return Err(format!("expected Timeout, got {e}")),
    }
    let took = t.elapsed();
    ensure!(
        took >= wait,
        "Timeout after {took:?}, before the {wait:?} asked for"
    );
    ensure!(
        took < wait + Duration::from_secs(3),
        "Timeout took {took:?}"
    );
    let info = a
        .inspect(&key)
        .await
        .ctx("inspect")?
        .ok_or("holder vanished")?;
    ensure!(info.lease_id == *g.lease_id(), "holder changed");
    if let Some(n) = info.waiters {
        ensure!(n == 0, "{n} waiter entries left behind after the timeout");
    }
    g.release().await.ctx("release")?;
    // A queue entry left behind would block this on fair backends.
    let g2 = b.try_acquire(&key).await.ctx("try_acquire after release")?;
    g2.release().await.ctx("release")?;
    Ok(format!("Timeout after {}", ms(took)))
}

async fn release_then_reacquire_token_grows(c: Ctx) -> Result<String, String> {
    let a = c.client().await?;
    let key = c.key("k");
    let g1 = a.acquire(&key).await.ctx("acquire 1")?;
    let t1 = g1.token();
    ensure!(
        g1.release().await.ctx("release")? == ReleaseOutcome::Released,
        "first release found nothing"
    );
    ensure!(
        a.inspect(&key).await.ctx("inspect")?.is_none(),
        "key still held after release"
    );
    let g2 = a.acquire(&key).await.ctx("acquire 2")?;
    let t2 = g2.token();
    ensure!(t2 > t1, "token went from {t1} to {t2}");
    g2.release().await.ctx("release")?;
    Ok(format!("tokens {t1} -> {t2}"))
}

async fn stale_guard_cannot_touch_new_holder(c: Ctx) -> Result<String, String> {
    let (a, b) = (c.client().await?, c.client().await?);
    let key = c.key("k");
    let opts = a
        .options()
        .clone()
        .lease(c.target.short_lease)
        .auto_renew(false);
    let stale = a.acquire_with(&key, &opts).await.ctx("acquire")?;
    tokio::time::timeout(c.target.short_lease * 3, stale.lost())
        .await
        .map_err(|_| "the unrenewed guard never reported loss")?;
    sleep(Duration::from_millis(100)).await; // the store's own expiry follows the guard's
    let fresh = b.acquire(&key).await.ctx("acquire by the next holder")?;
    ensure!(
        fresh.token() > stale.token(),
        "next token {} not above {}",
        fresh.token(),
        stale.token()
    );
    match stale.extend(Duration::from_secs(5)).await {
        Err(LockError::NotHeld { .. } | LockError::Lost { .. }) => {}
        other => return Err(format!("stale extend should fail, got {other:?}")),
    }
    let out = stale.release().await.ctx("stale release")?;
    ensure!(
        out == ReleaseOutcome::NotHeld,
        "stale release reported {out:?}"
    );
    let info = b
        .inspect(&key)
        .await
        .ctx("inspect")?
        .ok_or("the new holder's key was deleted")?;
    ensure!(
        info.lease_id == *fresh.lease_id(),
        "the new holder's lease was replaced"
    );
    fresh.release().await.ctx("release")?;
    Ok(String::new())
}

async fn release_is_idempotent(c: Ctx) -> Result<String, String> {
    let a = c.client().await?;
    let key = c.key("k");
    let g = a.acquire(&key).await.ctx("acquire")?;
    let lease = lock_core::LeaseRef::new(g.key().clone(), g.lease_id().clone());
    ensure!(
        g.release().await.ctx("release")? == ReleaseOutcome::Released,
        "release found nothing"
    );
    for i in 0..2 {
        let again = a.backend().release(&lease).await.ctx("repeated release")?;
        ensure!(
            again == ReleaseOutcome::NotHeld,
            "repeat {i} reported {again:?}"
        );
    }
    Ok(String::new())
}

async fn holder_that_stops_renewing_loses_key(c: Ctx) -> Result<String, String> {
    let (a, b) = (c.client().await?, c.client().await?);
    let key = c.key("k");
    let lease = c.target.short_lease;
    let opts = a.options().clone().lease(lease).auto_renew(false);
    let t = Instant::now();
    let g = a.acquire_with(&key, &opts).await.ctx("acquire")?;
    let lost = {
        let h = g.handle();
        tokio::spawn(async move {
            let r = h.lost().await;
            (r, Instant::now())
        })
    };
    // The store's lease started no earlier than `t`: by `t + lease` the holder must know.
    tokio::time::sleep_until(t + lease).await;
    ensure!(
        matches!(g.status(), LockStatus::Lost(_)),
        "status at the end of the lease is {:?}",
        g.status()
    );
    let (reason, at) = tokio::time::timeout(lease * 3, lost)
        .await
        .map_err(|_| "lost() did not resolve")?
        .ctx("lost task")?;
    let lost_after = at - t;
    ensure!(reason.is_some(), "lost() resolved without a reason");
    ensure!(g.check().is_err(), "check() passes on a lost lock");
    let opts_b = b.options().clone().wait(WaitPolicy::Timeout(lease * 4));
    let next = b
        .acquire_with(&key, &opts_b)
        .await
        .ctx("acquire after expiry")?;
    ensure!(
        next.token() > g.token(),
        "token {} not above {}",
        next.token(),
        g.token()
    );
    next.release().await.ctx("release")?;
    drop(g);
    Ok(format!(
        "lost after {} (lease {})",
        ms(lost_after),
        ms(lease)
    ))
}

async fn auto_renewal_keeps_lock_through_long_work(c: Ctx) -> Result<String, String> {
    let (a, b) = (c.client().await?, c.client().await?);
    let key = c.key("k");
    let lease = c.target.short_lease;
    let opts = a.options().clone().lease(lease);
    let g = a.acquire_with(&key, &opts).await.ctx("acquire")?;
    let mut watch = g.watch();
    let work = lease * 5;
    let deadline = Instant::now() + work;
    while Instant::now() < deadline {
        if tokio::time::timeout_at(deadline, watch.changed())
            .await
            .is_ok()
        {
            let s = watch.borrow().clone();
            ensure!(
                s == LockStatus::Held || s == LockStatus::Uncertain,
                "status became {s:?} during work"
            );
        }
    }
    ensure!(
        g.status() == LockStatus::Held,
        "status {:?} after work",
        g.status()
    );
    g.check().ctx("check after work")?;
    match b.try_acquire(&key).await {
        Err(LockError::Contended { .. }) => {}
        other => {
            return Err(format!(
                "another client got {other:?} while the lock was renewed"
            ))
        }
    }
    g.release().await.ctx("release")?;
    Ok(format!(
        "held through {} of work with a {} lease",
        ms(work),
        ms(lease)
    ))
}

async fn explicit_extend(c: Ctx) -> Result<String, String> {
    let (a, b) = (c.client().await?, c.client().await?);
    let key = c.key("k");
    let lease = c.target.short_lease;
    let opts = a.options().clone().lease(lease).auto_renew(false);
    let g = a.acquire_with(&key, &opts).await.ctx("acquire")?;
    let before = g.safe_until().ok_or("no safe_until on a TTL lock")?;
    sleep(lease / 3).await;
    g.extend(lease * 4).await.ctx("extend")?;
    let after = g.safe_until().ok_or("no safe_until after extend")?;
    ensure!(
        after > before + lease,
        "safe_until moved from {before:?} to {after:?} only"
    );
    sleep(lease * 2).await;
    ensure!(
        g.status() == LockStatus::Held,
        "status {:?} within the extended lease",
        g.status()
    );
    match b.try_acquire(&key).await {
        Err(LockError::Contended { .. }) => {}
        other => return Err(format!("got {other:?} within the extended lease")),
    }
    g.release().await.ctx("release")?;
    Ok(String::new())
}

async fn release_wakes_waiter(c: Ctx) -> Result<String, String> {
    let (a, b) = (c.client().await?, c.client().await?);
    let key = c.key("k");
    let g = a.acquire(&key).await.ctx("acquire")?;
    let k2 = key.clone();
    let waiter = tokio::spawn(async move {
        let g = b.acquire(&k2).await;
        (Instant::now(), g)
    });
    sleep(Duration::from_millis(300)).await;
    let released_at = Instant::now();
    g.release().await.ctx("release")?;
    let (got_at, g2) = waiter.await.ctx("waiter")?;
    let g2 = g2.ctx("waiter acquire")?;
    let handoff = got_at.saturating_duration_since(released_at);
    ensure!(
        handoff < Duration::from_secs(2),
        "hand-off took {handoff:?}"
    );
    g2.release().await.ctx("release")?;
    Ok(format!("hand-off {}", ms(handoff)))
}

async fn fifo_order(c: Ctx) -> Result<String, String> {
    let a = c.client().await?;
    let key = c.key("k");
    let g = a.acquire(&key).await.ctx("acquire")?;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let client = c.client().await?;
        let (key, order) = (key.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let g = client.acquire(&key).await.ctx("waiter acquire")?;
            order.lock().unwrap_or_else(|p| p.into_inner()).push(i);
            g.release().await.ctx("waiter release")?;
            Ok::<_, String>(())
        }));
        // Let this waiter reach the queue before the next one starts.
        sleep(Duration::from_millis(150)).await;
    }
    g.release().await.ctx("release")?;
    for t in tasks {
        t.await.ctx("task")??;
    }
    let order = order.lock().unwrap_or_else(|p| p.into_inner()).clone();
    ensure!(order == vec![0, 1, 2, 3, 4], "granted in order {order:?}");
    Ok(String::new())
}

async fn dropped_waiting_acquire_leaves_nothing(c: Ctx) -> Result<String, String> {
    let (a, b) = (c.client().await?, c.client().await?);
    let key = c.key("k");
    let g = a.acquire(&key).await.ctx("acquire")?;
    let k2 = key.clone();
    let b2 = b.clone();
    let waiter = tokio::spawn(async move {
        let opts = b2.options().clone().wait(WaitPolicy::Forever);
        b2.acquire_with(&k2, &opts).await.map(|g| g.token())
    });
    // The waiter must really be waiting when it is dropped: queued, where the store tells.
    let t = Instant::now();
    loop {
        let waiting = a
            .inspect(&key)
            .await
            .ctx("inspect")?
            .and_then(|i| i.waiters);
        match waiting {
            Some(n) if n >= 1 => break,
            None if t.elapsed() >= Duration::from_millis(300) => break,
            _ if t.elapsed() > Duration::from_secs(5) => {
                return Err(format!("the waiter never queued ({waiting:?} waiters)"))
            }
            _ => sleep(Duration::from_millis(20)).await,
        }
    }
    ensure!(
        !waiter.is_finished(),
        "the waiter finished before it was dropped"
    );
    waiter.abort();
    let _ = waiter.await;
    sleep(Duration::from_millis(200)).await;
    g.release().await.ctx("release")?;
    // If the dropped waiter had left a queue entry or taken the lock, these would fail.
    sleep(Duration::from_millis(500)).await;
    if let Some(info) = a.inspect(&key).await.ctx("inspect")? {
        return Err(format!(
            "key is held by {:?} after the only waiter was dropped",
            info.lease_id
        ));
    }
    let g2 = b.try_acquire(&key).await.ctx("try_acquire")?;
    g2.release().await.ctx("release")?;
    Ok(String::new())
}

async fn client_dropped_frees_key(c: Ctx) -> Result<String, String> {
    let (a, cut) = c.cuttable_client().await?;
    let b = c.client().await?;
    let key = c.key("k");
    let bound = c.expiry_bound();
    let opts = a.options().clone().lease(c.target.short_lease);
    let g = a.acquire_with(&key, &opts).await.ctx("acquire")?;
    // The holder dies: its connection goes dark, then the guard is dropped without release.
    cut.set_cut(true);
    let t = Instant::now();
    drop(g);
    drop(a);
    let opts_b = b
        .options()
        .clone()
        .wait(WaitPolicy::Timeout(bound + Duration::from_secs(10)));
    let g2 = b
        .acquire_with(&key, &opts_b)
        .await
        .ctx("acquire after the holder died")?;
    let freed = t.elapsed();
    ensure!(
        freed <= bound + Duration::from_secs(5),
        "key freed only after {freed:?} (bound {bound:?})"
    );
    g2.release().await.ctx("release")?;
    Ok(format!(
        "freed after {} (lease or session {})",
        ms(freed),
        ms(bound)
    ))
}

async fn many_keys_independent(c: Ctx) -> Result<String, String> {
    let mut guards = Vec::new();
    for i in 0..8 {
        let client = c.client().await?;
        let g = client
            .try_acquire(&c.key(&i.to_string()))
            .await
            .ctx("try_acquire")?;
        guards.push((client, g));
    }
    for (client, g) in guards {
        let info = client
            .inspect(g.key().as_str())
            .await
            .ctx("inspect")?
            .ok_or("not held")?;
        ensure!(
            info.lease_id == *g.lease_id(),
            "key {} has another holder",
            g.key()
        );
        g.release().await.ctx("release")?;
    }
    Ok(String::new())
}

async fn bad_input_rejected_and_writes_nothing(c: Ctx) -> Result<String, String> {
    let a = c.client().await?;
    let key = c.key("k");
    let too_long = "x".repeat(c.caps.max_key_len + 1);
    for bad in ["", too_long.as_str(), "a\u{0}b"] {
        match a.try_acquire(bad).await {
            Err(LockError::InvalidKey { .. }) => {}
            other => {
                return Err(format!(
                    "key of {} bytes: expected InvalidKey, got {other:?}",
                    bad.len()
                ))
            }
        }
    }
    for (lease, what) in [
        (Duration::ZERO, "zero"),
        (Duration::from_secs(7 * 24 * 3600), "absurd"),
    ] {
        let opts = a.options().clone().lease(lease);
        match a.acquire_with(&key, &opts).await {
            Err(LockError::InvalidOptions(_)) => {}
            other => {
                return Err(format!(
                    "{what} lease: expected InvalidOptions, got {other:?}"
                ))
            }
        }
    }
    // Called directly, the backend checks the lease itself (the client's checks are skipped).
    let backend = a.backend().clone();
    let lock_key = lock_core::LockKey::new(key.clone()).ctx("key")?;
    for (ttl, what) in [(Duration::ZERO, "zero"), (Duration::MAX, "endless")] {
        let req = lock_core::AcquireRequest::new(
            lock_key.clone(),
            ttl,
            lock_core::HolderMeta::default(),
            lock_core::Backoff::default(),
        );
        let tried = backend.try_acquire(&req).await;
        let waited = backend
            .acquire(&req, Some(Instant::now() + Duration::from_secs(2)))
            .await;
        for (how, res) in [("try_acquire", tried), ("acquire", waited)] {
            if !matches!(res, Err(LockError::InvalidOptions(_))) {
                return Err(format!(
                    "{how} with a {what} lease, called on the backend: expected \
                     InvalidOptions, got {:?}",
                    res.map(|g| g.token)
                ));
            }
        }
    }
    ensure!(
        a.inspect(&key).await.ctx("inspect")?.is_none(),
        "a rejected request wrote a lock"
    );
    let g = a
        .try_acquire(&key)
        .await
        .ctx("valid acquire after bad ones")?;
    if c.caps.lease == LeaseKind::Ttl {
        let lease = lock_core::LeaseRef::new(g.key().clone(), g.lease_id().clone());
        for (ttl, what) in [(Duration::ZERO, "zero"), (Duration::MAX, "endless")] {
            let res = backend.renew(&lease, ttl).await;
            ensure!(
                matches!(res, Err(LockError::InvalidOptions(_))),
                "renew to a {what} lease, called on the backend: expected InvalidOptions, got {res:?}"
            );
        }
        let res = backend.renew(&lease, a.options().lease).await;
        ensure!(
            res.is_ok(),
            "a valid renewal after the refused ones: {res:?}"
        );
    }
    g.release().await.ctx("release")?;
    Ok(String::new())
}

async fn illegal_backend_key_rejected(c: Ctx) -> Result<String, String> {
    let a = c.client().await?;
    let bad = c.target.illegal_key.clone().unwrap_or_default();
    match a.try_acquire(&bad).await {
        Err(LockError::InvalidKey { reason, .. }) => Ok(format!("rejected: {reason}")),
        other => Err(format!("key {bad:?}: expected InvalidKey, got {other:?}")),
    }
}

async fn unreachable_server_errors_in_time(c: Ctx) -> Result<String, String> {
    let (a, cut) = c.cuttable_client().await?;
    cut.set_cut(true);
    let op = Duration::from_millis(800);
    let opts = a.options().clone().op_timeout(op).wait(WaitPolicy::NoWait);
    let t = Instant::now();
    let res = a.acquire_with(&c.key("k"), &opts).await;
    let took = t.elapsed();
    cut.set_cut(false);
    match res {
        Err(e) if e.is_retryable() => {}
        other => return Err(format!("expected a retryable backend error, got {other:?}")),
    }
    ensure!(
        took < op * 2 + Duration::from_secs(2),
        "the error took {took:?} (op timeout {op:?})"
    );
    Ok(format!("error after {}", ms(took)))
}

async fn vanishing_server_turns_guard_lost(c: Ctx) -> Result<String, String> {
    let (a, cut) = c.cuttable_client().await?;
    let key = c.key("k");
    let lease = c.target.short_lease;
    let opts = a.options().clone().lease(lease);
    let g = a.acquire_with(&key, &opts).await.ctx("acquire")?;
    let seen = crate::record_statuses(&g);
    let t = Instant::now();
    cut.set_cut(true);
    let bound = c.expiry_bound() + Duration::from_secs(3);
    let lost = tokio::time::timeout(bound, g.lost()).await;
    cut.set_cut(false);
    lost.map_err(|_| format!("no loss within {bound:?} of the cut"))?;
    let seen = seen.await.ctx("watcher")?;
    let first_uncertain = seen.iter().position(|(_, s)| *s == LockStatus::Uncertain);
    let lost_at = seen
        .iter()
        .position(|(_, s)| matches!(s, LockStatus::Lost(_)));
    ensure!(
        first_uncertain.is_some() && first_uncertain < lost_at,
        "expected Uncertain then Lost, saw {:?}",
        seen.iter().map(|(_, s)| s).collect::<Vec<_>>()
    );
    let lost_after = seen
        .last()
        .map(|(at, _)| at.duration_since(t))
        .unwrap_or_default();
    // The guard is Lost from its safe deadline on, for every reader (`status()` judges it
    // on the monotonic clock); when a watcher hears of it depends on the scheduler.
    if !c.is_session() {
        let safe = g.safe_until();
        ensure!(
            safe.is_some_and(|s| s <= t + lease),
            "the guard's safe deadline {:?} after the cut is past the lease {lease:?}",
            safe.map(|s| s.saturating_duration_since(t))
        );
    }
    drop(g);
    Ok(format!(
        "Uncertain then Lost {} after the cut",
        ms(lost_after)
    ))
}

async fn with_lock_returns_value_and_reports_loss(c: Ctx) -> Result<String, String> {
    let a = c.client().await?;
    let key = c.key("k");
    let (token, v) = a
        .with_lock(&key, |h| async move { (h.token(), 42) })
        .await
        .ctx("with_lock")?;
    ensure!(v == 42, "with_lock returned {v}");
    ensure!(token.get() > 0, "with_lock handed out token {token}");
    ensure!(
        a.inspect(&key).await.ctx("inspect")?.is_none(),
        "with_lock did not release"
    );
    let (b, cut) = c.cuttable_client().await?;
    let opts = b.options().clone().lease(c.target.short_lease);
    let bound = c.expiry_bound() + Duration::from_secs(3);
    let res = b
        .with_lock_opts(&key, &opts, |h| {
            let cut = cut.clone();
            async move {
                cut.set_cut(true);
                let lost = tokio::time::timeout(bound, h.lost()).await;
                cut.set_cut(false);
                lost.is_ok()
            }
        })
        .await;
    match res {
        Err(LockError::Lost { .. }) => Ok(String::new()),
        other => Err(format!("expected Lost from with_lock, got {other:?}")),
    }
}

/// A release the store carries out but whose reply is lost (the connection then breaks):
/// the key is free at once, and the next holder's token is higher. `with_lock` returns the
/// closure's value where the backend tells its own earlier release from a loss
/// (DynamoDB, MongoDB), else `Lost(NotHeld)`: the retry finds the lease gone, which a loss of the
/// lease would look like too; never another error.
async fn release_whose_reply_is_lost_frees_the_key(c: Ctx) -> Result<String, String> {
    let (a, cut) = c.cuttable_client().await?;
    let key = c.key("k");
    let first = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = first.clone();
    let res = a
        .with_lock(&key, |h| {
            let cut = cut.clone();
            async move {
                seen.store(h.token().get(), std::sync::atomic::Ordering::SeqCst);
                // The release goes out as this returns; its reply is lost, and its
                // connection breaks a moment later.
                cut.lose_replies(true);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    cut.lose_replies(false);
                });
                42
            }
        })
        .await;
    let answer = match res {
        Ok(42) => "the value".to_owned(),
        Err(LockError::Lost {
            reason: LossReason::NotHeld,
            ..
        }) => "Lost(NotHeld)".to_owned(),
        other => return Err(format!("with_lock answered {other:?}")),
    };
    let b = c.client().await?;
    let g = b
        .try_acquire(&key)
        .await
        .ctx("another client's try right after the release")?;
    let (before, next) = (first.load(std::sync::atomic::Ordering::SeqCst), g.token());
    g.release().await.ctx("release")?;
    ensure!(next.get() > before, "token {next} after {before}");
    Ok(format!("with_lock: {answer}; the next token {next}"))
}

async fn tokens_monotone_across_clients(c: Ctx) -> Result<String, String> {
    let key = c.key("k");
    let mut last: Option<FencingToken> = None;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let client = c.client().await?; // a fresh connection each time
        let g = client.acquire(&key).await.ctx("acquire")?;
        if let Some(prev) = last {
            ensure!(g.token() > prev, "token {} after {prev}", g.token());
        }
        last = Some(g.token());
        seen.push(g.token().get());
        g.release().await.ctx("release")?;
        drop(client);
    }
    Ok(format!("tokens {seen:?}"))
}

async fn inspect_shows_holder(c: Ctx) -> Result<String, String> {
    let (a, b) = (c.client().await?, c.client().await?);
    let key = c.key("k");
    ensure!(
        b.inspect(&key).await.ctx("inspect free")?.is_none(),
        "free key shows a holder"
    );
    let opts = a.options().clone().label("inspect-me");
    let g = a.acquire_with(&key, &opts).await.ctx("acquire")?;
    let info = b
        .inspect(&key)
        .await
        .ctx("inspect")?
        .ok_or("no holder shown")?;
    ensure!(
        info.lease_id == *g.lease_id(),
        "lease id {:?} vs {:?}",
        info.lease_id,
        g.lease_id()
    );
    ensure!(
        info.token == g.token(),
        "token {} vs {}",
        info.token,
        g.token()
    );
    if c.caps.holder_meta {
        ensure!(
            info.meta.label.as_deref() == Some("inspect-me"),
            "label {:?}",
            info.meta.label
        );
        ensure!(
            info.meta.pid == Some(std::process::id()),
            "pid {:?}",
            info.meta.pid
        );
    }
    if let Some(n) = info.waiters {
        ensure!(n == 0, "{n} waiters reported with none waiting");
        let (w, k2) = (b.clone(), key.clone());
        let waiter = tokio::spawn(async move { w.acquire(&k2).await.map(|g| g.token()) });
        let t = Instant::now();
        let mut seen = None;
        while t.elapsed() < Duration::from_secs(5) {
            seen = b
                .inspect(&key)
                .await
                .ctx("inspect")?
                .and_then(|i| i.waiters);
            if seen == Some(1) {
                break;
            }
            sleep(Duration::from_millis(20)).await;
        }
        waiter.abort();
        let _ = waiter.await;
        ensure!(
            seen == Some(1),
            "one waiter queued, inspect reports {seen:?}"
        );
    }
    if !c.is_session() {
        let left = info.remaining.ok_or("no remaining time on a TTL lease")?;
        ensure!(
            left <= a.options().lease && !left.is_zero(),
            "remaining {left:?}"
        );
    }
    g.release().await.ctx("release")?;
    Ok(String::new())
}

async fn randomized_history_passes_checker(c: Ctx) -> Result<String, String> {
    const CLIENTS: usize = 4;
    const OPS: usize = 25;
    let keys: Vec<String> = (0..3).map(|i| c.key(&i.to_string())).collect();
    let history = Arc::new(History::new());
    let resources: Arc<HashMap<String, Fenced<u64>>> =
        Arc::new(keys.iter().map(|k| (k.clone(), Fenced::new(0))).collect());
    let mut tasks = Vec::new();
    for id in 0..CLIENTS {
        let client = c.client().await?;
        let (keys, history, resources) = (keys.clone(), history.clone(), resources.clone());
        tasks.push(tokio::spawn(async move {
            let name = format!("client-{id}");
            for _ in 0..OPS {
                let (key, cancel_after) = {
                    let mut rng = rand::rng();
                    let key = keys[rng.random_range(0..keys.len())].clone();
                    let cancel = rng
                        .random_bool(0.2)
                        .then(|| Duration::from_millis(rng.random_range(0..30)));
                    (key, cancel)
                };
                let op = history.invoke(&name, &key);
                let opts = client
                    .options()
                    .clone()
                    .wait(WaitPolicy::Timeout(Duration::from_secs(10)));
                let res = match cancel_after {
                    Some(d) => {
                        match tokio::time::timeout(d, client.acquire_with(&key, &opts)).await {
                            Ok(r) => r,
                            Err(_) => {
                                history.record(Event::AcquireUnknown { op });
                                continue;
                            }
                        }
                    }
                    None => client.acquire_with(&key, &opts).await,
                };
                let g: LockGuard = match res {
                    Ok(g) => g,
                    Err(e) => {
                        history.record(Event::AcquireFailed { op });
                        return Err(format!("{name} acquire {key}: {e}"));
                    }
                };
                let token = g.token().get();
                history.record(Event::Granted {
                    op,
                    client: name.clone(),
                    key: key.clone(),
                    token,
                });
                // A fenced read-modify-write (the read raises the fence).
                let resource = &resources[&key];
                let read = resource.read_with(g.token());
                tokio::task::yield_now().await;
                let v = read.as_ref().map_or(0, |v| *v);
                let accepted = read.is_ok() && resource.write(g.token(), v + 1).is_applied();
                history.record(Event::Write {
                    client: name.clone(),
                    key: key.clone(),
                    token,
                    accepted,
                    value: v + 1,
                });
                history.record(Event::ReleaseInvoked {
                    client: name.clone(),
                    key: key.clone(),
                    token,
                });
                g.release()
                    .await
                    .map_err(|e| format!("{name} release: {e}"))?;
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await.ctx("task")??;
    }
    let finals: HashMap<String, u64> = resources
        .iter()
        .map(|(k, v)| (k.clone(), v.read()))
        .collect();
    let report = history.check(&finals);
    ensure!(
        report.ok(),
        "checker found: {}",
        report.violations.join("; ")
    );
    ensure!(
        report.refused_writes == 0,
        "{} writes refused without any pause",
        report.refused_writes
    );
    ensure!(
        report.belief_overlaps == 0,
        "{} belief overlaps without any fault",
        report.belief_overlaps
    );
    Ok(format!(
        "{} grants, {} accepted writes, {} belief overlaps",
        report.grants, report.accepted_writes, report.belief_overlaps
    ))
}

/// Names that look like the keys a backend derives for its own bookkeeping, or that stress
/// its encoding: every pair, locked in both orders and held together, must behave as two
/// independent locks, and `inspect` must report each one's own holder.
async fn adversarial_names_are_independent_locks(c: Ctx) -> Result<String, String> {
    let a = c.client().await?;
    let base = c.key("a");
    let longest = {
        let room = c.caps.max_key_len.saturating_sub(base.len());
        format!("{base}{}", "z".repeat(room))
    };
    let mut names: Vec<String> = [
        "",
        ":fence",
        ":q",
        ":w:x",
        ":wake:x",
        "}",
        "}{",
        "{x}",
        " with spaces",
        "/ü/日本",
        "%7B",
        "%",
        "\\",
        "/",
        "//",
        ".",
        "..",
    ]
    .iter()
    .map(|s| format!("{base}{s}"))
    .collect();
    names.push(format!("{{{base}}}"));
    names.push(longest);
    // Every pair, in both orders.
    let mut pairs = 0;
    for (i, x) in names.iter().enumerate() {
        for (j, y) in names.iter().enumerate() {
            if i == j {
                continue;
            }
            let gx = a.try_acquire(x).await.ctx(&format!("lock {x:?}"))?;
            let gy = a
                .try_acquire(y)
                .await
                .ctx(&format!("lock {y:?} while {x:?} is held"))?;
            for g in [&gx, &gy] {
                let info = a
                    .inspect(g.key().as_str())
                    .await
                    .ctx(&format!("inspect {:?}", g.key().as_str()))?
                    .ok_or(format!("{:?} shows no holder", g.key().as_str()))?;
                ensure!(
                    info.lease_id == *g.lease_id() && info.token == g.token(),
                    "{:?} reports holder {} token {} (want {} token {})",
                    g.key().as_str(),
                    info.lease_id,
                    info.token,
                    g.lease_id(),
                    g.token()
                );
            }
            ensure!(
                gy.release().await.ctx("release")? == ReleaseOutcome::Released,
                "releasing {y:?} found nothing"
            );
            ensure!(
                a.inspect(x).await.ctx("inspect")?.is_some(),
                "releasing {y:?} freed {x:?}"
            );
            ensure!(
                gx.release().await.ctx("release")? == ReleaseOutcome::Released,
                "releasing {x:?} found nothing"
            );
            pairs += 1;
        }
    }
    // All held at once (a client each: a PostgreSQL advisory lock holds a pooled connection
    // for its life), while a waiter queues on the first.
    let mut held = Vec::new();
    for n in &names {
        let holder = c.client().await?;
        held.push(holder.try_acquire(n).await.ctx(&format!("lock {n:?}"))?);
    }
    let b = c.client().await?;
    let (first, w) = (names[0].clone(), b.clone());
    let waiter = tokio::spawn(async move { w.acquire(&first).await.map(|g| g.token()) });
    sleep(Duration::from_millis(200)).await;
    for (n, g) in names.iter().zip(&held).skip(1) {
        match b.try_acquire(n).await {
            Err(LockError::Contended { .. }) => {}
            other => return Err(format!("{n:?} while held by another: {other:?}")),
        }
        let info = b.inspect(n).await.ctx("inspect")?.ok_or("no holder")?;
        ensure!(info.lease_id == *g.lease_id(), "{n:?} shows another holder");
    }
    let mut it = held.into_iter();
    let first = it.next().ok_or("no names")?;
    let first_token = first.token();
    first.release().await.ctx("release")?;
    let next = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .map_err(|_| "the waiter was not granted after the release")?
        .ctx("waiter")?
        .ctx("waiter acquire")?;
    ensure!(
        next > first_token,
        "waiter token {next} after {first_token}"
    );
    for g in it {
        ensure!(
            g.release().await.ctx("release")? == ReleaseOutcome::Released,
            "a held name was gone at release"
        );
    }
    // A name the core refuses writes nothing.
    match a.try_acquire(&format!("{base}\nx")).await {
        Err(LockError::InvalidKey { .. }) => {}
        other => return Err(format!("a name with a newline: {other:?}")),
    }
    Ok(format!("{} names, {pairs} ordered pairs", names.len()))
}

/// `extend` on a lock whose session is the lease is refused, and the lock stays held.
async fn session_extend_is_refused_and_keeps_the_lock(c: Ctx) -> Result<String, String> {
    let (a, b) = (c.client().await?, c.client().await?);
    let key = c.key("k");
    let g = a.acquire(&key).await.ctx("acquire")?;
    match g.extend(Duration::from_secs(5)).await {
        Err(LockError::Unsupported { .. }) => {}
        other => return Err(format!("extend on a session lock gave {other:?}")),
    }
    g.check().ctx("check after the refused extend")?;
    match b.try_acquire(&key).await {
        Err(LockError::Contended { .. }) => {}
        other => return Err(format!("another client got {other:?} after the extend")),
    }
    g.release().await.ctx("release")?;
    Ok(String::new())
}

/// A guard whose session was lost (its connection cut until the session ended) cannot
/// release or extend the next holder's lock when the connection comes back.
async fn lost_session_guard_cannot_touch_new_holder(c: Ctx) -> Result<String, String> {
    let (a, cut) = c.cuttable_client().await?;
    let b = c.client().await?;
    let key = c.key("k");
    let stale = a.acquire(&key).await.ctx("acquire")?;
    cut.set_cut(true);
    let bound = c.expiry_bound() + Duration::from_secs(10);
    let opts = b.options().clone().wait(WaitPolicy::Timeout(bound));
    let fresh = b
        .acquire_with(&key, &opts)
        .await
        .ctx("the next holder, after the session ended")?;
    let lost = tokio::time::timeout(bound, stale.lost()).await;
    cut.set_cut(false);
    lost.map_err(|_| "the cut-off guard never reported Lost")?;
    ensure!(
        fresh.token() > stale.token(),
        "next token {} not above {}",
        fresh.token(),
        stale.token()
    );
    let _ = stale.extend(Duration::from_secs(5)).await;
    let out = stale.release().await;
    ensure!(
        !matches!(out, Ok(ReleaseOutcome::Released)),
        "the stale guard's release reported Released"
    );
    let info = b
        .inspect(&key)
        .await
        .ctx("inspect")?
        .ok_or("the new holder's lock is gone")?;
    ensure!(
        info.lease_id == *fresh.lease_id(),
        "the new holder's lease was replaced"
    );
    fresh
        .check()
        .ctx("the new holder after the stale release")?;
    fresh.release().await.ctx("release")?;
    Ok(format!("stale release: {out:?}"))
}

/// One client holds several keys at once. What bounds it: a PostgreSQL advisory lock holds
/// a pooled connection for its life (pool_size), a ZooKeeper lock a node in the client's
/// one session; the TTL stores hold nothing per lock in the client.
async fn one_client_holds_many_keys(c: Ctx) -> Result<String, String> {
    const KEYS: usize = 6;
    let a = c.client().await?;
    let b = c.client().await?;
    let mut held = Vec::new();
    for i in 0..KEYS {
        held.push(
            a.try_acquire(&c.key(&i.to_string()))
                .await
                .ctx("try_acquire")?,
        );
    }
    for g in &held {
        g.check().ctx("check")?;
        match b.try_acquire(g.key().as_str()).await {
            Err(LockError::Contended { .. }) => {}
            other => return Err(format!("{} held, another got {other:?}", g.key())),
        }
    }
    let tokens: Vec<u64> = held.iter().map(|g| g.token().get()).collect();
    for g in held {
        ensure!(
            g.release().await.ctx("release")? == ReleaseOutcome::Released,
            "a held key was gone at release"
        );
    }
    Ok(format!("{KEYS} keys at once, tokens {tokens:?}"))
}

/// Releases racing renewals that run as often as the options allow: after each release
/// the key is free, and stays free (no late renewal re-creates it).
async fn release_racing_renewal_leaves_the_key_free(c: Ctx) -> Result<String, String> {
    let a = c.client().await?;
    let key = c.key("k");
    let lease = c.target.short_lease;
    let opts = a
        .options()
        .clone()
        .lease(lease)
        .renew_every(Duration::from_millis(10));
    for i in 0..20 {
        let g = a.acquire_with(&key, &opts).await.ctx("acquire")?;
        let pause = Duration::from_millis(rand::rng().random_range(0..30));
        sleep(pause).await;
        g.release().await.ctx("release")?;
        ensure!(
            a.inspect(&key).await.ctx("inspect")?.is_none(),
            "round {i}: the key is held right after its release"
        );
    }
    sleep(lease / 2).await;
    ensure!(
        a.inspect(&key).await.ctx("inspect")?.is_none(),
        "the key was held again after the last release"
    );
    Ok("20 releases racing renewals every 10 ms".into())
}
