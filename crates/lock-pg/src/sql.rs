//! The schema, the statements, the key-to-advisory-id mapping and the error mapping.

use lock_core::LockError;
use tokio_postgres::error::SqlState;

/// Backend name used in errors.
pub(crate) const NAME: &str = "pg";

/// Maps a key to the 64-bit advisory-lock id space: FNV-1a over `schema \0 key`, then the
/// SplitMix64 finalizer (to spread FNV's weak low bits). Stable across versions, platforms
/// and processes: every client computes the same id for the same key.
///
/// Two keys can share an id (probability about n²/2⁶⁵ for n keys in use at once). Then
/// they contend as if they were one key (false contention), which costs waiting but never
/// a double grant: PostgreSQL grants one id to one session at a time, and a lock is only
/// reported held after PostgreSQL granted its id.
pub fn advisory_id(schema: &str, key: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in schema.bytes().chain([0u8]).chain(key.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    i64::from_ne_bytes(h.to_ne_bytes())
}

/// How `pg_locks` shows a bigint advisory id ([`advisory_id`]): `(classid, objid)`, its
/// high and low 32 bits, with `objsubid = 1`. To see who holds or waits for a key:
///
/// ```sql
/// SELECT pid, granted FROM pg_locks
/// WHERE locktype = 'advisory' AND objsubid = 1 AND classid::bigint = $1 AND objid::bigint = $2
/// ```
pub fn advisory_lock_parts(id: i64) -> (i64, i64) {
    let u = u64::from_ne_bytes(id.to_ne_bytes());
    (i64::from((u >> 32) as u32), i64::from(u as u32))
}

/// The statements, with the (validated) schema name filled in.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) schema_ddl: String,
    pub(crate) session_acquire: String,
    pub(crate) session_try: String,
    pub(crate) xact_try: String,
    pub(crate) session_unlock: &'static str,
    pub(crate) session_release: String,
    pub(crate) session_inspect: String,
    pub(crate) lease_acquire: String,
    pub(crate) lease_renew: String,
    pub(crate) lease_release: String,
    pub(crate) lease_handoff: String,
    pub(crate) lease_inspect: String,
    pub(crate) channel: String,
}

