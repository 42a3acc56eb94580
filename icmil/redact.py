"""One redaction for every text that leaves the process: our logs, captured third-party output (MLflow's
"View run ... at" lines, the KFP local runner's task logs), written configs and error messages.

Three rules, applied together by :func:`redact_text`:

* credentials in URIs: ``scheme://user:password@host`` and secret-looking query parameters
  (``?X-Amz-Signature=``, ``?password=``, ``?token=``) anywhere in the text;
* ``key=value`` / ``key: value`` pairs whose key looks secret (``password``, ``AWS_SECRET_ACCESS_KEY``,
  ``token``, ...) and ``Bearer``/``Basic`` authorisation values;
* the literal values of secrets this process knows about: secret-looking environment variables
  (``MLFLOW_TRACKING_PASSWORD``, ``AWS_SECRET_ACCESS_KEY``, ``KF_PIPELINES_TOKEN``, ...), the passwords inside
  URIs held by environment variables (``MLFLOW_TRACKING_URI``, ``ICMIL_OPTUNA_STORAGE``), and values passed to
  :func:`register_secret` (e.g. a ``--tracking-uri`` given on the command line).

Structured data (a config) is redacted by value with :func:`redact_data`: URIs lose their credentials and values
under secret-looking keys become ``***``; keys that only *name* a Kubernetes Secret or an environment variable
(``pipeline.mlflow_secret``, ``tuning.storage_env``) are kept.

Example:
    >>> redact_text("View run x at: http://icmil:pw123@mlflow:5000/#/experiments/1")
    'View run x at: http://***@mlflow:5000/#/experiments/1'
    >>> redact_text("refused: s3://b/k?X-Amz-Signature=abc&x=1 password=hunter2")
    'refused: s3://b/k?X-Amz-Signature=***&x=1 password=***'
    >>> redact_data({"tracking_uri": "postgresql://u:pw@db/x", "mlflow_secret": "icmil-mlflow"})
    {'tracking_uri': 'postgresql://***@db/x', 'mlflow_secret': 'icmil-mlflow'}
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
from collections.abc import Mapping
from typing import Any, TextIO
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

REDACTED = "***"

_SECRET_WORDS = r"password|passwd|secret|token|api[_-]?key|access[_-]?key|credential|signature"
SECRET_KEY = re.compile(rf"({_SECRET_WORDS})", re.I)
# Config keys that hold the NAME of a Kubernetes Secret or of an environment variable, never a secret value.
NAME_ONLY_KEYS = frozenset({"mlflow_secret", "s3_secret", "storage_secret", "storage_env"})
# Literal secrets shorter than this are not replaced in free text (they would hit ordinary words); the
# patterns below still catch them inside URIs and key=value pairs.
MIN_LITERAL_LENGTH = 6

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
_URI_USERINFO_START = re.compile(rf"^(?P<scheme>{_SCHEME})(?P<userinfo>[^/@\s]*)@")
_URI_USERINFO_ANYWHERE = re.compile(rf"(?P<scheme>{_SCHEME})(?P<userinfo>[^/@\s'\"<>]+)@")
_SECRET_QUERY_ANYWHERE = re.compile(
    rf"(?P<key>[?&;][^=&\s'\"#]*(?:{_SECRET_WORDS})[^=&\s'\"#]*=)(?P<value>[^&\s'\"#]+)", re.I
)
_SECRET_PAIR = re.compile(
    rf"(?P<key>\b[\w.\-]*(?:{_SECRET_WORDS})[\w.\-]*)(?P<sep>[\"']?\s*[=:]\s*)(?P<quote>[\"']?)"
    r"(?P<value>[^\s\"',;&}\]]+)",
    re.I,
)
_AUTH_VALUE = re.compile(r"\b(?P<kind>Bearer|Basic)\s+(?P<value>[A-Za-z0-9._~+/=\-]{6,})", re.I)

_registered: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Remember a secret this process holds (a password, a token, a URI with credentials) so every later
    redaction removes its literal value too.

    >>> register_secret("sqlite-is-fine")  # no credentials: nothing is remembered
    >>> register_secret("http://u:s3cr3t-pw@h"); redact_text("log: s3cr3t-pw")
    'log: ***'
    """
    for secret in _secrets_in(value or ""):
        with _lock:
            _registered.add(secret)


def _secrets_in(value: str) -> list[str]:
    """The credential parts of a URI (password, or the whole userinfo when it has no password)."""
    m = _URI_USERINFO_START.match(value.strip())
    if not m:
        return []
    userinfo = m.group("userinfo")
    user, _, password = userinfo.partition(":")
    found = [password, unquote(password)] if password else [user, unquote(user)]
    query = urlsplit(value.strip()).query
    found += [v for k, v in parse_qsl(query, keep_blank_values=True) if SECRET_KEY.search(k)]
    return [s for s in found if s]


def known_secrets() -> list[str]:
    """Literal secret values to remove from free text: secret-looking environment variables, credentials in
    URIs held by the environment, and :func:`register_secret` values (longest first)."""
    found: set[str] = set()
    for name, value in _environ_snapshot().items():
        if not value:
            continue
        if SECRET_KEY.search(name) and "://" not in value:
            found.add(value)
        found.update(_secrets_in(value))
    with _lock:
        found |= _registered
    return sorted((s for s in found if len(s) >= MIN_LITERAL_LENGTH), key=len, reverse=True)


