//! The Lua scripts that make multi-key changes atomic. Each runs with `EVALSHA` (loaded on
//! first use, and again after a server restart forgets it).
//!
//! Scripts only touch the keys they are given; numbers are formatted with `%d` so that large
//! positions never turn into floating-point notation.

use std::sync::LazyLock;

use redis::Script;

/// Appends events to a stream and the global stream, if the stream's version is as expected
/// — or recognises the append as a retry of one it already wrote
/// ([idempotent appends](orchestrator_core::store#idempotent-appends)).
///
/// KEYS: stream, global stream, position counter, the stream's id hash (event id → version).
/// ARGV: mode (`any` | `none` | `exists` | `exact`), exact version, n, then per event: type,
/// event id, CloudEvents JSON without its closing `}` … the script appends the positions it
/// assigns.
///
/// Returns `{1, version, first position, last position}` on success (for a retry: the
/// original's), `{0, version}` when the stream's version does not satisfy the expectation,
/// `{2, i, version}` when the batch's `i`-th event id (1-based) is stored at `version` and the
/// batch is not a retry.
pub(crate) static APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local len = redis.call('XLEN', KEYS[1])
local n = tonumber(ARGV[3])
local mode = ARGV[1]
local function satisfied(version)
  if mode == 'any' then return true
  elseif mode == 'none' then return version == 0
  elseif mode == 'exists' then return version > 0
  else return version == tonumber(ARGV[2]) end
end
local function position_at(version)
  local entry = redis.call('XRANGE', KEYS[1], '0-' .. version, '0-' .. version)[1]
  if not entry then return nil end
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == 'position' then return tonumber(f[i + 1]) end
  end
  return nil
end
-- Ids the stream holds already: a retry of the append that stored them, or a clash.
local found, clash, clash_version, in_place = nil, nil, nil, true
for i = 1, n do
  local v = redis.call('HGET', KEYS[4], ARGV[3 + (i - 1) * 3 + 2])
  if v then
    v = tonumber(v)
    if not clash then clash, clash_version = i, v end
    if i == 1 then found = v elseif not found or v ~= found + i - 1 then in_place = false end
  else
    in_place = false
  end
  if clash and not in_place then break end
end
if clash then
  if in_place and satisfied(found - 1) then
    local last = found + n - 1
    local p1, pn = position_at(found), position_at(last)
    if p1 and pn then return {1, last, p1, pn} end
  end
  return {2, clash, clash_version}
end
if not satisfied(len) then return {0, len} end
if n == 0 then
  local head = tonumber(redis.call('GET', KEYS[3]) or '0')
  return {1, len, head, head}
end
local last = redis.call('INCRBY', KEYS[3], n)
local first = last - n + 1
for i = 1, n do
  local base = 3 + (i - 1) * 3
  local version = string.format('%d', len + i)
  local position = string.format('%d', first + i - 1)
  local event = ARGV[base + 3] .. ',"streamversion":' .. version .. ',"globalposition":' .. position .. '}'
  redis.call('XADD', KEYS[1], '0-' .. version, 'type', ARGV[base + 1], 'event', event,
    'id', ARGV[base + 2], 'position', position)
  redis.call('XADD', KEYS[2], '0-' .. position, 'type', ARGV[base + 1], 'event', event)
  redis.call('HSET', KEYS[4], ARGV[base + 2], version)
end
return {1, len + n, first, last}
"#,
    )
});

/// Settles a delivery by sending it back for another attempt: acks it in its stream and adds
/// it to the group's retry stream now, or to the group's delayed set to be moved there later.
/// Does nothing if the entry was no longer pending (someone else settled it).
///
/// KEYS: source stream, retry stream, delayed set.
/// ARGV: group, entry id, delete source (`1` for retry-stream entries), delay ms, topic, type,
/// event JSON, attempt, first attempt (ms since the epoch), last error, nonce.
pub(crate) static NACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
if ARGV[3] == '1' then redis.call('XDEL', KEYS[1], ARGV[2]) end
local delay = tonumber(ARGV[4])
if delay <= 0 then
  redis.call('XADD', KEYS[2], '*', 'type', ARGV[6], 'event', ARGV[7], 'topic', ARGV[5],
    'attempt', ARGV[8], 'first', ARGV[9], 'error', ARGV[10])
else
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local member = cjson.encode({topic = ARGV[5], type = ARGV[6], event = ARGV[7],
    attempt = ARGV[8], first = ARGV[9], error = ARGV[10], nonce = ARGV[11]})
  redis.call('ZADD', KEYS[3], now + delay, member)
end
return 1
"#,
    )
});

