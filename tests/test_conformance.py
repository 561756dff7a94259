"""The conformance kit against every backend that runs without a server, and a user-written one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cognitia.session.backends import InMemorySessionBackend, SqliteSessionBackend
from cognitia.testing import ConformanceRule, conformance_rules

pytestmark = pytest.mark.anyio


class DictBackend:
    """A backend as a user writes it from the protocol alone (the seed's custom-backend shape)."""

    def __init__(self, storage: dict[str, str]) -> None:
        self._data = storage

    async def save(self, key: str, state: dict[str, Any]) -> None:
        self._data[key] = json.dumps(state)

    async def load(self, key: str) -> dict[str, Any] | None:
        data = self._data.get(key)
        return json.loads(data) if data else None

    async def delete(self, key: str) -> bool:
        return self._data.pop(key, None) is not None

    async def list_keys(self) -> list[str]:
        return list(self._data)


RULES = conformance_rules()


@pytest.mark.parametrize("rule", RULES, ids=str)
async def test_in_memory_backend(rule: ConformanceRule) -> None:
    ran = await rule.check(InMemorySessionBackend)
    assert ran or rule.persistent_only


@pytest.mark.parametrize("rule", RULES, ids=str)
async def test_sqlite_backend(rule: ConformanceRule, tmp_path: Path) -> None:
    assert await rule.check(lambda: SqliteSessionBackend(db_path=tmp_path / "sessions.db"))


@pytest.mark.parametrize("rule", RULES, ids=str)
async def test_user_written_backend(rule: ConformanceRule) -> None:
    storage: dict[str, str] = {}
    ran = await rule.check(lambda: DictBackend(storage))
    assert ran == (not rule.requires)


def test_every_rule_has_a_one_line_docstring() -> None:
    for rule in RULES:
        assert rule.doc and "\n" not in rule.doc, rule.name
