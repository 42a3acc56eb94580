"""What ``icmil predict`` was asked to predict: slide paths, globs, ``s3://`` URIs (with wildcards) or a
manifest CSV, turned into one table ``slide_id, path, mpp``.

Slide ids become file and folder names under the output folder, so they are checked: an id from a manifest or
a table follows the same rule as in training manifests (:func:`icmil.slide_ids.slide_id_problem`) and may appear
only once (ids differing only by letter case count as the same: they share a file on macOS and Windows). Ids
made from file names are made safe and unique without ever taking an id that is already used (``a/s1.svs`` and
``b/s1.svs`` give ``s1`` and ``s1_2``; a third file ``s1_2.svs`` then gets ``s1_2_2``), so two slides never
share tiles, features or outputs.

Example:
    >>> expand_slide_inputs(["a/s1.svs", "b/s1.svs", "s3://bucket/s2.tiff"])["slide_id"].tolist()
    ['s1', 's1_2', 's2']
    >>> expand_slide_inputs(["a/s1.svs", "b/s1.svs", "S1_2.svs"])["slide_id"].tolist()
    ['s1', 's1_2', 'S1_2_2']
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import pandas as pd

from icmil.errors import ConfigError, ManifestError
from icmil.slide_ids import MAX_LENGTH, id_key, slide_id_problem

MANIFEST_SUFFIXES = (".csv",)
_WILDCARDS = re.compile(r"[*?\[]")
# Ids made from file names keep room for a "_<n>" suffix that makes them unique.
_NAME_ID_LENGTH = MAX_LENGTH - 8
_SAFE_ID = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._\-]{{0,{_NAME_ID_LENGTH - 1}}}$")


def _is_glob(text: str) -> bool:
    return bool(_WILDCARDS.search(text))


def safe_id_from_name(path: str) -> str:
    """A slide id from a file or folder name: its stem with every unsafe character replaced by ``_``.

    >>> safe_id_from_name("/data/Slide 01 (HE).svs"), safe_id_from_name("s3://b/x/..")
    ('Slide_01_HE', 'slide')
    """
    name = path.rstrip("/").rsplit("/", 1)[-1]
    stem = Path(name).stem if Path(name).suffix else name
    clean = re.sub(r"[^A-Za-z0-9._\-]+", "_", stem).strip("._")
    clean = re.sub(r"\.{2,}", ".", clean)[:_NAME_ID_LENGTH].rstrip("._")
    return clean if _SAFE_ID.match(clean) and slide_id_problem(clean) is None else "slide"


def check_slide_id(slide_id: str, where: str) -> str:
    """``slide_id`` when it is a safe file name (the rule of training manifests), else a :class:`ConfigError`
    naming ``where`` it came from.

    >>> check_slide_id("Slide 12 (re-scan)", "row 2")
    'Slide 12 (re-scan)'
    """
    problem = slide_id_problem(slide_id)
    if problem is not None:
        raise ConfigError(
            f"{where}: slide_id {slide_id!r} {problem}; it becomes a file and folder name under the output "
            "folder: rename the slide"
        )
    return slide_id


def _refuse_duplicate_ids(ids: Sequence[tuple[str, str]]) -> None:
    """A :class:`ConfigError` when two given ids (``(id, where)`` pairs) would share a file: equal, or equal
    but for letter case (one file on macOS, Windows and many network shares)."""
    first: dict[str, tuple[str, str]] = {}
    for sid, where in ids:
        key = id_key(sid)
        if key in first:
            other, other_where = first[key]
            raise ConfigError(
                f"slide_id {sid!r} ({where}) and {other!r} ({other_where}) would share one output file "
                "(ids must be unique, and ids differing only by letter case count as the same); rename one"
            )
        first[key] = (sid, where)


def _given(slide_id: object) -> bool:
    return isinstance(slide_id, str) and bool(slide_id)


def _s3_matches(pattern: str) -> list[str]:
    """Objects of an ``s3://bucket/prefix*`` pattern (listed from the prefix before the first wildcard)."""
    from icmil.slides import s3_client, split_s3_uri

    bucket, key = split_s3_uri(pattern)
    prefix = _WILDCARDS.split(key, 1)[0]
    paginator = s3_client().get_paginator("list_objects_v2")
    keys = [
        obj["Key"]
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
        for obj in page.get("Contents", [])
        if fnmatchcase(obj["Key"], key)
    ]
    return [f"s3://{bucket}/{k}" for k in sorted(keys)]


