"""JSON encoding shared by every backend: one place decides what a storable state is.

States are encoded with the standard library's ``json``: no pickle, no custom tags. A value
JSON cannot represent (an arbitrary object, a set, bytes, NaN or infinity, a cycle) raises
:class:`~cognitia.errors.StateNotSerializableError` naming the key and the value's path,
before anything is written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from .errors import InvalidKeyError, StateNotSerializableError

__all__ = ["MAX_KEY_LENGTH", "byte_size", "check_key", "dumps", "loads"]

MAX_KEY_LENGTH = 1024

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_decoder = json.JSONDecoder()


def _reject(value: object) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _make_encode() -> Callable[[Any], str]:
    """The standard library's C encoder, built once instead of on every call.

    ``JSONEncoder.encode`` builds a fresh C encoder for each value (with a dict to detect
    reference cycles); building it once, without that dict, makes a 1 KB state encode about
    a quarter faster. A cycle then ends in ``RecursionError``, which :func:`dumps` reports
    like any other unencodable value. The output is checked against ``JSONEncoder`` at
    import; any difference (another Python, another signature) keeps ``JSONEncoder``.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return _encoder.encode
    try:
        chunks = make(None, _reject, json.encoder.encode_basestring, None, ":", ",", False, False, False)
    except TypeError:
        return _encoder.encode

    def encode(value: Any) -> str:
        return "".join(chunks(value, 0))

    probe = {"a": [1, 2.5, -0.0, 1e300, None, True, 'é\n"x\ud800'], "": {"k": (3,)}, "1": 10**30}
    try:
        same = encode(probe) == _encoder.encode(probe)
        for bad in (float("nan"), float("inf"), {1j}):
            try:
                encode([bad])
            except (TypeError, ValueError):
                continue
            same = False
    except Exception:
        same = False
    return encode if same else _encoder.encode


_encode = _make_encode()
_scan: Callable[[str, int], tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]


def check_key(key: object) -> str:
    """Return ``key`` if it can name a session, else raise :class:`InvalidKeyError`."""
    if type(key) is not str:
        raise InvalidKeyError(f"session key must be a str, got {type(key).__name__}: {key!r}")
    if not key or key.isspace():
        raise InvalidKeyError(f"session key must be a non-empty string, got {key!r}")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(
            f"session key is {len(key)} characters long, the limit is {MAX_KEY_LENGTH}: {key[:40]!r}..."
        )
    if "\x00" in key:
        raise InvalidKeyError(f"session key must not contain NUL characters: {key!r}")
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (left by a lossy decode upstream): storage engines key by UTF-8.
            raise InvalidKeyError(
                f"session key is not valid Unicode text (lone surrogate): {key!r}"
            ) from None
    return key


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
        if default is None:
            text = _encode(value)
        else:
            text = json.dumps(
                value, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=default
            )
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                # A lone surrogate cannot be stored as UTF-8 text; JSON's \u escape carries it
                # losslessly, so fall back to ASCII-only output for this value.
                text = json.dumps(
                    value, ensure_ascii=True, allow_nan=False, separators=(",", ":"), default=default
                )
        return text
    except (TypeError, ValueError, RecursionError) as exc:
        path, problem = _locate(value, root, default)
        raise StateNotSerializableError(key, path, problem) from exc


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
    if end != len(text):  # leading or trailing whitespace, trailing data: the full decoder decides
        return _decoder.decode(text)
    return value


def _locate(value: Any, root: str, default: Callable[[Any], Any] | None) -> tuple[str, str]:
    """Walk ``value`` to find the first thing JSON cannot encode (only on the error path)."""
    ancestors: set[int] = set()

    def walk(node: Any, path: str) -> tuple[str, str] | None:
        if node is None or isinstance(node, (str, bool, int)):
            return None
        if isinstance(node, float):
            return None if math.isfinite(node) else (path, f"is {node!r}, which JSON cannot represent")
        if isinstance(node, (dict, list, tuple)):
            if id(node) in ancestors:
                return (path, "refers back to itself (a reference cycle)")
            ancestors.add(id(node))
            try:
                if isinstance(node, dict):
                    for k, v in node.items():
                        if not isinstance(k, (str, int, float, bool)) and k is not None:
                            return (
                                path,
                                f"has a key of type {type(k).__name__} ({k!r}); keys must be strings",
                            )
                        label = json.dumps(k, ensure_ascii=False) if isinstance(k, str) else repr(k)
                        found = walk(v, f"{path}[{label}]")
                        if found:
                            return found
                else:
                    for i, v in enumerate(node):
                        found = walk(v, f"{path}[{i}]")
                        if found:
                            return found
            finally:
                ancestors.discard(id(node))
            return None
        if default is not None:
            try:
                converted = default(node)
            except Exception:
                return (path, f"is a {type(node).__name__} and the converter rejected it")
            return walk(converted, path)
        return (path, f"is a {type(node).__name__}, which JSON cannot represent")

    try:
        return walk(value, root) or (root, "cannot be encoded as JSON")
    except RecursionError:
        return (root, "is nested too deeply to be encoded as JSON")
