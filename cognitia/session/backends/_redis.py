from __future__ import annotations

import hashlib
import itertools
import math
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..._worker import Job, ThreadWorker, astop_workers, stop_workers
from ...errors import MissingDependencyError, VersionConflictError
from ._base import BackendBase, EncodedWrite, RawRecord

try:
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import NoScriptError
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("RedisSessionBackend", "redis", "redis") from exc

__all__ = ["RedisSessionBackend"]

# Why the synchronous redis-py client in worker threads, and not an async driver:
# redis.asyncio runs on asyncio only. coredis (6.x) runs on both, but its client must be
# entered with ``async with`` in a task that is a parent of every task using it, and exited
# in that same task, because each connection's reader is a task in the pool's task group.
# A backend is built at import time (``@persisted_session(RedisSessionBackend(...))``),
# used from any task and closed with a sync ``close()``, so it cannot host that task group;
# bridging coredis through a private event-loop thread measured about 2x slower than
# calling it directly. Threads that own blocking connections (as for SQLite and PostgreSQL)
# run the same on both runtimes, and the commands that queue up while a thread is busy go
# to Redis as one pipeline, one round trip for all of them.

# Every script touches only keys derived from the key prefix it is given, and each runs
# atomically on the server: no other client sees a half-applied commit.
#
# Versions never name two lives of a key. KEYS "removed" holds the highest version of any
# session a script deleted or pruned, and a session created anew starts above it. A session
# with a TTL can also vanish through Redis' own expiry, with no script running, so its
# version is kept in the hash "versions" too (field: the key) until the session is deleted
# or pruned; a new life of the key starts above that version as well.

_TOKENS = 64
"""How many of a key's latest write tokens are kept: a write resent after a lost reply (redis-py
resends a command when the connection drops) is recognised as applied while fewer than this
many other writes to the key landed in between."""
_TOKEN_MS = 60_000
"""How long the tokens of a key are kept after its last write."""

# A write carries a random token. The tokens of a key's recent writes are kept in a sorted
# set (KEYS "written": token -> version), so a write resent after a lost reply is recognised
# as applied even when other writes to the key landed in between.

