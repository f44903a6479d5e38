//! DynamoDB checks beyond the conformance suite: the record-version takeover, the fence
//! against a paused holder, the counter that release keeps, bad tables, and what an
//! emulator restart does. Run against moto here (`--via local`), or against the endpoint in
//! `LOCK_DYNAMO_URL`.

use std::collections::HashMap;
use std::time::Duration;

use lock_conformance::CaseResult;
use lock_core::{FencedWrite, LockClient, LockError, LockOptions, LockStatus, WaitPolicy};
use lock_dynamo::aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use lock_dynamo::DynamoBackend;
use tokio::time::Instant;

use lock_conformance::proxy::Proxy;

use crate::check;
use crate::servers::Moto;
use crate::targets::{addr_of, dynamo_config, with_addr};

type Res<T> = Result<T, String>;

fn e2s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The names of the checks below.
pub const CHECKS: [&str; 9] = [
    "takeover_only_after_the_version_is_unchanged_for_a_whole_lease",
    "a_heartbeat_answered_too_late_keeps_the_lock",
    "a_heartbeating_holder_is_never_taken_over",
    "paused_holders_late_write_is_refused_by_the_fence",
    "release_keeps_the_counter",
    "missing_table_or_wrong_key_schema_is_refused_and_nothing_written",
    "emulator_restart_loses_the_table_and_its_counter",
    "an_item_another_lock_tool_wrote_is_refused_and_left_as_it_was",
    "a_table_whose_ttl_would_delete_lock_items_is_refused",
];

/// Runs every DynamoDB check against `url`; `target` names the provider ("dynamo-moto"
/// for the emulator). The restart check starts an emulator of its own (`local`).
pub async fn run(url: &str, target: &str, local: bool) -> Vec<CaseResult> {
    let mut out = vec![
        check(target, CHECKS[0], takeover_after_a_whole_lease(url)).await,
        check(target, CHECKS[1], lost_heartbeat_answer(url)).await,
        check(target, CHECKS[2], heartbeat_keeps_it(url)).await,
        check(target, CHECKS[3], late_write_refused(url)).await,
        check(target, CHECKS[4], keeps_counter(url)).await,
        check(target, CHECKS[5], bad_tables(url)).await,
        check(target, CHECKS[7], foreign_item(url)).await,
        check(target, CHECKS[8], ttl_table(url)).await,
    ];
    out.push(if local {
        check(target, CHECKS[6], emulator_restart()).await
    } else {
        crate::skip(
            target,
            CHECKS[6],
            "restarts the emulator: needs a moto this run started (--via local)",
        )
    });
    // The command takes credentials from the environment: the emulator's test ones.
    let store = format!("dynamodb://distlock-smoke?endpoint={url}&region=us-east-1&create=true");
    let env: &[(&str, &str)] = if std::env::var_os("AWS_ACCESS_KEY_ID").is_some() {
        &[]
    } else {
        &[
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
        ]
    };
    out.push(
        check(
            target,
            "distlock_runs_a_command_under_the_lock",
            crate::distlock_checks::smoke(store, env),
        )
        .await,
    );
    out
}

fn table() -> String {
    format!("locks-{:08x}", rand::random::<u32>())
}

async fn backend(url: &str, table: &str) -> Res<DynamoBackend> {
    DynamoBackend::connect_with(dynamo_config(url, table))
        .await
        .map_err(e2s)
}

/// The item of `table` whose string key `attr` is `key`, read strongly consistent.
async fn read_item(
    b: &DynamoBackend,
    table: &str,
    attr: &str,
    key: &str,
) -> Res<Option<HashMap<String, AttributeValue>>> {
    Ok(b.client()
        .get_item()
        .table_name(table)
        .key(attr, AttributeValue::S(key.to_owned()))
        .consistent_read(true)
        .send()
        .await
        .map_err(e2s)?
        .item)
}

fn key(tag: &str) -> String {
    format!("{tag}-{:08x}", rand::random::<u32>())
}

