//! The schema, the statements, the key-to-advisory-id mapping and the error mapping.

use std::time::Duration;

use lock_core::{FencingToken, LockError};
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

/// The version of the schema this client creates and expects. A schema of another
/// version is refused with an error that names both.
pub(crate) const SCHEMA_VERSION: i32 = 1;

/// Makes the statement's own transaction wait for its WAL flush when the server's setting
/// would not (`off`); other settings (`remote_write`, `on` with standbys...) are kept.
const DURABLE: &str = "set_config('synchronous_commit', \
    CASE current_setting('synchronous_commit') WHEN 'off' THEN 'local' \
    ELSE current_setting('synchronous_commit') END, true)";

/// The statements, with the (validated) schema name filled in.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) schema_ddl: String,
    pub(crate) schema_version: String,
    pub(crate) schema_shape: String,
    pub(crate) crash_guard: String,
    pub(crate) crash_guard_call: String,
    pub(crate) sequence_check: String,
    pub(crate) advisory_grant: String,
    pub(crate) probe: &'static str,
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
        // The session setting in which a backend remembers the holder metadata it recorded
        // in `<schema>.holder` (a custom setting, one per schema).
        let guc = format!("lock_pg.{s}_meta");
        let idle = format!("lock_pg.{s}_idle");
        let epoch_lock = advisory_id(s, "\0epoch");
        let schema_ddl = format!(
            r#"
CREATE SCHEMA IF NOT EXISTS {s};
-- The version of this schema (one row), so that a later version can migrate it.
CREATE TABLE IF NOT EXISTS {s}.schema_version (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    version integer NOT NULL
);
INSERT INTO {s}.schema_version (version) VALUES ({SCHEMA_VERSION}) ON CONFLICT DO NOTHING;

-- The source of every token. A sequence never rolls back, so the token of a holder whose
-- transaction rolled back (a transaction-scoped lock, a terminated holder) is never issued
-- again. It logs 32 values ahead in the WAL; see crash_guard for what a crash does to the
-- values drawn since the last flush.
CREATE SEQUENCE IF NOT EXISTS {s}.token_seq;

-- Lease-row locks: one row per key, never deleted: it is also the key's fencing counter
-- (`token`). A released row has lease_id '' and expires_at '-infinity'; expiry is judged on
-- the server's clock. Grants and releases update the row in place. `waited`: an acquire
-- found the row held since its last grant (a grant clears it, a direct hand-off keeps
-- it): a release notifies waiters only then.
CREATE TABLE IF NOT EXISTS {s}.lease (
    key        text PRIMARY KEY,
    lease_id   text NOT NULL,
    token      bigint NOT NULL,
    meta       text NOT NULL,
    expires_at timestamptz NOT NULL,
    waited     boolean NOT NULL DEFAULT false
);

-- The holder metadata of each server process (backend) that holds or held an advisory
-- lock, written once per connection (again only when the metadata changes), not per grant:
-- an advisory grant writes no row. The grant names its holder in application_name
-- ('lk <lease> <token>', in pg_stat_activity at once); inspect finds the metadata here by
-- the holder's pid. UNLOGGED: recovery empties it, and every backend of before a crash is
-- gone.
CREATE UNLOGGED TABLE IF NOT EXISTS {s}.holder (
    pid  integer PRIMARY KEY,
    meta text NOT NULL
);
-- Records this backend's holder metadata and remembers it in the session (the setting
-- {guc}), so that later grants with the same metadata write nothing. A session grant
-- (p_clear) also clears the rows of ended backends when the role may, skipping rows
-- others have locked. A transaction-scoped grant writes only its own pid's row, in its
-- transaction.
CREATE OR REPLACE FUNCTION {s}.record_holder(p_meta text, p_clear boolean)
RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    v_new boolean;
BEGIN
    -- xmax = 0: the row was inserted (this backend's first), not updated.
    INSERT INTO {s}.holder AS h (pid, meta) VALUES (pg_backend_pid(), p_meta)
    ON CONFLICT (pid) DO UPDATE SET meta = EXCLUDED.meta
    RETURNING h.xmax = 0 INTO v_new;
    IF p_clear AND v_new AND has_table_privilege('{s}.holder', 'DELETE') THEN
        DELETE FROM {s}.holder WHERE pid IN (
            SELECT h.pid FROM {s}.holder h
            WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = h.pid)
            FOR UPDATE SKIP LOCKED);
    END IF;
    PERFORM set_config('{guc}', p_meta, false);
