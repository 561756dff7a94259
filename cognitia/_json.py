"""JSON encoding shared by every backend: one place decides what a storable state is.

States are encoded with the standard library's ``json``: no pickle, no custom tags. A value
JSON cannot represent (an arbitrary object, a set, bytes, NaN or infinity, a cycle, nesting
deeper than Python's recursion limit lets ``json`` go) raises
:class:`~cognitia.errors.StateNotSerializableError` naming the key and the value's path,
before anything is written.
"""

from __future__ import annotations

import _thread
import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from .errors import InvalidKeyError, StateNotSerializableError

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_KEY_LENGTH",
    "byte_size",
    "check_key",
    "child_path",
    "dumps",
    "find_string",
    "key_prefix_possible",
    "loads",
]

MAX_KEY_LENGTH = 1024
"""Characters a session key may have."""
MAX_KEY_BYTES = 2048
"""Bytes a session key may take in UTF-8: PostgreSQL indexes keys in a B-tree, whose entries
must stay under 2704 bytes."""

T = TypeVar("T")

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_ascii_encoder = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":"))
_decoder = json.JSONDecoder()


def _reject(value: object) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _make_encode(*, ascii: bool = False) -> Callable[[Any], str]:
    """The standard library's C encoder, built once instead of on every call (with
    ``ascii``, one that escapes every non-ASCII character, as ``ensure_ascii=True`` does).

    ``JSONEncoder.encode`` builds a fresh C encoder for each value (with a dict to detect
    reference cycles); building it once, without that dict, makes a 1 KB state encode about
    a quarter faster. A cycle then ends in ``RecursionError``, which :func:`dumps` reports
    like any other unencodable value. The output is checked against ``JSONEncoder`` at
    import; any difference (another Python, another signature) keeps ``JSONEncoder``.
    """
    reference = _ascii_encoder if ascii else _encoder
    make = getattr(json.encoder, "c_make_encoder", None)
    strings = json.encoder.encode_basestring_ascii if ascii else json.encoder.encode_basestring
    if make is None:
        return reference.encode
    try:
        chunks = make(None, _reject, strings, None, ":", ",", False, False, False)
    except TypeError:
        return reference.encode

    def encode(value: Any) -> str:
        return "".join(chunks(value, 0))

    probe = {"a": [1, 2.5, -0.0, 1e300, None, True, 'é\n"x\ud800'], "": {"k": (3,)}, "1": 10**30}
    try:
        same = encode(probe) == reference.encode(probe)
        for bad in (float("nan"), float("inf"), {1j}):
            try:
                encode([bad])
            except (TypeError, ValueError):
                continue
            same = False
    except Exception:
        same = False
    return encode if same else reference.encode


_encode = _make_encode()
_encode_ascii = _make_encode(ascii=True)
_scan: Callable[[str, int], tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]


def check_key(key: object) -> str:
    """Return ``key`` if it can name a session, else raise :class:`InvalidKeyError`."""
    if type(key) is not str:
        raise InvalidKeyError(f"session key must be a str, got {type(key).__name__}: {key!r}")
    if not key or key.isspace():
        raise InvalidKeyError(f"session key must be a non-empty, non-blank string, got {key!r}")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(
            f"session key is {len(key)} characters long, the limit is {MAX_KEY_LENGTH}: {key[:40]!r}..."
        )
    if "\x00" in key:
        raise InvalidKeyError(f"session key must not contain NUL characters: {key!r}")
    if not key.isascii():
        try:
            size = len(key.encode("utf-8"))
        except UnicodeEncodeError:
            # A lone surrogate (left by a lossy decode upstream): storage engines key by UTF-8.
            raise InvalidKeyError(
                f"session key is not valid Unicode text (lone surrogate): {key!r}"
            ) from None
        # An ASCII key is one byte a character, well inside the limit.
        if size > MAX_KEY_BYTES:
            raise InvalidKeyError(
                f"session key is {size} bytes long in UTF-8, the limit is {MAX_KEY_BYTES}: {key[:40]!r}..."
            )
    return key


def key_prefix_possible(prefix: str) -> bool:
    """Whether a valid key can start with ``prefix`` (no key holds NUL or a lone surrogate)."""
    if "\x00" in prefix:
        return False
    if not prefix.isascii():
        try:
            prefix.encode("utf-8")
        except UnicodeEncodeError:
            return False
    return True


