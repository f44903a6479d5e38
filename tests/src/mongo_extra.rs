//! MongoDB checks beyond the conformance suite; they need a reachable server
//! (`LOCK_MONGO_URL`).

use std::time::Duration;

use lock_conformance::CaseResult;
use lock_core::{FencedWrite, LockClient, LockOptions, WaitPolicy};
use lock_mongo::mongodb::bson::doc;
use lock_mongo::{MongoBackend, MongoConfig};

use crate::check;

type Res<T> = Result<T, String>;

fn e2s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The names of the checks below.
pub const CHECKS: [&str; 4] = [
    "release_keeps_the_counter",
    "fenced_update_refuses_late_holder",
    "fenced_update_keeps_the_callers_or",
    "distlock_runs_a_command_under_the_lock",
];

/// Runs every MongoDB-specific check against `url`.
pub async fn run(url: &str) -> Vec<CaseResult> {
    vec![
        check("mongo", CHECKS[0], keeps_counter(url)).await,
        check("mongo", CHECKS[1], fenced(url)).await,
        check("mongo", CHECKS[2], fenced_or(url)).await,
        check(
            "mongo",
            CHECKS[3],
            crate::distlock_checks::smoke(url.to_owned(), &[]),
        )
        .await,
    ]
}

async fn backend(url: &str, coll: &str) -> Res<MongoBackend> {
    MongoBackend::connect_with(MongoConfig::new(url).collection(coll))
        .await
        .map_err(e2s)
}

async fn keeps_counter(url: &str) -> Res<String> {
    let coll = format!("leases_{:08x}", rand::random::<u32>());
    let b = backend(url, &coll).await?;
    let c = LockClient::new(b.clone());
    let mut last = 0;
    for _ in 0..3 {
        let g = c.acquire("k").await.map_err(e2s)?;
        if g.token().get() <= last {
            return Err(format!("token {} after {last}", g.token()));
        }
        last = g.token().get();
        g.release().await.map_err(e2s)?;
    }
    let n = b.collection().count_documents(doc! {}).await.map_err(e2s)?;
    let _ = b.collection().drop().await;
    if n != 1 {
        return Err(format!("{n} lease documents for one key"));
    }
    Ok(format!(
        "3 grants, tokens up to {last}, the document (and counter) kept"
    ))
}

type Items = lock_mongo::mongodb::Collection<lock_mongo::mongodb::bson::Document>;

/// A backend on a fresh lease collection, and a fresh items collection beside it holding
/// `ids`, each with stock 10.
async fn with_items(url: &str, ids: &[&str]) -> Res<(MongoBackend, Items)> {
    let coll = format!("leases_{:08x}", rand::random::<u32>());
    let b = backend(url, &coll).await?;
    let leases = b.collection();
    let items = leases
        .client()
        .database(leases.namespace().db.as_str())
        .collection::<lock_mongo::mongodb::bson::Document>(&format!("{coll}_items"));
    for id in ids {
        items
            .insert_one(doc! {"_id": *id, "stock": 10, "fence": 0_i64})
            .await
            .map_err(e2s)?;
    }
    Ok((b, items))
}

async fn fenced(url: &str) -> Res<String> {
    let (b, items) = with_items(url, &["item-1"]).await?;
    let c = LockClient::new(b.clone());
    let stale = c
        .acquire_with(
            "inv",
            &LockOptions::default()
                .lease(Duration::from_millis(300))
                .auto_renew(false),
        )
        .await
        .map_err(e2s)?;
    let o = LockOptions::default().wait(WaitPolicy::Timeout(Duration::from_secs(10)));
    let fresh = c.acquire_with("inv", &o).await.map_err(e2s)?;
    let upd = doc! {"$inc": {"stock": -1}};
    let w1 = b
        .fenced_update(
            &items,
            doc! {"_id": "item-1"},
            upd.clone(),
            "fence",
            fresh.token(),
        )
        .await
        .map_err(e2s)?;
    let w2 = b
        .fenced_update(&items, doc! {"_id": "item-1"}, upd, "fence", stale.token())
        .await
        .map_err(e2s)?;
    fresh.release().await.map_err(e2s)?;
    drop(stale);
    let _ = items.drop().await;
    let _ = b.collection().drop().await;
    if w1 != FencedWrite::Applied(1) || !matches!(w2, FencedWrite::Refused { .. }) {
        return Err(format!("fresh {w1:?}, stale {w2:?}"));
    }
    Ok("fresh token applied, late token refused".into())
}

/// A caller's filter with its own `$or` keeps it: the token guard is added beside it, not
/// in its place (which would widen the update to every unfenced document).
async fn fenced_or(url: &str) -> Res<String> {
    let (b, items) = with_items(url, &["item-1", "item-2", "item-3"]).await?;
    let c = LockClient::new(b.clone());
    let g = c.acquire("inv-or").await.map_err(e2s)?;
    let w = b
        .fenced_update(
            &items,
            doc! {"$or": [{"_id": "item-1"}, {"_id": "item-2"}]},
            doc! {"$inc": {"stock": -1}},
            "fence",
            g.token(),
        )
        .await
        .map_err(e2s)?;
    g.release().await.map_err(e2s)?;
    let untouched = items
        .find_one(doc! {"_id": "item-3"})
        .await
        .map_err(e2s)?
        .and_then(|d| d.get_i32("stock").ok());
    let _ = items.drop().await;
    let _ = b.collection().drop().await;
    if w != FencedWrite::Applied(1) || untouched != Some(10) {
        return Err(format!(
            "an update of item-1 or item-2 gave {w:?} and left item-3 at {untouched:?}"
        ));
    }
    Ok("one document updated; the third, outside the caller's $or, untouched".into())
}
