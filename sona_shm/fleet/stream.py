"""The fleet's log in Redis: key names, the Lua scripts that keep it exactly-once, and the calls a flusher makes.

One fleet key ``K`` owns these keys (all with the hash tag ``{K}``, so a Redis Cluster
would keep them in one slot; sona_shm talks to one primary)::

    sona:{K}:meta      hash   config (JSON: what every host must share), epoch, created_at, protocol
    sona:{K}:log       stream entries of consecutive sealed windows of one host: h (host id), s (the first
                       window's seq), e (the last's), p (prev), w (the windows' bytes, back to back)
    sona:{K}:seqs      hash   host key (16 hex digits) -> the last seq of that host in the stream
    sona:{K}:hosts     hash   host id -> the token of the segment registered under it
    sona:{K}:lease:ID  string the token of the live flusher of host ID, with a TTL it renews
    sona:{K}:snap      hash   the newest snapshot (replica.Snapshot.to_fields), :snap:prev the one before
    sona:{K}:trimmed   string stream entries below this id were removed (XTRIM MINID)

The scripts run atomically in Redis, so a failover keeps or loses each one whole:

- ``join``: creates the fleet if ``meta`` is missing (config, a fresh epoch, and the
  joining host's state as the first snapshot); else refuses a host whose config differs,
  and a fleet made by a sona_shm of another stream format (``PROTOCOL``).
  Refuses a host id whose lease another token holds (a live flusher) or that another
  segment registered (``taken``; a new segment may take a free one over), and a host
  beyond ``MAX_FLEET_HOSTS``. Takes the lease.
- ``publish``: appends a host's windows only past the last seq the host has in the
  stream, each entry carrying consecutive windows ``s..e`` (the caller groups them: at
  most ``ENTRY_WINDOWS`` and ``ENTRY_BYTES``, unless one window is larger; the script
  cuts off a group's windows the stream has already), with ``p`` = the last seq before it
  (so a gap is visible to every reader), and only while the caller holds the host's
  lease (a fenced zombie appends nothing). Repeating a publish whose answer was lost
  appends nothing. Many windows to an entry cut the work of Redis and of every reader
  per window; grouping them in Python, not in Lua, matters because Redis's Lua hashes
  every byte of every string it makes (``step = 1`` in Redis's ``deps/lua/src/lstring.c``).
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import FleetError, InternalSignal
from .replica import StreamEntry, StreamId, format_id, parse_id

#: The stream's format (checked at join): 2 since an entry carries a run of windows (``e``); 1 carried one.
PROTOCOL = "2"

#: The most windows, and bytes of windows, one stream entry carries (a larger window goes alone).
ENTRY_WINDOWS = 32
ENTRY_BYTES = 64 * 1024

#: Seconds a host's lease lives without renewal (the fleet thread renews it every third of that).
LEASE_TTL = 10.0

_JOIN = """
local meta, seqs, hosts, lease, snap, prev, log, trimmed = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local config, new_epoch, host, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ttl, max_hosts, takeover, now, protocol, hkey = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local created = 0
if redis.call('EXISTS', meta) == 0 then
  -- a new fleet, or one Redis lost whole: this host's state is its first snapshot
  redis.call('DEL', seqs, hosts, snap, prev, log, trimmed)
  redis.call('HSET', meta, 'config', config, 'epoch', new_epoch, 'created_at', now, 'protocol', protocol)
  for i = 11, #ARGV, 2 do redis.call('HSET', snap, ARGV[i], ARGV[i + 1]) end
  local state = cjson.decode(redis.call('HGET', snap, 'state'))
  for key, row in pairs(state['table']) do redis.call('HSET', seqs, key, string.format('%.0f', row[1])) end
  created = 1
else
  local stored_protocol = redis.call('HGET', meta, 'protocol')
  if stored_protocol ~= protocol then return {'protocol', stored_protocol or ''} end
  local stored = redis.call('HGET', meta, 'config')
  if stored ~= config then return {'config', stored or ''} end