/// A holder that stops (renewal off, then cut off from the store, so that the release its
/// guard sends once Lost cannot free the key either) keeps the key for its whole lease as
/// seen by a waiter: the waiter is granted no sooner than a lease after it started
/// looking, with a higher token, and the old guard says Lost by then.
async fn takeover_after_a_whole_lease(url: &str) -> Res<String> {
    let t = table();
    let lease = Duration::from_millis(1500);
    let proxy = Proxy::start(addr_of(url)?).await.map_err(e2s)?;
    let a = LockClient::new(backend(&with_addr(url, proxy.addr())?, &t).await?)
        .with_options(LockOptions::default().lease(lease).auto_renew(false));
    let b = LockClient::new(backend(url, &t).await?)
        .with_options(LockOptions::default().wait(WaitPolicy::Timeout(Duration::from_secs(10))));
    let k = key("takeover");
    let ga = a.acquire(&k).await.map_err(e2s)?;
    proxy.set_cut(true);
    let safe = ga.safe_until().ok_or("no safe deadline on a lease")?;
    let started = Instant::now();
    let gb = b.acquire(&k).await.map_err(e2s)?;
    let (waited, granted) = (started.elapsed(), Instant::now());
    let old = ga.status();
    let (ta, tb) = (ga.token(), gb.token());
    gb.release().await.map_err(e2s)?;
    if waited < lease {
        return Err(format!(
            "taken over after {waited:?}, before a whole lease ({lease:?}) of the same version"
        ));
    }
    if granted < safe {
        return Err(format!(
            "the takeover returned {:?} before the old guard's safe deadline",
            safe - granted
        ));
    }
    if tb <= ta || !matches!(old, LockStatus::Lost(_)) {
        return Err(format!(
            "tokens {ta} then {tb}; the old guard said {old:?} at the takeover"
        ));
    }
    Ok(format!(
        "taken over after {waited:?} (lease {lease:?}), token {ta} -> {tb}, the old guard {old:?}"
    ))
}

/// A heartbeat that lands but whose answer comes too late (the guard gives up on it): the
/// next heartbeat must still be accepted, since the item carries a version of this lease's
/// own, and the guard is Held again.
async fn lost_heartbeat_answer(url: &str) -> Res<String> {
    let proxy = Proxy::start(addr_of(url)?).await.map_err(e2s)?;
    let via = with_addr(url, proxy.addr())?;
    let t = table();
    let b = backend(&via, &t).await?;
    let lease = Duration::from_millis(1500);
    let c = LockClient::new(b).with_options(LockOptions::default().lease(lease));
    let k = key("lost-answer");
    let g = c.acquire(&k).await.map_err(e2s)?;
    let seen = lock_conformance::record_statuses(&g);
    let direct = backend(url, &t).await?;
    let version = || async {
        let item = read_item(&direct, &t, "key", &k).await?.unwrap_or_default();
        Ok::<_, String>(item.get("rvn").and_then(|v| v.as_s().ok()).cloned())
    };
    let before = version().await?;
    // The first heartbeat goes out at a third of the lease; its answer is held back past
    // the guard's patience (a third of the lease), so the guard gives up on it.
    tokio::time::sleep(lease / 3 - Duration::from_millis(100)).await;
    proxy.set_reply_delay(lease / 3 + Duration::from_millis(300));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let during = version().await?;
    proxy.set_reply_delay(Duration::ZERO);
    tokio::time::sleep(lease).await;
    let status = g.status();
    g.release().await.map_err(e2s)?;
    let seen = seen.await.map_err(e2s)?;
    let uncertain = seen.iter().any(|(_, s)| *s == LockStatus::Uncertain);
    // The heartbeat whose answer was lost did land: the item's version changed.
    if status != LockStatus::Held || !uncertain || during == before {
        return Err(format!(
            "after a heartbeat whose answer came too late (version {before:?} -> {during:?}): {status:?}; statuses {seen:?}"
        ));
    }
    Ok("the heartbeat landed (version changed), its answer came too late; Uncertain, then Held again by the next heartbeat".into())
}

/// A holder that heartbeats (each heartbeat a new version) keeps the key through three
/// leases; a waiter times out.
async fn heartbeat_keeps_it(url: &str) -> Res<String> {
    let t = table();
    let lease = Duration::from_millis(800);
    let a =
        LockClient::new(backend(url, &t).await?).with_options(LockOptions::default().lease(lease));
    let b = LockClient::new(backend(url, &t).await?)
        .with_options(LockOptions::default().wait(WaitPolicy::Timeout(lease * 3)));
    let k = key("heartbeat");
    let ga = a.acquire(&k).await.map_err(e2s)?;
    let waited = b.acquire(&k).await;
    let status = ga.status();
    ga.release().await.map_err(e2s)?;
    match waited {
        Err(LockError::Timeout { waited, .. }) if status == LockStatus::Held => Ok(format!(
            "the waiter timed out after {waited:?}; the holder still Held"
        )),
        other => Err(format!(
            "the waiter got {:?}; the holder said {status:?}",
            other.map(|g| g.token())
        )),
    }
}

/// Creates a table of the application's own, keyed by `id` of type `kind`.
async fn app_table(b: &DynamoBackend, name: &str, kind: ScalarAttributeType) -> Res<()> {
    b.client()
        .create_table()
        .table_name(name)
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("id")
                .key_type(KeyType::Hash)
                .build()
                .map_err(e2s)?,
        )
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("id")
                .attribute_type(kind)
                .build()
                .map_err(e2s)?,
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .map_err(|e| lock_dynamo::aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string())?;
    Ok(())
}