_COMMIT = """
-- Commits one session, or several at once. KEYS: index, expiry, versions, removed, then per
-- session its hash, turn list and written tokens. ARGV: now, expires_at, ttl_ms, token, then
-- per session its key, state, expected version, truncate, turn count and turns. One token
-- stands for the whole commit, recorded under every session written. Replies {1, version...}
-- in the order given, or {0, actual version, i} for the first session i whose expected
-- version does not match, having written nothing.
local idx, xp, vs, rm = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, expires, ttl, nonce = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local count = (#KEYS - 4) / 3
local reply, seen = {1, false}, 0  -- tables sized for one session, the usual commit
for i = 1, count do
  local version = redis.call('ZSCORE', KEYS[3 * i + 4], nonce)
  if version then
    seen = seen + 1
    reply[i + 1] = tonumber(version)
  end
end
if seen == count then
  -- This very commit was applied and its reply lost; the client resent it.
  return reply
elseif seen > 0 then
  -- Applied, but resent after its token was dropped from some of its sessions (by later
  -- writes, or expiry): the versions it wrote are unknown, and it must not write again.
  return redis.error_reply('this commit was applied before its reply was lost, and resent too late ' ..
    'to know the versions it wrote')
end
-- Every version is checked before any session is written. found[2i - 1]: session i's stored
-- version (false if none), found[2i]: its turn count if it is alive (false if not).
local found, a = {false, false}, 5
for i = 1, count do
  local meta = redis.call('HMGET', KEYS[3 * i + 2], 'v', 'n', 'e')
  local v = tonumber(meta[1])
  local alive = v ~= nil and (not meta[3] or tonumber(meta[3]) > now)
  local expected = ARGV[a + 2]
  if expected ~= '' then
    expected = tonumber(expected)
    local actual = alive and v or -1
    if (expected == 0 and alive) or (expected > 0 and actual ~= expected) then
      return {0, actual, i}
    end
  end
  found[2 * i - 1], found[2 * i] = v or false, alive and (tonumber(meta[2]) or 0)
  a = a + 5 + tonumber(ARGV[a + 4])
end
a = 5
for i = 1, count do
  local h, l, w = KEYS[3 * i + 2], KEYS[3 * i + 3], KEYS[3 * i + 4]
  local key, last, v, n = ARGV[a], a + 4 + tonumber(ARGV[a + 4]), found[2 * i - 1], found[2 * i]
  local version
  if n then
    version = v + 1
  else
    -- A new life of the key starts above every version it had, and every version removed.
    n = 0
    redis.call('DEL', l)
    local before = tonumber(redis.call('HGET', vs, key)) or 0
    version = math.max(v or 0, before, tonumber(redis.call('GET', rm)) or 0) + 1
  end
  if ARGV[a + 3] ~= '' then
    local keep = tonumber(ARGV[a + 3])
    if keep < n then
      if keep == 0 then redis.call('DEL', l) else redis.call('LTRIM', l, 0, keep - 1) end
      n = keep
    end
  end
  local first = a + 5
  n = n + (last - first + 1)
  while first <= last do
    local upto = math.min(first + 999, last)
    redis.call('RPUSH', l, unpack(ARGV, first, upto))
    first = upto + 1
  end
  redis.call('HSET', h, 's', ARGV[a + 1], 'v', version, 'n', n, 'u', ARGV[1])
  redis.call('HDEL', h, 'c')
  redis.call('ZADD', w, version, nonce)
  redis.call('ZREMRANGEBYRANK', w, 0, -@TOKENS@ - 1)
  redis.call('PEXPIRE', w, @TOKEN_MS@)
  if ttl ~= '' then
    redis.call('HSET', h, 'e', expires)
    redis.call('PEXPIRE', h, ttl)
    redis.call('PEXPIRE', l, ttl)
    redis.call('ZADD', xp, expires, key)
    redis.call('HSET', vs, key, version)
  else
    redis.call('HDEL', h, 'e')
    redis.call('PERSIST', h)
    redis.call('PERSIST', l)
    redis.call('ZREM', xp, key)
    redis.call('HDEL', vs, key)
  end
  redis.call('ZADD', idx, 0, key)
  reply[i + 1] = version
  a = last + 1
end
return reply
"""

_TURNS = """
local meta = redis.call('HMGET', KEYS[1], 'v', 'e')
if not meta[1] or (meta[2] and tonumber(meta[2]) <= tonumber(ARGV[1])) then return {} end
if ARGV[2] == '' then return redis.call('LRANGE', KEYS[2], 0, -1) end
return redis.call('LRANGE', KEYS[2], -tonumber(ARGV[2]), -1)
"""

_LIST = """
local found = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], ARGV[2])
local now, out = tonumber(ARGV[3]), {}
for _, k in ipairs(found) do
  local e = redis.call('ZSCORE', KEYS[2], k)
  if (not e or tonumber(e) > now) and redis.call('EXISTS', ARGV[4] .. 's:' .. k) == 1 then
    out[#out + 1] = k
  end
end
return out
"""

_DELETE = """
local h, l, idx, xp, w, vs, rm = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local key, now, expected, nonce = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local seen = redis.call('ZSCORE', w, nonce)
if seen then
  -- This very delete was applied and its reply lost; the client resent it. Its token's
  -- score is the version it deleted, -1 if nothing was alive.
  if tonumber(seen) > 0 then return {1, 1} end
  return {1, 0}
end
local meta = redis.call('HMGET', h, 'v', 'e')
local v = tonumber(meta[1])
local alive = v ~= nil and (not meta[2] or tonumber(meta[2]) > now)
if expected ~= '' then
  local actual = -1
  if alive then actual = v end
  if actual ~= tonumber(expected) then return {0, actual} end
end
if alive then redis.call('ZADD', w, v, nonce) else redis.call('ZADD', w, -1, nonce) end
redis.call('ZREMRANGEBYRANK', w, 0, -@TOKENS@ - 1)
redis.call('PEXPIRE', w, @TOKEN_MS@)
local last = math.max(v or 0, tonumber(redis.call('HGET', vs, key)) or 0)
if last > (tonumber(redis.call('GET', rm)) or 0) then redis.call('SET', rm, last) end
redis.call('DEL', h, l)
redis.call('HDEL', vs, key)
redis.call('ZREM', idx, key)
redis.call('ZREM', xp, key)
if alive then return {1, 1} end
return {1, 0}
"""

