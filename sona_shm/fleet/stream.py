"""The fleet's log in Redis: key names, the Lua scripts that keep it exactly-once, and the calls a flusher makes.

One fleet key ``K`` owns these keys (all with the hash tag ``{K}``, so a Redis Cluster
would keep them in one slot; sona_shm talks to one primary)::

    sona:{K}:meta      hash   config (JSON: what every host must share), epoch, created_at, protocol
    sona:{K}:log       stream; every entry has h (host id) and k (its host key, 16 hex digits), windows and gaps also t
                       (the first 8 characters of the writing segment's token), and is one of:
                       windows: s (the first window's seq), e (the last's), p (prev), w (the windows' bytes, back to back)
                       a gap:   s = e + 1, e, p, c (the host's signal total at e), w empty: seqs p+1..e are lost
                       hello:   r = 1, the host was registered (only a registered host gets a row of the applied table)
                       bye:     r = 0, the host was removed (``sona-shm fleet remove-host``)
                       given up: a (windows), c (their signals): a segment whose host id another took counts its
                                windows the stream never had as lost
    sona:{K}:seqs      hash   host key (16 hex digits) -> the last seq of that host in the stream
    sona:{K}:hosts     hash   host id -> the token of the segment registered under it
    sona:{K}:hostkeys  hash   host id -> its host key (to register every host again in a stream made anew)
    sona:{K}:lease:ID  string the token of the live flusher of host ID, with a TTL it renews
    sona:{K}:snap      hash   the newest snapshot (replica.Snapshot.to_fields), :snap:prev the one before
    sona:{K}:trimmed   string stream entries below this id were removed (XTRIM MINID)
    sona:{K}:taken     hash   host id -> "OLD_TOKEN SEQ": another segment took the host id over at seq SEQ
    sona:{K}:given     set    "TOKEN:SEQ" of every given-up entry written (a repeated call writes none)
    sona:{K}:wm        stream with ``--fleet-min-replicas``: entries whose field i is a log id that ``WAIT``
                       confirmed the replicas hold; replicas apply log entries only up to the newest

The scripts run atomically in Redis, so a failover keeps or loses each one whole:

- ``join``: refuses a host whose config differs and a fleet made by a sona_shm of another
  stream format (``PROTOCOL``), before touching anything; heals what Redis lost (the
  stream: ``seqs`` reset to the snapshot's table and the trim point set to it; ``seqs``:
  rebuilt from the snapshot and the stream after it); creates the fleet if ``meta`` is
  missing, or if what was lost cannot be healed (config, a fresh epoch, and the joining
  host's state as the first snapshot). Refuses a host id that another segment registered
  (``taken``; a new segment may take one over, which ``taken`` records) or whose lease
  another token holds, and a host beyond ``MAX_FLEET_HOSTS``. Registers the host in the
  stream (``r`` = 1) and takes the lease.
- ``publish``: appends a host's windows only past the last seq the host has in the
  stream, each entry carrying consecutive windows ``s..e`` (the caller groups them: at
  most ``ENTRY_WINDOWS`` and ``ENTRY_BYTES``, unless one window is larger; the script
  cuts off a group's windows the stream has already), with ``p`` = the last seq before it
  (so a gap is visible to every reader), and only while the caller holds the host's
  lease (a fenced zombie appends nothing). Repeating a publish whose answer was lost
  appends nothing. Many windows to an entry cut the work of Redis and of every reader
  per window; grouping them in Python, not in Lua, matters because Redis's Lua hashes
  every byte of every string it makes (``step = 1`` in Redis's ``deps/lua/src/lstring.c``).
  Appends nothing and answers ``heal`` when a fleet key is gone (the caller joins again);
  appends a gap entry when asked to (the host's windows up to a seq Redis lost).
- ``release``: a cleanly stopped flusher deletes its host's lease if it still holds it
  (compare-and-delete), so the next flusher of that host id joins at once.
- ``confirm`` (``--fleet-min-replicas``): raises the watermark after ``WAIT`` said the
  replicas hold the stream up to an id.
- ``give_up``: a segment whose host id was taken counts its windows past the takeover as
  lost, once. ``remove``: retires a host id whose lease is gone.
- ``snapshot``: stores a snapshot only if its stream id is newer than the newest one
  (set-if-newer) and names an entry the stream holds (a replica that applied entries a
  failover lost never offers its state), keeps the one it replaces as ``:snap:prev``,
  and trims the stream up to the id of that older one (XTRIM MINID), noting the id in
  ``:trimmed``.

The client is redis-py with short timeouts and **no retries**: redis-py 6 and later
retry a failed command by default (redis-py 8: 10 times, exponential back-off up to 1 s),
which would block a caller through an outage; here every call fails fast and the
caller (:mod:`sona_shm.fleet.member`'s threads) decides when to try again. redis-py is imported
only here, and only when a fleet is used (``pip install 'sona-shm[fleet]'``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import FleetError, InternalSignal
from .replica import StreamEntry, StreamId, format_id, parse_id

#: The stream's format (checked at join): 4 since the routing rule's windows are its learned route table's deltas
#: (``SFW2``, :mod:`sona_shm.fleet.window`); 3 since hosts register in the stream (``r``) and gaps, given-up windows and
#: the host key (``k``) are entries and fields of it; 2 carried runs of windows (``e``); 1 one window an entry.
PROTOCOL = "4"

#: The most windows, and bytes of windows, one stream entry carries (a larger window goes alone).
ENTRY_WINDOWS = 32
ENTRY_BYTES = 64 * 1024

#: Seconds a host's lease lives without renewal (the fleet thread renews it every third of that).
LEASE_TTL = 10.0

_HEAL = """
-- Shared by join and publish: what Redis lost of the fleet's keys. KEYS: meta, seqs, snap, log.
local function lost(meta, seqs, snap, log)
  if redis.call('EXISTS', meta) == 0 then return 'meta' end
  if redis.call('HGET', meta, 'logged') == '1' and redis.call('EXISTS', log) == 0 then return 'log' end
  if redis.call('HEXISTS', seqs, '-') == 0 then return 'seqs' end
  return nil
