"""The ``cognitia`` command, run in-process through ``main()`` and once as ``python -m cognitia``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

from cognitia import StorageError
from cognitia.cli import main
from cognitia.session.backends import SqliteSessionBackend


def seed(db: Path, sessions: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]], **options: Any) -> None:
    """Store ``{key: (state, turns)}`` in ``db`` with the real backend (on trio, to vary the runtime)."""

    async def write() -> None:
        async with SqliteSessionBackend(db_path=db, **options) as backend:
            for key, (state, turns) in sessions.items():
                await backend.commit(key, state, turns=turns)

    anyio.run(write, backend="trio")


def stored(db: Path, key: str) -> tuple[dict[str, Any] | None, int | None, list[dict[str, Any]]]:
    async def read() -> tuple[dict[str, Any] | None, int | None, list[dict[str, Any]]]:
        async with SqliteSessionBackend(db_path=db) as backend:
            record = await backend.load_record(key)
            turns = await backend.load_turns(key)
        return (None, None, turns) if record is None else (record.state, record.version, turns)

    return anyio.run(read)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "sessions.db"
    seed(
        path,
        {
            "agent:user:42": (
                {"role": "coach", "turn": 7, "note": "héllo"},
                [{"q": "hi", "a": "hello"}, {"q": "2", "a": "b"}],
            ),
            "agent:user:43": ({"role": "tutor"}, []),
            "global:settings": ({"lang": "en"}, []),
        },
    )
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ls_prints_a_table_of_every_session(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--db", str(db), "ls")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["KEY", "VERSION", "TURNS", "UPDATED_AT", "BYTES"]
    rows = [line.split() for line in lines[1:]]
    assert [row[0] for row in rows] == ["agent:user:42", "agent:user:43", "global:settings"]
    assert rows[0][1:3] == ["1", "2"]
    assert rows[0][4] == str(
        len(
            json.dumps(
                {"role": "coach", "turn": 7, "note": "héllo"}, ensure_ascii=False, separators=(",", ":")
            ).encode()
        )
    )
    assert rows[0][3].endswith("Z") and rows[0][3].startswith(time.strftime("%Y", time.gmtime()))


def test_ls_filters_by_prefix_and_scope_and_prints_json_lines(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "--db", str(db), "ls", "--scope", "agent", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["key"] for r in rows] == ["agent:user:42", "agent:user:43"]
    assert rows[0]["turns"] == 2 and rows[0]["version"] == 1
    _, out, _ = run(capsys, "--db", str(db), "ls", "global:", "--json")
    assert [json.loads(line)["key"] for line in out.splitlines()] == ["global:settings"]
    _, out, _ = run(capsys, "--db", str(db), "ls", "--scope", "agent", "user:43", "--json")
    assert [json.loads(line)["key"] for line in out.splitlines()] == ["agent:user:43"]
    _, out, _ = run(capsys, "--db", str(db), "ls", "nothing:")
    assert out.splitlines() == ["KEY  VERSION  TURNS  UPDATED_AT  BYTES"]


def test_show_prints_the_state_as_pretty_json(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--db", str(db), "show", "agent:user:42")
    assert code == 0
    assert json.loads(out) == {"role": "coach", "turn": 7, "note": "héllo"}
    assert out.startswith("{\n  ") and "héllo" in out


def test_a_missing_key_exits_1_with_a_message_on_stderr(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("show", "turns", "rm"):
        code, out, err = run(capsys, "--db", str(db), command, "agent:nobody")
        assert (code, out) == (1, ""), command
        assert err == "cognitia: no session under key 'agent:nobody'\n"


def test_turns_prints_json_lines_and_the_tail(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--db", str(db), "turns", "agent:user:42")
    assert code == 0
    assert [json.loads(line) for line in out.splitlines()] == [
        {"q": "hi", "a": "hello"},
        {"q": "2", "a": "b"},
    ]
    _, out, _ = run(capsys, "--db", str(db), "turns", "agent:user:42", "--last", "1")
    assert [json.loads(line) for line in out.splitlines()] == [{"q": "2", "a": "b"}]
    code, out, _ = run(capsys, "--db", str(db), "turns", "agent:user:43")
    assert (code, out) == (0, "")


def test_rm_deletes_the_session_and_its_turns(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--db", str(db), "rm", "agent:user:42")[0] == 0
    assert stored(db, "agent:user:42") == (None, None, [])
    assert run(capsys, "--db", str(db), "rm", "agent:user:42")[0] == 1
    assert stored(db, "agent:user:43")[0] == {"role": "tutor"}


def test_prune_removes_only_expired_sessions_and_dry_run_removes_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "ttl.db"
    # Written with a clock 100 s in the past and a 10 s TTL: already expired now.
    seed(db, {"agent:old": ({"n": 1}, [{"t": 1}])}, ttl=10, clock=lambda: time.time() - 100)
    seed(db, {"agent:new": ({"n": 2}, [])}, ttl=3600)
    code, out, _ = run(capsys, "--db", str(db), "prune", "--dry-run")
    assert (code, out) == (0, "agent:old\n")
    assert run(capsys, "--db", str(db), "prune")[1] == "agent:old\n"
    assert run(capsys, "--db", str(db), "prune")[1] == ""
    _, out, _ = run(capsys, "--db", str(db), "ls", "--json")
    assert [json.loads(line)["key"] for line in out.splitlines()] == ["agent:new"]


def test_export_then_import_round_trips_state_and_turns(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "--db", str(db), "export", "agent:")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0] == {
        "key": "agent:user:42",
        "state": {"role": "coach", "turn": 7, "note": "héllo"},
        "version": 1,
        "turns": [{"q": "hi", "a": "hello"}, {"q": "2", "a": "b"}],
    }
    assert [line["key"] for line in lines] == ["agent:user:42", "agent:user:43"]
    dump = tmp_path / "agents.jsonl"
    dump.write_text(out, encoding="utf-8")

    copy = tmp_path / "copy.db"
    code, out, err = run(capsys, "--db", str(copy), "import", str(dump))
    assert (code, out, err) == (0, "", "imported 2 session(s)\n")
    assert stored(copy, "agent:user:42") == (lines[0]["state"], 1, lines[0]["turns"])
    assert stored(copy, "agent:user:43") == ({"role": "tutor"}, 1, [])
    assert stored(copy, "global:settings")[0] is None
    if sys.platform != "win32":
        assert os.stat(copy).st_mode & 0o777 == 0o600


def test_import_refuses_existing_sessions_unless_replace(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dump = tmp_path / "in.jsonl"
    dump.write_text(
        json.dumps({"key": "agent:fresh", "state": {"a": 1}, "version": 1, "turns": []})
        + "\n\n"
        + json.dumps(
            {"key": "agent:user:42", "state": {"replaced": True}, "version": 9, "turns": [{"only": 1}]}
        )
        + "\n",
        encoding="utf-8",
    )
    code, _, err = run(capsys, "--db", str(db), "import", str(dump))
    assert code == 1
    assert "'agent:user:42'" in err and "nothing was imported" in err and "--replace" in err
    assert stored(db, "agent:fresh")[0] is None

    assert run(capsys, "--db", str(db), "import", "--replace", str(dump))[0] == 0
    # The stored turns are replaced by the file's, not appended to.
    assert stored(db, "agent:user:42") == ({"replaced": True}, 2, [{"only": 1}])
    assert stored(db, "agent:fresh") == ({"a": 1}, 1, [])


def test_import_reads_stdin(
    db: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"key": "shared:team", "state": {"k": [1, 2]}}\n'))
    assert run(capsys, "--db", str(db), "import", "-")[0] == 0
    assert stored(db, "shared:team") == ({"k": [1, 2]}, 1, [])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"key": "a", "state": {}}\nnot json\n', "line 2: not JSON"),
        ('["a"]\n', "line 1: expected a JSON object"),
        ('{"key": 3, "state": {}}\n', "line 1: 'key' must be a string"),
        ('{"key": "a", "state": []}\n', "'state' of 'a' must be an object"),
        ('{"key": "a", "state": {}, "turns": [1]}\n', "'turns' of 'a' must be a list of objects"),
        ('{"key": "a", "state": {}}\n{"key": "a", "state": {}}\n', "line 2: session 'a' appears twice"),
        ('{"key": "", "state": {}}\n', "non-empty"),
        # Python's JSON reader takes NaN and Infinity; storage refuses them, so the check
        # before writing must too.
        (
            '{"key": "a", "state": {}}\n{"key": "b", "state": {"x": NaN}}\n',
            "line 2: cannot store session 'b': state[\"x\"] is nan",
        ),
        ('{"key": "a", "state": {}, "turns": [{"t": -Infinity}]}\n', 'turns[0]["t"] is -inf'),
        ('{"key": "a", "state": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "line 1: nested too deeply"),
    ],
)
def test_a_bad_import_file_imports_nothing_and_creates_no_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    dump = tmp_path / "bad.jsonl"
    dump.write_text(content, encoding="utf-8")
    target = tmp_path / "target.db"
    code, _, err = run(capsys, "--db", str(target), "import", str(dump))
    assert code == 1
    assert err.startswith("cognitia: ") and message in err
    assert not target.exists()


def test_import_of_a_missing_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "--db", str(tmp_path / "x.db"), "import", str(tmp_path / "absent.jsonl"))
    assert code == 1 and "cannot read" in err and "absent.jsonl" in err


def test_a_lone_surrogate_in_a_stored_string_is_exported_and_imported_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Pasted bytes decoded with surrogateescape: JSON carries them as \\u escapes.
    state = {"text": "pasted \udcff bytes"}
    db = tmp_path / "s.db"
    seed(db, {"agent:a": (state, [{"q": "\ud800"}]), "agent:b": ({"ok": "é"}, [])})
    code, out, _ = run(capsys, "--db", str(db), "export")
    assert code == 0 and len(out.splitlines()) == 2
    assert "é" in out  # only the value that needs it is written with ASCII escapes
    code, shown, _ = run(capsys, "--db", str(db), "show", "agent:a")
    assert code == 0 and json.loads(shown) == state
    dump = tmp_path / "dump.jsonl"
    dump.write_text(out, encoding="utf-8")
    copy = tmp_path / "copy.db"
    assert run(capsys, "--db", str(copy), "import", str(dump))[0] == 0
    assert stored(copy, "agent:a") == (state, 1, [{"q": "\ud800"}])


def test_reading_commands_never_add_tables_to_another_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "app.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE users (name TEXT)")
    code, out, err = run(capsys, "--db", str(other), "ls")
    assert (code, out, err) == (1, "", f"cognitia: {other} is not a cognitia session database\n")
    with sqlite3.connect(other) as connection:
        tables = connection.execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [("users",)]
    text = tmp_path / "notes.txt"
    text.write_text("not a database", encoding="utf-8")
    assert run(capsys, "--db", str(text), "show", "agent:a")[2] == (
        f"cognitia: {text} is not a cognitia session database\n"
    )
    assert run(capsys, "--db", str(tmp_path), "ls")[2] == (
        f"cognitia: {tmp_path} is a directory, not a database (use --db PATH)\n"
    )


def test_a_missing_database_is_reported_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "typo.db"
    code, out, err = run(capsys, "--db", str(path), "ls")
    assert (code, out) == (1, "")
    assert err == f"cognitia: no database at {path} (use --db PATH)\n"
    assert not path.exists()


def test_the_default_database_is_sessions_db_in_the_working_directory(
    db: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(db.parent)
    code, out, _ = run(capsys, "show", "global:settings")
    assert code == 0 and json.loads(out) == {"lang": "en"}


def test_cognitia_db_names_the_database_when_db_is_not_given(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COGNITIA_DB", str(db))
    assert json.loads(run(capsys, "show", "global:settings")[1]) == {"lang": "en"}
    # --db wins over the variable.
    code, _, err = run(capsys, "--db", str(tmp_path / "other.db"), "show", "global:settings")
    assert (code, err) == (1, f"cognitia: no database at {tmp_path / 'other.db'} (use --db PATH)\n")
    dump = tmp_path / "one.jsonl"
    dump.write_text('{"key": "agent:a", "state": {}}\n', encoding="utf-8")
    code, _, err = run(capsys, "--db", str(tmp_path / "nowhere" / "new.db"), "import", str(dump))
    assert (code, err) == (
        1,
        f"cognitia: no directory {tmp_path / 'nowhere'} to create the database new.db in\n",
    )
    # A stale variable is named in the error.
    monkeypatch.setenv("COGNITIA_DB", str(tmp_path / "gone.db"))
    code, _, err = run(capsys, "ls")
    assert (code, err) == (
        1,
        f"cognitia: no database at {tmp_path / 'gone.db'}, named by COGNITIA_DB (use --db PATH)\n",
    )


def test_usage_errors_exit_2(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", str(db), "turns", "agent:user:42", "--last", "-1"]) == 2
    assert "expected a number >= 0" in capsys.readouterr().err
    assert main(["--db", str(db), "--redis", "redis://x", "ls"]) == 2
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "Inspect and manage cognitia sessions" in capsys.readouterr().out


def test_reading_commands_leave_the_file_exactly_as_it_was(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An older schema in a rollback journal is read as it is: not migrated, not switched to WAL."""
    old = tmp_path / "old.db"
    with sqlite3.connect(db) as source, sqlite3.connect(old) as target:
        source.backup(target)
    with contextlib.closing(sqlite3.connect(old, isolation_level=None)) as connection:
        connection.execute("PRAGMA journal_mode = DELETE")
        connection.execute("DROP TABLE cognitia_meta")
        connection.execute("PRAGMA user_version = 1")
    before = old.read_bytes()
    for command in (
        ["ls"],
        ["show", "agent:user:42"],
        ["turns", "agent:user:42"],
        ["export"],
        ["prune", "--dry-run"],
    ):
        assert run(capsys, "--db", str(old), *command)[0] == 0, command
    assert old.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("old")) == ["old.db"]
    assert json.loads(run(capsys, "--db", str(old), "show", "agent:user:43")[1]) == {"role": "tutor"}


