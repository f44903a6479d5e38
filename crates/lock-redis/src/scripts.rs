//! The server-side scripts. Each lock operation is one script, so one round trip, and
//! atomic on the server.
//!
//! Keys, for a lock key `k` under namespace `ns` (the scripts derive the related keys from
//! the lock key by suffix, so they need a standalone server or Redlock's independent nodes,
//! not Redis Cluster):
//! - `ns k`: a string `lease:token:meta` with the lease as its expiry (one `SET NX`, one
//!   `GET`: the cheapest shape for the uncontended path);
//! - `ns k :fence`: the highest token issued; never expires. An attempt issues its token
//!   before it tries the key, so one that finds the key held has used a token up too;
//! - `ns k :q`: sorted set of waiting lease ids, ordered by arrival;
//! - `ns k :w: <lease>`: a waiter's liveness key, refreshed while it waits, expiring if it dies;
//! - `ns k :wake: <lease>`: the list a waiter blocks on; release pushes to the first live one.
//!
//! Tokens: `max(last + 1, server time in microseconds)`, issued by one `SET fence now GET`
//! (a second `SET` only when the clock has not moved past the last token). The counter
//! alone would restart at 1 after the server lost its data; the clock term keeps tokens
//! increasing across such a restart, on the assumption that the server's clock does not
//! step back across the restart by more than the restart took, and that a key is not
//! attempted more than a million times a second (each attempt may push the counter one
//! microsecond ahead of the clock). The clock is read once per script call, so a batch of
//! grants shares one reading (each still gets `last + 1` at least). Lua numbers are doubles:
//! microsecond time stays exact below 2^53 (year 2255).

use redis::Script;

/// Acquires and releases, several per call: `KEYS[i]` is op i's lock key; `ARGV` is
/// `fair (0/1), waiter ttl ms`, then four per op: `op (t try, w wait, r release), lease,
/// ttl_ms, meta`. Ops run in order, each as it would alone; one op's error (a key of the
/// wrong type) is its own reply and does not stop the others. The reply is one flat array;
/// per op, in order: acquire `granted, token, pttl`, release `released`, error
/// `-1, message` (`granted` and `released` are 0 or 1, so -1 marks an error).
pub(crate) const OPS: &str = r#"
local fair = ARGV[1] == '1'
local wttl = ARGV[2]
-- The server clock in microseconds, read once per call (as a decimal string and a number):
-- every grant of this call is issued at this time or after it.
local now_s, now_n
local function clock()
  if not now_s then
    local t = redis.call('TIME')
    now_s = t[1] .. string.format('%06d', tonumber(t[2]))
    now_n = tonumber(now_s)
  end
  return now_s, now_n
end
-- Whether holder value `v` is `lease`'s (`lease:...`): a prefix test that makes no
-- substring (a new Lua string is hashed and interned).
local function holds(v, lease)
  return string.byte(v, #lease + 1) == 58 and string.find(v, lease, 1, true) == 1
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
    local t = redis.call('TIME')
    redis.call('ZADD', q, tonumber(t[1]) * 1000000 + tonumber(t[2]), lease)
  end
  redis.call('SET', k .. ':w:' .. lease, '1', 'PX', wttl)
  redis.call('PEXPIRE', q, tonumber(wttl) * 4)
end
-- The reply to an attempt that may not take the key (held, or others first in line): a
-- lease that already holds it is granted again with its token (an attempt repeated after
-- its answer was lost); any other is refused, and queued if it waits.
local function refuse(q, k, lease, wait)
  local cur = redis.call('GET', k)
  if cur and holds(cur, lease) then
    local b = string.find(cur, ':', #lease + 2, true)
    return 1, tonumber(string.sub(cur, #lease + 2, (b or 0) - 1)), redis.call('PTTL', k)
  end
  if wait then enqueue(q, k, lease) end
  return 0, 0, redis.call('PTTL', k)
end
-- The uncontended path is three commands (`EXISTS` of the queue when fair, the fence,
-- `SET NX`): the token is issued before the key is tried, so the holder's value can
-- carry it in the one `SET`. An attempt that finds the key held has then used up a token
-- (tokens may skip numbers; they never repeat or go back) and reads the holder's value.
local function acquire(k, lease, ttl, meta, wait)
  local q = k .. ':q'
  -- Whether this lease may sit in the queue (only a waiting acquire enqueues).
  local queued = wait
  if fair then
    local h = head(q, k)
    if not h then
      -- head() dropped every dead entry on its way: the queue is empty.
      queued = false
    elseif h ~= lease then
      return refuse(q, k, lease, wait)
    end
  end
  local tok, now = clock()
  local fence = k .. ':fence'
  local prev = redis.call('SET', fence, tok, 'GET')
  if prev and tonumber(prev) >= now then
    tok = string.format('%d', tonumber(prev) + 1)
    redis.call('SET', fence, tok)
  end
  if not redis.call('SET', k, lease .. ':' .. tok .. ':' .. meta, 'NX', 'PX', ttl) then
    -- Held (a script sees no key expire while it runs, so the key is there to read).
    return refuse(q, k, lease, wait)
  end
  if queued and redis.call('ZREM', q, lease) == 1 then
    redis.call('DEL', k .. ':w:' .. lease)
  end
  return 1, tonumber(tok), tonumber(ttl)
end
local function release(k, lease)
  local released = 0
  local cur = redis.call('GET', k)
  local q = k .. ':q'
  if cur and holds(cur, lease) then
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
-- One flat reply for the whole call (a nested table per op costs the server more to
-- convert than the op's own commands): each op appends its integers, or -1 and a message.
-- The ops return their integers as multiple values, so no table is made per op.
local out, n = {}, 0
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 4
  local op, lease = ARGV[b + 1], ARGV[b + 2]
  if op == 'r' then
    local ok, r = pcall(release, KEYS[i], lease)
    if ok then
      out[n + 1] = r
      n = n + 1
    else
      out[n + 1], out[n + 2] = -1, tostring(type(r) == 'table' and r.err or r)
      n = n + 2
    end
  else
    local ok, g, t, p = pcall(acquire, KEYS[i], lease, ARGV[b + 3], ARGV[b + 4], op == 'w')
    if ok then
      out[n + 1], out[n + 2], out[n + 3] = g, t, p
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

/// `KEYS`: fence. `ARGV`: token. Raises the token floor (Redlock's second round).
pub(crate) const RAISE_FLOOR: &str = r#"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"#;

/// `KEYS`: resource, resource fence. `ARGV`: token, value. Writes only if the token is not
/// lower than the highest accepted. Returns `{accepted, highest}`.
pub(crate) const FENCED_SET: &str = r#"
local high = tonumber(redis.call('GET', KEYS[2]) or '0')
local tok = tonumber(ARGV[1])
if tok < high then return {0, high} end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SET', KEYS[1], ARGV[2])
return {1, tok}
"#;

/// The compiled scripts (hashes computed once).
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) ops: Script,
    pub(crate) renew: Script,
    pub(crate) inspect: Script,
    pub(crate) raise_floor: Script,
    pub(crate) fenced_set: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            ops: Script::new(OPS),
            renew: Script::new(RENEW),
            inspect: Script::new(INSPECT),
            raise_floor: Script::new(RAISE_FLOOR),
            fenced_set: Script::new(FENCED_SET),
        }
    }
}
