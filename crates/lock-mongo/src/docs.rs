//! The filter and update documents, built apart from any connection so they can be
//! checked without a server.
//!
//! A lease document: `{ _id: <key>, owner: <lease id> | null, meta: <holder metadata> | null,
//! token: <u64 as i64>, expiresAt: <Date> }`. Documents are never deleted: the `token`
//! counter lives in them, so deleting one would let the next grant reuse old tokens. There
//! is no TTL index for the same reason (and because the TTL monitor runs only about every
//! 60 s, expiry is always judged in the filter, on the server's clock `$$NOW`).

use lock_core::{FencingToken, HolderMeta, LeaseId, LockKey};
use mongodb::bson::{doc, Bson, Document};

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Acquire: matches the key's document only if it is free or its lease expired by the
/// server's clock. With `upsert`, a missing document is inserted; a present but held one
/// makes the upsert collide on `_id` (duplicate key), which means "contended".
pub(crate) fn acquire_filter(key: &LockKey) -> Document {
    doc! {
        "_id": key.as_str(),
        "$expr": { "$or": [
            { "$eq": [ { "$ifNull": ["$owner", Bson::Null] }, Bson::Null ] },
            { "$lte": [ "$expiresAt", "$$NOW" ] },
        ]},
    }
}

/// Acquire: an update pipeline (so that `$$NOW` is the server's clock) that takes the lease
/// and increments the token; `$ifNull` starts a new document's counter at 1.
pub(crate) fn acquire_update(
    lease: &LeaseId,
    meta: &HolderMeta,
    ttl: std::time::Duration,
) -> Vec<Document> {
    vec![doc! { "$set": {
        "owner": lease.as_str(),
        "meta": meta.encode(),
        "token": { "$add": [ { "$ifNull": ["$token", 0_i64] }, 1_i64 ] },
        "expiresAt": { "$add": [ "$$NOW", ms(ttl) ] },
    }}]
}

/// Renew: only the owner, only while the lease has not run out.
pub(crate) fn renew_filter(key: &LockKey, lease: &LeaseId) -> Document {
    doc! {
        "_id": key.as_str(),
        "owner": lease.as_str(),
        "$expr": { "$gt": [ "$expiresAt", "$$NOW" ] },
    }
}

/// Renew: extend from the server's now.
pub(crate) fn renew_update(ttl: std::time::Duration) -> Vec<Document> {
    vec![doc! { "$set": { "expiresAt": { "$add": [ "$$NOW", ms(ttl) ] } } }]
}

/// Release: only the owner.
pub(crate) fn owner_filter(key: &LockKey, lease: &LeaseId) -> Document {
    doc! { "_id": key.as_str(), "owner": lease.as_str() }
}

/// Release: unset the owner, keep the token. Returns the document as it was before, with
/// `live` telling whether the lease had not yet expired.
pub(crate) fn release_update() -> Vec<Document> {
    vec![doc! { "$set": { "owner": Bson::Null, "meta": Bson::Null, "expiresAt": "$$NOW" } }]
}

/// Inspect and re-read: the document with the lease's remaining time on the server's
/// clock.
pub(crate) fn read_pipeline(key: &LockKey) -> Vec<Document> {
    vec![
        doc! { "$match": { "_id": key.as_str() } },
        doc! { "$project": {
            "owner": 1, "meta": 1, "token": 1,
            "remaining": { "$subtract": [ "$expiresAt", "$$NOW" ] },
        }},
    ]
}

/// Change stream filter: changes to lease documents (a release or an expiry takeover).
pub(crate) fn change_pipeline() -> Vec<Document> {
    vec![doc! { "$match": { "operationType": { "$in": ["update", "replace", "delete"] } } }]
}