def test_a_read_only_backend_refuses_writes_and_missing_files(tmp_path: Path) -> None:
    async def check() -> None:
        async with SqliteSessionBackend(db_path=tmp_path / "absent.db", read_only=True) as absent:
            with pytest.raises(StorageError, match="unable to open"):
                await absent.load("agent:a")
        path = tmp_path / "s.db"
        async with SqliteSessionBackend(db_path=path) as writer:
            await writer.save("agent:a", {"n": 1})
        async with SqliteSessionBackend(db_path=path, read_only=True) as reader:
            assert await reader.load("agent:a") == {"n": 1}
            with pytest.raises(StorageError, match="readonly"):
                await reader.save("agent:a", {"n": 2})
            assert await reader.load("agent:a") == {"n": 1}

    for runtime in ("asyncio", "trio"):
        anyio.run(check, backend=runtime)
    assert not (tmp_path / "absent.db").exists()


def test_import_never_adds_tables_to_another_programs_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(other)) as connection:
        connection.execute("CREATE TABLE users (name TEXT)")
    lines = tmp_path / "one.jsonl"
    lines.write_text(json.dumps({"key": "agent:a", "state": {}}) + "\n", encoding="utf-8")
    assert run(capsys, "--db", str(other), "import", str(lines))[2] == (
        f"cognitia: {other} is not a cognitia session database\n"
    )
    with contextlib.closing(sqlite3.connect(other)) as connection:
        assert connection.execute("SELECT name FROM sqlite_master").fetchall() == [("users",)]
    empty = tmp_path / "empty.db"
    empty.touch()
    assert run(capsys, "--db", str(empty), "import", str(lines))[0] == 0  # an empty file is a new database


