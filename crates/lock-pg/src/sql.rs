//! The schema, the statements, the key-to-advisory-id mapping and the error mapping.

use lock_core::LockError;
use tokio_postgres::error::SqlState;

use crate::session::Scope;

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
        // Earlier versions' session grant, as their `session_token` function runs it.
        let fn_session_grant =
            session_grant(s, "true", ["p_key", "p_lease", "p_meta"], " INTO v_token");
        let guc = meta_setting(s);
        let epoch_lock = advisory_id(s, "\0epoch");
        let schema_ddl = format!(
            r#"
CREATE SCHEMA IF NOT EXISTS {s};
-- Earlier versions' per-key counter for advisory locks, rows never deleted. This
-- version's grants take their tokens from token_seq and neither read nor write here.
-- Earlier versions wrote the token of a transaction-scoped lock, with its holder
-- (lease_id, meta, holder_pid), and the end of a session lock's block (`cursor`), and
-- session 12 clients read it (`token_above`). Every value written here is a draw of
-- token_seq, or a block's end at one.
CREATE TABLE IF NOT EXISTS {s}.fence (
    key        text PRIMARY KEY,
    token      bigint NOT NULL,
    lease_id   text,
    meta       text,
    holder_pid integer
);
-- Source of token values: never rolled back, so a holder whose transaction rolled back
-- (transaction-scoped locks, a terminated holder) cannot have its token issued again.
-- Durable: PostgreSQL logs it 32 draws ahead, and the draw that logs commits
-- synchronously (it takes a transaction id), so after a crash it resumes above every value
-- drawn before. Each value also reserves the 31 below it, for earlier versions' session
-- blocks (`cursor`).
CREATE SEQUENCE IF NOT EXISTS {s}.token_seq INCREMENT BY 32;
DO $do$ BEGIN
    IF (SELECT seqincrement FROM pg_sequence WHERE seqrelid = '{s}.token_seq'::regclass) < 32 THEN
        ALTER SEQUENCE {s}.token_seq INCREMENT BY 32;
    END IF;
END $do$;
-- Earlier versions' session locks (session 10 and 11 clients): per key, the last token
-- issued from the key's current block, the block's end, and the holder (lease_id, meta,
-- holder_pid). UNLOGGED: written without WAL, and emptied by PostgreSQL's recovery after
-- a crash. A grant inside the block writes only
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

-- The holder metadata of each server process (backend) that holds or held an advisory
-- lock: written once per connection (again only when the metadata changes), not per
-- grant. A grant names its holder in the session's application_name
-- ('lk <lease> <token>', visible in pg_stat_activity at once); inspect finds the
-- metadata here by the holder's pid. A backend writes its own pid's row at its first
-- grant, so a row left by an ended backend is replaced before its pid holds a lock again.
-- UNLOGGED: recovery empties it, and every backend of before the crash is gone.
CREATE UNLOGGED TABLE IF NOT EXISTS {s}.holder (
    pid  integer PRIMARY KEY,
    meta text NOT NULL
);
-- Records this backend's holder metadata, and remembers it in the session (the setting
-- {guc}) so that later grants with the same metadata write nothing (a client that
-- changes the metadata at every grant writes the row at every grant). A backend's first
-- session grant (p_clear, a statement of its own) also clears the rows of ended backends
-- when the role may delete them, skipping rows others have locked. A transaction-scoped
-- grant writes only its own row, in the caller's transaction: it stays locked until that
-- ends, and only this backend writes its pid's row.
CREATE OR REPLACE FUNCTION {s}.record_holder(p_meta text, p_clear boolean)
RETURNS boolean LANGUAGE plpgsql AS $fn$
DECLARE
    v_new boolean;
BEGIN
    -- xmax = 0: the row was inserted (this backend's first), not updated.
    INSERT INTO {s}.holder AS h (pid, meta) VALUES (pg_backend_pid(), p_meta)
    ON CONFLICT (pid) DO UPDATE SET meta = EXCLUDED.meta
    RETURNING h.xmax = 0 INTO v_new;
    IF p_clear AND v_new AND has_table_privilege('{s}.holder', 'DELETE') THEN
        -- Never waits: a row another transaction is clearing (or writing) is skipped.
        DELETE FROM {s}.holder WHERE pid IN (
            SELECT h.pid FROM {s}.holder h
            WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = h.pid)
            FOR UPDATE SKIP LOCKED);
    END IF;
    PERFORM set_config('{guc}', p_meta, false);
    RETURN true;
END
$fn$;

