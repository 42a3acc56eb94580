"""Slide ids become file names (``tiles/<id>.h5``, ``features/<id>.h5``, heatmaps...): only safe ones are accepted.

A slide id must start with a letter or digit and may then use letters, digits, spaces and ``. _ - + ( ) @ ~``
(ASCII only), at most :data:`MAX_LENGTH` characters, with no ``..`` and no trailing dot or space. So an id can
never name a path outside the output folder (no separator, no ``..``, not absolute), never a hidden file (our
temporary files are hidden), and never a name that Windows or SMB shares would silently change. Two ids that
differ only by letter case would share one file on a case-insensitive filesystem (macOS, Windows, many network
shares), so the manifest reader refuses them as duplicates (:func:`id_key`).

Example:
    >>> slide_id_problem("TCGA-A1-A0SB-01Z-00-DX1") is None
    True
    >>> slide_id_problem("../../etc/x")
    "contains '/', a path separator"
    >>> slide_file("/data/tiles", "s1", ".h5").as_posix()
    '/data/tiles/s1.h5'
"""

from __future__ import annotations

import os
import string
import unicodedata
from pathlib import Path

from icmil.errors import SlideError

MAX_LENGTH = 128
_FIRST = frozenset(string.ascii_letters + string.digits)
_ALLOWED = _FIRST | frozenset(" ._-+()@~")
ALLOWED_TEXT = "letters A-Z a-z, digits, spaces and . _ - + ( ) @ ~ (starting with a letter or digit)"


def _describe(char: str) -> str:
    if unicodedata.category(char).startswith("C"):
        return f"the control character U+{ord(char):04X}"
    return repr(char)


def slide_id_problem(slide_id: str) -> str | None:
    """Why ``slide_id`` cannot be used as a file name, or None when it can.

    >>> slide_id_problem("a" * 200)
    'is 200 characters long (at most 128)'
    >>> slide_id_problem("scan\\x1b[31m")
    'contains the control character U+001B (allowed: letters A-Z a-z, digits, spaces and . _ - + ( ) @ ~ (starting with a letter or digit))'
    """
    if not slide_id:
        return "is empty"
    if len(slide_id) > MAX_LENGTH:
        return f"is {len(slide_id)} characters long (at most {MAX_LENGTH})"
    for sep in ("/", "\\"):
        if sep in slide_id:
            return f"contains {sep!r}, a path separator"
    if ".." in slide_id:
        return "contains '..'"
    for char in slide_id:
        if char not in _ALLOWED:
            return f"contains {_describe(char)} (allowed: {ALLOWED_TEXT})"
    if slide_id[0] not in _FIRST:
        return f"starts with {slide_id[0]!r} (must start with a letter or digit)"
    if slide_id[-1] in ". ":
        return "ends with a dot or a space"
    return None


def id_key(slide_id: str) -> str:
    """The key under which two ids would share a file on a case-insensitive filesystem.

    >>> id_key("Slide_01") == id_key("slide_01")
    True
    """
    return slide_id.casefold()


def slide_file(directory: str | os.PathLike[str], slide_id: str, suffix: str) -> Path:
    """``directory/<slide_id><suffix>``, refusing an id that is not a safe file name (:class:`SlideError`).

    The manifest reader already refuses such ids; this guard keeps library callers that build their own
    manifest (or pass ids from elsewhere) from writing outside ``directory``.

    >>> slide_file("out", "../x", ".h5")
    Traceback (most recent call last):
    ...
    icmil.errors.SlideError: slide '../x': the slide id contains '/', a path separator (rename the slide in the manifest)
    """
    problem = slide_id_problem(slide_id)
    if problem is not None:
        raise SlideError(slide_id, f"the slide id {problem}", "rename the slide in the manifest")
    return Path(directory) / f"{slide_id}{suffix}"