impl Sql {
    pub(crate) fn new(s: &str) -> Self {
        // The grants as the functions run them, the lock being held: session_token, and
        // session_acquire's transaction-scoped branch after its waiting lock.
        let fn_session_grant =
            session_grant(s, "true", ["p_key", "p_lease", "p_meta"], " INTO v_token");
        let fn_xact_grant = xact_grant(s, "true", ["p_key", "p_lease", "p_meta"], " INTO v_token");
        let schema_ddl = format!(
            r#"
CREATE SCHEMA IF NOT EXISTS {s};
-- One row per key, never deleted: the key's durable fencing counter. `token` is at or
-- above every token issued for the key: the last one a transaction-scoped lock issued, or
-- the end of the block of tokens session locks reserved (below). Transaction-scoped locks
-- also record their holder here (lease_id, meta, holder_pid).
CREATE TABLE IF NOT EXISTS {s}.fence (
    key        text PRIMARY KEY,
    token      bigint NOT NULL,
    lease_id   text,
    meta       text,
    holder_pid integer
);
-- Source of token values: never rolled back, so a holder whose transaction rolled back
-- (transaction-scoped locks, a terminated holder) cannot have its token issued again.
-- Each value also reserves the 31 below it: a session lock's block (below) is drawn
-- from it, so every block ends at or below the sequence.
CREATE SEQUENCE IF NOT EXISTS {s}.token_seq INCREMENT BY 32;
DO $do$ BEGIN
    IF (SELECT seqincrement FROM pg_sequence WHERE seqrelid = '{s}.token_seq'::regclass) < 32 THEN
        ALTER SEQUENCE {s}.token_seq INCREMENT BY 32;
    END IF;
END $do$;
-- Session locks: per key, the last token issued from the key's current block, the block's
-- end, and the holder (lease_id, meta, holder_pid). UNLOGGED: written without WAL, and
-- emptied by PostgreSQL's recovery after a crash. A grant inside the block writes only
-- this row, so its commit waits for no WAL flush; a grant that needs a new block raises
-- fence.token (WAL-logged, committed synchronously) first. The block is used only while
-- `ceiling` still equals fence.token (no other grant moved the durable counter since),
-- so after a crash, or after any other writer, the next grant starts above fence.token:
-- above every token issued before.
CREATE UNLOGGED TABLE IF NOT EXISTS {s}.cursor (
    key        text PRIMARY KEY,
    token      bigint NOT NULL,
    ceiling    bigint NOT NULL,
    lease_id   text NOT NULL,
    meta       text NOT NULL,
    holder_pid integer NOT NULL
);
-- Lease-row locks: one row per key, never deleted: it is also the key's fencing counter
-- (`token`). A released row has lease_id '' and expires_at '-infinity'; expiry is judged on
-- the server's clock. Grants and releases update the row in place (HOT updates, no index
-- churn).
CREATE TABLE IF NOT EXISTS {s}.lease (
    key        text PRIMARY KEY,
    lease_id   text NOT NULL,
    token      bigint NOT NULL,
    meta       text NOT NULL,
    expires_at timestamptz NOT NULL
);
-- Whether an acquire found the row held since its last grant (a grant clears it, a
-- direct hand-off keeps it): a release notifies waiters only then.
ALTER TABLE {s}.lease ADD COLUMN IF NOT EXISTS waited boolean NOT NULL DEFAULT false;

-- A session lock's token, the lock being held already: the next of the key's block, or a
-- new block. The uncontended grant statement calls it only when the block has none left
-- (once in a block's worth of grants), so that its own plan does not carry the new-block
-- path; session_acquire calls it after a wait.
CREATE OR REPLACE FUNCTION {s}.session_token(p_key text, p_lease text, p_meta text)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_token bigint;
BEGIN
    {fn_session_grant};
    RETURN v_token;
END
$fn$;

-- Session (p_xact = false) and transaction-scoped (p_xact = true) advisory locks.
-- p_wait_ms: NULL = try once; 0 = wait without limit; n = wait at most n ms (lock_timeout).
-- p_idle_ms: the server ends the holder's session (or transaction) after this long without
-- a message from the client (PostgreSQL 14+), so a dead or partitioned holder cannot keep
-- the lock; the client probes well inside it and reports loss before it runs out.
-- Returns the new token, or NULL when a try found the lock taken.
DROP FUNCTION IF EXISTS {s}.session_acquire(text, bigint, text, text, bigint, boolean);
CREATE OR REPLACE FUNCTION {s}.session_acquire(
    p_key text, p_id bigint, p_lease text, p_meta text, p_wait_ms bigint, p_xact boolean,
    p_idle_ms bigint)
RETURNS bigint LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_old text := current_setting('lock_timeout');
    v_token bigint;
BEGIN
    IF p_wait_ms IS NULL THEN
        IF p_xact THEN
            IF NOT pg_try_advisory_xact_lock(p_id) THEN RETURN NULL; END IF;
        ELSE
            IF NOT pg_try_advisory_lock(p_id) THEN RETURN NULL; END IF;
        END IF;
    ELSE
        PERFORM set_config('lock_timeout', p_wait_ms::text, true);
        IF p_xact THEN
            PERFORM pg_advisory_xact_lock(p_id);
        ELSE
            PERFORM pg_advisory_lock(p_id);
        END IF;
        PERFORM set_config('lock_timeout', v_old, true);
    END IF;
    IF p_xact THEN
        {fn_xact_grant};
    ELSE
        v_token := {s}.session_token(p_key, p_lease, p_meta);
    END IF;
    IF p_idle_ms IS NOT NULL AND current_setting('server_version_num')::int >= 140000 THEN
        IF p_xact THEN
            PERFORM set_config('idle_in_transaction_session_timeout', p_idle_ms::text, true);
        ELSE
            PERFORM set_config('idle_session_timeout', p_idle_ms::text, false);
        END IF;
    END IF;
    IF p_xact THEN
        -- The fence row stays invisible to others until commit; the session's
        -- application_name is visible at once (pg_stat_activity) and reverts at commit.
        PERFORM set_config('application_name', 'lk ' || p_lease || ' ' || v_token, true);
    END IF;
    RETURN v_token;
END
$fn$;

-- Functions of earlier versions, now plain statements (`lease_acquire`, `session_release`
-- in sql.rs).
DROP FUNCTION IF EXISTS {s}.lease_acquire(text, text, text, bigint);
DROP FUNCTION IF EXISTS {s}.session_release(bigint);
"#
        );
        Self {
            schema_ddl,
            session_acquire: format!("SELECT {s}.session_acquire($1, $2, $3, $4, $5, $6, $7)"),
            // The session lock's uncontended path as one plain statement (what
            // session_acquire does for a try, without the PL/pgSQL call). The lock's CTE
            // is materialized, so the lock is tried exactly once, before any write; no row
            // comes back (and nothing is written) when the lock is taken. The token is the
            // next of the key's block; when the block has none left (one grant in 32),
            // `session_token` starts a new one. The plan names only the two tables the
            // block path reads: carrying the new-block path inline (the sequence, two
            // upserts) cost the server about 15 µs per grant even where it wrote nothing
            // (session 11). $5: the server-side idle limit (ms).
            session_try: format!(
                "WITH l AS MATERIALIZED (SELECT pg_try_advisory_lock($2) AS ok), \
                 up AS ({}) \
                 SELECT coalesce((SELECT token FROM up), {s}.session_token($1, $3, $4)), \
                     {IDLE_IF_14}set_config('idle_session_timeout', $5, false) END \
                 FROM l WHERE l.ok",
                block_next(s, ["$1", "$3", "$4"])
            ),
            // The transaction-scoped lock's, sent right behind `BEGIN`: the idle limit and
            // the holder's name (application_name, visible in pg_stat_activity at once)
            // are local to the transaction.
            xact_try: xact_grant(
                s,
                "pg_try_advisory_xact_lock($2)",
                ["$1", "$3", "$4"],
                &format!(
                    ", {IDLE_IF_14}set_config('idle_in_transaction_session_timeout', $5, true) END, \
                     set_config('application_name', 'lk ' || $3 || ' ' || f.token, true)"
                ),
            ),
            session_unlock: "SELECT pg_advisory_unlock($1)",
            // One plain statement: give the lock back and clear the session's idle limit
            // (the connection returns to the pool).
            session_release: "SELECT pg_advisory_unlock($1), \
                 CASE WHEN current_setting('server_version_num')::int >= 140000 \
                      THEN set_config('idle_session_timeout', '0', false) END"
                .to_owned(),
            session_inspect: format!(
                "SELECT f.lease_id, f.token, f.meta, a.application_name, \
                    (SELECT count(*) FROM pg_locks w WHERE w.locktype = 'advisory' \
                       AND w.database = l.database AND w.classid::bigint = $2 \
                       AND w.objid::bigint = $3 AND w.objsubid = 1 AND NOT w.granted) \
                 FROM pg_locks l \
                 LEFT JOIN {s}.cursor f ON f.key = $1 AND f.holder_pid = l.pid \
                 LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
                   AND l.classid::bigint = $2 AND l.objid::bigint = $3 \
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            // Lease rows: take a free, released or expired lease and issue the token, in
            // one plain statement that writes one row. The row is the key's counter: the
            // token is `greatest(row's last token + 1, nextval)`, so it grows per key even
            // if the counter was ahead of the sequence, and never repeats after a restart
            // (the sequence is durable). A refused attempt uses up a sequence value (tokens
            // may skip numbers, never repeat or go back). A row already held under the
            // same lease id is granted again (new token, new expiry): an attempt whose
            // answer was lost, or a hand-off whose outcome the releaser could not learn,
            // does not leave its waiter locked out until expiry (lease ids are random and
            // belong to one acquire). An attempt that finds the row held marks it
            // `waited`, in the same transaction: its `ON CONFLICT` locked the row, so a
            // release running at the same moment waits for that commit and sees the mark
            // (no release can slip between the refusal and the mark unnoticed). A row
            // (token, NULL) when granted;
            // a row (NULL, holder's remaining ms) when not; no row when another client's
            // grant committed while this statement ran (held, time unknown).
            lease_acquire: format!(
                "WITH t AS MATERIALIZED (SELECT nextval('{s}.token_seq') AS tok), \
                 ins AS ( \
                     INSERT INTO {s}.lease AS l (key, lease_id, token, meta, expires_at) \
                     SELECT $1, $2, t.tok, $3, clock_timestamp() + $4::bigint * interval '1 millisecond' FROM t \
                     ON CONFLICT (key) DO UPDATE \
                         SET lease_id = EXCLUDED.lease_id, token = greatest(l.token + 1, EXCLUDED.token), \
                             meta = EXCLUDED.meta, expires_at = EXCLUDED.expires_at, waited = false \
                         WHERE l.expires_at <= clock_timestamp() OR l.lease_id = EXCLUDED.lease_id \
                     RETURNING l.token), \
                 mark AS ( \
                     UPDATE {s}.lease SET waited = true \
                     WHERE key = $1 AND NOT EXISTS (SELECT 1 FROM ins) RETURNING 1) \
                 SELECT ins.token, NULL::bigint FROM ins \
                 UNION ALL \
                 SELECT NULL::bigint, greatest(0, ceil(extract(epoch FROM \
                     greatest(l.expires_at, clock_timestamp()) - clock_timestamp()) * 1000))::bigint \
                 FROM {s}.lease l WHERE l.key = $1 AND NOT EXISTS (SELECT 1 FROM ins)"
            ),
            lease_renew: format!(
                "UPDATE {s}.lease SET expires_at = clock_timestamp() + $3::bigint * interval '1 millisecond' \
                 WHERE key = $1 AND lease_id = $2 AND expires_at > clock_timestamp() RETURNING 1"
            ),
            // Marks the row released (the row stays: it holds the key's counter) and wakes
            // waiters, with a notification only when an acquire found the row held since
            // its last grant (`waited`): a release nobody waited for costs the listening
            // sessions of every client nothing. One row when this lease was live; none
            // when it had expired or was taken over (the row is then left to its next
            // taker, untouched).
            //
            // The commit is asynchronous (`synchronous_commit` off for this statement's
            // own transaction only): it does not wait for a WAL flush. A release lost in a
            // server crash leaves the row as it was, held until its expiry, the same as a
            // holder that died: a delay for waiters, never a double grant. The next grant
            // commits synchronously, which flushes this release with it. Grants and
            // renewals always commit synchronously: a renewal or a token lost in a crash
            // would not be safe.
            lease_release: format!(
                "WITH u AS (UPDATE {s}.lease SET lease_id = '', meta = '', expires_at = '-infinity' \
                            WHERE key = $1 AND lease_id = $2 AND expires_at > clock_timestamp() \
                            RETURNING waited) \
                 SELECT CASE WHEN u.waited THEN pg_notify('{s}_released', $1)::text END, \
                        set_config('synchronous_commit', 'off', true) FROM u"
            ),
            // A direct hand-off (handoff.rs): the holder's lease ($2) ends and the waiter's
            // ($3) begins in one statement, with a new token; a row (the token) when the
            // holder's lease was live, none otherwise (nothing changes). A grant, so it
            // commits synchronously.
            lease_handoff: format!(
                "UPDATE {s}.lease AS l SET lease_id = $3, \
                     token = greatest(l.token + 1, nextval('{s}.token_seq')), meta = $4, \
                     expires_at = clock_timestamp() + $5::bigint * interval '1 millisecond' \
                 WHERE key = $1 AND lease_id = $2 AND expires_at > clock_timestamp() \
                 RETURNING l.token"
            ),
            lease_inspect: format!(
                "SELECT lease_id, token, meta, \
                    greatest(0, ceil(extract(epoch FROM expires_at - clock_timestamp()) * 1000))::bigint \
                 FROM {s}.lease WHERE key = $1 AND expires_at > clock_timestamp()"
            ),
            channel: format!("{s}_released"),
        }
    }
}

/// Sets the server's idle limit only on PostgreSQL 14 and later (`CASE ... END`).
const IDLE_IF_14: &str = "CASE WHEN current_setting('server_version_num')::int >= 140000 THEN ";

/// A session lock's grant: takes the lock (`lock`, true when already held) and issues the
/// token, in one statement. `[key, lease, meta]` name its inputs; `tail` follows the
/// returned token (more columns, or `INTO` in PL/pgSQL). No row, and nothing written,
/// when the lock is taken.
///
/// **Inside the key's block** (`up`): the unlogged `cursor` row has tokens left and its
/// ceiling still equals the durable `fence.token`. The grant writes only that row, so its
/// commit waits for no WAL flush.
///
/// **A new block** (`fe`, `ins`) otherwise: `n = nextval(token_seq)`, which steps by `inc`
/// (at least 32), so every value in `(n - inc, n]` belongs to this draw alone. The key's
/// `fence.token` becomes `greatest(fence.token + inc, n)` (normally `n`); the block is the
/// `inc` tokens ending there (fewer at the very start of the sequence, where tokens begin
/// at 1), and its first one is the grant's token. That write is
/// WAL-logged, so the grant commits synchronously.
///
/// Every value is read where PostgreSQL gives the newest committed row, not the
/// statement's snapshot (taken before the lock was granted, so possibly before the
/// previous holder's grant committed): the block's row through the `UPDATE` (which
/// re-reads a row changed since the snapshot), the durable counter through the upsert's
/// `ON CONFLICT DO UPDATE`, and the sequence, which has no snapshot. Only the
/// `fence.token` comparison reads the snapshot; the writers that move it (a new block, a
/// transaction-scoped grant) also change the block's row, which the `UPDATE` does see. A
/// client of the previous version moves it without: if its grant committed after this
/// statement's snapshot, this grant can come out below its token (an inversion, which a
/// fence refuses, never a repeat: its token came from `nextval`, above the block).
///
/// Why tokens never repeat or go back per key: every token issued is at or below the
/// key's `fence.token`, which never goes down, and a new block starts above it: above
/// every earlier draw of the sequence too (those are at or below `n - inc`). A block is
/// used only while its ceiling equals `fence.token`, a value committed synchronously before
/// any of the block's tokens was issued, so it survives a crash, while the block's row does
/// not (recovery empties unlogged tables). A transaction-scoped grant ([`xact_grant`])
/// takes `nextval`, above every block's end, and retires the key's block.
fn session_grant(s: &str, lock: &str, [key, lease, meta]: [&str; 3], tail: &str) -> String {
    let next = block_next(s, [key, lease, meta]);
    format!(
        "WITH l AS MATERIALIZED (SELECT {lock} AS ok), \
         up AS ({next}), \
         inc AS MATERIALIZED ( \
             SELECT greatest(seqincrement, 1) AS inc FROM pg_sequence \
             WHERE seqrelid = '{s}.token_seq'::regclass), \
         fe AS ( \
             INSERT INTO {s}.fence AS f (key, token) \
             SELECT {key}, nextval('{s}.token_seq') FROM l WHERE l.ok AND NOT EXISTS (SELECT 1 FROM up) \
             ON CONFLICT (key) DO UPDATE \
                 SET token = greatest(f.token + (SELECT inc FROM inc), EXCLUDED.token) \
             RETURNING f.token AS ceiling), \
         ins AS ( \
             INSERT INTO {s}.cursor AS c (key, token, ceiling, lease_id, meta, holder_pid) \
             SELECT {key}, greatest(fe.ceiling - inc.inc + 1, 1), fe.ceiling, {lease}, {meta}, pg_backend_pid() \
             FROM fe, inc \
             ON CONFLICT (key) DO UPDATE SET token = EXCLUDED.token, ceiling = EXCLUDED.ceiling, \
                 lease_id = EXCLUDED.lease_id, meta = EXCLUDED.meta, holder_pid = EXCLUDED.holder_pid \
             RETURNING c.token) \
         SELECT t.token{tail} FROM (SELECT token FROM up UNION ALL SELECT token FROM ins) t"
    )
}

/// The next token of the key's session block, and the holder written beside it: the
/// `UPDATE` that [`session_grant`] runs first (its `up`), after the lock CTE `l`. No row
/// when the lock was not taken, or the block is used up or retired.
fn block_next(s: &str, [key, lease, meta]: [&str; 3]) -> String {
    format!(
        "UPDATE {s}.cursor c SET token = c.token + 1, lease_id = {lease}, meta = {meta}, \
             holder_pid = pg_backend_pid() \
         FROM l WHERE l.ok AND c.key = {key} AND c.token < c.ceiling \
           AND c.ceiling = (SELECT f.token FROM {s}.fence f WHERE f.key = {key}) \
         RETURNING c.token"
    )
}

/// A transaction-scoped lock's grant, in the caller's transaction: takes the lock (`lock`)
/// and writes the token to the key's `fence` row, `greatest(fence.token + 1, nextval)`,
/// and retires the key's session block (`cursor.ceiling = 0`), so the next session grant
/// starts a block above this token. If the transaction rolls back, both writes do too,
/// but the sequence does not, so the token is never issued again (later session tokens,
/// from the block, may be lower than it: the grant is void). Inputs and `tail` as in
/// [`session_grant`].
fn xact_grant(s: &str, lock: &str, [key, lease, meta]: [&str; 3], tail: &str) -> String {
    format!(
        "WITH l AS MATERIALIZED (SELECT {lock} AS ok), \
         retire AS (UPDATE {s}.cursor SET ceiling = 0 \
             WHERE key = {key} AND ceiling <> 0 AND (SELECT ok FROM l)) \
         INSERT INTO {s}.fence AS f (key, token, lease_id, meta, holder_pid) \
         SELECT {key}, nextval('{s}.token_seq'), {lease}, {meta}, pg_backend_pid() FROM l WHERE l.ok \
         ON CONFLICT (key) DO UPDATE \
             SET token = greatest(f.token + 1, EXCLUDED.token), lease_id = EXCLUDED.lease_id, \
                 meta = EXCLUDED.meta, holder_pid = EXCLUDED.holder_pid \
         RETURNING f.token{tail}"
    )
}

/// Maps a driver error to the core error.
pub(crate) fn map_err(e: tokio_postgres::Error) -> LockError {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        if *code == SqlState::INSUFFICIENT_PRIVILEGE {
            return LockError::InvalidConfig(format!(
                "permission denied: {} (grant the role USAGE and CREATE on the lock schema, or \
                 run PgLocks::migrate as a role that may)",
                db.message()
            ));
        }
        if [
            SqlState::INVALID_SCHEMA_NAME,
            SqlState::UNDEFINED_TABLE,
            SqlState::UNDEFINED_FUNCTION,
        ]
        .contains(code)
        {
            return LockError::InvalidConfig(format!(
                "lock schema is missing or out of date: {} (call PgLocks::migrate or enable \
                 auto_migrate)",
                db.message()
            ));
        }
        if [
            SqlState::INVALID_PASSWORD,
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            SqlState::INVALID_CATALOG_NAME,
        ]
        .contains(code)
        {
            return LockError::InvalidConfig(format!("cannot connect: {}", db.message()));
        }
        let retryable = [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::READ_ONLY_SQL_TRANSACTION,
        ]
        .contains(code);
        // The driver's own message for a server error is only "db error": say what the
        // server said.
        let mut msg = format!("{} (SQLSTATE {})", db.message(), code.code());
        if let Some(detail) = db.detail() {
            msg.push_str(": ");
            msg.push_str(detail);
        }
        return LockError::backend(NAME, retryable, msg);
    }
    // Not a server error: I/O, a closed connection, a timeout while connecting.
    LockError::backend(NAME, true, e)
}