END
$fn$;

-- The crash guard. A draw of token_seq is visible to every session at once, but the WAL
-- record that covers it (one in 32 draws logs the next 32) reaches the disk only with a
-- later commit: a token handed out just before a crash can lie above the sequence as
-- recovery restores it. Recovery (and a standby's promotion) empties this UNLOGGED marker;
-- advisory_grant draws nothing while it is missing, and the client first runs
-- crash_guard as a statement of its own, with synchronous_commit on: it moves the
-- sequence 2^32 past its recovered value and puts the marker back, durably, before any
-- draw. So every draw after a crash lies above every draw before it, as long as fewer
-- than 2^27 draws (2^32 / 32 values per WAL record) went unflushed before the crash.
-- A transaction-scoped lock keeps the concurrent guards apart and is released at commit,
-- whatever happens (a cancel, a statement timeout). SECURITY DEFINER: setval needs the
-- sequence's UPDATE privilege, which a role that only uses the schema lacks.
CREATE UNLOGGED TABLE IF NOT EXISTS {s}.epoch (
    one boolean PRIMARY KEY DEFAULT true CHECK (one)
);
CREATE OR REPLACE FUNCTION {s}.crash_guard()
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM {s}.epoch) THEN
        PERFORM pg_advisory_xact_lock('{epoch_lock}'::bigint);
        IF NOT EXISTS (SELECT 1 FROM {s}.epoch) THEN
            PERFORM setval('{s}.token_seq',
                (SELECT last_value FROM {s}.token_seq) + 4294967296);
            INSERT INTO {s}.epoch VALUES (true);
        END IF;
    END IF;
END
$fn$;

-- Session (p_xact = false) and transaction-scoped (p_xact = true) advisory locks: takes the
-- lock and draws its token. p_wait_ms: NULL = try once; 0 = wait without limit; n = wait
-- at most n ms (lock_timeout). p_idle_ms: the server ends the holder's session (or
-- transaction) after this long without a message from the client (a session lock needs
-- PostgreSQL 14+), so a dead or cut-off holder cannot keep the lock; the client confirms
-- the session well inside it and judges the lock lost at the limit. Returns the token; NULL when a try
-- found the lock taken; -1, with nothing taken, while the crash guard has not run since
-- the last crash.
CREATE OR REPLACE FUNCTION {s}.advisory_grant(
    p_id bigint, p_lease text, p_meta text, p_wait_ms bigint, p_xact boolean,
    p_idle_ms bigint)
RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    v_old text := current_setting('lock_timeout');
    v_token bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM {s}.epoch) THEN
        RETURN -1;
    END IF;
    IF p_wait_ms IS NULL THEN
        IF p_xact THEN
            IF NOT pg_try_advisory_xact_lock(p_id) THEN RETURN NULL; END IF;
        ELSIF NOT pg_try_advisory_lock(p_id) THEN
            RETURN NULL;
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
    v_token := nextval('{s}.token_seq');
    -- Named for the transaction only (it reverts at its end) when the lock is the
    -- transaction's.
    PERFORM set_config('application_name', 'lk ' || p_lease || ' ' || v_token, p_xact);
    IF current_setting('{guc}', true) IS DISTINCT FROM p_meta THEN
        PERFORM {s}.record_holder(p_meta, NOT p_xact);
    END IF;
    IF p_idle_ms IS NOT NULL THEN
        IF p_xact THEN
            PERFORM set_config('idle_in_transaction_session_timeout', p_idle_ms::text, true);
        ELSIF current_setting('server_version_num')::int >= 140000 THEN
            -- The connection's own limit, for the release to restore (saved once).
            IF coalesce(current_setting('{idle}', true), '') = '' THEN
                PERFORM set_config('{idle}', current_setting('idle_session_timeout'), false);
            END IF;
            PERFORM set_config('idle_session_timeout', p_idle_ms::text, false);
        END IF;
    END IF;
    RETURN v_token;