/// Moves the delayed messages whose time has come into the retry stream.
///
/// KEYS: delayed set, retry stream. ARGV: at most this many.
/// Returns `{moved, ms until the next one is due or -1}`.
pub(crate) static MOVE_DUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  local ok, r = pcall(cjson.decode, member)
  if ok and type(r) == 'table' and r.event then
    redis.call('XADD', KEYS[2], '*', 'type', tostring(r.type or ''), 'event', r.event,
      'topic', tostring(r.topic or ''), 'attempt', tostring(r.attempt or '1'),
      'first', tostring(r.first or ''), 'error', tostring(r.error or ''))
  else
    -- Not ours to read: hand it over as is, so the consumer dead-letters it with a reason.
    redis.call('XADD', KEYS[2], '*', 'delayed', member)
  end
  redis.call('ZREM', KEYS[1], member)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = -1
if nxt[2] then wait = math.max(0, tonumber(nxt[2]) - now) end
return {#due, string.format('%d', wait)}
"#,
    )
});

/// Parks a letter in the dead-letter queue and, for a delivery, acks it in its stream — or
/// does nothing when the delivery was no longer pending.
///
/// KEYS: dead-letter stream, dead-letter index, [source stream].
/// ARGV: letter id, event type, subscription, letter JSON, [group, entry id, delete source].
/// Returns 1 when parked, 0 when the delivery had been settled already.
pub(crate) static DEAD_LETTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if KEYS[3] then
  if redis.call('XACK', KEYS[3], ARGV[5], ARGV[6]) == 0 then return 0 end
  if ARGV[7] == '1' then redis.call('XDEL', KEYS[3], ARGV[6]) end
end
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old then redis.call('XDEL', KEYS[1], old) end
local entry = redis.call('XADD', KEYS[1], '*', 'id', ARGV[1], 'type', ARGV[2],
  'subscription', ARGV[3], 'letter', ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], entry)
return 1
"#,
    )
});

/// Reads one letter and, if asked, removes it.
///
/// KEYS: dead-letter stream, dead-letter index. ARGV: letter id, remove (`1`/`0`).
/// Returns the letter JSON or nil.
pub(crate) static TAKE_LETTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local entry = redis.call('HGET', KEYS[2], ARGV[1])
if not entry then return false end
local found = redis.call('XRANGE', KEYS[1], entry, entry)
if ARGV[2] == '1' then
  redis.call('XDEL', KEYS[1], entry)
  redis.call('HDEL', KEYS[2], ARGV[1])
end
if not found[1] then return false end
local f = found[1][2]
for i = 1, #f, 2 do
  if f[i] == 'letter' then return f[i + 1] end
end
return false
"#,
    )
});

/// Removes an ephemeral group: its consumer group on every stream in `KEYS` that has one
/// (topic streams and its retry stream), its retry stream and delayed set, its alive key and
/// its membership of the ephemeral set.
///
/// KEYS: the topic streams..., retry, delayed, alive, ephemeral set; ARGV: group.
pub(crate) static REMOVE_GROUP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local group = ARGV[1]
local n = #KEYS
for i = 1, n - 3 do
  if redis.call('TYPE', KEYS[i])['ok'] == 'stream' then
    redis.pcall('XGROUP', 'DESTROY', KEYS[i], group)
  end
end
redis.call('DEL', KEYS[n - 3], KEYS[n - 2], KEYS[n - 1])
redis.call('SREM', KEYS[n], group)
return 1
",
    )
});

/// Trims a topic stream of what no consumer group still needs (see the
/// [module docs](super#trimming-topic-streams)): the entries older than the oldest of, for each
/// group, its last-delivered id and its oldest pending id — and, whatever the groups, only
/// entries older than the retention age. Atomic, so no read, ack or claim comes between
/// computing the cut and trimming.
///
/// Ids are compared as pairs of decimal strings (exact for any 64-bit part, where Lua numbers
/// would round).
///
/// KEYS: topic stream. ARGV: retention age in ms (entries younger are kept).
/// Returns `{removed, length after, the cut (the oldest id kept may be newer)}`.
pub(crate) static TRIM_TOPIC: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local key = KEYS[1]
if redis.call('TYPE', key)['ok'] ~= 'stream' then return {0, 0, ''} end
local function split(id)
  local dash = string.find(id, '-', 1, true)
  return string.sub(id, 1, dash - 1), string.sub(id, dash + 1)
end
local function below(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local function older(a, b)
  local am, as = split(a)
  local bm, bs = split(b)
  if am ~= bm then return below(am, bm) end
  return below(as, bs)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cut = string.format('%d', math.max(now - tonumber(ARGV[1]), 0)) .. '-0'
local groups = redis.call('XINFO', 'GROUPS', key)
for _, g in ipairs(groups) do
  local name, pending, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1]
    elseif g[i] == 'pending' then pending = g[i + 1]
    elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  if older(last, cut) then cut = last end
  if pending > 0 then
    local oldest = redis.call('XPENDING', key, name)[2]
    if older(oldest, cut) then cut = oldest end
  end
end
local removed = redis.call('XTRIM', key, 'MINID', cut)
return {removed, redis.call('XLEN', key), cut}
",
    )
});
