//! The server-side scripts. Each lock operation is one script, so one round trip, and
//! atomic on the server.
//!
//! Keys, for a lock key `k` under namespace `ns`:
//! - `ns k`: hash `{id, tok, meta}` with the lease as its expiry;
//! - `ns k :fence`: the last token issued; never expires;
//! - `ns k :q`: sorted set of waiting lease ids, ordered by arrival;
//! - `ns k :w: <lease>`: a waiter's liveness key, refreshed while it waits, expiring if it dies;
//! - `ns k :wake: <lease>`: the list a waiter blocks on; release pushes to the first live one.
//!
//! Tokens: `max(last + 1, server time in microseconds)`. The counter alone would restart at
//! 1 after the server lost its data; the clock term keeps tokens increasing across such a
//! restart, on the assumption that the server's clock does not step back across the
//! restart by more than the restart took, and that a key is not granted more than a
//! million times a second (each grant may push the counter one microsecond ahead of the
//! clock). Lua numbers are doubles: microsecond time stays exact below 2^53 (year 2255).

use redis::Script;

/// `KEYS`: lock, fence, queue. `ARGV`: lease, ttl_ms, meta, wait (0/1), fair (0/1),
/// waiter prefix, waiter ttl ms. Returns `{granted, token, pttl}`.
pub(crate) const ACQUIRE: &str = r#"
local lease = ARGV[1]
local wprefix = ARGV[6]
local function enqueue()
  if ARGV[4] ~= '1' then return end
  if not redis.call('ZSCORE', KEYS[3], lease) then
    local t = redis.call('TIME')
    redis.call('ZADD', KEYS[3], tonumber(t[1]) * 1000000 + tonumber(t[2]), lease)
  end
  redis.call('SET', wprefix .. lease, '1', 'PX', ARGV[7])
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[7]) * 4)
end
local holder = redis.call('HGET', KEYS[1], 'id')
if holder == lease then
  return {1, tonumber(redis.call('HGET', KEYS[1], 'tok')), redis.call('PTTL', KEYS[1])}
end
if holder then
  enqueue()
  return {0, 0, redis.call('PTTL', KEYS[1])}
end
-- Whether this lease may sit in the queue (only a waiting acquire enqueues), so that the
-- uncontended path runs no queue commands beyond one look at the head.
local queued = ARGV[4] == '1'
if ARGV[5] == '1' then
  while true do
    local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
    if not head then
      queued = false
      break
    end
    if head == lease then break end
    if redis.call('EXISTS', wprefix .. head) == 1 then
      enqueue()
      return {0, 0, -1}
    end
    redis.call('ZREM', KEYS[3], head)
  end
end
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tok = tonumber(redis.call('GET', KEYS[2]) or '0') + 1
if now_us > tok then tok = now_us end
local stok = string.format('%d', tok)
redis.call('SET', KEYS[2], stok)
redis.call('HSET', KEYS[1], 'id', lease, 'tok', stok, 'meta', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if queued and redis.call('ZREM', KEYS[3], lease) == 1 then
  redis.call('DEL', wprefix .. lease)
end
return {1, tok, tonumber(ARGV[2])}
"#;

/// `KEYS`: lock. `ARGV`: lease, ttl_ms. Extends only this lease; never creates one.
pub(crate) const RENEW: &str = r#"
if redis.call('HGET', KEYS[1], 'id') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// `KEYS`: lock, queue. `ARGV`: lease, waiter prefix, wake prefix. Removes this lease (held
/// or queued) and, if the key is now free, wakes exactly one live waiter.
pub(crate) const RELEASE: &str = r#"
local released = 0
local free
if redis.call('HGET', KEYS[1], 'id') == ARGV[1] then
  -- A holder left the queue when it was granted: nothing of it to remove there.
  redis.call('DEL', KEYS[1])
  released = 1
  free = true
else
  if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
    redis.call('DEL', ARGV[2] .. ARGV[1])
  end
  free = redis.call('EXISTS', KEYS[1]) == 0
end
if free then
  while true do
    local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
    if not head then break end
    if redis.call('EXISTS', ARGV[2] .. head) == 1 then
      redis.call('RPUSH', ARGV[3] .. head, '1')
      redis.call('PEXPIRE', ARGV[3] .. head, 10000)
      break
    end
    redis.call('ZREM', KEYS[2], head)
  end
end
return released
"#;

/// `KEYS`: lock, queue, waiter prefix is ARGV[1]. Returns `{id, tok, meta, pttl, waiters}`
/// or an empty array.
pub(crate) const INSPECT: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'id', 'tok', 'meta')
if not h[1] then return {} end
local live = 0
for _, w in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if redis.call('EXISTS', ARGV[1] .. w) == 1 then live = live + 1 end
end
return {h[1], h[2], h[3] or '', redis.call('PTTL', KEYS[1]), live}
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
    pub(crate) acquire: Script,
    pub(crate) renew: Script,
    pub(crate) release: Script,
    pub(crate) inspect: Script,
    pub(crate) raise_floor: Script,
    pub(crate) fenced_set: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            acquire: Script::new(ACQUIRE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
            inspect: Script::new(INSPECT),
            raise_floor: Script::new(RAISE_FLOOR),
            fenced_set: Script::new(FENCED_SET),
        }
    }
}