end
-- seqs := the snapshot's table, then every entry after the snapshot (false: no snapshot to rebuild from)
local function rebuild(seqs, snap, log)
  local raw = redis.call('HGET', snap, 'state')
  local id = redis.call('HGET', snap, 'id')
  if not raw or not id then return false end
  redis.call('DEL', seqs)
  redis.call('HSET', seqs, '-', '0')
  local ok, state = pcall(cjson.decode, raw)
  if not ok or type(state) ~= 'table' or type(state['table']) ~= 'table' then return false end
  for key, row in pairs(state['table']) do redis.call('HSET', seqs, key, string.format('%.0f', row[1])) end
  for _, item in ipairs(redis.call('XRANGE', log, '(' .. id, '+')) do
    local f, k, e = item[2], nil, nil
    for i = 1, #f, 2 do
      if f[i] == 'k' then k = f[i + 1] elseif f[i] == 'e' then e = f[i + 1] end
    end
    if k and e then redis.call('HSET', seqs, k, e) end
  end
  return true
end
"""

_JOIN = (
    _HEAL
    + """
local meta, seqs, hosts, lease, snap, prev = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local log, trimmed, taken, given, hostkeys = KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11]
local config, new_epoch, host, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ttl, max_hosts, takeover, now, protocol, hkey = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local reset = ARGV[11]
local created, healed = 0, ''
if redis.call('EXISTS', meta) == 1 then  -- before any healing: a fleet of another format or configuration is never touched
  local stored_protocol = redis.call('HGET', meta, 'protocol')
  if stored_protocol ~= protocol then return {'protocol', stored_protocol or ''} end
  local stored = redis.call('HGET', meta, 'config')
  if stored ~= config then return {'config', stored or ''} end
end
local what = lost(meta, seqs, snap, log)
if what == nil and reset == '1' and redis.call('EXISTS', snap) == 0 then
  what = 'snap'  -- no snapshot for long, and no replica that may offer one: made again from this host's state