def test_bad_server_addresses_and_import_keys_are_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("psycopg")
    code, _, err = run(capsys, "--postgres", "not a dsn", "ls")
    assert (code, err) == (1, "cognitia: dsn is not a valid libpq connection string or postgresql:// URL\n")
    # libpq's reason, on one line (port 1 on the loopback interface refuses at once).
    code, _, err = run(
        capsys, "--postgres", "postgresql://nobody:secret@127.0.0.1:1/none?connect_timeout=5", "ls"
    )
    assert code == 1 and err.count("\n") == 1 and "secret" not in err
    assert err.startswith("cognitia: cannot read the PostgreSQL database: ") and "port 1 failed" in err
    pytest.importorskip("redis")
    code, _, err = run(capsys, "--redis", "http://localhost/0", "ls")
    assert code == 1 and err.startswith("cognitia: Redis URL must specify one of the following schemes")
    # What redis-py accepts and fails on later, or ignores: refused at once, the URL not quoted.
    code, _, err = run(capsys, "--redis", "redis://:secret@localhost:6379/0?colour=blue", "ls")
    assert code == 1 and err.startswith("cognitia: url has an option redis-py does not know:")
    assert "'colour'" in err and "secret" not in err
    code, _, err = run(capsys, "--redis", "redis://:secret@localhost:6379/abc", "ls")
    assert (code, err) == (
        1,
        "cognitia: url: the database index after the last / must be a number, got 'abc'\n",
    )
    lines = tmp_path / "bad.jsonl"
    lines.write_text(
        json.dumps({"key": "agent:a", "state": {}}) + "\n" + json.dumps({"key": " ", "state": {}}) + "\n"
    )
    code, _, err = run(capsys, "--db", str(tmp_path / "new.db"), "import", str(lines))
    assert (code, err) == (
        1,
        f"cognitia: {lines}, line 2: session key must be a non-empty, non-blank string, got ' '\n",
    )