end
local holder = redis.call('GET', lease)
if holder and holder ~= token then return {'busy', tostring(redis.call('PTTL', lease))} end
local registered = redis.call('HGET', hosts, host)
if not registered then
  if redis.call('HLEN', hosts) >= max_hosts then return {'full', tostring(redis.call('HLEN', hosts))} end
  redis.call('HSET', hosts, host, token)
elseif registered ~= token then
  if takeover ~= '1' then return {'taken', ''} end
  redis.call('HSET', hosts, host, token)
end
redis.call('SET', lease, token, 'PX', ttl)
return {'ok', redis.call('HGET', meta, 'epoch'), redis.call('HGET', seqs, hkey) or '0', tostring(created)}
"""

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

_PUBLISH = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return {'fenced', '0', '0'} end
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[3]) or '0')
local appended, entries = 0, 0
for g = 4, #ARGV, 3 do
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
    redis.call('XADD', KEYS[1], '*', 'h', ARGV[2], 's', string.format('%.0f', first), 'e', string.format('%.0f', stop),
      'p', string.format('%.0f', last), 'w', raw)
    appended, entries, last = appended + stop - first + 1, entries + 1, stop
  end
end
redis.call('HSET', KEYS[2], ARGV[3], string.format('%.0f', last))
return {'ok', string.format('%.0f', last), tostring(appended), tostring(entries)}
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


class LinkDown(InternalSignal):
    """Redis did not answer (connection refused or lost, timeout): try again later."""


@dataclass(frozen=True)
class Joined:
    """What ``join`` answered: the fleet's epoch, the last seq the stream has of this host, whether this call created the fleet."""

    epoch: int
    last_seq: int
    created: bool


@dataclass(frozen=True)
class ReadResult:
    entries: list[StreamEntry]
    trimmed: StreamId  # entries below it were removed
    epoch: int  # the fleet's epoch now (0: no fleet: Redis lost everything)


def keys(fleet_key: str) -> dict[str, str]:
    """The Redis keys of fleet ``fleet_key`` (see the module docstring)."""
    base = f"sona:{{{fleet_key}}}:"
    return {name: base + name for name in ("meta", "log", "seqs", "hosts", "snap", "trimmed")} | {"prev": base + "snap:prev"}


def import_redis() -> Any:
    """The ``redis`` module, or :class:`FleetError` saying how to install it."""
    try:
        import redis
    except ImportError as exc:
        raise FleetError(f"--fleet: needs redis-py: pip install 'sona-shm[fleet]' ({exc})") from None
    return redis


def connect(url: str, *, timeout: float, read_timeout: float | None = None) -> Any:
    """A redis-py client of one connection to ``url``: connect and command timeouts, no retries.

    ``url``: ``redis://[:password@]host:port[/db]`` or ``rediss://`` for TLS, as redis-py
    takes it. ``read_timeout``: the socket timeout of commands (longer for a blocking read).
    """
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
        shown = url.split("://", 1)[0] + "://" + url.rsplit("@", 1)[-1].split("://", 1)[-1]  # without credentials
        raise FleetError(f"--fleet: {shown!r} is not a Redis URL redis-py takes ({exc}); expected redis://HOST:PORT[/DB]") from None
    except redis.AuthenticationError as exc:  # before ConnectionError, its base: a wrong password is no outage
        raise FleetError(f"--fleet: Redis refused the credentials in the URL ({exc})") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:  # one connection is made at once
        raise LinkDown(f"{type(exc).__name__}: {exc}") from None


