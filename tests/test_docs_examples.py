"""Every ```python block in the READMEs and docs/ runs, and the documentation site builds.

Each block runs on its own, in a fresh temporary directory as the working directory, so a
reader can paste any one of them into a file and run it. A block with a top-level
``await`` runs inside an async function, once on asyncio and once on trio.

A block opts out only with a marker comment the reader can see:

- ``# docs-test: requires postgres`` / ``requires redis``: needs the server named by
  ``COGNITIA_TEST_POSTGRES_DSN`` / ``COGNITIA_TEST_REDIS_URL`` and the extra; while it runs,
  that address is also in ``DATABASE_URL`` / ``REDIS_URL``, which is where such blocks read
  it from. Under ``COGNITIA_REQUIRE_SERVERS=1`` (CI) a missing server fails the test.
- ``# docs-test: requires openai-agents`` (or ``pydantic-ai``, ``langgraph``, ``adk``,
  ``anthropic``, or any distribution name): skipped when the framework or its cognitia
  integration is not installed.
- ``# docs-test: skip <reason>``: not run at all; the reason is mandatory.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from _servers import REQUIRE_SERVERS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)(?P<rest>.*)$")
_MARKER = re.compile(r"#\s*docs-test:\s*(?P<verb>\w+)(?P<args>.*)$", re.MULTILINE)
_PYTHON = {"python", "py", "python3"}

_SERVERS = {
    # marker: (variable naming the test server, variable the block reads, cognitia's backend class)
    "postgres": ("COGNITIA_TEST_POSTGRES_DSN", "DATABASE_URL", "PostgresSessionBackend"),
    "redis": ("COGNITIA_TEST_REDIS_URL", "REDIS_URL", "RedisSessionBackend"),
}
_FRAMEWORKS = {
    # marker: modules that must be importable (the framework, then cognitia's integration)
    "openai-agents": ("agents", "cognitia_openai_agents"),
    "pydantic-ai": ("pydantic_ai", "cognitia_pydantic_ai"),
    "langgraph": ("langgraph", "cognitia_langgraph"),
    "adk": ("google.adk", "cognitia_adk"),
    "anthropic": ("anthropic", "cognitia_anthropic"),
}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    """Line of the block's first code line in the Markdown file (1-based)."""
    source: str

    @property
    def name(self) -> str:
        where = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{where.as_posix()}:{self.line}"

    @property
    def markers(self) -> list[tuple[str, str]]:
        return [(m["verb"], m["args"].strip()) for m in _MARKER.finditer(self.source)]

    @property
    def is_async(self) -> bool:
        return bool(self.compile().co_flags & inspect.CO_COROUTINE)

    def compile(self) -> Any:
        # Padding with blank lines makes tracebacks point at the Markdown file's own lines.
        padded = "\n" * (self.line - 1) + self.source
        return compile(
            padded, str(self.path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
        )


def python_blocks(path: Path) -> list[Block]:
    """The fenced Python blocks of a Markdown file, indented ones (admonitions, tabs) included."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence, lang = opening["indent"], opening["fence"], opening["lang"].lower()
        start = i + 1
        i = start
        while i < len(lines):
            closing = _FENCE.match(lines[i])
            if (
                closing is not None
                and closing["fence"].startswith(fence[0])
                and len(closing["fence"]) >= len(fence)
                and not closing["lang"]
                and not closing["rest"].strip()
            ):
                break
            i += 1
        if lang in _PYTHON:
            body = [
                line[len(indent) :] if line.startswith(indent) else line.lstrip() for line in lines[start:i]
            ]
            blocks.append(Block(path, start + 1, "\n".join(body) + "\n"))
        i += 1
    return blocks


def documentation_files() -> list[Path]:
    """The README, every page of the site, and the READMEs of the integrations and benchmarks."""
    files = [ROOT / "README.md"] if (ROOT / "README.md").exists() else []
    readmes = sorted(ROOT.glob("integrations/*/README.md")) + sorted(ROOT.glob("benchmarks/README.md"))
    return files + sorted(DOCS.rglob("*.md")) + readmes


def _compiles(block: Block) -> bool:
    try:
        block.compile()
    except SyntaxError:
        return False  # reported by test_every_block_compiles, with the file and line
    return True


BLOCKS = [block for path in documentation_files() for block in python_blocks(path)]
CASES = [
    pytest.param(block, runtime, id=block.name + (f"-{runtime}" if runtime else ""))
    for block in BLOCKS
    for runtime in (("asyncio", "trio") if _compiles(block) and block.is_async else (None,))
]


def requirement_missing(requirement: str) -> str | None:
    """Why ``requirement`` (a marker argument) is not met here, or ``None`` if it is."""
    if requirement in _SERVERS:
        variable, _, backend_class = _SERVERS[requirement]
        if not os.environ.get(variable, "").strip():
            return f"needs a {requirement} server: set {variable}"
        try:
            # Whatever driver the backend uses: importing it says whether the extra is here.
            getattr(importlib.import_module("cognitia.session.backends"), backend_class)
        except ImportError as exc:
            return str(exc)
        return None
    modules = _FRAMEWORKS.get(requirement)
    if modules is not None:
        for module in modules:
            if not _importable(module):
                return f"needs {requirement}: {module} is not installed"
        return None
    try:
        importlib.metadata.distribution(requirement)
    except importlib.metadata.PackageNotFoundError:
        return f"needs the distribution {requirement!r}, which is not installed"
    return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package, e.g. google for google.adk
        return False


def check_markers(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the test if a marker says so; fail on a marker that is not understood."""
    for verb, args in block.markers:
        if verb == "skip":
            assert args, f"{block.name}: '# docs-test: skip' needs a reason after it"
            pytest.skip(f"{block.name}: {args}")
        elif verb == "requires":
            for requirement in args.replace(",", " ").split():
                missing = requirement_missing(requirement)
                if missing and requirement in _SERVERS and os.environ.get(REQUIRE_SERVERS) == "1":
                    # CI sets this: a run must not pass by skipping the server examples.
                    pytest.fail(f"{block.name} {missing} ({REQUIRE_SERVERS}=1 forbids skipping)")
                if requirement in _SERVERS and not missing:
                    variable, exposed, _ = _SERVERS[requirement]
                    monkeypatch.setenv(exposed, os.environ[variable].strip())
                missing = requirement_missing(requirement)
                if missing:
                    pytest.skip(f"{block.name} {missing}")
        else:
            pytest.fail(
                f"{block.name}: unknown marker '# docs-test: {verb}' (use 'requires ...' or 'skip <reason>')"
            )


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh working directory, and logging configuration restored after the block."""
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    cognitia_logger = logging.getLogger("cognitia")
    cognitia_state = (list(cognitia_logger.handlers), cognitia_logger.level, cognitia_logger.propagate)
    yield tmp_path
    structlog.reset_defaults()
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    cognitia_logger.handlers[:] = cognitia_state[0]
    cognitia_logger.setLevel(cognitia_state[1])
    cognitia_logger.propagate = cognitia_state[2]


def run_block(block: Block, runtime: str | None, workdir: Path) -> dict[str, Any]:
    """Run the block as a script; on ``runtime`` inside an async function if it awaits."""
    code = block.compile()
    namespace: dict[str, Any] = {"__name__": "__main__", "__file__": str(workdir / "example.py")}
    if runtime is None:
        exec(code, namespace)
        return namespace

    async def run_awaiting_block() -> None:
        await eval(code, namespace)

    anyio.run(run_awaiting_block, backend=runtime)
    return namespace


@pytest.mark.parametrize(("block", "runtime"), CASES)
def test_documentation_example_runs(
    block: Block, runtime: str | None, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_markers(block, monkeypatch)
    run_block(block, runtime, isolated)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.name)
def test_every_block_compiles(block: Block) -> None:
    block.compile()


def test_the_documentation_has_examples_to_run() -> None:
    names = {block.path.name for block in BLOCKS}
    assert {"index.md", "quickstart.md", "backends.md", "manager.md", "decorator.md", "logging.md"} <= names


def test_the_block_extractor_finds_indented_and_nested_blocks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n"
        "```python\nx = 1\n```\n"
        "!!! note\n    ```python\n    y = 2\n    ```\n"
        "````markdown\n```python\nnot_a_block = True\n```\n````\n"
        "```bash\necho no\n```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(page)
    assert [(b.line, b.source) for b in blocks] == [(3, "x = 1\n"), (7, "y = 2\n")]


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_an_awaiting_block_runs_on_the_named_runtime(runtime: str, tmp_path: Path) -> None:
    sniffio = pytest.importorskip("sniffio", reason="sniffio comes with trio")
    block = Block(
        tmp_path / "p.md",
        3,
        "import anyio, sniffio\nawait anyio.sleep(0)\nlibrary = sniffio.current_async_library()\n",
    )
    assert block.is_async
    assert run_block(block, runtime, tmp_path)["library"] == runtime
    assert sniffio is not None


def test_a_failing_block_fails_and_points_at_the_markdown_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n```python\nx = 1\nassert x == 2, 'wrong'\n```\n", encoding="utf-8")
    [block] = python_blocks(page)
    assert not block.is_async
    with pytest.raises(AssertionError, match="wrong") as failure:
        run_block(block, None, tmp_path)
    assert (failure.traceback[-1].path, failure.traceback[-1].lineno + 1) == (page, 5)


def test_markers_are_parsed_and_unknown_ones_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = Block(tmp_path / "p.md", 1, "# docs-test: requires postgres, redis\n# docs-test: skip slow\n")
    assert block.markers == [("requires", "postgres, redis"), ("skip", "slow")]
    with pytest.raises(pytest.fail.Exception, match="unknown marker"):
        check_markers(Block(tmp_path / "p.md", 1, "# docs-test: later\n"), monkeypatch)
    with pytest.raises(AssertionError, match="needs a reason"):
        check_markers(Block(tmp_path / "p.md", 1, "# docs-test: skip\n"), monkeypatch)
    assert requirement_missing("no-such-distribution-for-cognitia") is not None
    assert requirement_missing("anyio") is None


def test_every_page_is_in_the_navigation() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with mkdocs: pip install mkdocs-material")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def pages(node: Any) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [page for item in node for page in pages(item)]
        if isinstance(node, dict):
            return [page for value in node.values() for page in pages(value)]
        return []

    in_nav = set(pages(config["nav"]))
    on_disk = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    assert on_disk - in_nav == set(), "pages missing from the nav in mkdocs.yml"
    assert in_nav - on_disk == set(), "nav entries without a page"


def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    for module in ("mkdocs", "material"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install mkdocs-material")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(tmp_path / "site"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "index.html").exists()