def test_a_key_with_a_line_break_cannot_pass_for_another_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s.db"
    seed(path, {"agent:a\nagent:admin   9": ({}, [])})
    out = run(capsys, "--db", str(path), "ls")[1]
    assert out.splitlines()[1].startswith("'agent:a\\nagent:admin   9'")
    assert len(out.splitlines()) == 2


def test_python_dash_m_cognitia_runs_the_cli(db: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cognitia", "--db", str(db), "show", "agent:user:43"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert json.loads(result.stdout) == {"role": "tutor"}
    missing = subprocess.run(
        [sys.executable, "-m", "cognitia", "--db", str(db), "show", "agent:nobody"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 1
    assert missing.stderr == "cognitia: no session under key 'agent:nobody'\n"


def test_output_is_utf_8_whatever_the_locale(db: Path, tmp_path: Path) -> None:
    """An export redirected to a file on a cp1252 system (Windows) imports back: every
    command writes UTF-8, which is what import reads."""
    seed(db, {"agent:user:44": ({"note": "café 🙂"}, [{"q": "naïve ✓"}])})
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}

    def cli(*argv: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "cognitia", *argv], capture_output=True, env=env, timeout=60, check=False
        )

    exported = cli("--db", str(db), "export", "agent:user:44")
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout.decode("utf-8"))["state"] == {"note": "café 🙂"}
    shown = cli("--db", str(db), "show", "agent:user:44")
    assert json.loads(shown.stdout.decode("utf-8")) == {"note": "café 🙂"}
    backup = tmp_path / "backup.jsonl"
    backup.write_bytes(exported.stdout)
    other = tmp_path / "other.db"
    imported = cli("--db", str(other), "import", str(backup))
    assert imported.returncode == 0, imported.stderr
    assert stored(other, "agent:user:44") == ({"note": "café 🙂"}, 1, [{"q": "naïve ✓"}])

    # Standard input is read as UTF-8 too (a byte order mark first is skipped), and bytes
    # that are not UTF-8 are refused, not stored garbled.
    line = '{"key": "agent:piped", "state": {"x": "café"}}\n'.encode()
    for given in (line, b"\xef\xbb\xbf" + line):
        piped = subprocess.run(
            [sys.executable, "-m", "cognitia", "--db", str(other), "import", "--replace", "-"],
            input=given,
            capture_output=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert piped.returncode == 0, piped.stderr
        assert stored(other, "agent:piped")[0] == {"x": "café"}
    latin = subprocess.run(
        [sys.executable, "-m", "cognitia", "--db", str(other), "import", "--replace", "-"],
        input=line.replace("é".encode(), b"\xe9"),
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert latin.returncode == 1
    assert latin.stderr.decode().startswith("cognitia: standard input is not UTF-8 text:")
    assert stored(other, "agent:piped")[0] == {"x": "café"}


def test_stored_text_that_is_not_json_is_a_one_line_error_naming_the_key(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE cognitia_sessions SET state = 'not json' WHERE key = 'global:settings'")
        conn.execute("UPDATE cognitia_turns SET turn = '{bad' WHERE key = 'agent:user:42'")
    prefix = "cognitia: sqlite backend failed to load session"
    for argv, key, what in [
        (("show", "global:settings"), "global:settings", "state"),
        (("ls",), "global:settings", "state"),
        (("turns", "agent:user:42"), "agent:user:42", "turn 0"),
        (("export", "agent:"), "agent:user:42", "turn 0"),
    ]:
        code, _, err = run(capsys, "--db", str(db), *argv)
        assert code == 1 and err.count("\n") == 1, (argv, err)
        assert err.startswith(f"{prefix} {key!r}: its stored {what} is not JSON ("), (argv, err)


@pytest.mark.parametrize(
    "store",
    [
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("redis", marks=pytest.mark.redis),
    ],
)
def test_export_and_import_keep_each_sessions_deadline(
    store: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if store == "sqlite":
        where = ["--db", str(tmp_path / "ttl.db")]
    else:
        where = [
            f"--{store}",
            request.getfixturevalue("postgres_dsn" if store == "postgres" else "redis_url"),
        ]
    prefix = f"cli-ttl:{uuid.uuid4().hex}:"
    deadline = time.time() + 3600.25
    dump = tmp_path / "in.jsonl"
    dump.write_text(
        "".join(
            json.dumps(line) + "\n"
            for line in [
                {"key": prefix + "lasting", "state": {"n": 1}, "turns": [{"i": 0}]},
                {"key": prefix + "expiring", "state": {"n": 2}, "turns": [], "expires_at": deadline},
                {"key": prefix + "expired", "state": {"n": 3}, "turns": [], "expires_at": time.time() - 5},
            ]
        ),
        encoding="utf-8",
    )
    try:
        code, _, err = run(capsys, *where, "import", str(dump))
        assert (code, err) == (0, "imported 2 session(s) (1 expired before the import, skipped)\n")
        exported = {
            e["key"].removeprefix(prefix): e
            for e in map(json.loads, run(capsys, *where, "export", prefix)[1].splitlines())
        }
        assert sorted(exported) == ["expiring", "lasting"]
        assert "expires_at" not in exported["lasting"]
        assert exported["expiring"]["expires_at"] == deadline
        # Round trip: the export imports back with the same deadline.
        again = tmp_path / "again.jsonl"
        again.write_text(run(capsys, *where, "export", prefix)[1], encoding="utf-8")
        assert run(capsys, *where, "import", "--replace", str(again))[0] == 0
        line = run(capsys, *where, "export", prefix + "expiring")[1]
        assert json.loads(line)["expires_at"] == deadline
    finally:
        for name in ("lasting", "expiring", "expired"):
            run(capsys, *where, "rm", prefix + name)

    # A session the file holds as expired: no conflict with the target's copy, which
    # --replace removes, as the file says it is gone.
    gone = tmp_path / "gone.jsonl"
    gone.write_text(
        json.dumps({"key": prefix + "x", "state": {"old": True}, "expires_at": time.time() - 5}) + "\n",
        encoding="utf-8",
    )
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_text(json.dumps({"key": prefix + "x", "state": {"n": 1}}) + "\n", encoding="utf-8")
    try:
        assert run(capsys, *where, "import", str(fresh))[0] == 0
        code, _, err = run(capsys, *where, "import", str(gone))
        assert (code, err) == (0, "imported 0 session(s) (1 expired before the import, skipped)\n")
        assert json.loads(run(capsys, *where, "show", prefix + "x")[1]) == {"n": 1}
        assert run(capsys, *where, "import", "--replace", str(gone))[0] == 0
        assert run(capsys, *where, "show", prefix + "x")[0] == 1
    finally:
        run(capsys, *where, "rm", prefix + "x")

    bad = tmp_path / "bad.jsonl"
    for value in ('"tomorrow"', "true", "1e300"):
        bad.write_text(f'{{"key": "{prefix}x", "state": {{}}, "expires_at": {value}}}\n', encoding="utf-8")
        code, _, err = run(capsys, *where, "import", str(bad))
        assert code == 1 and "'expires_at' of" in err and "must be seconds since the epoch" in err


@pytest.mark.parametrize(
    "server",
    [pytest.param("postgres", marks=pytest.mark.postgres), pytest.param("redis", marks=pytest.mark.redis)],
)
def test_the_commands_work_on_a_server(
    server: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = request.getfixturevalue("postgres_dsn" if server == "postgres" else "redis_url")
    where = [f"--{server}", address]
    # A prefix of its own keeps this test's sessions apart from anything else on the server.
    prefix = f"cli-test:{uuid.uuid4().hex}:"
    sessions = [
        {
            "key": prefix + "a",
            "state": {"n": 1, "text": "héllo"},
            "version": 4,
            "turns": [{"i": 0}, {"i": 1}],
        },
        {"key": prefix + "b", "state": {}, "version": 1, "turns": []},
    ]
    dump = tmp_path / "in.jsonl"
    dump.write_text("".join(json.dumps(s) + "\n" for s in sessions), encoding="utf-8")
    try:
        assert run(capsys, *where, "import", str(dump))[0] == 0
        code, out, _ = run(capsys, *where, "ls", prefix, "--json")
        assert code == 0
        listed = [json.loads(line) for line in out.splitlines()]
        assert [(r["key"], r["turns"]) for r in listed] == [(prefix + "a", 2), (prefix + "b", 0)]
        # Imported as new sessions, not at the dump's versions: both get the store's first
        # version (1, or above every version removed from this shared store before).
        assert listed[0]["version"] == listed[1]["version"]
        assert json.loads(run(capsys, *where, "show", prefix + "a")[1]) == {"n": 1, "text": "héllo"}
        assert run(capsys, *where, "turns", prefix + "a", "--last", "1")[1] == '{"i":1}\n'
        exported = [json.loads(line) for line in run(capsys, *where, "export", prefix)[1].splitlines()]
        assert [(e["key"], e["state"], e["turns"]) for e in exported] == [
            (s["key"], s["state"], s["turns"]) for s in sessions
        ]
        assert run(capsys, *where, "import", str(dump))[0] == 1  # they exist now
        assert run(capsys, *where, "show", prefix + "missing")[:2] == (1, "")
    finally:
        for session in sessions:
            run(capsys, *where, "rm", str(session["key"]))
    assert run(capsys, *where, "ls", prefix, "--json")[1] == ""


@pytest.mark.parametrize(
    "server",
    [pytest.param("postgres", marks=pytest.mark.postgres), pytest.param("redis", marks=pytest.mark.redis)],
)
def test_a_store_laid_out_other_than_the_defaults_is_named_by_options(
    server: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    """A backend given another schema and table prefix (PostgreSQL) or key prefix (Redis): the
    commands reach its sessions with the same options, and without them see none of them."""
    if server == "postgres":
        from cognitia.session.backends import PostgresSessionBackend

        dsn = request.getfixturevalue("postgres_dsn")
        schema = request.getfixturevalue("postgres_schemas")()
        backend: Any = PostgresSessionBackend(dsn, schema=schema, table_prefix="app_")
        where = ["--postgres", dsn]
        layout = ["--schema", schema, "--table-prefix", "app_"]
    else:
        from cognitia.session.backends import RedisSessionBackend

        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        backend = RedisSessionBackend(url, key_prefix=prefix)
        where = ["--redis", url]
        layout = ["--key-prefix", prefix]

    async def store() -> None:
        async with backend:
            await backend.commit("agent:user:1", {"n": 1}, turns=[{"q": "hi"}])

    anyio.run(store)
    code, out, _ = run(capsys, *where, *layout, "ls", "agent:user:", "--json")
    assert code == 0
    assert [(row["key"], row["turns"]) for row in map(json.loads, out.splitlines())] == [("agent:user:1", 1)]
    assert run(capsys, *where, *layout, "turns", "agent:user:1")[1] == '{"q":"hi"}\n'
    # Without the options: the default layout (which may hold other sessions) has none of them.
    assert run(capsys, *where, "show", "agent:user:1")[:2] == (1, "")
    if server == "postgres":
        code, _, err = run(capsys, *where, "--schema", schema + "_other", "ls")
        assert code == 1
        assert f"holds no cognitia sessions in schema '{schema}_other' with table prefix 'cognitia_'" in err
    assert run(capsys, *where, *layout, "rm", "agent:user:1")[0] == 0
    assert run(capsys, *where, *layout, "ls", "agent:user:", "--json")[1] == ""


def test_a_server_option_for_another_kind_of_storage_is_a_usage_error(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "--db", str(db), "--schema", "app", "ls")
    assert code == 2 and "--schema applies to --postgres only" in err
    code, _, err = run(capsys, "--postgres", "postgresql://x", "--key-prefix", "app:", "ls")
    assert code == 2 and "--key-prefix applies to --redis only" in err


def test_an_import_postgresql_cannot_hold_writes_nothing(
    postgres_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Strings jsonb cannot hold (U+0000, a lone surrogate), which a SQLite export may carry,
    are found before the first session is written."""
    prefix = f"cli-test:{uuid.uuid4().hex}:"
    for bad in ({"text": "nul \x00 here"}, {"text": "pasted \udcff bytes"}):
        dump = tmp_path / "in.jsonl"
        lines = [{"key": prefix + "a", "state": {"ok": True}}, {"key": prefix + "b", "state": bad}]
        dump.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
        code, _, err = run(capsys, "--postgres", postgres_dsn, "import", str(dump))
        assert code == 1
        assert "line 2: cannot store session" in err and 'state["text"]' in err and "jsonb" in err
        assert run(capsys, "--postgres", postgres_dsn, "ls", prefix, "--json")[1] == ""