/// Whether the error is `lock_timeout` running out (SQLSTATE 55P03).
pub(crate) fn is_lock_timeout(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advisory_ids_are_stable_and_spread() {
        // Pinned: changing the mapping would let old and new clients lock different ids.
        assert_eq!(advisory_id("distlock", "a"), advisory_id("distlock", "a"));
        assert_ne!(advisory_id("distlock", "a"), advisory_id("distlock", "b"));
        assert_ne!(advisory_id("distlock", "a"), advisory_id("other", "a"));
        assert_eq!(advisory_id("distlock", "inventory:1"), PINNED);
        let ids: std::collections::HashSet<i64> = (0..10_000)
            .map(|i| advisory_id("s", &i.to_string()))
            .collect();
        assert_eq!(ids.len(), 10_000);
    }
    // Computed independently (Python, same FNV-1a + SplitMix64 steps).
    const PINNED: i64 = -6_475_857_679_545_948_956;

    #[test]
    fn lock_parts_match_pg_locks() {
        assert_eq!(advisory_lock_parts(1), (0, 1));
        assert_eq!(advisory_lock_parts(-1), (0xffff_ffff, 0xffff_ffff));
        assert_eq!(advisory_lock_parts(1 << 32), (1, 0));
    }

    /// Only a release may skip the WAL flush: a grant (its token) or a renewal lost in a
    /// server crash would not be safe.
    #[test]
    fn only_the_lease_release_commits_asynchronously() {
        let s = Sql::new("distlock");
        assert!(s
            .lease_release
            .contains("set_config('synchronous_commit', 'off', true)"));
        for (name, stmt) in [
            ("schema", &s.schema_ddl),
            ("session_acquire", &s.session_acquire),
            ("session_try", &s.session_try),
            ("xact_try", &s.xact_try),
            ("session_release", &s.session_release),
            ("lease_acquire", &s.lease_acquire),
            ("lease_renew", &s.lease_renew),
            ("lease_handoff", &s.lease_handoff),
        ] {
            assert!(
                !stmt.contains("synchronous_commit"),
                "{name} must commit synchronously"
            );
        }
    }

    #[test]
    fn statements_name_the_schema_only() {
        let s = Sql::new("myschema");
        assert!(s.schema_ddl.contains("myschema.fence"));
        assert!(s.lease_release.contains("'myschema_released'"));
        assert!(!s.lease_acquire.contains("distlock"));
    }
}
