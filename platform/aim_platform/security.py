"""Secure defaults: secret redaction and path safety.

Redaction: anything that goes to MLflow (params, tags, artifacts) or to a log goes through
:func:`redact` (nested configs, storage options, flattened params) or :func:`redact_text`
(free text) first. A key looks secret when one of its words (split on ``.``, ``_``, ``-``,
spaces and camelCase) is a secret word (``secret``, ``password``, ``token``, ``key``,
``credential(s)``, ...), so ``aws_secret_access_key``, ``AWS_SESSION_TOKEN``,
``storage_options.key``, ``mlflow.tracking_password`` and ``credentials.anything`` are all
redacted, while ``num_tokens`` or ``tokenizer`` are not. Passwords embedded in URLs
(``postgresql://user:pw@host/db``) are redacted wherever they appear.

Path safety: :func:`check_relative` validates a relative path read from a config or a
manifest (a submitted config's place in the repository, a shard path of an ingest manifest)
and refuses ``..`` escapes, absolute paths and URLs where a relative path is expected.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from aim_platform.errors import PlatformError

REDACTED = "***REDACTED***"

# Words that make a key secret. Matched against whole words of the key, never substrings.
SECRET_WORDS = frozenset(
    {
        "secret",
        "secrets",
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "token",
        "key",
        "apikey",
        "credential",
        "credentials",
        "authorization",
        "cookie",
    }
)
# Whole-key spellings without separators that word splitting cannot see.
_SECRET_COMPACT = ("secretkey", "accesskey", "privatekey", "sessiontoken", "authtoken", "apikey")

_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
# scheme://user:password@host -> scheme://user:***REDACTED***@host
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*:)(?P<pw>[^/\s@]+)(?=@)")
# KEY=value or KEY: value where KEY looks secret (env dumps, command lines, YAML lines).
_ASSIGNMENT = re.compile(
    r"(?<![\w./\-])(?P<key>[A-Za-z_][A-Za-z0-9_.\-]*)(?P<sep>\s*[=:]\s*)(?P<q>[\"']?)(?P<val>[^\s\"',}]+)"
)
# AWS access key ids and "Bearer <token>" headers, whatever key they sit under.
_KNOWN_VALUES = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|(?<=Bearer )[A-Za-z0-9._~+/=\-]{8,}")


def key_words(key: str) -> list[str]:
    """Lower-case words of a key: ``"aws.SecretAccessKey"`` -> ``["aws", "secret", ...]``."""
    return [w.lower() for w in _WORD_SPLIT.split(str(key)) if w]


def is_secret_key(key: str) -> bool:
    """Whether a (possibly dotted) key names a secret.

    Args:
        key: a config field, storage option, environment variable or flattened param name.

    Returns:
        True when any word of any dotted segment is a secret word.
    """
    words = key_words(key)
    if any(w in SECRET_WORDS for w in words):
        return True
    compact = re.sub(r"[^a-z0-9]", "", str(key).lower())
    return any(c in compact for c in _SECRET_COMPACT)


def _redact_value(value: Any) -> Any:
    """The redacted form of a secret value; ``None`` and empty values stay (nothing leaks)."""
    if value is None or value == "" or value == {} or value == []:
        return value
    return REDACTED


def redact(obj: Any) -> Any:
    """A copy of ``obj`` with every secret replaced by :data:`REDACTED`.

    Works on nested configs (dicts, lists, tuples, pydantic models), on storage options and on
    flattened params (``{"data.storage_options.secret": ...}``). Values under secret keys are
    replaced whole (a secret section such as ``credentials: {...}`` is redacted entirely);
    every other string has URL passwords and known token shapes scrubbed.

    Args:
        obj: the object to redact; never modified.

    Returns:
        A redacted copy with the same structure.
    """
    if hasattr(obj, "model_dump") and callable(obj.model_dump):
        obj = obj.model_dump(mode="json")
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            if is_secret_key(str(key)):
                out[key] = _redact_value(value)
            else:
                out[key] = redact(value)
        return out
    if isinstance(obj, list | tuple):
        items = [redact(v) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Scrub secrets from free text (a log line, a YAML dump, a command line).

    Removes, in order: each given secret value, passwords in URLs, AWS access key ids and
    bearer tokens, values assigned to secret looking keys (``AWS_SECRET_ACCESS_KEY=...``,
    ``password: ...``).

    Args:
        text: the text to scrub.
        secrets: known secret values (e.g. from :func:`secret_values`) to remove anywhere.

    Returns:
        The scrubbed text.
    """
    for value in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)
    text = _KNOWN_VALUES.sub(REDACTED, text)

    def assignment(m: re.Match[str]) -> str:
        if not is_secret_key(m.group("key")) or m.group("val") in (REDACTED, "Bearer"):
            return m.group(0)
        return f"{m.group('key')}{m.group('sep')}{m.group('q')}{REDACTED}"

    return _ASSIGNMENT.sub(assignment, text)


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


class UnsafePathError(PlatformError, ValueError):
    """A path that would leave its root, or an absolute path where a relative one is expected."""


def check_relative(path: str | Path, *, field: str = "path") -> str:
    """Validate a relative path from a config or manifest and return it normalized.

    Args:
        path: the path as written by the user (POSIX separators).
        field: the config field it came from, named in the error.

    Returns:
        The normalized relative path (``a/./b`` -> ``a/b``).

    Raises:
        UnsafePathError: empty, absolute (``/x``, ``~/x``, ``C:\\x``), a URL, containing a NUL
            byte or a backslash, or escaping with ``..``.
    """
    text = str(path)
    if not text.strip():
        raise UnsafePathError(f"{field}: empty path; expected a path relative to the run root")
    if "\x00" in text:
        raise UnsafePathError(f"{field}: {text!r} contains a NUL byte")
    if "\\" in text:
        raise UnsafePathError(f"{field}: {text!r} contains a backslash; use '/' separators")
    if _SCHEME.match(text):
        raise UnsafePathError(f"{field}: {text!r} is a URL; expected a relative path")
    if text.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", text):
        raise UnsafePathError(f"{field}: {text!r} is absolute; expected a relative path")
    norm = posixpath.normpath(text)
    if norm == ".." or norm.startswith("../"):
        raise UnsafePathError(f"{field}: {text!r} escapes its root with '..'")
    return norm
