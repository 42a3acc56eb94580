"""Crash-safe file I/O and content digests.

Every file the project writes goes through :func:`atomic_path` (temp name + ``os.replace``), so a file that
exists is complete and "skip if it exists" is trustworthy after a killed run.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "a.txt") as tmp:
    ...     _ = tmp.write_text("hello")
    >>> (d / "a.txt").read_text()
    'hello'
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_DIGEST_CACHE: dict[tuple[str, int, int], str] = {}


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` only if the block succeeds.

    The temporary file lives in the same directory so the final ``os.replace`` is atomic on POSIX.
    On error the temporary file is removed and ``target`` (if it existed) is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.tmp-{os.getpid()}-{_host_token()}-",
        suffix=suffix if suffix is not None else ".tmp",
        dir=target.parent,
    )
    os.close(fd)
    # mkstemp creates 0600 files; outputs are shared (other users, pods on a shared volume): honour the umask.
    os.chmod(tmp_name, 0o666 & ~_umask())
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


# ``.<target>.tmp-<pid>-<host token>-<random><suffix>``: the owner is in the name, so a later run can tell a
# temporary file whose writer died (kill -9, OOM, power loss) from one another process is writing right now.
_TEMP_NAME = re.compile(
    r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[a-z0-9_]{8}(?:\.[A-Za-z0-9]+)?$"
)


@functools.cache
def _host_token() -> str:
    """This machine *and* PID namespace: PIDs are only comparable inside one namespace (containers)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}|{namespace}".encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (another user's process) or we cannot tell: keep its file
    return True


def remove_stale_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` left in ``directory`` when its writer was killed.

    Only our own temporary names are touched, and only when their writer process ran on this machine (same
    host and PID namespace) and no longer exists; a file written right now by another run is never removed.
    Returns the removed paths.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / f".s1.h5.tmp-999999999-{_host_token()}-abcd1234.h5").write_text("half")
    >>> [p.name.split(".tmp-")[0] for p in remove_stale_temp_files(d)]
    ['.s1.h5']
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    removed = []
    me, host = os.getpid(), _host_token()
    for entry in root.iterdir():
        m = _TEMP_NAME.match(entry.name)
        if m is None or m.group("host") != host or not entry.is_file() or entry.is_symlink():
            continue
        pid = int(m.group("pid"))
        if pid == me or _alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):  # another cleaner got there first
            entry.unlink()
            removed.append(entry)
    return removed


def _umask() -> int:
    """The process umask, read without changing it (os.umask would set it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def write_text_atomic(target: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``target`` atomically and return the path."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json_atomic(target: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (non-finite floats become null)."""
    return write_text_atomic(target, json.dumps(_finite(obj), indent=2, sort_keys=True, default=str) + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def file_digest(path: str | os.PathLike[str], chunk_size: int = 8 << 20) -> str:
    """SHA-256 of a file's bytes (hex), memoised per (path, size, mtime) within the process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    cached = _DIGEST_CACHE.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with p.open("rb") as fh:
        while block := fh.read(chunk_size):
            h.update(block)
    digest = h.hexdigest()
    _DIGEST_CACHE[key] = digest
    return digest


def text_digest(*parts: Any) -> str:
    """Short SHA-256 over the JSON form of ``parts``: a stable key for settings and combinations of digests.

    >>> text_digest({"a": 1}) == text_digest({"a": 1})
    True
    """
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:16]