-- The crash guard. A draw of token_seq is visible to every session at once, but the WAL
-- record that covers it (one in 32 draws logs the next 32) reaches the disk only when the
-- drawing transaction commits: a token handed out just before a crash can lie above the
-- sequence as recovery restores it, and be drawn again. So the first grant of every
-- server process (backend) first checks this UNLOGGED marker, which recovery (or a
-- standby's promotion) empties: if it is missing, the sequence is moved 2^32 ahead before
-- any draw, under an advisory lock so that two movers cannot set it back. Every process
-- of before a crash ended with it, so no draw after recovery comes before the move.
-- Assumes fewer than 2^27 draws (2^32 / 32) between the last WAL flush and the crash.
-- SECURITY DEFINER: setval needs the sequence's UPDATE privilege, which a role that only
-- uses the schema lacks.
CREATE UNLOGGED TABLE IF NOT EXISTS {s}.epoch (
    one boolean PRIMARY KEY DEFAULT true CHECK (one)
);
CREATE OR REPLACE FUNCTION {s}.first_token()
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM {s}.epoch) THEN
        -- A session-level lock, given back before the caller's transaction ends (a
        -- transaction-scoped grant's may last long); an error gives it back too.
        PERFORM pg_advisory_lock('{epoch_lock}'::bigint);
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM {s}.epoch) THEN
                PERFORM setval('{s}.token_seq',
                    (SELECT last_value FROM {s}.token_seq) + 4294967296);
                BEGIN
                    INSERT INTO {s}.epoch VALUES (true) ON CONFLICT DO NOTHING;
                EXCEPTION WHEN serialization_failure THEN
                    -- A REPEATABLE READ or SERIALIZABLE caller whose snapshot is older
                    -- than another process's insert of the marker: this call saw no marker
                    -- and moved the sequence again (setval is not rolled back, and a
                    -- second move is harmless), and the marker is there. Go on.
                    NULL;
                END;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            PERFORM pg_advisory_unlock('{epoch_lock}'::bigint);
            RAISE;
        END;
        PERFORM pg_advisory_unlock('{epoch_lock}'::bigint);
    END IF;
    RETURN nextval('{s}.token_seq');
END
$fn$;

-- Session 12 clients' advisory token when the key's counter (fence.token) is not below
-- their draw, which this schema's writers never cause (every value they write is a draw
-- of token_seq): a token above the counter, written to it. Kept so that their statements,
-- which name it, still prepare; this version does not call it.
CREATE OR REPLACE FUNCTION {s}.token_above(p_key text)
RETURNS bigint LANGUAGE sql AS $fn$
    INSERT INTO {s}.fence AS f (key, token) VALUES (p_key, nextval('{s}.token_seq'))
    ON CONFLICT (key) DO UPDATE SET token = greatest(f.token + 1, EXCLUDED.token)
    RETURNING f.token
$fn$;