def dumps(
    key: str,
    value: Any,
    *,
    root: str = "state",
    default: Callable[[Any], Any] | None = None,
) -> str:
    """Encode ``value`` as compact JSON, or raise naming the key and the offending path.

    ``default`` converts values JSON does not know (a pydantic model, a datetime) into ones
    it does, as in :func:`json.dumps`.
    """
    if root == "state" and not isinstance(value, Mapping):
        raise StateNotSerializableError(key, root, f"must be a dict, got {type(value).__name__}")
    try:
        # _encode_text, inlined: this is every save's path.
        text = _encode(value) if default is None else _encode_converted(value, default)
        return text if text.isascii() else _keep_lone_surrogates(text, value, default)
    except RecursionError:
        # Encoding recurses once per level of nesting (and loops forever on a cycle). The
        # caller's own stack may be what ran out: on a fresh one every caller gets the same
        # limit, so where a state is saved from never decides whether it can be stored.
        try:
            return _on_fresh_stack(_encode_text, value, default)
        except (TypeError, ValueError, RecursionError) as exc:
            path, problem = _on_fresh_stack(_locate, value, root, default)
            raise StateNotSerializableError(key, path, problem) from exc
    except (TypeError, ValueError) as exc:
        path, problem = _locate(value, root, default)
        raise StateNotSerializableError(key, path, problem) from exc


def _encode_text(value: Any, default: Callable[[Any], Any] | None) -> str:
    text = _encode(value) if default is None else _encode_converted(value, default)
    return text if text.isascii() else _keep_lone_surrogates(text, value, default)


def _encode_converted(value: Any, default: Callable[[Any], Any]) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=default)


def _keep_lone_surrogates(text: str, value: Any, default: Callable[[Any], Any] | None) -> str:
    """``text`` if it is valid UTF-8 text, else ``value`` encoded as ASCII-only JSON.

    A lone surrogate cannot be stored as UTF-8 text; JSON's \\u escape carries it
    losslessly, so such a value falls back to ASCII-only output.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        if default is not None:
            return json.dumps(
                value, ensure_ascii=True, allow_nan=False, separators=(",", ":"), default=default
            )
        try:
            return _encode_ascii(value)
        except RecursionError:
            # The text above was made on this stack: on a fresh one, anything as deep encodes.
            return _on_fresh_stack(_encode_ascii, value)
    return text


def byte_size(text: str) -> int:
    """Bytes of ``text`` in UTF-8, without encoding it when it is ASCII (the usual case)."""
    return len(text) if text.isascii() else len(text.encode())


def loads(text: str | bytes) -> Any:
    """Decode JSON written by :func:`dumps`."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8")
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        end = -1
    except RecursionError:
        # Decoding recurses once per level of nesting, like encoding: whatever dumps()
        # accepted decodes on a fresh stack, however deep the caller's is.
        return _on_fresh_stack(_decode_text, text)
    if end != len(text):  # leading or trailing whitespace, trailing data: the full decoder decides
        return _decoder.decode(text)
    return value


def _decode_text(text: str) -> Any:
    # On a fresh stack this runs a frame shallower than _encode_text's encoder, so it
    # decodes anything that encoded.
    value, end = _scan(text, 0)
    return value if end == len(text) else _decoder.decode(text)