_PRUNE = """
local keys = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[4]))
if ARGV[2] == '0' and #keys > 0 then
  local removed = tonumber(redis.call('GET', KEYS[4])) or 0
  for _, k in ipairs(keys) do
    local h = ARGV[3] .. 's:' .. k
    local v = tonumber(redis.call('HGET', h, 'v')) or 0
    removed = math.max(removed, v, tonumber(redis.call('HGET', KEYS[3], k)) or 0)
    redis.call('DEL', h, ARGV[3] .. 't:' .. k)
    redis.call('HDEL', KEYS[3], k)
    redis.call('ZREM', KEYS[1], k)
    redis.call('ZREM', KEYS[2], k)
  end
  redis.call('SET', KEYS[4], removed)
end
return keys
"""

_COMMIT, _DELETE = (
    script.replace("@TOKENS@", str(_TOKENS)).replace("@TOKEN_MS@", str(_TOKEN_MS))
    for script in (_COMMIT, _DELETE)
)

_SCRIPTS = {
    name: (text, hashlib.sha1(text.encode()).hexdigest())
    for name, text in [
        ("commit", _COMMIT),
        ("turns", _TURNS),
        ("list", _LIST),
        ("delete", _DELETE),
        ("prune", _PRUNE),
    ]
}

_PRUNE_BATCH = 500
"""Expired sessions deleted per script run, so one prune never stalls the server for long."""

Command = Sequence[Any]
Finish = Callable[[Any], Any]
Plan = tuple[Command, Finish]
"""One Redis command, and what turns its reply into the operation's result."""


def _lex_range(prefix: str) -> tuple[bytes, bytes]:
    """``ZRANGEBYLEX`` bounds holding exactly the members that start with ``prefix``.

    Members compare as bytes, and UTF-8 keeps code point order, so every key starting with
    the prefix's bytes lies below those bytes with the last one bumped (UTF-8 never uses
    0xFF, so the bump cannot overflow).
    """
    if not prefix:
        return b"-", b"+"
    low = prefix.encode()
    return b"[" + low, b"(" + low[:-1] + bytes([low[-1] + 1])


def _float(value: str | None) -> float | None:
    return None if value is None or value == "" else float(value)