/// A table of the application's own, with one item carrying a fence token at 0.
async fn resource_table(b: &DynamoBackend) -> Res<String> {
    let name = format!("items-{:08x}", rand::random::<u32>());
    app_table(b, &name, ScalarAttributeType::S).await?;
    b.client()
        .put_item()
        .table_name(&name)
        .item("id", AttributeValue::S("item-1".into()))
        .item("stock", AttributeValue::N("10".into()))
        .item("fence", AttributeValue::N("0".into()))
        .send()
        .await
        .map_err(e2s)?;
    Ok(name)
}

async fn sell(b: &DynamoBackend, table: &str, token: lock_core::FencingToken) -> Res<FencedWrite> {
    b.fenced_update(
        table,
        HashMap::from([("id".to_owned(), AttributeValue::S("item-1".into()))]),
        "stock = stock - :one",
        HashMap::new(),
        HashMap::from([(":one".to_owned(), AttributeValue::N("1".into()))]),
        "fence",
        token,
    )
    .await
    .map_err(e2s)
}

/// A holder pauses past its lease (no heartbeat); another takes over and writes; the
/// paused one's late write is refused by the fence, and the stock counts only two sales.
async fn late_write_refused(url: &str) -> Res<String> {
    let t = table();
    let (ba, bb) = (backend(url, &t).await?, backend(url, &t).await?);
    let items = resource_table(&ba).await?;
    let lease = Duration::from_millis(800);
    let a = LockClient::new(ba.clone())
        .with_options(LockOptions::default().lease(lease).auto_renew(false));
    let b = LockClient::new(bb.clone())
        .with_options(LockOptions::default().wait(WaitPolicy::Timeout(Duration::from_secs(10))));
    let k = key("fence");
    let ga = a.acquire(&k).await.map_err(e2s)?;
    let first = sell(&ba, &items, ga.token()).await?;
    let gb = b.acquire(&k).await.map_err(e2s)?;
    let second = sell(&bb, &items, gb.token()).await?;
    let late = sell(&ba, &items, ga.token()).await?;
    let (ta, tb) = (ga.token(), gb.token());
    gb.release().await.map_err(e2s)?;
    let stock = read_item(&ba, &items, "id", "item-1")
        .await?
        .and_then(|i| i.get("stock").and_then(|v| v.as_n().ok()).cloned());
    let refused = matches!(late, FencedWrite::Refused { highest } if highest == tb);
    if !first.is_applied() || !second.is_applied() || !refused || stock.as_deref() != Some("8") {
        return Err(format!(
            "first {first:?}, second {second:?}, late {late:?}, stock {stock:?}"
        ));
    }
    Ok(format!(
        "holder {ta} sold, holder {tb} sold after the takeover, the late write of {ta}: {late:?}; stock 8"
    ))
}

/// Release marks the item free and keeps it, with its counter: tokens keep rising.
async fn keeps_counter(url: &str) -> Res<String> {
    let t = table();
    let b = backend(url, &t).await?;
    let c = LockClient::new(b.clone());
    let k = key("counter");
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let g = c.acquire(&k).await.map_err(e2s)?;
        tokens.push(g.token().get());
        g.release().await.map_err(e2s)?;
    }
    let item = read_item(&b, &t, "key", &k)
        .await?
        .ok_or("the released item is gone")?;
    let stored = item.get("token").and_then(|v| v.as_n().ok()).cloned();
    if !tokens.windows(2).all(|w| w[0] < w[1])
        || item.contains_key("owner")
        || stored != Some(tokens[2].to_string())
    {
        return Err(format!(
            "tokens {tokens:?}; the item after release: {item:?}"
        ));
    }
    Ok(format!(
        "tokens {tokens:?}; the released item keeps token {}",
        tokens[2]
    ))
}

/// No table (and no create), or a table whose key is not a string partition key named as
/// configured: a clear configuration error at connect, and nothing written.
async fn bad_tables(url: &str) -> Res<String> {
    let t = table();
    let missing = DynamoBackend::connect_with(dynamo_config(url, &t).create_table(false)).await;
    let missing = match missing {
        Err(e @ LockError::InvalidConfig(_)) if e.to_string().contains(&t) => e.to_string(),
        other => return Err(format!("a missing table gave {:?}", other.map(|_| ()))),
    };
    let admin = backend(url, &table()).await?;
    let tables = admin.client().list_tables().send().await.map_err(e2s)?;
    if tables.table_names().contains(&t) {
        return Err(format!("the missing table {t} was created"));
    }
    // A table keyed by a number named "id".
    let wrong = table();
    app_table(&admin, &wrong, ScalarAttributeType::N).await?;
    let schema = match DynamoBackend::connect_with(dynamo_config(url, &wrong)).await {
        Err(e @ LockError::InvalidConfig(_)) if e.to_string().contains("key schema") => {
            e.to_string()
        }
        other => return Err(format!("a wrong key schema gave {:?}", other.map(|_| ()))),
    };
    let items = admin
        .client()
        .scan()
        .table_name(&wrong)
        .send()
        .await
        .map_err(e2s)?
        .count;
    if items != 0 {
        return Err(format!("{items} items written to the wrong table"));
    }
    Ok(format!("missing: {missing}; wrong schema: {schema}"))
}