def _on_fresh_stack(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` run on a new thread, whose call stack is as shallow as it gets.

    A bare ``_thread`` thread: ``threading.Thread`` would put its own frames below it.
    """
    outcome: list[tuple[bool, Any]] = []
    finished = _thread.allocate_lock()
    finished.acquire()

    def run() -> None:
        try:
            outcome.append((True, function(*args)))
        except BaseException as exc:  # re-raised in the calling thread
            outcome.append((False, exc))
        finally:
            finished.release()

    _thread.start_new_thread(run, ())
    finished.acquire()
    done, result = outcome[0]
    if not done:
        raise result
    return result  # type: ignore[no-any-return]


def child_path(path: str, key: object) -> str:
    """The path of ``key`` (a dict key or list index) inside the value at ``path``."""
    label = json.dumps(key, ensure_ascii=False) if isinstance(key, str) else repr(key)
    return f"{path}[{label}]"


def find_string(value: Any, root: str, problem: Callable[[str], str | None]) -> tuple[str, str] | None:
    """The path of the first string in decoded JSON ``value`` that ``problem`` objects to, and
    the objection; a dict key is reported at the path of its dict. ``None`` if there is none.

    The walk keeps its own stack, so it goes as deep as anything JSON decoded.
    """
    pending: list[tuple[Any, str]] = [(value, root)]
    while pending:
        node, path = pending.pop()
        if isinstance(node, str):
            found = problem(node)
            if found is not None:
                return (path, found)
        elif isinstance(node, dict):
            children = []
            for k, v in node.items():
                children.append((_KeyOf(k), path))
                children.append((v, child_path(path, k)))
            pending.extend(reversed(children))
        elif isinstance(node, _KeyOf):
            found = problem(node.key)
            if found is not None:
                return (path, f"has a key that {found}")
        elif isinstance(node, list):
            pending.extend(reversed([(v, f"{path}[{i}]") for i, v in enumerate(node)]))
    return None


class _KeyOf:
    """A dict key met by a walk, checked where its dict's items are."""

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        self.key = key


def _int_problem(number: int) -> str | None:
    """Why JSON cannot write ``number``: Python refuses to turn very long ints into text."""
    try:
        int.__repr__(number)
    except ValueError:
        return (
            f"is an int of more than {sys.get_int_max_str_digits()} digits, which Python will not "
            "convert to text (see sys.set_int_max_str_digits)"
        )
    return None


def _locate(value: Any, root: str, default: Callable[[Any], Any] | None) -> tuple[str, str]:
    """Find the first thing JSON cannot encode, in the order the encoder meets it (only on
    the error path).

    The walk keeps its own stack, so it goes as deep as the value does, and reports a
    value nested past the encoder's own depth limits (see :func:`_encoder_depth`) as
    nested too deeply, where the encoder gave up.
    """
    ancestors: set[int] = set()
    # Each open container: its id, and its children (value, path) still to visit.
    open_: list[tuple[int, Iterator[tuple[Any, str]]]] = []
    pending: Iterator[tuple[Any, str]] = iter([(value, root)])
    limits: tuple[int, int] | None = None
    while True:
        item = next(pending, None)
        if item is None:
            if not open_:
                return (root, "cannot be encoded as JSON")
            ancestors.discard(open_.pop()[0])
            pending = open_[-1][1] if open_ else iter(())
            continue
        node, path = item
        if isinstance(node, _KeyOf):  # a dict's key, checked before its value
            problem = _key_problem(node.key)
            if problem is not None:
                return (path, problem)
            continue
        depth = len(open_) + 1
        if depth > _SHALLOW:
            if limits is None:
                limits = _encoder_depth()
            if depth > limits[0 if isinstance(node, (dict, list, tuple)) else 1]:
                return (path, _TOO_DEEP)
        conversions = 0
        while True:
            if node is None or isinstance(node, (str, bool)):
                problem = None
            elif isinstance(node, int):
                problem = _int_problem(node)
            elif isinstance(node, float):
                problem = None if math.isfinite(node) else f"is {node!r}, which JSON cannot represent"
            elif isinstance(node, (dict, list, tuple)):
                problem = None
            elif default is not None:
                # The converted value takes the place of the original, as in the encoder.
                try:
                    node = default(node)
                except Exception:
                    return (path, f"is a {type(node).__name__} and the converter rejected it")
                conversions += 1
                if conversions > sys.getrecursionlimit():
                    return (path, _TOO_DEEP)
                continue
            else:
                problem = f"is a {type(node).__name__}, which JSON cannot represent"
            break
        if problem is not None:
            return (path, problem)
        if not isinstance(node, (dict, list, tuple)):
            continue
        if id(node) in ancestors:
            return (path, "refers back to itself (a reference cycle)")
        ancestors.add(id(node))
        children = _dict_children(node, path) if isinstance(node, dict) else _list_children(node, path)
        open_.append((id(node), children))
        pending = children


def _dict_children(node: dict[Any, Any], path: str) -> Iterator[tuple[Any, str]]:
    for k, v in node.items():
        yield (_KeyOf(k), path)
        yield (v, child_path(path, k))


def _list_children(node: list[Any] | tuple[Any, ...], path: str) -> Iterator[tuple[Any, str]]:
    for i, v in enumerate(node):
        yield (v, f"{path}[{i}]")


def _key_problem(key: Any) -> str | None:
    """Why ``key`` cannot be a JSON object key (which ``json`` makes of str, int, float, bool, None)."""
    if isinstance(key, float) and not math.isfinite(key):
        return f"has the key {key!r}, which JSON cannot represent"
    if isinstance(key, int) and not isinstance(key, bool):
        problem = _int_problem(key)
        return None if problem is None else f"has a key that {problem}"
    if not isinstance(key, (str, float, bool)) and key is not None:
        return f"has a key of type {type(key).__name__} ({key!r}); keys must be strings"
    return None


_SHALLOW = 64
"""Levels a state may nest without asking how deep the encoder goes (any Python does 64)."""
_depth_limits: list[tuple[int, int]] = []


def _encoder_depth() -> tuple[int, int]:
    """The deepest level at which the encoder takes a container, and a scalar, measured
    once on a fresh stack (the state itself is level 1).

    JSON is encoded one level at a time: on Python 3.11 the limit is the recursion limit,
    since 3.12 the interpreter's C recursion limit (about 1,500 levels on 3.12, 10,000 on
    3.13). A scalar may sit one level below the deepest container.
    """
    if not _depth_limits:
        _depth_limits.append((_deepest_encoded([]), _deepest_encoded(0)))
    return _depth_limits[0]


def _deepest_encoded(innermost: Any) -> int:
    def encodes(levels: int) -> bool:
        nested = innermost
        for _ in range(levels - 1):
            nested = [nested]
        try:
            _on_fresh_stack(_encode_text, nested, None)
        except RecursionError:
            return False
        return True

    low, high = 1, 1024
    while encodes(high):
        low, high = high, high * 2
    while low + 1 < high:  # low encodes, high does not
        middle = (low + high) // 2
        low, high = (middle, high) if encodes(middle) else (low, middle)
    return low


_TOO_DEEP = (
    "is nested too deeply: JSON is encoded one level at a time, and this goes past Python's recursion limit"
)