class _Commands:
    """The backend's operations as single Redis commands, over one key prefix."""

    def __init__(self, key_prefix: str) -> None:
        self.prefix = key_prefix
        self.index = f"{key_prefix}index"
        self.expiry = f"{key_prefix}expiry"
        self.versions = f"{key_prefix}versions"
        self.removed = f"{key_prefix}removed"

    def _keys(self, key: str) -> tuple[str, str]:
        return f"{self.prefix}s:{key}", f"{self.prefix}t:{key}"

    def _written(self, key: str) -> str:
        """The sorted set of the tokens of the latest writes of ``key`` (token -> version)."""
        return f"{self.prefix}w:{key}"

    def load(self, key: str, now: float) -> Plan:
        def finish(reply: list[str | None]) -> RawRecord | None:
            state, version, turn_count, updated_at, expires_at = reply
            if state is None or version is None:
                return None
            expiry = _float(expires_at)
            if expiry is not None and expiry <= now:
                return None
            return (state, int(version), int(turn_count or 0), float(updated_at or 0.0), expiry)

        return ("HMGET", self._keys(key)[0], "s", "v", "n", "u", "e"), finish

    def commit(
        self,
        key: str,
        state: str,
        expected_version: int | None,
        turns: list[str],
        truncate: int | None,
        now: float,
        expires_at: float | None,
        ttl_ms: int | None,
        nonce: str,
    ) -> Plan:
        def finish(reply: list[int]) -> int:
            return _checked(key, expected_version, reply)

        write = (key, state, expected_version, turns, truncate)
        return self._commit_command((write,), now, expires_at, ttl_ms, nonce), finish

    def commit_many(
        self, writes: list[EncodedWrite], now: float, expires_at: float | None, ttl_ms: int | None, nonce: str
    ) -> Plan:
        def finish(reply: list[int]) -> list[int]:
            if not reply[0]:
                conflicted = writes[reply[2] - 1]
                _checked(conflicted.key, conflicted.expected_version, reply)
            return reply[1:]

        return self._commit_command(writes, now, expires_at, ttl_ms, nonce), finish

    def _commit_command(
        self,
        writes: Sequence[tuple[str, str, int | None, Sequence[str], int | None]],
        now: float,
        expires_at: float | None,
        ttl_ms: int | None,
        nonce: str,
    ) -> Command:
        """The commit script's call for ``writes``: (key, state, expected_version, turns, truncate)."""
        prefix = self.prefix
        command: list[Any] = [
            "EVALSHA",
            _SCRIPTS["commit"][1],
            4 + 3 * len(writes),
            self.index,
            self.expiry,
            self.versions,
            self.removed,
        ]
        for write in writes:  # the names _keys and _written give, inlined: every commit runs this
            key = write[0]
            command += (f"{prefix}s:{key}", f"{prefix}t:{key}", f"{prefix}w:{key}")
        command += (
            repr(now),
            "" if expires_at is None else repr(expires_at),
            "" if ttl_ms is None else ttl_ms,
            nonce,
        )
        for key, state, expected_version, turns, truncate in writes:
            command += (
                key,
                state,
                "" if expected_version is None else expected_version,
                "" if truncate is None else truncate,
                len(turns),
            )
            command += turns
        return command

    def load_turns(self, key: str, last: int | None, now: float) -> Plan:
        return (
            ("EVALSHA", _SCRIPTS["turns"][1], 2, *self._keys(key), repr(now), "" if last is None else last),
            list,
        )

    def delete(self, key: str, now: float, expected_version: int | None, nonce: str) -> Plan:
        def finish(reply: list[int]) -> bool:
            return bool(_checked(key, expected_version, reply))

        command = (
            "EVALSHA",
            _SCRIPTS["delete"][1],
            7,
            *self._keys(key),
            self.index,
            self.expiry,
            self._written(key),
            self.versions,
            self.removed,
            key,
            repr(now),
            "" if expected_version is None else expected_version,
            nonce,
        )
        return command, finish

    def list_keys(self, prefix: str, now: float) -> Plan:
        low, high = _lex_range(prefix)
        return (
            ("EVALSHA", _SCRIPTS["list"][1], 2, self.index, self.expiry, low, high, repr(now), self.prefix),
            list,
        )

    def prune(self, now: float, dry_run: bool) -> Plan:
        limit = -1 if dry_run else _PRUNE_BATCH
        return (
            (
                "EVALSHA",
                _SCRIPTS["prune"][1],
                4,
                self.index,
                self.expiry,
                self.versions,
                self.removed,
                repr(now),
                int(dry_run),
                self.prefix,
                limit,
            ),
            list,
        )


# Everything below runs in a worker thread, on the client it owns.


def _load_scripts(client: redis.Redis) -> None:
    for text, _ in _SCRIPTS.values():
        client.script_load(text)


def _execute(client: redis.Redis, plan: Callable[..., Plan], *args: Any) -> Any:
    command, finish = plan(*args)
    try:
        reply = client.execute_command(*command)  # type: ignore[no-untyped-call]
    except NoScriptError:
        # The server restarted or its script cache was flushed since we loaded them.
        _load_scripts(client)
        reply = client.execute_command(*command)  # type: ignore[no-untyped-call]
    return finish(reply)