class FleetLog:
    """The calls one flusher thread makes on fleet ``fleet_key`` through ``client`` (its own connection)."""

    def __init__(self, client: Any, fleet_key: str) -> None:
        self.client = client
        self.fleet_key = fleet_key
        self.k = keys(fleet_key)
        redis = import_redis()
        self._errors = (redis.ConnectionError, redis.TimeoutError, OSError)
        self._auth_errors = (redis.AuthenticationError, redis.exceptions.AuthorizationError)
        self._response_error = redis.ResponseError
        self._join = client.register_script(_JOIN)
        self._renew = client.register_script(_RENEW)
        self._publish = client.register_script(_PUBLISH)
        self._snapshot = client.register_script(_SNAPSHOT)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._auth_errors as exc:
            raise FleetError(f"fleet {self.fleet_key!r}: Redis refused the credentials in the URL ({exc})") from None
        except self._errors as exc:
            raise LinkDown(f"{type(exc).__name__}: {exc}") from None
        except self._response_error as exc:
            text = str(exc)
            if text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
                raise FleetError(
                    f"fleet {self.fleet_key!r}: Redis refused this client ({text}): check the URL's credentials and ACLs"
                ) from None
            if text.startswith(("LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN")):
                raise LinkDown(f"Redis is not ready: {text}") from None  # restarting, or a replica after a failover
            raise

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a dead connection must not raise
            pass

    def lease_key(self, host_id: str) -> str:
        return f"sona:{{{self.fleet_key}}}:lease:{host_id}"

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
    ) -> Joined:
        """Join (or create) the fleet; :class:`FleetError` if it refuses this host."""
        k = self.k
        argv: list[Any] = [config, str(new_epoch), host_id, token, int(LEASE_TTL * 1000), max_hosts, "1" if takeover else "0", repr(now)]
        argv += [PROTOCOL, host_key]
        for name, value in snapshot.items():
            argv += [name, value]
        keys_ = [k["meta"], k["seqs"], k["hosts"], self.lease_key(host_id), k["snap"], k["prev"], k["log"], k["trimmed"]]
        answer = self._call(self._join, keys=keys_, args=argv)
        status = _text(answer[0])
        if status == "ok":
            return Joined(int(answer[1]), int(answer[2]), answer[3] in (b"1", "1", 1))
        if status == "config":
            theirs = _text(answer[1])
            try:
                ours_d, theirs_d = json.loads(config), json.loads(theirs)
                diffs = [
                    f"{k}: the fleet's is {theirs_d.get(k)!r}, this engine's {ours_d.get(k)!r}"
                    for k in ours_d
                    if ours_d.get(k) != theirs_d.get(k)
                ]
            except ValueError:
                diffs = [f"the fleet's configuration is {theirs!r}"]
            raise FleetError(
                f"fleet {self.fleet_key!r} refuses this engine ({'; '.join(diffs) or 'another configuration'}); every host of "
                "a fleet needs the same hidden_dim, rank, rule, lr, flush_threshold, temperature and route table"
            )
        if status == "protocol":
            raise FleetError(
                f"fleet {self.fleet_key!r} was made by a sona_shm whose stream format is protocol {_text(answer[1]) or '?'!r}, "
                f"this one writes and reads protocol {PROTOCOL!r}; give this engine another --fleet-key (or delete the old "
                "fleet's keys once every host runs this version)"
            )
        if status == "busy":
            raise FleetError(
                f"fleet {self.fleet_key!r}: host id {host_id!r} is held by another live flusher (its lease expires in "
                f"{max(0, int(answer[1])) / 1000:.1f} s if it is dead); give this engine its own --host-id"
            )
        if status == "taken":
            raise FleetError(
                f"fleet {self.fleet_key!r}: host id {host_id!r} was taken over by another engine since this segment used it; "
                "give this engine its own --host-id (or destroy the segment to join afresh)"
            )
        if status == "full":
            raise FleetError(f"fleet {self.fleet_key!r}: it has {_text(answer[1])} hosts, the most a fleet holds; use another --fleet-key")
        raise FleetError(f"fleet {self.fleet_key!r}: unexpected answer to join: {answer!r}")

    def renew(self, host_id: str, token: str) -> bool | None:
        """Renew (or take back, if it expired and nobody else took it) the host's lease.

        False if another engine holds it or registered the host id; None if the host id is not
        registered at all (the fleet was made again: join it anew).
        """
        answer = int(self._call(self._renew, keys=[self.lease_key(host_id), self.k["hosts"]], args=[token, int(LEASE_TTL * 1000), host_id]))
        return None if answer == 2 else answer == 1

    # ----------------------------------------------------------------- publishing

    def publish(
        self,
        *,
        host_id: str,
        host_key: str,
        token: str,
        first_seq: int,
        windows: Sequence[bytes],
        entry_windows: int = ENTRY_WINDOWS,
        entry_bytes: int = ENTRY_BYTES,
    ) -> int | None:
        """Append windows ``first_seq, first_seq + 1, ...`` of the host (those past its last); return its last seq in the stream.

        They go in entries of at most ``entry_windows`` windows and ``entry_bytes`` bytes.

        None if the caller does not hold the host's lease (fenced: nothing appended; renew it first).
        """
        args: list[Any] = [token, host_id, host_key]
        start = 0
        while start < len(windows):  # the entries, made here: a Lua string costs Redis a pass over every byte
            stop, size = start + 1, len(windows[start])
            while stop < len(windows) and stop - start < entry_windows and size + len(windows[stop]) <= entry_bytes:
                size += len(windows[stop])
                stop += 1
            group = windows[start:stop]
            args += [first_seq + start, ",".join(str(len(w)) for w in group), b"".join(group)]
            start = stop
        answer = self._call(self._publish, keys=[self.k["log"], self.k["seqs"], self.lease_key(host_id)], args=args)
        if _text(answer[0]) == "fenced":
            return None
        return int(answer[1])

    # ----------------------------------------------------------------- reading

    def read(self, cursor: StreamId, *, block_ms: int, count: int) -> ReadResult:
        """Entries after ``cursor`` (waiting up to ``block_ms`` for one), and the trim point and epoch read after them."""
        pipe = self.client.pipeline(transaction=False)
        pipe.xread({self.k["log"]: format_id(cursor)}, count=count, block=block_ms)
        pipe.get(self.k["trimmed"])
        pipe.hget(self.k["meta"], "epoch")
        streams, trimmed, epoch = self._call(pipe.execute)
        entries = _entries(streams[0][1]) if streams else []
        return ReadResult(entries, parse_id(trimmed) if trimmed else (0, 0), int(epoch) if epoch else 0)

    def range(self, after: StreamId, count: int) -> list[StreamEntry]:
        """Up to ``count`` entries after ``after`` (no wait)."""
        return _entries(self._call(self.client.xrange, self.k["log"], min=f"({format_id(after)}", count=count))

    def has_entry(self, stream_id: StreamId) -> bool:
        rows = self._call(self.client.xrange, self.k["log"], min=format_id(stream_id), max=format_id(stream_id), count=1)
        return bool(rows)

    def trimmed(self) -> StreamId:
        value = self._call(self.client.get, self.k["trimmed"])
        return parse_id(value) if value else (0, 0)

    def epoch(self) -> int:
        value = self._call(self.client.hget, self.k["meta"], "epoch")
        return int(value) if value else 0

    def meta(self) -> dict[str, str]:
        return {_text(k): _text(v) for k, v in self._call(self.client.hgetall, self.k["meta"]).items()}

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
    out = []
    for raw_id, fields in rows:
        try:
            seq, last, prev = int(fields[b"s"]), int(fields[b"e"]), int(fields[b"p"])
            if not (0 <= min(seq, last, prev) and max(seq, last, prev) < 1 << 64):
                raise ValueError("a seq the applied table (u64) cannot hold")
            out.append(
                StreamEntry(
                    id=parse_id(raw_id),
                    host=fields[b"h"].decode("utf-8", "replace"),
                    seq=seq,
                    prev=prev,
                    windows=fields[b"w"],
                    last=last,
                )
            )
        except (KeyError, ValueError, TypeError, AttributeError):
            # Not an entry sona_shm wrote: handed on without a host, so every replica counts it
            # as bad and moves past it alike.
            out.append(StreamEntry(id=parse_id(raw_id), host="", seq=0, prev=0, windows=b"", last=0))
    return out


__all__ = [
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
