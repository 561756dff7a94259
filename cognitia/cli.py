"""The ``cognitia`` command: look at, export, import and clean up stored sessions.

It works on a SQLite file (``--db``, default ``sessions.db``), or on a server when the
extra is installed (``--postgres DSN`` with ``--schema`` and ``--table-prefix``,
``--redis URL`` with ``--key-prefix``, when the backend was given other than the defaults)::

    cognitia ls agent:                  keys with version, turn count, last save, size
    cognitia show agent:user:42         the state as pretty JSON
    cognitia turns agent:user:42 --last 5
    cognitia rm agent:user:42
    cognitia prune --dry-run            sessions past the backend's TTL
    cognitia export agent: > agents.jsonl
    cognitia import agents.jsonl

Also runnable as ``python -m cognitia``. Exit status: 0 on success, 1 when the command
failed (a missing key, a storage error), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TextIO

import anyio

from ._json import check_key, dumps
from .errors import CognitiaError, SessionNotFound, VersionConflictError
from .session.backends import MemoryScope
from .session.backends._base import MAX_TTL, BackendBase

__all__ = ["main"]

_PROG = "cognitia"


class _CommandError(Exception):
    """A failure to report on stderr with exit status 1 (no traceback: it is not a bug)."""


@dataclass(frozen=True, slots=True)
class _Exported:
    """One line of an export file."""

    key: str
    state: dict[str, Any]
    version: int
    turns: list[dict[str, Any]]
    expires_at: float | None
    """When the session expires (seconds since the epoch), if it has a deadline."""
    where: str
    """The file and line it was read from."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    >>> main(["--db", "sessions.db", "ls", "agent:"])  # doctest: +SKIP
    0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        _check_options(parser, args)
    except SystemExit as exc:  # a usage error (2), or --help (0): argparse has printed why
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.command == "import":
            # Read and check the whole file before touching storage: a bad line imports nothing.
            args.sessions = _read_import_file(args.file)
        backend = _open_backend(args)
        anyio.run(_run, backend, args)
    except (_CommandError, CognitiaError) as exc:
        # One line: a driver's message may span several (libpq's hints do).
        print(f"{_PROG}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `cognitia export | head` closed the pipe early; that is not an error of ours.
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        return 130
    return 0


# -- arguments ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Inspect and manage cognitia sessions stored in SQLite, PostgreSQL or Redis.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--db",
        metavar="PATH",
        default=None,
        help="SQLite database file (default: $COGNITIA_DB, else sessions.db)",
    )
    where.add_argument("--postgres", metavar="DSN", help="PostgreSQL connection string (extra [postgres])")
    where.add_argument(
        "--redis", metavar="URL", help="Redis URL, e.g. redis://localhost:6379/0 (extra [redis])"
    )
    parser.add_argument(
        "--schema", metavar="NAME", help="with --postgres: the schema holding the tables (default: public)"
    )
    parser.add_argument(
        "--table-prefix",
        metavar="PREFIX",
        help="with --postgres: the tables' name prefix (default: cognitia_)",
    )
    parser.add_argument(
        "--key-prefix", metavar="PREFIX", help="with --redis: the prefix of every key (default: cognitia:)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = commands.add_parser("ls", help="list sessions with version, turn count, last save and size")
    ls.add_argument("prefix", nargs="?", default="", help="only keys starting with PREFIX")
    ls.add_argument(
        "--scope",
        choices=[scope.value for scope in MemoryScope],
        help="only keys of one MemoryScope, PREFIX then read within it (agent + user: lists agent:user:...)",
    )
    ls.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")

    show = commands.add_parser("show", help="print a session's state as pretty JSON")
    show.add_argument("key")

    turns = commands.add_parser("turns", help="print a session's turns, one JSON object per line")
    turns.add_argument("key")
    turns.add_argument("--last", type=_non_negative, metavar="N", help="only the newest N turns")

    rm = commands.add_parser("rm", help="delete a session and its turns")
    rm.add_argument("key")

    prune = commands.add_parser("prune", help="delete sessions past their TTL and print their keys")
    prune.add_argument("--dry-run", action="store_true", help="only print what would be deleted")

    export = commands.add_parser("export", help="write sessions as JSON lines to stdout")
    export.add_argument("prefix", nargs="?", default="", help="only keys starting with PREFIX")

    import_ = commands.add_parser("import", help="read sessions from a JSON lines file written by export")
    import_.add_argument("file", help="the file to read, or - for stdin")
    import_.add_argument(
        "--replace",
        action="store_true",
        help="overwrite sessions that already exist (default: refuse, and import nothing)",
    )
    return parser


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a server option given for another kind of storage (a usage error, exit 2)."""
    for option, value, needs in (
        ("--schema", args.schema, "postgres"),
        ("--table-prefix", args.table_prefix, "postgres"),
        ("--key-prefix", args.key_prefix, "redis"),
    ):
        if value is not None and getattr(args, needs) is None:
            parser.error(f"{option} applies to --{needs} only")


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


_READING = frozenset({"ls", "show", "turns", "export"})
"""Commands that only read: they open storage so that nothing can be written."""


def _open_backend(args: argparse.Namespace) -> BackendBase:
    try:
        if args.postgres is not None:
            from .session.backends import PostgresSessionBackend

            layout = {"schema": args.schema, "table_prefix": args.table_prefix}
            postgres = PostgresSessionBackend(
                args.postgres, **{name: value for name, value in layout.items() if value is not None}
            )
            if args.command != "import":
                try:
                    found = postgres._tables_exist()
                except Exception as exc:
                    # libpq's messages name the host, port, database and user, never the password.
                    raise _CommandError(f"cannot read the PostgreSQL database: {exc}") from None
                if not found:
                    raise _CommandError(
                        f"the PostgreSQL database holds no cognitia sessions in schema {postgres.schema!r} "
                        f"with table prefix {postgres.table_prefix!r} (see --schema, --table-prefix)"
                    )
            return postgres
        if args.redis is not None:
            from .session.backends import RedisSessionBackend

            redis: BackendBase = (
                RedisSessionBackend(args.redis)
                if args.key_prefix is None
                else RedisSessionBackend(args.redis, key_prefix=args.key_prefix)
            )
            return redis
    except ValueError as exc:  # a malformed DSN or URL
        raise _CommandError(str(exc)) from None
    from .session.backends import SqliteSessionBackend

    path = Path(args.db or os.environ.get("COGNITIA_DB") or "sessions.db")
    # No command leaves an empty database behind after a typo in the path, nor adds
    # cognitia's tables to some other program's database; import may create a new file.
    if args.command == "import" and (not path.exists() or (path.is_file() and path.stat().st_size == 0)):
        if not path.parent.is_dir():
            raise _CommandError(f"no directory {path.parent} to create the database {path.name} in")
        return SqliteSessionBackend(db_path=path)
    if not path.exists():
        named = "" if args.db or not os.environ.get("COGNITIA_DB") else ", named by COGNITIA_DB"
        raise _CommandError(f"no database at {path}{named} (use --db PATH)")
    if path.is_dir():
        raise _CommandError(f"{path} is a directory, not a database (use --db PATH)")
    if not _holds_sessions(path):
        raise _CommandError(f"{path} is not a cognitia session database")
    reading = args.command in _READING or (args.command == "prune" and args.dry_run)
    return SqliteSessionBackend(db_path=path, read_only=reading)


def _holds_sessions(path: Path) -> bool:
    """Whether the SQLite file at ``path`` has cognitia's tables (read only, nothing created)."""
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            found = db.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?", ("cognitia_sessions",)
            ).fetchone()
    except sqlite3.OperationalError as exc:
        hint = ""
        if "readonly" in str(exc) and not os.access(path.parent, os.W_OK):
            # Reading a WAL database takes its shared-memory file beside it, made on first use.
            hint = (
                f" (SQLite must create {path.name}-shm in {path.parent} to read it, and cannot write there)"
            )
        raise _CommandError(f"cannot read {path}: {exc}{hint}") from None
    except sqlite3.DatabaseError:  # not an SQLite database at all
        return False
    return bool(found[0])