/// Fenced update of a user document: applies only if the stored token (in `field`) is not
/// higher than `token`, and stores `token`. A document without the token field does not
/// match: it cannot tell which holder wrote it. The caller's filter is kept whole beside
/// the guard (`$and`), so a filter with its own `$or` still applies; an update whose `$set`
/// is not a document is refused rather than rewritten.
pub(crate) fn fenced(
    filter: Document,
    mut update: Document,
    field: &str,
    token: FencingToken,
) -> Result<(Document, Document), String> {
    let t = i64::try_from(token.get())
        .map_err(|_| format!("token {token} does not fit a BSON Int64"))?;
    let guard = doc! { field: { "$lte": t } };
    let f = if filter.is_empty() {
        guard
    } else {
        doc! { "$and": [filter, guard] }
    };
    let mut set = match update.remove("$set") {
        Some(Bson::Document(d)) => d,
        None => Document::new(),
        Some(other) => return Err(format!("the update's $set must be a document, not {other}")),
    };
    set.insert(field, t);
    update.insert("$set", set);
    Ok((f, update))
}

/// A lease document, as read back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) owner: Option<String>,
    pub(crate) meta: Option<String>,
    pub(crate) token: u64,
    /// Milliseconds left by the server's clock (only from `read_pipeline`).
    pub(crate) remaining_ms: Option<i64>,
}

/// An integer stored as Int64, Int32 or a Double that holds it exactly; `None` otherwise
/// (a fraction, or a Double past 2^53 that may stand for several integers).
pub(crate) fn as_i64(b: Option<&Bson>) -> Option<i64> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    match b? {
        Bson::Int64(v) => Some(*v),
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Double(v) if v.fract() == 0.0 && v.abs() <= EXACT => Some(*v as i64),
        _ => None,
    }
}

