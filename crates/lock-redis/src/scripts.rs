//! The server-side scripts. Each lock operation is one script, so one round trip, and
//! atomic on the server.
//!
//! # Keys
//!
//! A lock key `k` under namespace `ns` is stored at `ns{e}`, where `e` is `k` with `%`, `{`
//! and `}` percent-encoded ([`lock_key`]). The namespace holds no braces, so the first `{`
//! ends it and the first `}` after it ends `e`: no two lock keys, and no lock key and
//! another lock's helper key, can ever be the same Redis key. The helpers are suffixes
//! after the `}`, and the braces make every key of one lock share a Redis Cluster hash slot:
//! - `ns{e}`: a string `lease:token:meta` with the lease as its expiry;
//! - `ns{e}:fence`: the highest token issued (see *Tokens*);
//! - `ns{e}:q`: sorted set of waiting lease ids, ordered by arrival;
//! - `ns{e}:w:<lease>`: a waiter's liveness key, refreshed while it waits, expiring if it
//!   dies;
//! - `ns{e}:wake:<lease>`: the list a waiter blocks on; release pushes to the first live one.
//!
//! The scripts reach the helper keys by name rather than through `KEYS`, so they need a
//! standalone server (or Redlock's independent servers); a cluster-enabled server is
//! refused at connect.
//!
//! # Tokens
//!
//! `max(last + 1, server time in µs)`, issued before the key is tried, so an attempt that
//! finds the key held uses a token up (tokens skip numbers; they never repeat or go back).
//! Tokens are decimal strings in the scripts, compared and incremented digit by digit: a Lua
//! number is exact only below 2^53. The clock term keeps tokens increasing after the
//! server lost the counter (a restart without persistence), so the counter may expire: it
//! does, [`FENCE_KEEP`] after the time its token stands for, when the clock alone gives a
//! higher token. Both rest on one assumption: the server's clock never steps back by more
//! than [`FENCE_KEEP`]. A server clock more than [`MAX_CLOCK_LEAD`] ahead of the client's
//! is refused: one token from it would lift every later token of the key that far.

use std::time::Duration;

use redis::Script;

/// How long a token record outlives the time its token stands for.
pub(crate) const FENCE_KEEP: Duration = Duration::from_secs(3600);
/// How far ahead of the client's clock a server's clock may be before its tokens are refused.
pub(crate) const MAX_CLOCK_LEAD: Duration = Duration::from_secs(24 * 3600);

/// The Redis key of lock `key` under `namespace` (see the module docs).
pub(crate) fn lock_key(namespace: &str, key: &str) -> String {
    let mut out = String::with_capacity(namespace.len() + key.len() + 2);
    out.push_str(namespace);
    out.push('{');
    for c in key.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    out.push('}');
    out
}

/// The key of a Redlock node's marker (see [`OPS`]): outside every lock's key space, as no
/// `{` follows the namespace.
pub(crate) fn marker_key(namespace: &str) -> String {
    format!("{namespace}#node")
}