def _run_batch(client: redis.Redis, jobs: list[Job]) -> None:
    """Send every queued operation in one pipeline: one round trip for all of them."""
    if len(jobs) == 1:
        jobs[0].run(client)
        return
    planned: list[tuple[Job, Plan]] = []
    for job in jobs:
        try:
            planned.append((job, job.args[0](*job.args[1:])))
        except BaseException as exc:
            job.error = exc
    replies = _pipeline(client, [plan[0] for _, plan in planned])
    if any(isinstance(reply, NoScriptError) for reply in replies):
        _load_scripts(client)
        again = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        for i, reply in zip(again, _pipeline(client, [planned[i][1][0] for i in again]), strict=True):
            replies[i] = reply
    for (job, (_, finish)), reply in zip(planned, replies, strict=True):
        if isinstance(reply, Exception):
            job.error = reply
            continue
        try:
            job.result = finish(reply)
        except BaseException as exc:
            job.error = exc


def _pipeline(client: redis.Redis, commands: list[Command]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command)  # type: ignore[no-untyped-call]
    return pipe.execute(raise_on_error=False)


class RedisSessionBackend(BackendBase):
    """Sessions in Redis, shared by every process and host that reaches the server.

    Each session is a hash (state, version, turn count, times) and a list (its turns). A
    commit is one Lua script that checks the version, writes the state, truncates and
    appends the turns and updates the key index, atomically on the server; so is a commit of
    several sessions, which checks every version before it writes any; a delete with
    ``expected_version`` checks the version in the script that deletes. Keys are listed
    from a sorted-set index by lexical range (never ``KEYS`` or ``SCAN``). With ``ttl``
    every save sets a server-side expiry on the session's keys; expired sessions are
    invisible at once, and :meth:`prune` also removes them from the index.

    Runs the same on asyncio and trio: redis-py's blocking client is driven by threads the
    backend owns, each with a connection from a shared pool. Operations that queue up while
    a thread is busy are sent together as one pipeline. A dropped connection is reopened and
    the command resent (commits and deletes carry a token, and the tokens of a
    key's latest writes are kept for a minute, so a resent one is applied once even if other
    writes landed in between); an unreachable server surfaces as
    :class:`~cognitia.errors.StorageError`.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` for TLS, or
            ``unix:///path/to/socket``.
        key_prefix: prepended to every Redis key the backend uses, so several applications
            (or tests) can share a database.
        ttl: seconds after the last save when a session expires (``None``: never).
        max_connections: connections to Redis, and the threads that drive them.
        timeout: seconds allowed to connect, and to wait for each reply.
        retries: resends of a command after a dropped connection or timeout.

    >>> backend = RedisSessionBackend("redis://127.0.0.1:6379/0", key_prefix="myapp:")
    """

    name = "redis"
    _driver_errors = (redis.RedisError, OSError)

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        key_prefix: str = "cognitia:",
        ttl: float | None = None,
        max_connections: int = 2,
        timeout: float = 5.0,
        retries: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(ttl=ttl, clock=clock)
        if not isinstance(key_prefix, str):
            raise TypeError(f"key_prefix must be a str, got {type(key_prefix).__name__}")
        if type(max_connections) is not int or max_connections < 1:
            raise ValueError(f"max_connections must be an int >= 1, got {max_connections!r}")
        if not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
        if type(retries) is not int or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        self.url = url
        self.key_prefix = key_prefix
        self._ttl_ms = None if ttl is None else max(1, math.ceil(ttl * 1000))
        self._commands = _Commands(key_prefix)
        self._pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # TCP keepalives notice a server that vanished; a unix socket has none.
            **({} if urlsplit(url).scheme == "unix" else {"socket_keepalive": True}),
            health_check_interval=30,
            decode_responses=True,
            client_name="cognitia",
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.01), retries),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        _check_url(url, self._pool)
        self._workers = [
            ThreadWorker(f"cognitia-redis-{i}:{self._describe()}", self._open, _close, batch=_run_batch)
            for i in range(max_connections)
        ]
        self._next = itertools.cycle(self._workers).__next__

    def _open(self) -> redis.Redis:
        return redis.Redis(connection_pool=self._pool)

    async def _call(self, plan: Callable[..., Plan], *args: Any, write: bool = False) -> Any:
        return await self._next().call(_execute, plan, *args, shield=write)

    # -- the storage engine -----------------------------------------------------------------

    async def _raw_load(self, key: str, now: float) -> RawRecord | None:
        return await self._call(self._commands.load, key, now)  # type: ignore[no-any-return]

    async def _raw_commit(
        self,
        key: str,
        state: str,
        expected_version: int | None,
        turns: list[str],
        truncate: int | None,
        now: float,
        expires_at: float | None,
    ) -> int:
        nonce = secrets.token_hex(8)
        # The key expires with the session: at the backend's ttl, or at a restored session's
        # own deadline (or never).
        ttl_ms = None if expires_at is None else max(1, math.ceil((expires_at - now) * 1000))
        return await self._call(  # type: ignore[no-any-return]
            self._commands.commit,
            key,
            state,
            expected_version,
            turns,
            truncate,
            now,
            expires_at,
            ttl_ms,
            nonce,
            write=True,
        )

    async def _raw_commit_many(
        self, writes: list[EncodedWrite], now: float, expires_at: float | None
    ) -> list[int]:
        # One script: every version is checked before any session is written, and no other
        # client runs in between. The token, recorded under each session, makes a resend
        # after a lost reply return the versions it wrote instead of writing again.
        nonce = secrets.token_hex(8)
        return await self._call(  # type: ignore[no-any-return]
            self._commands.commit_many, writes, now, expires_at, self._ttl_ms, nonce, write=True
        )

    async def _raw_load_turns(self, key: str, last: int | None, now: float) -> list[str]:
        return await self._call(self._commands.load_turns, key, last, now)  # type: ignore[no-any-return]

    async def _raw_delete(self, key: str, now: float, expected_version: int | None) -> bool:
        # Every delete carries a token: resent after a lost reply (a pipeline is resent whole),
        # it is recognised, and never deletes what was written under the key since.
        nonce = secrets.token_hex(8)
        return await self._call(  # type: ignore[no-any-return]
            self._commands.delete, key, now, expected_version, nonce, write=True
        )

    async def _raw_list_keys(self, prefix: str, now: float) -> list[str]:
        return sorted(await self._call(self._commands.list_keys, prefix, now))

    async def _raw_prune(self, now: float, dry_run: bool) -> list[str]:
        pruned: list[str] = []
        while True:
            keys: list[str] = await self._call(self._commands.prune, now, dry_run, write=True)
            pruned.extend(keys)
            if dry_run or len(keys) < _PRUNE_BATCH:
                return sorted(pruned)

    def _raw_close(self) -> None:
        stop_workers(self._workers, self._pool.disconnect)

    async def _raw_aclose(self) -> None:
        await astop_workers(self._workers, self._pool.disconnect)

    def _describe(self) -> str:
        parts = urlsplit(self.url)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            user = parts.username or ""
            parts = parts._replace(netloc=f"{user}:***@{host}")
        return f"url={urlunsplit(parts)!r} key_prefix={self.key_prefix!r}"


def _close(client: redis.Redis) -> None:
    client.close()


def _checked(key: str, expected_version: int | None, reply: list[int]) -> int:
    """The value of a versioned script's ``[ok, value]`` reply; a conflict raises.

    On a conflict ``value`` is the stored version, ``-1`` when nothing is stored.
    """
    ok, value = reply[0], reply[1]
    if not ok:
        assert expected_version is not None
        raise VersionConflictError(key, expected_version, None if value < 0 else int(value))
    return int(value)


def _check_url(url: str, pool: Any) -> None:
    """Refuse what redis-py accepts from a URL and fails on (or ignores) later: an option no
    connection takes, a database index that is not a number. The URL is not quoted: it may
    hold a password."""
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss"):
        index = parts.path.strip("/")
        if index and not index.isdigit():
            raise ValueError(f"url: the database index after the last / must be a number, got {index!r}")
    try:
        pool.connection_class(**pool.connection_kwargs)  # builds the object only: no socket yet
    except TypeError as exc:
        raise ValueError(f"url has an option redis-py does not know: {exc}") from None