END
$fn$;
"#
        );
        Self {
            schema_ddl,
            schema_version: format!("SELECT version FROM {s}.schema_version"),
            // The columns of `schema_version`, if the table exists, and whether the schema
            // holds anything at all.
            schema_shape: format!(
                "SELECT (SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), \
                            ', ' ORDER BY attnum) \
                         FROM pg_attribute WHERE attrelid = to_regclass('{s}.schema_version') \
                           AND attnum > 0 AND NOT attisdropped), \
                        EXISTS (SELECT 1 FROM pg_class WHERE relnamespace = n.oid) \
                        OR EXISTS (SELECT 1 FROM pg_proc WHERE pronamespace = n.oid) \
                        OR EXISTS (SELECT 1 FROM pg_type WHERE typnamespace = n.oid) \
                 FROM (SELECT 0) one LEFT JOIN pg_namespace n ON n.nspname = '{s}'"
            ),
            // A transaction of its own, committed synchronously before any draw (see the
            // schema); read committed, so that a guard that waited for another sees its
            // marker. Also run on every new pooled connection, when the schema exists.
            crash_guard: format!(
                "BEGIN ISOLATION LEVEL READ COMMITTED; \
                 SET LOCAL synchronous_commit = on; \
                 DO $$ BEGIN \
                     IF to_regprocedure('{s}.crash_guard()') IS NOT NULL THEN \
                         PERFORM {s}.crash_guard(); \
                     END IF; \
                 END $$; \
                 COMMIT"
            ),
            crash_guard_call: format!("SELECT {s}.crash_guard()"),
            sequence_check: format!(
                "SELECT seqincrement, seqcache FROM pg_sequence \
                 WHERE seqrelid = '{s}.token_seq'::regclass"
            ),
            advisory_grant: format!("SELECT {s}.advisory_grant($1, $2, $3, $4, $5, $6)"),
            // Any statement restarts the server's idle timer of a held lock's session.
            probe: "SELECT 1",
            session_unlock: "SELECT pg_advisory_unlock($1)",
            // Gives the lock back, restores the session's idle limit as the grant saved it
            // (reading it from pg_settings builds the whole view: several round trips' worth
            // of server time) and gives the session its own application_name ($2) again.
            session_release: format!(
                "SELECT pg_advisory_unlock($1), \
                 CASE WHEN coalesce(current_setting('{idle}', true), '') <> '' THEN \
                     set_config('idle_session_timeout', current_setting('{idle}', true), false) END, \
                 set_config('application_name', $2, false)"
            ),
            // The holder: its application_name ('lk <lease> <token>') and its recorded
            // metadata, and the number of waiters.
            session_inspect: format!(
                "SELECT a.application_name, h.meta, \
                    (SELECT count(*) FROM pg_locks w WHERE w.locktype = 'advisory' \
                       AND w.database = l.database AND w.classid::bigint = $1 \
                       AND w.objid::bigint = $2 AND w.objsubid = 1 AND NOT w.granted) \
                 FROM pg_locks l \
                 LEFT JOIN {s}.holder h ON h.pid = l.pid \
                 LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
                   AND l.classid::bigint = $1 AND l.objid::bigint = $2 \
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
                "WITH t AS MATERIALIZED (SELECT nextval('{s}.token_seq') AS tok, \
                     {DURABLE}), \
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
                 WHERE key = $1 AND lease_id = $2 AND expires_at > clock_timestamp() \
                 RETURNING {DURABLE}"
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
            // commits synchronously, which flushes this release with it. Grants,
            // renewals and hand-offs wait for their flush ([`DURABLE`]) whatever the
            // server's default: a grant or renewal lost in a crash would let a
            // second holder in while the first is told it holds the key.
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
                 RETURNING l.token, {DURABLE}"
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

/// Maps a driver error to the core error.
pub(crate) fn map_err(e: tokio_postgres::Error) -> LockError {
    use SqlState as S;
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        let hint = match code {
            c if *c == S::INSUFFICIENT_PRIVILEGE => "permission denied (grant the role USAGE and \
                CREATE on the lock schema, or run PgLocks::migrate as a role that may)",
            c if [S::INVALID_SCHEMA_NAME, S::UNDEFINED_TABLE, S::UNDEFINED_FUNCTION].contains(c) => {
                "lock schema is missing or out of date (call PgLocks::migrate or enable auto_migrate)"
            }
            c if [
                S::INVALID_PASSWORD,
                S::INVALID_AUTHORIZATION_SPECIFICATION,
                S::INVALID_CATALOG_NAME,
            ]
            .contains(c) =>
            {
                "cannot connect"
            }
            _ => {
                let retryable = [
                    S::ADMIN_SHUTDOWN,
                    S::CRASH_SHUTDOWN,
                    S::CANNOT_CONNECT_NOW,
                    S::T_R_SERIALIZATION_FAILURE,
                    S::T_R_DEADLOCK_DETECTED,
                    S::TOO_MANY_CONNECTIONS,
                    S::READ_ONLY_SQL_TRANSACTION,
                ]
                .contains(code);
                // The driver's own message is only "db error"; never the DETAIL, which can
                // carry the values of a user's rows.
                let msg = format!("{} (SQLSTATE {})", db.message(), code.code());
                return LockError::backend(NAME, retryable, msg);
            }
        };
        return LockError::InvalidConfig(format!("{hint}: {}", db.message()));
    }
    // A certificate refused, or no TLS where sslmode asks for it, will be the same on a
    // retry: configuration errors, named as such.
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    let hint = if text.contains("invalid peer certificate") {
        "the server's certificate was not accepted (wrong CA, or a host name it does not name?)"
    } else if text.contains("does not support TLS") {
        "the server does not offer TLS, which sslmode asks for"
    } else {
        // Not a server error: I/O, a closed connection, a timeout while connecting.
        return LockError::backend(NAME, true, e);
    };
    LockError::InvalidConfig(format!("TLS: {hint}: {text}"))
}

/// What the advisory grant function answered.
pub(crate) enum Answer {
    Granted(FencingToken),
    /// A try found the lock taken.
    Taken,
    /// The crash guard has not run since the server's last crash: nothing was taken.
    GuardFirst,
}

/// Reads the advisory grant function's answer: a token, NULL (taken) or -1 (guard first).
pub(crate) fn answer(row: &tokio_postgres::Row) -> Result<Answer, LockError> {
    Ok(match row.try_get::<_, Option<i64>>(0).map_err(map_err)? {
        Some(-1) => Answer::GuardFirst,
        Some(t) => Answer::Granted(token(t)?),
        None => Answer::Taken,
    })
}

/// A token column's value as a fencing token.
pub(crate) fn token(t: i64) -> Result<FencingToken, LockError> {
    u64::try_from(t)
        .map(FencingToken::new)
        .map_err(|_| LockError::Protocol(format!("negative fencing token {t}")))
}

/// A duration in whole milliseconds, as statements take it.
pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
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
        assert!(s.crash_guard.contains("SET LOCAL synchronous_commit = on"));
        for (name, stmt) in [
            ("schema", &s.schema_ddl),
            ("advisory_grant", &s.advisory_grant),
            ("lease_acquire", &s.lease_acquire),
            ("lease_renew", &s.lease_renew),
            ("lease_handoff", &s.lease_handoff),
        ] {
            assert!(
                !stmt.contains("'synchronous_commit', 'off'"),
                "{name} must commit synchronously"
            );
        }
        for stmt in [&s.lease_acquire, &s.lease_renew, &s.lease_handoff] {
            assert!(stmt.contains(DURABLE));
        }
    }

    #[test]
    fn statements_name_the_schema_only() {
        let s = Sql::new("myschema");
        assert!(s.schema_ddl.contains("myschema.lease"));
        assert!(s.lease_release.contains("'myschema_released'"));
        assert!(!s.lease_acquire.contains("distlock"));
    }
}