/// An item of the key written by another lock tool (the AWS DynamoDB Lock Client's
/// attributes, which has no `owner`): a try and a waiting acquire get a configuration error
/// at once, inspect too, and the item is left as it was.
async fn foreign_item(url: &str) -> Res<String> {
    let t = table();
    let b = backend(url, &t).await?;
    let k = key("foreign");
    b.client()
        .put_item()
        .table_name(&t)
        .item("key", AttributeValue::S(k.clone()))
        .item("ownerName", AttributeValue::S("host-a".into()))
        .item("leaseDuration", AttributeValue::S("20000".into()))
        .item("recordVersionNumber", AttributeValue::S("0b7e-4b1c".into()))
        .send()
        .await
        .map_err(e2s)?;
    let before = read_item(&b, &t, "key", &k).await?;
    let c = LockClient::new(b.clone());
    let mut seen = Vec::new();
    for wait in [
        WaitPolicy::NoWait,
        WaitPolicy::Timeout(Duration::from_secs(5)),
    ] {
        let started = Instant::now();
        let opts = LockOptions::default().wait(wait);
        match c.acquire_with(&k, &opts).await {
            Err(e @ LockError::InvalidConfig(_)) if started.elapsed() < Duration::from_secs(3) => {
                seen.push(e.to_string())
            }
            other => {
                return Err(format!(
                    "{wait:?} gave {:?} after {:?}",
                    other.map(|g| g.token()),
                    started.elapsed()
                ))
            }
        }
    }
    match c.inspect(&k).await {
        Err(LockError::InvalidConfig(_)) => {}
        other => return Err(format!("inspect gave {other:?}")),
    }
    let after = read_item(&b, &t, "key", &k).await?;
    if after != before {
        return Err(format!("the item changed: {before:?} -> {after:?}"));
    }
    Ok(seen.join(" | "))
}

/// A table whose time-to-live attribute is one of the lock item's: refused at connect
/// (TTL would delete released items, and their token counters with them).
async fn ttl_table(url: &str) -> Res<String> {
    use lock_dynamo::aws_sdk_dynamodb::types::TimeToLiveSpecification;
    let t = table();
    let b = backend(url, &t).await?;
    b.client()
        .update_time_to_live()
        .table_name(&t)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .attribute_name("token")
                .enabled(true)
                .build()
                .map_err(e2s)?,
        )
        .send()
        .await
        .map_err(e2s)?;
    match DynamoBackend::connect_with(dynamo_config(url, &t)).await {
        Err(e @ LockError::InvalidConfig(_)) if e.to_string().contains("token") => {
            Ok(e.to_string())
        }
        other => Err(format!(
            "a table with TTL on \"token\" gave {:?}",
            other.map(|_| ())
        )),
    }
}

/// The emulator keeps nothing across a restart: the table is gone (a clear error to the
/// backend that used it), and a new backend recreates it with counters from 1, so tokens
/// repeat. A real DynamoDB table is durable: its counters survive anything short of
/// deleting the table.
async fn emulator_restart() -> Res<String> {
    let mut moto = tokio::task::spawn_blocking(Moto::start)
        .await
        .map_err(e2s)??;
    let t = table();
    let url = moto.url();
    let b = backend(&url, &t).await?;
    let c = LockClient::new(b);
    let k = key("restart");
    let mut before = 0;
    for _ in 0..3 {
        let g = c.acquire(&k).await.map_err(e2s)?;
        before = g.token().get();
        g.release().await.map_err(e2s)?;
    }
    moto = tokio::task::spawn_blocking(move || moto.restart().map(|()| moto))
        .await
        .map_err(e2s)??;
    let old = match c.acquire(&k).await {
        Err(e @ LockError::InvalidConfig(_)) => e.to_string(),
        other => {
            return Err(format!(
                "the old backend got {:?}",
                other.map(|g| g.token())
            ))
        }
    };
    let fresh = LockClient::new(backend(&moto.url(), &t).await?);
    let g = fresh.acquire(&k).await.map_err(e2s)?;
    let after = g.token().get();
    g.release().await.map_err(e2s)?;
    if after > before {
        return Err(format!(
            "token {after} after the restart, above {before}: the emulator kept its data?"
        ));
    }
    Ok(format!(
        "before the restart token {before}; the old backend: {old}; a new backend recreated the table and was granted token {after} (a repeat: moto only)"
    ))
}