end
if what == 'log' then
  -- the stream was evicted or deleted: the fleet goes on from its snapshot (replicas resync to it; what the
  -- stream held after it is counted lost from the hosts' seq gaps)
  if redis.call('EXISTS', snap) == 1 then
    redis.call('DEL', seqs)
    redis.call('HSET', seqs, '-', '0')
    rebuild(seqs, snap, log)
    redis.call('SET', trimmed, redis.call('HGET', snap, 'id'))
    -- The stream starts again after the snapshot: every registered host registers in it again (a host registered
    -- after the snapshot was taken has no row there), this one too, so the stream exists again.
    local known = redis.call('HGETALL', hostkeys)
    for i = 1, #known, 2 do
      if known[i] ~= host and redis.call('HEXISTS', hosts, known[i]) == 1 then
        redis.call('XADD', log, '*', 'h', known[i], 'k', known[i + 1], 'r', '1')
      end
    end
    redis.call('XADD', log, '*', 'h', host, 'k', hkey, 'r', '1')
    healed, what = 'log', nil
  end
elseif what == 'seqs' then
  if rebuild(seqs, snap, log) then healed, what = 'seqs', nil end
end
if what ~= nil then
  -- a new fleet, or one Redis lost too much of: this host's state is its first snapshot
  redis.call('DEL', meta, seqs, hosts, snap, prev, log, trimmed, taken, given, hostkeys)
  redis.call('HSET', meta, 'config', config, 'epoch', new_epoch, 'created_at', now, 'protocol', protocol)
  for i = 12, #ARGV, 2 do redis.call('HSET', snap, ARGV[i], ARGV[i + 1]) end
  redis.call('HSET', seqs, '-', '0')
  local raw = redis.call('HGET', snap, 'state')
  if raw then
    for key, row in pairs(cjson.decode(raw)['table']) do redis.call('HSET', seqs, key, string.format('%.0f', row[1])) end
  end
  created = 1
end
local registered = redis.call('HGET', hosts, host)
if registered and registered ~= token and takeover ~= '1' then return {'taken', ''} end
local holder = redis.call('GET', lease)
if holder and holder ~= token then return {'busy', tostring(redis.call('PTTL', lease))} end
if not registered then
  if redis.call('HLEN', hosts) >= max_hosts then return {'full', tostring(redis.call('HLEN', hosts))} end
elseif registered ~= token then
  -- a new segment takes the host id over: the windows the old one sealed past this seq never reach the stream
  redis.call('HSET', taken, host, registered .. ' ' .. (redis.call('HGET', seqs, hkey) or '0'))
end
if registered ~= token then
  redis.call('HSET', hosts, host, token)
  redis.call('XADD', log, '*', 'h', host, 'k', hkey, 'r', '1')  -- every replica gives the host a row
  redis.call('HSET', meta, 'logged', '1')
end
redis.call('HSET', hostkeys, host, hkey)
redis.call('SET', lease, token, 'PX', ttl)
return {'ok', redis.call('HGET', meta, 'epoch'), redis.call('HGET', seqs, hkey) or '0', tostring(created), healed}
"""
)

_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if holder then return 0 end
local registered = redis.call('HGET', KEYS[2], ARGV[3])
if not registered then return 2 end
if registered ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_RELEASE = """
-- a cleanly stopped flusher gives its lease back: deleted only while it still holds it (compare-and-delete)
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_PUBLISH = (
    _HEAL
    + """
local log, seqs, lease, meta, snap = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
if lost(meta, seqs, snap, log) then return {'heal', '0', '0', '0', '0-0'} end
if redis.call('GET', lease) ~= ARGV[1] then return {'fenced', '0', '0', '0', '0-0'} end
local last = tonumber(redis.call('HGET', seqs, ARGV[3]) or '0')
local appended, entries = 0, 0
if ARGV[4] ~= '' then
  -- a gap: the host's windows up to this seq are not in the stream and never will be (Redis lost them)
  local gap, cum = string.match(ARGV[4], '(%d+) (%d+)')
  gap = tonumber(gap)
  if gap > last then
    redis.call('XADD', log, '*', 'h', ARGV[2], 'k', ARGV[3], 't', string.sub(ARGV[1], 1, 8), 's', string.format('%.0f', gap + 1),
      'e', string.format('%.0f', gap), 'p', string.format('%.0f', last), 'c', cum, 'w', '')
    last, entries = gap, 1
  end
end
for g = 5, #ARGV, 3 do
  local first, raw = tonumber(ARGV[g]), ARGV[g + 2]
  local lengths = {}
  for length in string.gmatch(ARGV[g + 1], '%d+') do lengths[#lengths + 1] = tonumber(length) end
  local stop = first + #lengths - 1
  if stop > last then
    if first <= last then
      -- windows up to last are in the stream already (an answer was lost): cut them off
      local skip = 0
      for i = 1, last - first + 1 do skip = skip + lengths[i] end
      raw, first = string.sub(raw, skip + 1), last + 1
    end
    redis.call('XADD', log, '*', 'h', ARGV[2], 'k', ARGV[3], 't', string.sub(ARGV[1], 1, 8), 's', string.format('%.0f', first),
      'e', string.format('%.0f', stop), 'p', string.format('%.0f', last), 'w', raw)
    appended, entries, last = appended + stop - first + 1, entries + 1, stop
  end
end
redis.call('HSET', seqs, ARGV[3], string.format('%.0f', last))
local tip = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
return {'ok', string.format('%.0f', last), tostring(appended), tostring(entries), tip[1] and tip[1][1] or '0-0'}
"""
)

_CONFIRM = """
-- the replicas hold the log up to ARGV[1] (WAIT said so): raise the watermark if that is newer
local function split(id) local d = string.find(id, '-') return tonumber(string.sub(id, 1, d - 1)), tonumber(string.sub(id, d + 1)) end
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local ms, seq = split(ARGV[1])
if top[1] then
  local cms, cseq = split(top[1][2][2])
  if ms < cms or (ms == cms and seq <= cseq) then return 0 end
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', '64', '*', 'i', ARGV[1])
return 1
"""

_GIVE_UP = """
-- a segment whose host id another segment took: its windows the stream never had are counted lost, once
local hosts, taken, given, log, seqs = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local host, hkey, token = ARGV[1], ARGV[2], ARGV[3]
local registered = redis.call('HGET', hosts, host)
if registered == token then return {'owner', '0', '0'} end
if not registered then return {'unregistered', '0', '0'} end
local from = tonumber(redis.call('HGET', seqs, hkey) or '0')
local record = redis.call('HGET', taken, host)
if record then
  local old, seq = string.match(record, '(%S+) (%d+)')
  if old == token then from = tonumber(seq) end
end
local count, signals, first = 0, 0, nil
for seq, n in string.gmatch(ARGV[4], '(%d+):(%d+)') do
  if tonumber(seq) > from then
    count, signals = count + 1, signals + tonumber(n)
    first = first or seq
  end
end
if count == 0 then return {'ok', '0', '0'} end
if redis.call('SADD', given, token .. ':' .. first) == 0 then return {'ok', tostring(count), tostring(signals)} end
redis.call('XADD', log, '*', 'h', host, 'k', hkey, 'a', tostring(count), 'c', string.format('%.0f', signals))
return {'ok', tostring(count), tostring(signals)}
"""

_REMOVE = """
-- retire a host id: refused while its lease lives
if redis.call('EXISTS', KEYS[1]) == 1 then return {'busy', tostring(redis.call('PTTL', KEYS[1]))} end
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return {'unknown', ''} end
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('HDEL', KEYS[6], ARGV[1])
redis.call('XADD', KEYS[4], '*', 'h', ARGV[1], 'k', ARGV[2], 'r', '0')
return {'ok', ''}
"""

_SNAPSHOT = """
local snap, prev, log, trimmed, meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
if redis.call('HGET', meta, 'epoch') ~= ARGV[1] then return 'epoch' end
local ms, seq = tonumber(ARGV[2]), tonumber(ARGV[3])
local id = ARGV[2] .. '-' .. ARGV[3]
-- a snapshot is the state at an entry the stream holds: never at one a failover lost
if #redis.call('XRANGE', log, id, id) == 0 then return 'absent' end
local cur = redis.call('HGET', snap, 'id')
if cur then
  local dash = string.find(cur, '-')
  local cms, cseq = tonumber(string.sub(cur, 1, dash - 1)), tonumber(string.sub(cur, dash + 1))
  if ms < cms or (ms == cms and seq <= cseq) then return 'older' end
  redis.call('RENAME', snap, prev)
end
for i = 4, #ARGV, 2 do redis.call('HSET', snap, ARGV[i], ARGV[i + 1]) end
local keep = redis.call('HGET', prev, 'id')
if keep then
  redis.call('XTRIM', log, 'MINID', keep)
  redis.call('SET', trimmed, keep)
end
return 'ok'
"""

#: Redis answers that mean "not now": a restarting or loading server, a replica after a failover, a primary
#: without its replicas (min-replicas-to-write), a busy script, a full memory. redis-py raises most as their
#: own classes (stripping the word); BUSY, NOREPLICAS and MISCONF come as plain ResponseErrors with it.
RETRY_WORDS = ("LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN", "NOREPLICAS", "OOM", "MISCONF", "CLUSTERDOWN", "UNBLOCKED")
#: maxmemory-policy values that let Redis drop a fleet's keys (every key of a fleet has no TTL but the leases).
EVICTING = ("allkeys-lru", "allkeys-lfu", "allkeys-random")
VOLATILE = ("volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl")


class LinkDown(InternalSignal):
    """Redis did not answer (connection refused or lost, timeout), or answered "not now": try again later."""


@dataclass(frozen=True)
class Joined:
    """What ``join`` answered: the fleet's epoch, the last seq the stream has of this host, whether this call created
    the fleet, and what it healed (``""``, ``"log"``: the stream was gone, ``"seqs"``: the hosts' last seqs were)."""

    epoch: int
    last_seq: int
    created: bool
    healed: str = ""


@dataclass(frozen=True)
class Published:
    """What ``publish`` answered: the host's last seq in the stream, windows and entries appended, the stream's last id."""

    last_seq: int
    appended: int
    entries: int
    tip: StreamId


@dataclass(frozen=True)
class ReadResult:
    entries: list[StreamEntry]
    trimmed: StreamId  # entries below it were removed
    epoch: int  # the fleet's epoch now (0: no fleet: Redis lost everything)


class NeedsHealing(InternalSignal):
    """A script found a fleet key gone (``meta``, the stream, ``seqs``): join again, which heals it."""


def keys(fleet_key: str) -> dict[str, str]:
    """The Redis keys of fleet ``fleet_key`` (see the module docstring)."""
    base = f"sona:{{{fleet_key}}}:"
    names = ("meta", "log", "seqs", "hosts", "hostkeys", "snap", "trimmed", "taken", "given", "wm")
    return {name: base + name for name in names} | {"prev": base + "snap:prev"}


def import_redis() -> Any:
    """The ``redis`` module, or :class:`FleetError` saying how to install it."""
    try:
        import redis
    except ImportError as exc:
        raise FleetError(f"--fleet: needs redis-py: pip install 'sona-shm[fleet]' ({exc})") from None
    return redis


def safe_url(url: Any) -> str:
    """``url`` with no password (and no user name) in it, for logs and errors; whatever it is, even not a URL."""
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return "(a URL without '://')" if "@" in text or ":" in text else repr(text)
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = ""
    if "?" in path:
        path, _, query = path.partition("?")
        query = "?" + "&".join(
            p if p.split("=", 1)[0].lower() not in ("password", "username", "user") else p.split("=", 1)[0] + "=***"
            for p in query.split("&")
        )
    return f"{scheme}://{netloc}{slash}{path}{query}"


def _scrub(text: str, url: str) -> str:
    """``text`` (an error redis-py raised) without the password of ``url`` in it."""
    try:
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(url)
        secrets = [s for s in (parts.password, unquote(parts.password or "")) if s]
        for item in parts.query.split("&"):
            name, _, value = item.partition("=")
            if name.lower() == "password" and value:
                secrets += [value, unquote(value)]
    except ValueError:
        return "(an error whose text may hold the URL: not shown)"
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


@dataclass(frozen=True)
class Target:
    """Where the fleet's Redis is: a URL (``redis://``, ``rediss://``, ``unix://``), or Sentinels that name the primary
    of ``service`` (the URL then gives the credentials, database and TLS; its host and port are not used)."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None

    def describe(self) -> str:
        if self.sentinels:
            return f"the primary of {self.service!r} by Sentinels {', '.join(f'{h}:{p}' for h, p in self.sentinels)}"
        return safe_url(self.url)


def parse_sentinels(text: str) -> tuple[tuple[str, int], ...]:
    """``HOST:PORT[,HOST:PORT...]`` as pairs; :class:`ValueError` naming what is wrong."""
    out = []
    for item in text.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected HOST:PORT[,HOST:PORT...], got {item.strip()!r}")
        out.append((host.strip("[]"), int(port)))
    return tuple(out)


def _client(url: str, timeout: float, read_timeout: float | None) -> Any:
    redis = import_redis()
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    try:
        return redis.Redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=read_timeout or timeout,
            retry=Retry(NoBackoff(), 0),  # redis-py 8 retries 10 times by default: fail fast instead
            retry_on_error=[],
            health_check_interval=0,
            single_connection_client=True,
        )
    except ValueError as exc:
        raise FleetError(
            f"--fleet: {safe_url(url)} is not a Redis URL redis-py takes ({_scrub(str(exc), url)}); expected redis://HOST:PORT[/DB]"
        ) from None


def locate(target: Target, timeout: float) -> tuple[str, int] | None:
    """The primary's address the first Sentinel that answers names (None: a fixed URL; LinkDown: no Sentinel knows)."""
    if not target.sentinels:
        return None
    redis = import_redis()
    errors = []
    for host, port in target.sentinels:
        try:
            client = redis.Redis(host=host, port=port, socket_timeout=timeout, socket_connect_timeout=timeout, retry=None)
            try:
                answer = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", target.service)
            finally:
                client.close()
        except (redis.RedisError, OSError) as exc:
            errors.append(f"{host}:{port}: {type(exc).__name__}")
            continue
        if answer:
            return _text(answer[0]), int(answer[1])
        errors.append(f"{host}:{port}: does not know {target.service!r}")
    raise LinkDown(f"no Sentinel named the primary of {target.service!r} ({'; '.join(errors)})")


def _at(url: str, address: tuple[str, int]) -> str:
    """``url`` with its host and port replaced by ``address`` (credentials, database, options kept)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url if "://" in url else "redis://")
    scheme = parts.scheme if parts.scheme in ("redis", "rediss") else "redis"
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    host = f"[{address[0]}]" if ":" in address[0] else address[0]
    return urlunsplit((scheme, f"{auth}{host}:{address[1]}", parts.path, parts.query, ""))


def connect(target: Target | str, *, timeout: float, read_timeout: float | None = None, _hops: int = 0) -> Any:
    """A redis-py client of one connection to the fleet's primary: connect and command timeouts, no retries.

    ``target``: a :class:`Target` (or a URL): ``redis://[[user]:password@]host:port[/db]``,
    ``rediss://`` for TLS, as redis-py takes it; with Sentinels, the primary they name now.
    ``read_timeout``: the socket timeout of commands (longer for a blocking read). The client's
    ``sona_address`` is the ``(host, port)`` it talks to (None for a fixed URL).
    """
    if isinstance(target, str):
        target = Target(target)
    redis = import_redis()
    address = locate(target, timeout)
    url = target.url if address is None else _at(target.url, address)
    client = None
    try:
        client = _client(url, timeout, read_timeout)  # one connection, made now: a refusal is told here
        client.ping()
    except redis.AuthenticationError as exc:  # before ConnectionError, its base: a wrong password is no outage
        raise FleetError(f"--fleet: Redis refused the credentials in the URL ({_scrub(str(exc), target.url)})") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise LinkDown(f"{type(exc).__name__}: {_scrub(str(exc), target.url)}") from None
    except redis.ResponseError as exc:
        if str(exc).startswith(("NOAUTH", "WRONGPASS", "NOPERM")) or isinstance(exc, redis.exceptions.NoPermissionError):
            raise FleetError(f"--fleet: Redis refused this client ({_scrub(str(exc), target.url)})") from None
        raise LinkDown(f"Redis is not ready: {_scrub(str(exc), target.url)}") from None
    finally:
        if client is not None and sys.exc_info()[0] is not None:
            client.close()
    if address is None and not target.url.startswith("unix://"):
        # A fixed address that is a replica now (a failover behind it) names its primary: follow it while the
        # replica's link to it is up, so that a fleet given one node's address follows a Sentinel failover too.
        try:
            role = client.execute_command("ROLE")
        except (redis.RedisError, OSError):
            role = None
        if role and _text(role[0]) == "slave" and len(role) > 3 and _text(role[3]) == "connected" and _hops < 2:
            client.close()
            primary = (_text(role[1]), int(role[2]))
            return connect(Target(_at(target.url, primary)), timeout=timeout, read_timeout=read_timeout, _hops=_hops + 1)
    client.sona_address = address
    client.sona_url = target.url
    return client


class FleetLog:
    """The calls one flusher thread makes on fleet ``fleet_key`` through ``client`` (its own connection)."""

    def __init__(self, client: Any, fleet_key: str) -> None:
        self.client = client
        self.fleet_key = fleet_key
        self.k = keys(fleet_key)
        self.address: tuple[str, int] | None = getattr(client, "sona_address", None)
        self._url = getattr(client, "sona_url", "")
        redis = import_redis()
        e = redis.exceptions
        self._errors = (redis.ConnectionError, redis.TimeoutError, OSError)
        self._auth_errors = (redis.AuthenticationError, e.AuthorizationError, e.NoPermissionError)
        self._not_now = tuple(
            getattr(e, name)
            for name in ("ReadOnlyError", "MasterDownError", "TryAgainError", "BusyLoadingError", "OutOfMemoryError", "ClusterDownError")
            if hasattr(e, name)
        )
        self._response_error = redis.ResponseError
        self._join = client.register_script(_JOIN)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._publish = client.register_script(_PUBLISH)
        self._snapshot = client.register_script(_SNAPSHOT)
        self._confirm = client.register_script(_CONFIRM)
        self._give_up = client.register_script(_GIVE_UP)
        self._remove = client.register_script(_REMOVE)
        self.last_error: str = ""

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._auth_errors as exc:
            raise FleetError(
                f"fleet {self.fleet_key!r}: Redis refused this client ({self._scrub(exc)}): check the URL's credentials and ACLs"
            ) from None
        except self._errors as exc:
            raise LinkDown(f"{type(exc).__name__}: {self._scrub(exc)}") from None
        except self._not_now as exc:  # matched on redis-py's classes: it strips the word from the message
            raise LinkDown(f"Redis is not ready ({type(exc).__name__}: {self._scrub(exc)})") from None
        except self._response_error as exc:
            text = self._scrub(exc)
            if text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
                raise FleetError(
                    f"fleet {self.fleet_key!r}: Redis refused this client ({text}): check the URL's credentials and ACLs"
                ) from None
            if text.split(" ", 1)[0] in RETRY_WORDS:
                raise LinkDown(f"Redis is not ready: {text}") from None
            # Anything else is no reason to stop learning either: said loudly, retried with back-off.
            raise LinkDown(f"Redis answered an error this flusher does not expect: {type(exc).__name__}: {text}") from None

    def _scrub(self, exc: BaseException) -> str:
        return _scrub(str(exc), self._url) if self._url else str(exc)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a dead connection must not raise
            pass

    def lease_key(self, host_id: str) -> str:
        return f"sona:{{{self.fleet_key}}}:lease:{host_id}"

    # ----------------------------------------------------------------- the node

    def role(self) -> str:
        """``master`` or ``slave``: what the node this connection talks to is now."""
        answer = self._call(self.client.execute_command, "ROLE")
        return _text(answer[0])

    def check_primary(self, target: Target, timeout: float) -> None:
        """LinkDown unless this connection's node is a primary and, with Sentinels, the one they name now."""
        if self.role() != "master":
            raise LinkDown("the node this host writes to is a replica now (a failover); following the primary")
        if target.sentinels:
            named = locate(target, timeout)
            if named != self.address:
                raise LinkDown(f"the Sentinels name another primary now ({named[0]}:{named[1]}); following it" if named else "no primary")

    def eviction_policy(self) -> tuple[str, int] | None:
        """``(maxmemory-policy, maxmemory)``; None when the server does not say (CONFIG is often forbidden on managed Redis)."""
        try:
            got = self.client.config_get("maxmemory*")
        except Exception:  # NOPERM, an unknown command (renamed CONFIG): nothing to warn about then
            return None
        try:
            return _text(got.get("maxmemory-policy", "")), int(got.get("maxmemory", 0))
        except (TypeError, ValueError):
            return None

    # ----------------------------------------------------------------- joining and the lease

    def join(
        self,
        *,
        config: str,
        new_epoch: int,
        host_id: str,
        host_key: str,
        token: str,
        max_hosts: int,
        takeover: bool,
        snapshot: Mapping[str, bytes],
        now: float,
        reset: bool = False,
    ) -> Joined:
        """Join (or create) the fleet, healing what Redis lost of it; :class:`FleetError` if it refuses this host
        (:class:`LeaseHeld` if a flusher's lease holds the host id)."""
        k = self.k
        argv: list[Any] = [config, str(new_epoch), host_id, token, int(LEASE_TTL * 1000), max_hosts, "1" if takeover else "0", repr(now)]
        argv += [PROTOCOL, host_key, "1" if reset else "0"]
        for name, value in snapshot.items():
            argv += [name, value]
        keys_ = [
            k["meta"],
            k["seqs"],
            k["hosts"],
            self.lease_key(host_id),
            k["snap"],
            k["prev"],
            k["log"],
            k["trimmed"],
            k["taken"],
            k["given"],
            k["hostkeys"],
        ]
        answer = self._call(self._join, keys=keys_, args=argv)
        status = _text(answer[0])
        if status == "ok":
            return Joined(_u64(answer[1]), _u64(answer[2]), answer[3] in (b"1", "1", 1), _text(answer[4]) if len(answer) > 4 else "")
        if status == "config":
            theirs = _text(answer[1])
            try:
                ours_d, theirs_d = json.loads(config), json.loads(theirs)
                diffs = [
                    f"{k}: the fleet's is {theirs_d.get(k)!r}, this engine's {ours_d.get(k)!r}"
                    for k in ours_d
                    if ours_d.get(k) != theirs_d.get(k)
                ]
            except (ValueError, AttributeError):
                diffs = [f"the fleet's configuration is {theirs[:200]!r}"]
            raise FleetError(
                f"fleet {self.fleet_key!r} refuses this engine ({'; '.join(diffs) or 'another configuration'}); every host of "
                "a fleet needs the same hidden_dim, rank, rule, lr, flush_threshold, temperature and route table"
            )
        if status == "protocol":
            raise FleetError(
                f"fleet {self.fleet_key!r} was made by a sona_shm whose stream format is protocol {_text(answer[1])[:20] or '?'!r}, "
                f"this one writes and reads protocol {PROTOCOL!r}; give this engine another --fleet-key (or delete the old "
                "fleet's keys once every host runs this version)"
            )
        if status == "busy":
            try:
                pttl = max(0, int(answer[1])) / 1000
            except (TypeError, ValueError):
                pttl = LEASE_TTL
            raise LeaseHeld(
                f"fleet {self.fleet_key!r}: host id {host_id!r} is held by another flusher's lease (it expires in "
                f"{pttl:.1f} s if that flusher is dead); give this engine its own --host-id",
                pttl,
            )
        if status == "taken":
            raise FleetError(
                f"fleet {self.fleet_key!r}: host id {host_id!r} was taken over by another engine since this segment used it; "
                "give this engine its own --host-id (or destroy the segment to join afresh)"
            )
        if status == "full":
            raise FleetError(
                f"fleet {self.fleet_key!r}: it has {_text(answer[1])[:20]} hosts, the most a fleet holds; retire gone ones "
                f"(`sona-shm fleet remove-host`) or use another --fleet-key"
            )
        raise FleetError(f"fleet {self.fleet_key!r}: unexpected answer to join: {answer!r:.200}")

    def renew(self, host_id: str, token: str) -> bool | None:
        """Renew (or take back, if it expired and nobody else took it) the host's lease.

        False if another engine holds it or registered the host id; None if the host id is not
        registered at all (the fleet was made again, or Redis lost its hosts: join anew).
        """
        answer = int(self._call(self._renew, keys=[self.lease_key(host_id), self.k["hosts"]], args=[token, int(LEASE_TTL * 1000), host_id]))
        return None if answer == 2 else answer == 1

    def release(self, host_id: str, token: str) -> bool:
        """Give the host's lease back (a clean stop), so a flusher that starts next with this host id joins at once
        instead of waiting out the TTL; True if it was this token's (another token's lease is left alone, atomically)."""
        return int(self._call(self._release, keys=[self.lease_key(host_id)], args=[token])) == 1

    def host_seq(self, host_key: str) -> int:
        """The last seq the stream has of the host (``seqs``; 0 when none)."""
        return _u64_or_zero(self._call(self.client.hget, self.k["seqs"], host_key))

    def lease_ttl(self, host_id: str) -> float:
        """Seconds the host id's lease still lives (0: none)."""
        return max(0, int(self._call(self.client.pttl, self.lease_key(host_id)))) / 1000

    # ----------------------------------------------------------------- publishing

    def publish(
        self,
        *,
        host_id: str,
        host_key: str,
        token: str,
        first_seq: int,
        windows: Sequence[bytes],
        gap: tuple[int, int] | None = None,
        entry_windows: int = ENTRY_WINDOWS,
        entry_bytes: int = ENTRY_BYTES,
    ) -> Published | None:
        """Append windows ``first_seq, first_seq + 1, ...`` of the host (those past its last); what Redis answered.

        They go in entries of at most ``entry_windows`` windows and ``entry_bytes`` bytes.
        ``gap``: ``(seq, cum)``: the host's windows up to ``seq`` (its signal total then: ``cum``)
        are not in the stream and never will be: if the stream has fewer, a gap entry says so.

        None if the caller does not hold the host's lease (fenced: nothing appended; renew it
        first); :class:`NeedsHealing` if a fleet key is gone (join again).
        """
        args: list[Any] = [token, host_id, host_key, f"{gap[0]} {gap[1]}" if gap else ""]
        start = 0
        while start < len(windows):  # the entries, made here: a Lua string costs Redis a pass over every byte
            stop, size = start + 1, len(windows[start])
            while stop < len(windows) and stop - start < entry_windows and size + len(windows[stop]) <= entry_bytes:
                size += len(windows[stop])
                stop += 1
            group = windows[start:stop]
            args += [first_seq + start, ",".join(str(len(w)) for w in group), b"".join(group)]
            start = stop
        k = self.k
        answer = self._call(self._publish, keys=[k["log"], k["seqs"], self.lease_key(host_id), k["meta"], k["snap"]], args=args)
        status = _text(answer[0])
        if status == "fenced":
            return None
        if status == "heal":
            raise NeedsHealing(f"fleet {self.fleet_key!r}: Redis lost a key of the fleet (evicted or deleted); healing it")
        return Published(_u64(answer[1]), _u64(answer[2]), _u64(answer[3]), parse_id(answer[4]))

    def wait_replicas(self, replicas: int, timeout_ms: int) -> int:
        """``WAIT``: how many replicas acknowledged every write this connection made (at most ``timeout_ms``)."""
        return int(self._call(self.client.execute_command, "WAIT", replicas, timeout_ms))

    def confirm(self, tip: StreamId) -> None:
        """Raise the fleet's replicated watermark to ``tip`` (after WAIT said the replicas hold the log up to it)."""
        self._call(self._confirm, keys=[self.k["wm"]], args=[format_id(tip)])

    def watermark(self) -> tuple[StreamId, StreamId]:
        """The newest watermark: ``(its wm stream id, the log id it confirms)``; zeros when there is none."""
        rows = self._call(self.client.xrevrange, self.k["wm"], "+", "-", 1)
        if not rows:
            return (0, 0), (0, 0)
        wm_id, fields = rows[0]
        try:
            return parse_id(wm_id), parse_id(fields[b"i"])
        except (KeyError, ValueError):
            return parse_id(wm_id), (0, 0)

    def give_up(self, *, host_id: str, host_key: str, token: str, windows: Sequence[tuple[int, int]]) -> tuple[str, int, int]:
        """Count this segment's windows ``(seq, n)`` the stream never had as lost (its host id was taken over);
        ``(status, windows, signals)`` — ``owner``: the host id is still this segment's."""
        listing = ",".join(f"{seq}:{n}" for seq, n in windows)
        k = self.k
        answer = self._call(
            self._give_up, keys=[k["hosts"], k["taken"], k["given"], k["log"], k["seqs"]], args=[host_id, host_key, token, listing]
        )
        return _text(answer[0]), _u64(answer[1]), _u64(answer[2])

    def remove_host(self, host_id: str, host_key: str) -> tuple[str, float]:
        """Retire ``host_id``: ``("ok", 0)``, ``("busy", lease seconds left)`` or ``("unknown", 0)``."""
        k = self.k
        answer = self._call(
            self._remove,
            keys=[self.lease_key(host_id), k["hosts"], k["seqs"], k["log"], k["taken"], k["hostkeys"]],
            args=[host_id, host_key],
        )
        status = _text(answer[0])
        return status, (max(0, int(answer[1])) / 1000 if status == "busy" else 0.0)

    def hosts(self) -> dict[str, dict[str, Any]]:
        """Every registered host id: its lease (seconds left, 0: none), last seq in the stream, taken-over record."""
        from .replica import host_key

        k = self.k
        registered = {_text(h): _text(t) for h, t in self._call(self.client.hgetall, k["hosts"]).items()}
        seqs = {_text(h): _text(s) for h, s in self._call(self.client.hgetall, k["seqs"]).items()}
        out = {}
        for host in sorted(registered):
            out[host] = {
                "lease_s": self.lease_ttl(host),
                "last_seq": int(seqs.get(f"{host_key(host):016x}", "0") or 0),
                "token": registered[host][:8],
            }
        return out

    # ----------------------------------------------------------------- reading

    def read(self, cursor: StreamId, *, block_ms: int, count: int) -> ReadResult:
        """Entries after ``cursor`` (waiting up to ``block_ms`` for one), and the trim point and epoch read after them."""
        pipe = self.client.pipeline(transaction=False)
        pipe.xread({self.k["log"]: format_id(cursor)}, count=count, block=block_ms)
        pipe.get(self.k["trimmed"])
        pipe.hget(self.k["meta"], "epoch")
        streams, trimmed, epoch = self._call(pipe.execute)
        entries = _entries(streams[0][1]) if streams else []
        return ReadResult(entries, _id_or_zero(trimmed), _u64_or_zero(epoch))

    def range(self, after: StreamId, count: int) -> list[StreamEntry]:
        """Up to ``count`` entries after ``after`` (no wait)."""
        return _entries(self._call(self.client.xrange, self.k["log"], min=f"({format_id(after)}", count=count))

    def has_entry(self, stream_id: StreamId) -> bool:
        rows = self._call(self.client.xrange, self.k["log"], min=format_id(stream_id), max=format_id(stream_id), count=1)
        return bool(rows)

    def consistent(self, cursor: StreamId) -> str | None:
        """Why a replica at ``cursor`` must resync (None: its state is a prefix of the fleet's stream)."""
        if cursor == (0, 0):
            return None
        if cursor < self.trimmed():
            return "the stream was trimmed past this replica (it was away longer than the snapshots are kept)"
        if self.has_entry(cursor):
            return None
        snap = self._call(self.client.hget, self.k["snap"], "id")
        if snap is not None and _id_or_zero(snap) == cursor:
            return None  # at the snapshot the fleet goes on from (its stream entry may be gone: evicted)
        return "the last entry this replica applied is not in the stream any more (Redis lost writes: a failover or an eviction)"

    def trimmed(self) -> StreamId:
        return _id_or_zero(self._call(self.client.get, self.k["trimmed"]))

    def epoch(self) -> int:
        return _u64_or_zero(self._call(self.client.hget, self.k["meta"], "epoch"))

    def meta(self) -> dict[str, str]:
        return {_text(k): _text(v) for k, v in self._call(self.client.hgetall, self.k["meta"]).items()}

    def has_snapshot(self) -> bool:
        return bool(self._call(self.client.exists, self.k["snap"]))

    # ----------------------------------------------------------------- snapshots

    def get_snapshot(self) -> dict[bytes, bytes] | None:
        fields = self._call(self.client.hgetall, self.k["snap"])
        return fields or None

    def put_snapshot(self, epoch: int, stream_id: StreamId, fields: Mapping[str, bytes]) -> str:
        """Store a snapshot if it is newer than the fleet's newest (and trim the stream); ``ok``, ``older`` or ``epoch``."""
        argv: list[Any] = [str(epoch), stream_id[0], stream_id[1]]
        for name, value in fields.items():
            argv += [name, value]
        k = self.k
        return _text(self._call(self._snapshot, keys=[k["snap"], k["prev"], k["log"], k["trimmed"], k["meta"]], args=argv))


class LeaseHeld(FleetError):
    """Another flusher's lease holds the host id (``seconds``: how long it still lives unless renewed)."""

    def __init__(self, message: str, seconds: float) -> None:
        super().__init__(message)
        self.seconds = seconds


def _u64(value: Any) -> int:
    number = int(value)
    if not 0 <= number < 1 << 64:
        raise ValueError(f"expected an unsigned 64-bit integer, got {number}")
    return number


def _u64_or_zero(value: Any) -> int:
    try:
        return _u64(value) if value is not None else 0
    except (TypeError, ValueError):
        return 0


def _id_or_zero(value: Any) -> StreamId:
    try:
        return parse_id(value) if value else (0, 0)
    except (TypeError, ValueError, UnicodeDecodeError):
        return (0, 0)


def config_json(config: Any, routes: Any) -> str:
    """What every host of a fleet must share, as canonical JSON (the route table as a digest of its bytes)."""
    import hashlib

    digest = None
    if routes is not None:
        h = hashlib.sha256(routes.vectors.tobytes())
        h.update(json.dumps(list(routes.names)).encode())
        digest = h.hexdigest()
    return json.dumps(
        {
            "hidden_dim": config.hidden_dim,
            "rank": config.rank,
            "rule": config.rule,
            "lr": config.lr,
            "flush_threshold": config.flush_threshold,
            "temperature": config.temperature,
            "routes": digest,
        },
        sort_keys=True,
    )


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _entries(rows: Sequence[Any]) -> list[StreamEntry]:
    """Stream rows as entries; anything sona_shm did not write (missing fields, numbers out of range) is handed on
    without a host, so every replica counts it as bad and moves past it alike."""
    out = []
    for raw_id, fields in rows:
        entry_id = parse_id(raw_id)
        try:
            host = fields[b"h"].decode("utf-8")
            if not host:
                raise ValueError("no host")
            if b"r" in fields:  # a host registered (1) or removed (0)
                kind = "hello" if fields[b"r"] == b"1" else "bye" if fields[b"r"] == b"0" else ""
                if not kind:
                    raise ValueError("r is neither 0 nor 1")
                out.append(StreamEntry(id=entry_id, host=host, seq=0, prev=0, windows=b"", last=0, kind=kind))
                continue
            if b"a" in fields:  # windows a segment gave up (its host id was taken over): counted lost
                count, signals = _u64(fields[b"a"]), _u64(fields[b"c"])
                out.append(StreamEntry(id=entry_id, host=host, seq=count, prev=0, windows=b"", last=0, kind="given", cum=signals))
                continue
            seq, last, prev = _u64(fields[b"s"]), _u64(fields[b"e"]), _u64(fields[b"p"])
            token = fields.get(b"t", b"").decode("ascii")
            if b"c" in fields:  # a gap: seqs prev+1..last are lost
                if seq != last + 1 or fields[b"w"]:
                    raise ValueError("not a gap")
                out.append(
                    StreamEntry(id=entry_id, host=host, seq=seq, prev=prev, windows=b"", last=last, kind="gap", cum=_u64(fields[b"c"]))
                )
                continue
            out.append(StreamEntry(id=entry_id, host=host, seq=seq, prev=prev, windows=fields[b"w"], last=last, token=token))
        except (KeyError, ValueError, TypeError, AttributeError, UnicodeDecodeError):
            out.append(StreamEntry(id=entry_id, host="", seq=0, prev=0, windows=b"", last=0))
    return out


__all__ = [
    "EVICTING",
    "VOLATILE",
    "LeaseHeld",
    "NeedsHealing",
    "Published",
    "Target",
    "locate",
    "parse_sentinels",
    "safe_url",
    "ENTRY_BYTES",
    "ENTRY_WINDOWS",
    "LEASE_TTL",
    "FleetError",
    "FleetLog",
    "Joined",
    "LinkDown",
    "ReadResult",
    "config_json",
    "connect",
    "import_redis",
    "keys",
]
