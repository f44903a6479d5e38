//! The paused-holder scenario on the in-memory backend, with and without the fence. The
//! unfenced run is the checker's negative control: it must be flagged.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use lock_core::memory::MemoryStore;
use lock_core::{Fenced, LockClient, LockError, LockOptions, WaitPolicy};

use crate::history::{CheckReport, Event, History};

/// Two workers increment a counter under the lock; the first pauses between its read and
/// its write for longer than its lease (the store's clock is moved forward), so the second
/// is granted the key meanwhile. With `fenced`, the resource checks tokens; without, it
/// accepts any write. Returns the checker's report.
pub async fn paused_holder(fenced: bool) -> Result<CheckReport, LockError> {
    let store = MemoryStore::new();
    let opts = LockOptions::default()
        .lease(Duration::from_millis(500))
        .auto_renew(false)
        .wait(WaitPolicy::Timeout(Duration::from_secs(5)));
    let a = LockClient::new(store.connect()).with_options(opts.clone());
    let b = LockClient::new(store.connect()).with_options(opts);
    let history = History::new();
    // The fenced resource (a read-modify-write under the token: the read raises the fence),
    // or, for the negative control, a plain value that takes any write.
    let fenced_counter = Fenced::new(0u64);
    let plain = Mutex::new(0u64);
    let key = "inventory:item-1";
    let read = |token: lock_core::FencingToken| {
        if fenced {
            fenced_counter.read_with(token).unwrap_or(0)
        } else {
            *plain.lock().unwrap_or_else(|p| p.into_inner())
        }
    };
    let write = |client: &str, token: lock_core::FencingToken, value: u64| {
        let accepted = if fenced {
            fenced_counter.write(token, value).is_applied()
        } else {
            *plain.lock().unwrap_or_else(|p| p.into_inner()) = value;
            true
        };
        history.record(Event::Write {
            client: client.into(),
            key: key.into(),
            token: token.get(),
            accepted,
            value,
        });
    };

    let op = history.invoke("a", key);
    let ga = a.acquire(key).await?;
    history.record(Event::Granted {
        op,
        client: "a".into(),
        key: key.into(),
        token: ga.token().get(),
    });
    let read_a = read(ga.token());
    // a pauses (GC, SIGSTOP...): its lease runs out on the store's clock.
    store.advance(Duration::from_secs(2));

    let op = history.invoke("b", key);
    let gb = b.acquire(key).await?;
    history.record(Event::Granted {
        op,
        client: "b".into(),
        key: key.into(),
        token: gb.token().get(),
    });
    let read_b = read(gb.token());
    write("b", gb.token(), read_b + 1);
    history.record(Event::ReleaseInvoked {
        client: "b".into(),
        key: key.into(),
        token: gb.token().get(),
    });
    gb.release().await?;

    // a wakes up and writes what it computed before the pause.
    write("a", ga.token(), read_a + 1);
    history.record(Event::ReleaseInvoked {
        client: "a".into(),
        key: key.into(),
        token: ga.token().get(),
    });
    let _ = ga.release().await;

    let finals = HashMap::from([(
        key.to_owned(),
        if fenced {
            fenced_counter.read()
        } else {
            *plain.lock().unwrap_or_else(|p| p.into_inner())
        },
    )]);
    Ok(history.check(&finals))
}