def _environ_snapshot() -> dict[str, str]:
    """A copy of the environment; other threads (MLflow's telemetry) may change it while it is read, which
    makes a plain iteration raise: read again."""
    for _ in range(5):
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    return {}


def redact_uri(value: str) -> str:
    """Remove credentials from one URI: ``user:password@`` and secret-looking query parameters.

    Non-URI strings are returned unchanged.

    >>> redact_uri("postgresql://mlflow:hunter2@db:5432/mlflow")
    'postgresql://***@db:5432/mlflow'
    >>> redact_uri("s3://bucket/key?X-Amz-Signature=abc&x=1")
    's3://bucket/key?X-Amz-Signature=***&x=1'
    """
    if "://" not in value:
        return value
    value = _URI_USERINFO_START.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", value, count=1)
    parts = urlsplit(value)
    if parts.query and SECRET_KEY.search(parts.query):
        query = [
            (k, REDACTED if SECRET_KEY.search(k) else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
        value = urlunsplit(parts._replace(query=urlencode(query, safe="*")))
    return value


def redact_text(text: str) -> str:
    """Free text with every credential replaced by ``***`` (see the module docstring for the rules).

    >>> redact_text("Authorization: Bearer abcdef123456")
    'Authorization: Bearer ***'
    >>> redact_text("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI tuning.storage_secret: icmil-optuna")
    'AWS_SECRET_ACCESS_KEY=*** tuning.storage_secret: icmil-optuna'
    """
    if not text:
        return text
    for secret in known_secrets():
        if secret in text:
            text = text.replace(secret, REDACTED)
    text = _URI_USERINFO_ANYWHERE.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    text = _SECRET_QUERY_ANYWHERE.sub(lambda m: f"{m.group('key')}{REDACTED}", text)
    text = _SECRET_PAIR.sub(_pair, text)
    return _AUTH_VALUE.sub(lambda m: f"{m.group('kind')} {REDACTED}", text)


def _pair(m: re.Match[str]) -> str:
    key = m.group("key")
    if key.rsplit(".", 1)[-1].lower() in NAME_ONLY_KEYS or m.group("value") == REDACTED:
        return m.group(0)
    return f"{key}{m.group('sep')}{m.group('quote')}{REDACTED}"


def holds_credential(value: str) -> bool:
    """True when ``value`` carries a credential itself: a password in a URI (``scheme://user:password@``) or a
    secret-looking query parameter with a value (``?token=...``, ``X-Amz-Signature=...``). What a compiled
    pipeline must not contain (a user name alone, or the name of a Secret, is fine).

    >>> holds_credential("postgresql://optuna:pw@db/optuna"), holds_credential("postgresql://optuna@db/optuna")
    (True, False)
    >>> holds_credential("http://mlflow:5000/?token=abc"), holds_credential("icmil-optuna")
    (True, False)
    """
    m = _URI_USERINFO_START.match(value.strip())
    return bool(m and ":" in m.group("userinfo")) or bool(_SECRET_QUERY_ANYWHERE.search(value))


def is_secret_key(key: object) -> bool:
    """True for a key whose value is a secret (``password``, ``api_key``), False for names of Secrets."""
    name = str(key)
    return bool(SECRET_KEY.search(name)) and name.lower() not in NAME_ONLY_KEYS


def redact_data(value: Any) -> Any:
    """A copy of nested data (dicts, lists, strings) with credentials removed: URIs by value, values under
    secret-looking keys replaced by ``***``, literal known secrets anywhere."""
    if isinstance(value, str):
        return redact_text(redact_uri(value))
    if isinstance(value, Mapping):
        return {
            k: REDACTED if is_secret_key(k) and v not in (None, "") else redact_data(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact_data(v) for v in value]
    return value


# --------------------------------------------------------------------------- logs and streams


class RedactingFilter(logging.Filter):
    """A logging filter (put on handlers) that redacts the formatted message and any exception text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave the record to logging's own error handling
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


_FILTER = RedactingFilter()


def install_log_redaction(*logger_names: str) -> None:
    """Put the redacting filter on every handler of the root logger, ``icmil``, ``mlflow`` and
    ``logger_names`` (idempotent). Handlers added later by a library need another call."""
    for name in (None, "icmil", "mlflow", "alembic", "urllib3", *logger_names):
        for handler in logging.getLogger(name).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)


class RedactingStream(io.TextIOBase):
    """A text stream that redacts whole lines before passing them on (captured third-party output).

    Text is buffered up to the next newline so that a secret split across two writes is still caught;
    :meth:`flush` passes on an unfinished line as it is (redacted).
    """

    def __init__(self, target: TextIO) -> None:
        self._target = target
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            done, _, self._pending = self._pending.rpartition("\n")
            self._target.write(redact_text(done) + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._target.write(redact_text(self._pending))
            self._pending = ""
        self._target.flush()

    def isatty(self) -> bool:
        return bool(getattr(self._target, "isatty", lambda: False)())