/// Reads a lease document; `None` if it is malformed.
pub(crate) fn parse_lease(d: &Document) -> Option<Lease> {
    let owner = match d.get("owner") {
        Some(Bson::String(s)) => Some(s.clone()),
        None | Some(Bson::Null) => None,
        _ => return None,
    };
    let meta = match d.get("meta") {
        Some(Bson::String(s)) => Some(s.clone()),
        _ => None,
    };
    let token = u64::try_from(as_i64(d.get("token"))?).ok()?;
    Some(Lease {
        owner,
        meta,
        token,
        remaining_ms: as_i64(d.get("remaining")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_read_and_written_exactly_or_refused() {
        assert_eq!(as_i64(Some(&Bson::Int64(i64::MAX))), Some(i64::MAX));
        assert_eq!(as_i64(Some(&Bson::Double(4096.0))), Some(4096));
        assert_eq!(as_i64(Some(&Bson::Double(4096.5))), None);
        assert_eq!(as_i64(Some(&Bson::Double(2f64.powi(60)))), None);
        assert!(parse_lease(&doc! {"_id": "k", "owner": null}).is_none());
        let big = FencingToken::new(u64::MAX);
        assert!(fenced(doc! {}, doc! {}, "fence", big).is_err());
        // A document without the token field never matches the guard.
        let (f, _) = fenced(doc! {"_id": 1}, doc! {}, "fence", FencingToken::new(5)).unwrap();
        assert!(!f.to_string().contains("$exists"), "{f}");
    }

    #[test]
    fn acquire_documents_use_the_server_clock_and_never_reset_the_token() {
        let key = LockKey::new("inv:1").unwrap();
        let f = acquire_filter(&key);
        assert_eq!(f.get_str("_id").unwrap(), "inv:1");
        let expr = f.get_document("$expr").unwrap().to_string();
        assert!(expr.contains("$$NOW"), "{expr}");
        assert!(expr.contains("$owner"), "{expr}");
        let lease = LeaseId::random();
        let u = acquire_update(
            &lease,
            &HolderMeta::default().with_label("x"),
            std::time::Duration::from_millis(1500),
        );
        let set = u[0].get_document("$set").unwrap();
        assert_eq!(set.get_str("owner").unwrap(), lease.as_str());
        let tok = set.get_document("token").unwrap().to_string();
        assert!(tok.contains("$ifNull") && tok.contains("$token"), "{tok}");
        let exp = set.get_document("expiresAt").unwrap().to_string();
        assert!(exp.contains("$$NOW") && exp.contains("1500"), "{exp}");
    }

    #[test]
    fn renew_and_release_are_owner_checked_and_keep_the_counter() {
        let key = LockKey::new("k").unwrap();
        let lease = LeaseId::random();
        let f = renew_filter(&key, &lease);
        assert_eq!(f.get_str("owner").unwrap(), lease.as_str());
        assert!(f
            .get_document("$expr")
            .unwrap()
            .to_string()
            .contains("$$NOW"));
        let r = release_update();
        let set = r[0].get_document("$set").unwrap();
        assert!(
            set.get("token").is_none(),
            "release must not touch the token"
        );
        assert_eq!(set.get("owner"), Some(&Bson::Null));
        assert_eq!(
            owner_filter(&key, &lease).get_str("owner").unwrap(),
            lease.as_str()
        );
    }

    #[test]
    fn fenced_update_guards_and_stores_the_token() {
        let (f, u) = fenced(
            doc! {"item": "a"},
            doc! {"$inc": {"stock": -1}, "$set": {"note": "x"}},
            "fence",
            FencingToken::new(7),
        )
        .unwrap();
        let parts = f.get_array("$and").unwrap();
        assert_eq!(parts[0], Bson::Document(doc! {"item": "a"}));
        assert_eq!(
            parts[1],
            Bson::Document(doc! {"fence": {"$lte": 7_i64}}),
            "a write with token 7 applies only where the stored token is not higher"
        );
        let set = u.get_document("$set").unwrap();
        assert_eq!(set.get_i64("fence").unwrap(), 7);
        assert_eq!(
            set.get_str("note").unwrap(),
            "x",
            "the caller's $set is kept"
        );
        assert!(u.get_document("$inc").is_ok());
    }

    #[test]
    fn fenced_update_keeps_a_filter_that_has_its_own_or() {
        let mine = doc! {"$or": [{"item": "a"}, {"item": "b"}]};
        let (f, _) = fenced(
            mine.clone(),
            doc! {"$inc": {"stock": -1}},
            "fence",
            FencingToken::new(3),
        )
        .unwrap();
        assert!(
            f.get("$or").is_none(),
            "the guard must not replace the caller's $or"
        );
        let parts = f.get_array("$and").unwrap();
        assert_eq!(parts[0], Bson::Document(mine));
        let (empty, _) = fenced(Document::new(), doc! {}, "fence", FencingToken::new(3)).unwrap();
        assert_eq!(
            empty,
            doc! {"fence": {"$lte": 3_i64}},
            "an empty filter is just the guard"
        );
    }

    #[test]
    fn fenced_update_refuses_a_set_that_is_not_a_document() {
        let r = fenced(
            doc! {"item": "a"},
            doc! {"$set": 5_i32},
            "fence",
            FencingToken::new(3),
        );
        assert!(r.unwrap_err().contains("$set"));
    }

    #[test]
    fn lease_documents_parse() {
        let d = doc! {"_id": "k", "owner": "abc", "meta": "h\t1\tl", "token": 5_i64, "remaining": 1200_i64};
        assert_eq!(
            parse_lease(&d),
            Some(Lease {
                owner: Some("abc".into()),
                meta: Some("h\t1\tl".into()),
                token: 5,
                remaining_ms: Some(1200)
            })
        );
        let free = doc! {"_id": "k", "owner": Bson::Null, "token": 9_i32};
        assert_eq!(parse_lease(&free).unwrap().owner, None);
        assert_eq!(parse_lease(&free).unwrap().token, 9);
        assert_eq!(parse_lease(&doc! {"owner": 5}), None);
        assert_eq!(parse_lease(&doc! {"owner": "a", "token": -1_i64}), None);
    }
}