-- Earlier versions' session token (session 10 and 11 clients call it from their
-- statements): the next of the key's block of tokens (the `cursor` row), or a new block.
-- This version's session grants draw their token from token_seq directly.
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
    -- The token and the holder's name, as the plain statements do (see `advisory_try` in
    -- sql.rs): a draw of token_seq, through the crash guard at a server process's first
    -- grant. The name is the transaction's own for a transaction-scoped lock (it reverts
    -- at commit or rollback), the session's for a session lock (until release). p_key is
    -- unused since session 13 (kept for the signature that clients call).
    IF current_setting('{guc}', true) IS NULL THEN
        v_token := {s}.first_token();
    ELSE
        v_token := nextval('{s}.token_seq');
    END IF;
    PERFORM set_config('application_name', 'lk ' || p_lease || ' ' || v_token, p_xact);
    IF current_setting('{guc}', true) IS DISTINCT FROM p_meta THEN
        PERFORM {s}.record_holder(p_meta, NOT p_xact);
    END IF;
    IF p_idle_ms IS NOT NULL AND current_setting('server_version_num')::int >= 140000 THEN
        IF p_xact THEN
            PERFORM set_config('idle_in_transaction_session_timeout', p_idle_ms::text, true);
        ELSE
            PERFORM set_config('idle_session_timeout', p_idle_ms::text, false);
        END IF;
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
            // The session lock's uncontended path (see `advisory_try`).
            session_try: advisory_try(s, Scope::Session),
            // The transaction-scoped lock's, the same with the transaction's own lock,
            // sent right behind `BEGIN`: the idle limit and the holder's name are local to
            // the transaction (they revert at commit or rollback), and the metadata row,
            // when written, is the transaction's.
            xact_try: advisory_try(s, Scope::Transaction),
            session_unlock: "SELECT pg_advisory_unlock($1)",
            // One plain statement: give the lock back, clear the session's idle limit and
            // give the session its own application_name ($2) again (the connection returns
            // to the pool).
            session_release: "SELECT pg_advisory_unlock($1), \
                 CASE WHEN current_setting('server_version_num')::int >= 140000 \
                      THEN set_config('idle_session_timeout', '0', false) END, \
                 set_config('application_name', $2, false)"
                .to_owned(),
            // The holder: its application_name ('lk <lease> <token>') and its recorded
            // metadata; or, for a holder of an earlier version, its `cursor` row.
            session_inspect: format!(
                "SELECT f.lease_id, f.token, f.meta, a.application_name, \
                    (SELECT count(*) FROM pg_locks w WHERE w.locktype = 'advisory' \
                       AND w.database = l.database AND w.classid::bigint = $2 \
                       AND w.objid::bigint = $3 AND w.objsubid = 1 AND NOT w.granted), \
                    h.meta \
                 FROM pg_locks l \
                 LEFT JOIN {s}.cursor f ON f.key = $1 AND f.holder_pid = l.pid \
                 LEFT JOIN {s}.holder h ON h.pid = l.pid \
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

/// An advisory lock's uncontended grant as one plain statement (what session_acquire does
/// for a try, without the PL/pgSQL call). Parameters: $1 advisory id, $2 lease, $3
/// metadata, $4 the server-side idle limit (ms). No row when the lock is taken.
///
/// The plan is two nodes: a `Result` that tries the lock and, only when granted, draws
/// the token, under a subquery scan (`OFFSET 0` keeps the subquery, so the draw is
/// evaluated once per row) that drops the row when the lock was taken and otherwise
/// names the holder. No token is drawn when the lock is taken. A server process's first
/// grant (its session has no recorded metadata yet) draws through `first_token`, the
/// crash guard (see the schema). The token is a draw of `token_seq`: a sequence writes
/// WAL (and takes a transaction id) once in 32 draws, when it logs the next 32 ahead, so
/// the grant writes no row and reads none. Every token of the key, in either scope and
/// from every client version, was an earlier draw of the same sequence or lies in a block
/// at or below one (session 10 and 11 clients), so the draw is above them all: the
/// argument rests on the sequence never going back, which the crash guard keeps through a
/// crash and which an operator must keep through a restore (the README's procedure). The
/// holder is named in application_name (`lk <lease> <token>`, in pg_stat_activity at once);
/// its metadata is recorded once per connection (`record_holder`, only when the session's
/// remembered metadata differs).
///
/// Session 12's form (three materialized CTEs and a lookup of the key's `fence` row)
/// spent about 5 µs more server CPU per grant, mostly in setting up its plan.
fn advisory_try(s: &str, scope: Scope) -> String {
    let (lock, local, idle) = match scope {
        Scope::Session => ("pg_try_advisory_lock", false, "idle_session_timeout"),
        Scope::Transaction => (
            "pg_try_advisory_xact_lock",
            true,
            "idle_in_transaction_session_timeout",
        ),
    };
    format!(
        "SELECT x.tok, set_config('application_name', 'lk ' || $2 || ' ' || x.tok, {local}), \
             {record}, \
             {IDLE_IF_14}set_config('{idle}', $4, {local}) END \
         FROM (SELECT CASE WHEN {lock}($1) THEN \
                 CASE WHEN current_setting('{guc}', true) IS NULL \
                 THEN {s}.first_token() ELSE nextval('{s}.token_seq') END END AS tok \
               OFFSET 0) x \
         WHERE x.tok IS NOT NULL",
        record = record_if_changed(s, "$3", !local),
        guc = meta_setting(s),
    )
}

/// The session setting in which a backend remembers the holder metadata it recorded in
/// `<schema>.holder` (a custom setting, one per schema).
fn meta_setting(s: &str) -> String {
    format!("lock_pg.{s}_meta")
}

/// Records the holder metadata `meta` (an SQL expression) for this backend only when the
/// session has not recorded that value yet: once per connection in practice. `clear`: also
/// clear ended backends' rows (session grants only, see `record_holder`).
fn record_if_changed(s: &str, meta: &str, clear: bool) -> String {
    format!(
        "CASE WHEN current_setting('{guc}', true) IS DISTINCT FROM {meta} \
         THEN {s}.record_holder({meta}, {clear}) END",
        guc = meta_setting(s)
    )
}

/// Sets the server's idle limit only on PostgreSQL 14 and later (`CASE ... END`).
const IDLE_IF_14: &str = "CASE WHEN current_setting('server_version_num')::int >= 140000 THEN ";

/// Earlier versions' session grant (session 10 and 11 clients, whose statements call the
/// `session_token` function built from it; this version's grants are [`advisory_try`]):
/// takes the lock (`lock`, true when already held) and issues the token from the key's
/// block, in one statement. `[key, lease, meta]` name its inputs; `tail` follows the
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
/// not (recovery empties unlogged tables). Those versions' transaction-scoped grants
/// retired the key's block. This version's grants draw `nextval`, above every block's end,
/// but do not retire the block: while a client of those versions still runs, its block can
/// go on below a newer token (an inversion, which a fence refuses). Its blocks also skip
/// the crash guard (`first_token`): after a crash that lost the sequence's last record, its
/// new block can even repeat a newer client's token. Upgrade every client of a schema
/// before relying on the order of their tokens.
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