/// Lua shared by the scripts: exact token arithmetic and the token record.
const COMMON: &str = r#"
-- Tokens are decimal strings without leading zeros.
local function tgt(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local function tinc(s)
  local i = #s
  while i > 0 do
    local d = string.byte(s, i)
    if d < 57 then
      return string.sub(s, 1, i - 1) .. string.char(d + 1) .. string.rep('0', #s - i)
    end
    i = i - 1
  end
  return '1' .. string.rep('0', #s)
end
-- Writes token `tok` to the record `fence`, to expire `keep` ms after the time it stands
-- for (kept without expiry if it stands for no plausible time).
local function record(fence, tok, keep)
  if #tok > 3 and #tok <= 16 then
    local ms = tonumber(string.sub(tok, 1, #tok - 3)) + tonumber(keep)
    redis.call('SET', fence, tok, 'PXAT', ms)
  else
    redis.call('SET', fence, tok)
  end
end
"#;

/// Acquires and releases, several per call: `KEYS[i]` is op i's lock key; `ARGV` is
/// `fair (0/1), waiter ttl ms, client clock ms, token record keep ms, sit-out ms, marker
/// key, largest clock lead ms`, then four per op: `op (t try, w wait, r release), lease,
/// ttl_ms, meta`; a release's `meta` is empty, or the one token whose grant it gives back.
///
/// A sit-out of 0 skips the node check. Otherwise (Redlock) the marker key holds the
/// server's `run_id`, the time the node's lock data began and the longest sit-out any
/// client asked for since; when it is missing (a new node, or one that lost its data) or
/// names another `run_id` (a restart, even one with persistence, which may have come back
/// from an older snapshot), the data begins now, and for the sit-out (the longest lease
/// any client takes) this node grants nothing: a lease it lost may still run on another
/// client's majority. Like the leases themselves, the sit-out is timed by the node's clock.
///
/// Ops run in order, each as it would alone; one op's error (a key of the wrong type) is
/// its own reply and does not stop the others. The reply is one flat array: the marker's
/// longest sit-out (0 without a node check), then per op, in order: acquire
/// `status, token, pttl` (status 1 granted, 3 granted again to the lease that held the key,
/// 0 refused, 2 the node sits out, pttl then its time left), release `released`, error
/// `-1, message`.
pub(crate) const OPS: &str = r#"
local fair = ARGV[1] == '1'
local wttl = ARGV[2]
local client_ms, keep, sitout = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
-- The server clock, read once per call: in µs as a decimal string, and in ms.
local t = redis.call('TIME')
local now_s = t[1] .. string.format('%06d', tonumber(t[2]))
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local clock_err
if now_ms - client_ms > tonumber(ARGV[7]) then
  clock_err = 'the server clock is ' .. (now_ms - client_ms) .. ' ms ahead of the client clock: refusing to issue tokens from it (check both clocks)'
end
local sitting, longest = 0, 0
if sitout > 0 and not clock_err then
  local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
  local m = redis.call('GET', ARGV[6])
  local since
  if m then
    local r, s, l = string.match(m, '^(%x+) (%d+) (%d+)$')
    if r == run then since, longest = tonumber(s), tonumber(l) end
  end
  if not since then
    since, longest = now_ms, sitout
    redis.call('SET', ARGV[6], run .. ' ' .. since .. ' ' .. longest)
  elseif sitout > longest then
    longest = sitout
    redis.call('SET', ARGV[6], run .. ' ' .. since .. ' ' .. longest)
  end
  sitting = since + longest - now_ms
end
-- Whether holder value `v` is `lease`'s (`lease:...`).
local function holds(v, lease)
  return string.byte(v, #lease + 1) == 58 and string.find(v, lease, 1, true) == 1
end
-- The token in `lease`'s holder value `v` (`lease:token:meta`).
local function token_in(v, lease)
  local b = string.find(v, ':', #lease + 2, true)
  return string.sub(v, #lease + 2, (b or 0) - 1)
end
-- A new token for lock key `k`, written to its record before the key is tried, so that the
-- holder's value can carry it.
local function issue(k)
  local fence = k .. ':fence'
  local prev = redis.call('GET', fence)
  local tok = now_s
  if prev and not tgt(now_s, prev) then tok = tinc(prev) end
  record(fence, tok, keep)
  return tok
end
-- The first live waiter in `q` (lock key `k`), dropping dead ones on the way; nil if none.
local function head(q, k)
  if redis.call('EXISTS', q) == 0 then return nil end
  local wp = k .. ':w:'
  while true do
    local h = redis.call('ZRANGE', q, 0, 0)[1]
    if not h or redis.call('EXISTS', wp .. h) == 1 then return h end
    redis.call('ZREM', q, h)
  end
end
local function enqueue(q, k, lease)
  if not redis.call('ZSCORE', q, lease) then
    redis.call('ZADD', q, now_ms, lease)
  end
  redis.call('SET', k .. ':w:' .. lease, '1', 'PX', wttl)
  redis.call('PEXPIRE', q, tonumber(wttl) * 4)
end
-- The reply to an attempt that may not take the key (held, or others first in line): a
-- lease that already holds it (an attempt repeated after its answer was lost) is granted
-- again (status 3), with a new token, so that undoing an earlier attempt, which names that
-- attempt's token, spares this grant; any other is refused, and queued if it waits.
local function refuse(q, k, lease, ttl, meta, wait)
  local cur = redis.call('GET', k)
  if cur and holds(cur, lease) then
    local tok = issue(k)
    local left = math.max(redis.call('PTTL', k), tonumber(ttl))
    redis.call('SET', k, lease .. ':' .. tok .. ':' .. meta, 'PX', left)
    return 3, tok, left
  end
  if wait then enqueue(q, k, lease) end
  return 0, '0', redis.call('PTTL', k)
end
-- The uncontended path: `PTTL`, `EXISTS` of the queue when fair, the token record, `SET NX`.
local function acquire(k, lease, ttl, meta, wait)
  if sitting > 0 then return 2, '0', sitting end
  if clock_err then error(clock_err) end
  -- A lock key always expires: one that does not holds another writer's value.
  if redis.call('PTTL', k) == -1 then return 4, '0', -1 end
  local q = k .. ':q'
  -- Whether this lease may sit in the queue (only a waiting acquire enqueues).
  local queued = wait
  if fair then
    local h = head(q, k)
    if not h then
      queued = false
    elseif h ~= lease then
      return refuse(q, k, lease, ttl, meta, wait)
    end
  end
  local tok = issue(k)
  if not redis.call('SET', k, lease .. ':' .. tok .. ':' .. meta, 'NX', 'PX', ttl) then
    -- Held (a script sees no key expire while it runs, so the key is there to read).
    return refuse(q, k, lease, ttl, meta, wait)
  end
  if queued and redis.call('ZREM', q, lease) == 1 then
    redis.call('DEL', k .. ':w:' .. lease)
  end
  return 1, tok, tonumber(ttl)
end
-- Releases `lease`'s grant; with a token `only`, only the grant of that token (an undo, or
-- a Redlock round giving back what it was granted).
local function release(k, lease, only)
  local released = 0
  local cur = redis.call('GET', k)
  local q = k .. ':q'
  if cur and holds(cur, lease) and (only == '' or token_in(cur, lease) == only) then
    -- A holder left the queue when it was granted: nothing of it to remove there.
    redis.call('DEL', k)
    released = 1
    cur = nil
  elseif redis.call('ZREM', q, lease) == 1 then
    redis.call('DEL', k .. ':w:' .. lease)
  end
  if not cur then
    local h = head(q, k)
    if h then
      redis.call('RPUSH', k .. ':wake:' .. h, '1')
      redis.call('PEXPIRE', k .. ':wake:' .. h, 10000)
    end
  end
  return released
end
local out, n = {longest}, 1
for i = 1, #KEYS do
  local b = 7 + (i - 1) * 4
  local op, lease = ARGV[b + 1], ARGV[b + 2]
  if op == 'r' then
    local ok, r = pcall(release, KEYS[i], lease, ARGV[b + 4])
    if ok then
      out[n + 1] = r
      n = n + 1
    else
      out[n + 1], out[n + 2] = -1, tostring(type(r) == 'table' and r.err or r)
      n = n + 2
    end
  else
    local ok, g, tk, p = pcall(acquire, KEYS[i], lease, ARGV[b + 3], ARGV[b + 4], op == 'w')
    if ok then
      out[n + 1], out[n + 2], out[n + 3] = g, tk, p
      n = n + 3
    else
      out[n + 1], out[n + 2] = -1, tostring(type(g) == 'table' and g.err or g)
      n = n + 2
    end
  end
end
return out
"#;

/// `KEYS`: lock. `ARGV`: lease, ttl_ms. Extends only this lease; never creates one.
pub(crate) const RENEW: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #ARGV[1] + 1) == ARGV[1] .. ':' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// `KEYS`: lock. Returns `{value, pttl, live waiters}` or an empty array.
pub(crate) const INSPECT: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then return {} end
local live = 0
for _, w in ipairs(redis.call('ZRANGE', KEYS[1] .. ':q', 0, -1)) do
  if redis.call('EXISTS', KEYS[1] .. ':w:' .. w) == 1 then live = live + 1 end
end
return {v, redis.call('PTTL', KEYS[1]), live}
"#;

/// `KEYS`: token record. `ARGV`: token, keep ms. Raises the token floor (Redlock's second
/// round).
pub(crate) const RAISE_FLOOR: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur or tgt(ARGV[1], cur) then record(KEYS[1], ARGV[1], ARGV[2]) end
return 1
"#;

/// `KEYS`: resource (a hash of `value` and `token`). `ARGV`: token, value, then for a
/// compare-and-set `1` and the value read (`0` if there was none). Writes only if the
/// token is not lower than the stored one and, for a compare-and-set, the value is still
/// the one read. Returns `{1, token}` written, `{0, stored token}` refused, `{2, stored
/// token}` the value changed since it was read.
pub(crate) const FENCED_WRITE: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'token', 'value')
local high, val = cur[1], cur[2]
if high and tgt(high, ARGV[1]) then return {0, high} end
if ARGV[3] == '1' then
  local want = ARGV[4] == '1' and ARGV[5] or false
  if val ~= want then return {2, high or '0'} end
end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'value', ARGV[2])
return {1, ARGV[1]}
"#;

/// The compiled scripts (hashes computed once).
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) ops: Script,
    pub(crate) renew: Script,
    pub(crate) inspect: Script,
    pub(crate) raise_floor: Script,
    pub(crate) fenced_write: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        let with_common = |body: &str| Script::new(&format!("{COMMON}{body}"));
        Self {
            ops: with_common(OPS),
            renew: Script::new(RENEW),
            inspect: Script::new(INSPECT),
            raise_floor: with_common(RAISE_FLOOR),
            fenced_write: with_common(FENCED_WRITE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_never_collide_and_share_a_hash_slot() {
        let names = [
            "a", "a:fence", "a:q", "a:w:x", "{a}", "a}", "}{", "%7B", "{", "}", "%", "a b", "ü",
        ];
        let keys: Vec<String> = names.iter().map(|n| lock_key("lock:", n)).collect();
        for (i, k) in keys.iter().enumerate() {
            // One `{`, one `}`: the hash tag is the whole encoded name.
            assert_eq!(k.matches('{').count(), 1, "{k}");
            assert_eq!(k.matches('}').count(), 1, "{k}");
            assert!(k.ends_with('}'), "{k}");
            for (j, other) in keys.iter().enumerate() {
                if i == j {
                    continue;
                }
                for suffix in ["", ":fence", ":q", ":w:x", ":wake:x"] {
                    assert_ne!(
                        format!("{k}{suffix}"),
                        *other,
                        "{} vs {}",
                        names[i],
                        names[j]
                    );
                }
            }
        }
        assert_eq!(lock_key("lock:", "a{b}%"), "lock:{a%7Bb%7D%25}");
        assert!(!marker_key("lock:").starts_with("lock:{"));
    }
}