def _expand(item: str) -> list[str]:
    if not _is_glob(item):
        return [item]
    if item.startswith("s3://"):
        try:
            found = _s3_matches(item)
        except Exception as err:  # botocore's errors: credentials, endpoint, bucket
            raise ConfigError(f"cannot list {item}: {type(err).__name__}: {err}") from None
    else:
        found = sorted(glob.glob(os.path.expanduser(item), recursive=True))
    if not found:
        raise ConfigError(f"no slide matches {item!r} (globs are expanded by icmil: quote them in the shell)")
    return found


def read_prediction_manifest(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A CSV with a ``path`` column (optional ``slide_id``, ``mpp``; labels and splits are ignored). Relative
    paths resolve against the CSV's folder, as in training manifests."""
    p = Path(path)
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:
        raise ManifestError(f"cannot read manifest {p}: {err}") from None
    if "path" not in df.columns:
        raise ManifestError(f"manifest {p} needs a 'path' column (has {list(df.columns)})")
    rows = []
    given: list[tuple[str, str]] = []
    for i, rec in enumerate(df.to_dict("records"), start=2):  # row 1 is the header
        raw = str(rec.get("path", "")).strip()
        if not raw:
            raise ManifestError(f"manifest {p} row {i}: empty path")
        full = raw if "://" in raw or Path(raw).is_absolute() else str((p.parent / raw).resolve())
        sid = str(rec.get("slide_id", "") or "").strip()
        if sid:
            given.append((check_slide_id(sid, f"manifest {p} row {i}"), f"manifest {p} row {i}"))
        mpp_text = str(rec.get("mpp", "") or "").strip()
        try:
            mpp = float(mpp_text) if mpp_text else np.nan
        except ValueError:
            raise ManifestError(f"manifest {p} row {i}: mpp {mpp_text!r} is not a number") from None
        rows.append({"slide_id": sid or None, "path": full, "mpp": mpp})
    _refuse_duplicate_ids(given)
    return pd.DataFrame(rows, columns=["slide_id", "path", "mpp"])


def expand_slide_inputs(
    items: Sequence[str | os.PathLike[str]] | str | pd.DataFrame,
    manifest: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """One table ``slide_id, path, mpp`` for slide paths, globs (``slides/*.svs``, ``s3://b/run1/*.tiff``),
    ``s3://`` URIs, feature ``.h5`` files, ``.csv`` manifests among ``items``, and ``manifest``.

    A DataFrame with a ``path`` column (optional ``slide_id``, ``mpp``) is taken as is. Given ids (manifest
    or table) must be safe and unique (:class:`ConfigError` otherwise); ids made from file names get ``_2``,
    ``_3``... when their name is taken, never an id already in use. Paths are not checked here: a missing slide
    is a per-slide error later.
    """
    if isinstance(items, pd.DataFrame):
        if "path" not in items.columns:
            raise ConfigError(f"slide table needs a 'path' column, got columns {list(items.columns)}")
        frame = items.reset_index(drop=True).copy()
        frame["path"] = frame["path"].astype(str)
        for col, default in (("slide_id", None), ("mpp", np.nan)):
            if col not in frame.columns:
                frame[col] = default
        for i, sid in enumerate(frame["slide_id"]):
            if isinstance(sid, str) and sid:
                check_slide_id(sid, f"slide table row {i}")
        parts = [frame[["slide_id", "path", "mpp"]]]
    else:
        if isinstance(items, (str, os.PathLike)):
            items = [items]
        parts = []
        plain: list[str] = []
        for item in [str(i) for i in items] + ([str(manifest)] if manifest else []):
            for path in _expand(item):
                if path.lower().endswith(MANIFEST_SUFFIXES) and "://" not in path:
                    parts.append(read_prediction_manifest(path))
                else:
                    plain.append(path)
        if plain:
            parts.insert(0, pd.DataFrame({"slide_id": None, "path": plain, "mpp": np.nan}))
    if not parts:
        raise ConfigError("nothing to predict: give slide paths, globs, s3:// URIs or a manifest CSV")
    table = pd.concat(parts, ignore_index=True)
    given = [
        (str(sid), f"row {i + 1} of the slides") for i, sid in enumerate(table["slide_id"]) if _given(sid)
    ]
    _refuse_duplicate_ids(given)
    # Ids made from names never take a given id or another made one (two slides must not share files).
    taken = {id_key(sid) for sid, _ in given}
    ids: list[str] = []
    for sid, path in zip(table["slide_id"], table["path"], strict=True):
        if _given(sid):
            ids.append(str(sid))
            continue
        base = safe_id_from_name(str(path))
        candidate, n = base, 1
        while id_key(candidate) in taken:
            n += 1
            candidate = f"{base}_{n}"
        taken.add(id_key(candidate))
        ids.append(candidate)
    table["slide_id"] = ids
    table["mpp"] = pd.to_numeric(table["mpp"], errors="coerce")
    return table[["slide_id", "path", "mpp"]]