# -- commands -----------------------------------------------------------------------------------


async def _run(backend: BackendBase, args: argparse.Namespace) -> None:
    async with backend:
        with _utf8(sys.stdout) as out:
            await _COMMANDS[args.command](backend, args, out)


@contextlib.contextmanager
def _utf8(stream: TextIO) -> Iterator[TextIO]:
    """``stream`` writing UTF-8 whatever the locale says, as ``import`` reads it.

    Standard output redirected to a file takes the locale's encoding (cp1252 on Windows),
    which would make an export unreadable to ``import`` or fail on the first emoji.
    """
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    buffer = getattr(stream, "buffer", None)
    if encoding == "utf8" or buffer is None:
        yield stream
        return
    stream.flush()
    wrapper = io.TextIOWrapper(buffer, encoding="utf-8", write_through=True)
    try:
        yield wrapper
    finally:
        try:
            wrapper.flush()
        finally:
            wrapper.detach()  # the buffer stays standard output's


async def _ls(backend: BackendBase, args: argparse.Namespace, out: TextIO) -> None:
    prefix = MemoryScope(args.scope).prefix + args.prefix if args.scope else args.prefix
    rows: list[dict[str, Any]] = []
    for key in await backend.list_keys(prefix):
        record = await backend.load_record(key)
        if record is None:  # deleted or expired since it was listed
            continue
        rows.append(
            {
                "key": key,
                "version": record.version,
                "turns": record.turn_count,
                "updated_at": _iso(record.updated_at),
                "bytes": record.size,
            }
        )
    if args.json:
        for row in rows:
            _print_json_line(row, out)
        return
    columns = ["key", "version", "turns", "updated_at", "bytes"]
    table = [[name.upper() for name in columns]] + [
        [_shown(row["key"])] + [str(row[name]) for name in columns[1:]] for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        # The key is left-aligned, the rest right-aligned so numbers compare at a glance.
        cells = [line[0].ljust(widths[0])] + [line[i].rjust(widths[i]) for i in range(1, len(columns))]
        print("  ".join(cells).rstrip(), file=out)


async def _show(backend: BackendBase, args: argparse.Namespace, out: TextIO) -> None:
    record = await backend.load_record(check_key(args.key))
    if record is None:
        raise SessionNotFound(args.key)
    print(_text(record.state, indent=2), file=out)


async def _turns(backend: BackendBase, args: argparse.Namespace, out: TextIO) -> None:
    key = check_key(args.key)
    # A session with an empty turn log is not an error; a session that does not exist is.
    if await backend.load_record(key) is None:
        raise SessionNotFound(key)
    for turn in await backend.load_turns(key, last=args.last):
        _print_json_line(turn, out)


async def _rm(backend: BackendBase, args: argparse.Namespace, out: TextIO) -> None:
    if not await backend.delete(check_key(args.key)):
        raise SessionNotFound(args.key)


async def _prune(backend: BackendBase, args: argparse.Namespace, out: TextIO) -> None:
    for key in await backend.prune(dry_run=args.dry_run):
        print(_shown(key), file=out)


async def _export(backend: BackendBase, args: argparse.Namespace, out: TextIO) -> None:
    for key in await backend.list_keys(args.prefix):
        record = await backend.load_record(key)
        if record is None:
            continue
        turns = await backend.load_turns(key)
        line = {"key": key, "state": record.state, "version": record.version, "turns": turns}
        if record.expires_at is not None:
            line["expires_at"] = record.expires_at
        _print_json_line(line, out)


async def _import(backend: BackendBase, args: argparse.Namespace, out: TextIO) -> None:
    sessions: list[_Exported] = args.sessions
    # What this engine cannot hold (PostgreSQL: U+0000, lone surrogates) is refused before
    # the first session is written, as a malformed line is.
    for session in sessions:
        try:
            backend.check_storable(
                session.key,
                dumps(session.key, session.state),
                [dumps(session.key, turn, root=f"turns[{i}]") for i, turn in enumerate(session.turns)],
            )
        except CognitiaError as exc:
            raise _CommandError(f"{session.where}: {exc}") from None
    # A session past its deadline is gone already (absent to every read): it is not
    # written, and with --replace the target's copy of it goes too, as the file says.
    now = time.time()
    expired = [s for s in sessions if s.expires_at is not None and s.expires_at <= now]
    lasting = [s for s in sessions if not (s.expires_at is not None and s.expires_at <= now)]
    if not args.replace:
        existing = [s.key for s in lasting if await backend.load_record(s.key) is not None]
        if existing:
            shown = ", ".join(repr(k) for k in existing[:5]) + (" ..." if len(existing) > 5 else "")
            raise _CommandError(
                f"{len(existing)} session(s) already exist: {shown}; nothing was imported (use --replace)"
            )
    for session in lasting:
        try:
            # Its own deadline, if it had one: an export keeps a session's time to live.
            await backend._restore(
                session.key,
                session.state,
                session.turns,
                expected_version=None if args.replace else 0,
                expires_at=session.expires_at,
            )
        except VersionConflictError:
            raise _CommandError(
                f"session {session.key!r} was created by another writer during the import (use --replace)"
            ) from None
    if args.replace:
        for session in expired:
            await backend.delete(session.key)
    skipped = f" ({len(expired)} expired before the import, skipped)" if expired else ""
    print(f"imported {len(lasting)} session(s){skipped}", file=sys.stderr)


def _read_import_file(file: str) -> list[_Exported]:
    # UTF-8 whatever the locale's encoding, as export writes it (a byte order mark, which
    # some Windows tools put first, is skipped).
    try:
        if file == "-":
            stdin = getattr(sys.stdin, "buffer", None)  # bytes, unless stdin was replaced by text
            text = sys.stdin.read() if stdin is None else stdin.read().decode("utf-8-sig")
            return list(_read_export(io.StringIO(text), "<stdin>"))
        with open(file, encoding="utf-8-sig") as handle:
            return list(_read_export(handle, file))
    except OSError as exc:
        raise _CommandError(f"cannot read {file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise _CommandError(f"{'standard input' if file == '-' else file} is not UTF-8 text: {exc}") from None


def _read_export(lines: IO[str], name: str) -> Iterator[_Exported]:
    seen: set[str] = set()
    latest = time.time() + MAX_TTL  # the furthest deadline every engine stores
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name}, line {number}"
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise _CommandError(f"{where}: not JSON ({exc})") from None
        except RecursionError:
            raise _CommandError(f"{where}: nested too deeply to read") from None
        if not isinstance(item, dict):
            raise _CommandError(f"{where}: expected a JSON object, got {type(item).__name__}")
        key, state = item.get("key"), item.get("state")
        version, turns = item.get("version", 0), item.get("turns", [])
        if not isinstance(key, str):
            raise _CommandError(f"{where}: 'key' must be a string")
        try:
            check_key(key)
        except CognitiaError as exc:
            raise _CommandError(f"{where}: {exc}") from None
        if not isinstance(state, dict):
            raise _CommandError(f"{where}: 'state' of {key!r} must be an object")
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise _CommandError(f"{where}: 'turns' of {key!r} must be a list of objects")
        if type(version) is not int:
            raise _CommandError(f"{where}: 'version' of {key!r} must be an integer")
        expires_at = item.get("expires_at")
        if expires_at is not None and (
            type(expires_at) not in (int, float) or not math.isfinite(expires_at) or expires_at > latest
        ):
            raise _CommandError(
                f"{where}: 'expires_at' of {key!r} must be seconds since the epoch, or absent"
            )
        if key in seen:
            raise _CommandError(f"{where}: session {key!r} appears twice")
        # Storage encodes what it is given: whatever it would refuse (NaN, Infinity, nesting
        # too deep) is refused here, before anything is written.
        try:
            dumps(key, state)
            for i, turn in enumerate(turns):
                dumps(key, turn, root=f"turns[{i}]")
        except CognitiaError as exc:
            raise _CommandError(f"{where}: {exc}") from None
        seen.add(key)
        yield _Exported(key, state, version, turns, None if expires_at is None else float(expires_at), where)


_COMMANDS: dict[str, Callable[[BackendBase, argparse.Namespace, TextIO], Awaitable[None]]] = {
    "ls": _ls,
    "show": _show,
    "turns": _turns,
    "rm": _rm,
    "prune": _prune,
    "export": _export,
    "import": _import,
}


# -- output -------------------------------------------------------------------------------------


def _iso(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _shown(key: str) -> str:
    """A key as one line of text: one holding a line break or another control character is
    shown as a Python string literal, so that it can never pass for another row."""
    return key if key.isprintable() else repr(key)


def _print_json_line(value: Any, out: TextIO) -> None:
    print(_text(value, separators=(",", ":")), file=out)


def _text(value: Any, **options: Any) -> str:
    """``value`` as JSON text, readable UTF-8 where it can be.

    A stored string may hold a lone surrogate (JSON's ``\\u`` escape carries it), which no
    UTF-8 output can; such a value is written with ASCII escapes, which read back the same.
    """
    text = json.dumps(value, ensure_ascii=False, **options)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, ensure_ascii=True, **options)
    return text


def _silence_stdout() -> None:
    # Python flushes stdout at exit and would report the broken pipe a second time.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
