"""The slide manifest: ``slide_id,path,label[,split][,mpp]`` — read, validated, split once for every stage.

Every data row of the CSV ends up in exactly one place, named by its CSV line number:

* a usable slide in :attr:`Manifest.slides`;
* a rejected row in :attr:`Manifest.rejected` (line -> why) and, so a stage reports it with the other slide
  failures, in :attr:`Manifest.errors` (slide id, or ``<line N>`` when the row names no usable id, -> why).
  Row problems: a field count that differs from the header's, an empty or unsafe slide id
  (:mod:`icmil.slide_ids`), a duplicate id (also one differing only by letter case), an empty or unsupported
  path, an empty label, a label outside the configured ``classes``, a bad split or µm/px value;
* a row whose fields are all blank (a spreadsheet's trailing rows) in :attr:`Manifest.rejected` only.

Problems with the cohort as a whole raise :class:`ManifestError` naming the lines: an unreadable file, a missing
column, no usable row, and label problems — with ``classes`` unset the classes are the labels of the *training*
rows, so a val/test label never seen in training is an error, and so are two labels that differ only by case,
spacing or a small edit (``tumor`` / ``tumour``): a typo must not become a class of its own.

Splits: with no ``split`` column a stratified, seeded split by slide is made (``val_fraction``,
``test_fraction``); with official splits that have no ``val`` rows (train/test only, as Camelyon16), a
stratified, seeded validation split of ``val_fraction`` of the training slides is carved from ``train``. The
decision is logged and kept in :attr:`Manifest.notes`; the resolved manifest (:meth:`Manifest.write`) records it
in its ``split_source`` column (``manifest``, ``carved from train (...)`` or ``seeded split (...)``).

Example:
    >>> import io, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> rows = [f"s{i},s{i}.tif,{'tumor' if i % 2 else 'normal'}" for i in range(6)]
    >>> _ = (d / "m.csv").write_text("slide_id,path,label\\n" + "\\n".join(rows) + "\\n")
    >>> m = read_manifest(d / "m.csv", val_fraction=0.2, test_fraction=0.2)
    >>> m.classes, len(m.slides), sorted(m.slides["split"].unique())
    (['normal', 'tumor'], 6, ['test', 'train', 'val'])
"""

from __future__ import annotations

import csv
import io
import os
import re
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from icmil.errors import ManifestError
from icmil.io import text_digest, write_text_atomic
from icmil.log import get_logger
from icmil.slide_ids import id_key, slide_id_problem

if TYPE_CHECKING:
    from icmil.config import ICMILConfig

log = get_logger("manifest")

REQUIRED_COLUMNS = ("slide_id", "path", "label")
# Column of the resolved manifest saying where each row's split came from (the manifest, or a seeded decision).
SPLIT_SOURCE = "split_source"
SPLITS = ("train", "val", "test")
_MAX_LISTED = 10  # lines named in one message; the rest are counted


@dataclass
class Manifest:
    """Validated slides (columns ``slide_id, path, label, label_index, split, mpp``) plus per-row errors."""

    slides: pd.DataFrame
    classes: list[str]
    errors: dict[str, str] = field(default_factory=dict)
    source: str = ""
    rejected: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def digest(self) -> str:
        """Content key of the usable rows (ids, paths, labels, splits, mpp)."""
        cols = ["slide_id", "path", "label", "split", "mpp"]
        return text_digest(self.slides[cols].astype(str).values.tolist(), self.classes)

    def split(self, name: str) -> pd.DataFrame:
        """Rows of one split (``train``, ``val`` or ``test``)."""
        return self.slides[self.slides["split"] == name].reset_index(drop=True)

    def label_of(self, slide_id: str) -> int:
        return int(self.slides.loc[self.slides["slide_id"] == slide_id, "label_index"].iloc[0])

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the resolved manifest (with the split and label index filled in) atomically."""
        return write_text_atomic(path, self.slides.to_csv(index=False))


# --------------------------------------------------------------------------- splits


def _stratified_split(labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """Seeded per-class split; every split that is asked for gets at least one slide of each class if possible."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=object)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n = len(idx)
        n_test = round(n * test_fraction) if test_fraction > 0 else 0
        n_val = round(n * val_fraction) if val_fraction > 0 else 0
        if test_fraction > 0 and n >= 3:
            n_test = max(n_test, 1)
        if val_fraction > 0 and n >= 3:
            n_val = max(n_val, 1)
        n_test = min(n_test, max(n - 1, 0))
        n_val = min(n_val, max(n - 1 - n_test, 0))
        out[idx[:n_test]] = "test"
        out[idx[n_test : n_test + n_val]] = "val"
        out[idx[n_test + n_val :]] = "train"
    return out


def _carve_val(df: pd.DataFrame, seed: int, val_fraction: float) -> int:
    """Move a stratified, seeded ``val_fraction`` of the training rows to ``val`` (in place); returns how many.

    Only the training rows take part, so the official test split is never touched; the same rows, seed and
    fraction always give the same validation slides.
    """
    train = df.index[df["split"] == "train"]
    if len(train) == 0 or val_fraction <= 0:
        return 0
    assigned = _stratified_split(df.loc[train, "label_index"].to_numpy(), seed, val_fraction, 0.0)
    moved = train[assigned == "val"]
    df.loc[moved, "split"] = "val"
    return len(moved)


# --------------------------------------------------------------------------- labels


def _normalised_label(label: str) -> str:
    """Case, spacing, ``_`` and ``-`` removed: labels equal under this are the same word written twice."""
    return re.sub(r"[\s_\-]+", "", unicodedata.normalize("NFKC", label).casefold())


def _edit_distance(a: str, b: str, limit: int) -> int:
    """Levenshtein distance, stopping early once it exceeds ``limit`` (returns ``limit + 1`` then)."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
        if min(cur) > limit:
            return limit + 1
        prev = cur
    return prev[-1]


def _letters_only_difference(a: str, b: str) -> bool:
    """True when the characters that differ are letters: ``grade1``/``grade2`` or ``HER2+``/``HER2-`` are real
    classes, ``tumor``/``tumour`` is a typo."""
    common = set(a) & set(b)
    diff = (set(a) | set(b)) - common
    # Characters appearing a different number of times count too (``tumor`` vs ``tumoor``).
    diff |= {c for c in common if a.count(c) != b.count(c)}
    return bool(diff) and all(c.isalpha() for c in diff)


def confusable_labels(a: str, b: str) -> bool:
    """Whether two distinct labels look like one label written two ways (case, spacing, or a 1-2 letter typo).

    >>> confusable_labels("tumor", "Tumour"), confusable_labels("Normal ", "normal")
    (True, True)
    >>> confusable_labels("grade1", "grade2"), confusable_labels("LUAD", "LUSC"), confusable_labels("HER2+", "HER2-")
    (False, False, False)
    """
    if a == b:
        return False
    na, nb = _normalised_label(a), _normalised_label(b)
    if na == nb:
        return True
    shortest = min(len(na), len(nb))
    limit = 2 if shortest >= 10 else 1 if shortest >= 5 else 0
    if limit == 0:
        return False
    return _edit_distance(na, nb, limit) <= limit and _letters_only_difference(na, nb)


def _closest(label: str, choices: Sequence[str]) -> str | None:
    return next((c for c in choices if confusable_labels(label, c)), None)


def _lines_text(lines: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in lines[:_MAX_LISTED])
    more = f" and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
    return f"line{'s' if len(lines) > 1 else ''} {shown}{more}"


# --------------------------------------------------------------------------- reading


@dataclass
class _Row:
    line: int
    values: dict[str, str]


class _Rejections:
    """Collects rejected rows: line -> why, and the slide-keyed view stages report."""

    def __init__(self) -> None:
        self.by_line: dict[int, str] = {}
        self.by_slide: dict[str, str] = {}

    def add(self, row: _Row, why: str, *, counts: bool = True) -> None:
        sid = row.values.get("slide_id", "")
        text = f"line {row.line}: {why}"
        self.by_line[row.line] = text
        if counts:
            # A rejected id that is unsafe or empty is not used as a key (it may even look like another id).
            key = sid if sid and slide_id_problem(sid) is None else f"<line {row.line}>"
            self.by_slide[key] = f"{self.by_slide[key]}; {text}" if key in self.by_slide else text


def _read_rows(p: Path) -> tuple[list[str], list[_Row], _Rejections]:
    """The header and the data rows of the CSV with their line numbers; field-count problems are rejections."""
    rejections = _Rejections()
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = p.read_bytes()[: err.start].count(b"\n") + 1
        raise ManifestError(
            f"manifest {p} is not UTF-8 text (undecodable byte on line {line}); save it as UTF-8 CSV"
        ) from None
    except OSError as err:
        raise ManifestError(f"manifest {p} cannot be read: {err}") from None
    if "\x00" in text:
        raise ManifestError(f"manifest {p} contains NUL bytes; it is not a CSV text file")
    # Lines end at \n, \r\n or \r only (not at the other Unicode line separators str.splitlines knows), so
    # line numbers are the ones an editor shows and such characters inside a value stay in the value.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[_Row] = []
    header: list[str] | None = None
    start = 1
    try:
        for record in reader:
            line, start = start, reader.line_num + 1
            if header is None:
                if not record or all(not f.strip() for f in record):
                    continue  # blank lines before the header
                header = [h.strip() for h in record]
                continue
            if not record:
                continue  # an empty line is not a row
            values = [f.strip() for f in record]
            if all(not v for v in values):
                row = _Row(line, {})
                rejections.add(row, "blank row (every field is empty); ignored", counts=False)
                continue
            if len(values) != len(header):
                # The values cannot be matched to columns, so not even the slide id is known for sure.
                hint = (
                    "an unquoted comma inside a value? quote the value"
                    if len(values) > len(header)
                    else "every row needs a value (possibly empty) for every column"
                )
                rejections.add(
                    _Row(line, {}),
                    f"has {len(values)} fields but the header has {len(header)}, so its values cannot be "
                    f"matched to columns (first field {values[0]!r}; {hint})",
                )
                continue
            rows.append(_Row(line, dict(zip(header, values, strict=True))))
    except csv.Error as err:
        raise ManifestError(f"manifest {p} is not a valid CSV near line {reader.line_num}: {err}") from None
    if header is None:
        raise ManifestError(
            f"manifest {p} is empty; expected the header 'slide_id,path,label[,split][,mpp]' and one row per slide"
        )
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes or "" in header:
        raise ManifestError(
            f"manifest {p}: the header {header} has "
            + (f"duplicate column(s) {dupes}" if dupes else "an empty column name")
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ManifestError(
            f"manifest {p} is missing column(s) {missing}; expected header "
            f"'slide_id,path,label[,split][,mpp]' separated by commas, found {header}"
        )
    return header, rows, rejections


def _control_char_field(values: dict[str, str]) -> str | None:
    """The first column this project reads whose value holds a control character (free extra columns, such
    as notes with line breaks, are the user's business)."""
    for column in ("path", "label", "split", "mpp"):
        if any(unicodedata.category(c) == "Cc" for c in values.get(column, "")):
            return column
    return None


def _path_problem(value: str) -> str | None:
    if not value:
        return "empty path"
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*)://", value)
    if scheme and scheme.group(1).lower() != "s3":
        return f"path {value!r} uses the unsupported scheme {scheme.group(1)!r} (use a local path or s3://bucket/key)"
    return None


def _resolve_path(value: str, base: Path) -> str:
    if value.startswith("s3://") or os.path.isabs(value):
        return value
    return str((base / os.path.expanduser(value)).resolve())


def _label_sort_key(s: str) -> tuple[bool, int, str]:
    """Integer labels first, in numeric order; names after them, alphabetically."""
    try:
        return (False, int(s), s)
    except ValueError:
        return (True, 0, s)


def read_manifest(
    path: str | os.PathLike[str],
    *,
    classes: list[str] | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    partial: bool = False,
) -> Manifest:
    """Read and validate a manifest CSV; fill in splits where the column is absent or has no ``val`` rows.

    Relative slide paths resolve against the manifest's folder; ``s3://`` paths are kept as they are. A path may
    name a folder (a DICOM-WSI slide stored as one file per level). Labels are class names or integers;
    ``classes`` fixes the allowed names and their order, otherwise they are the sorted labels of the training
    rows. ``partial=True`` reads a part of a resolved manifest (one shard of the tile/embed stages): labels and
    splits are taken as they are, classes come from all rows and no validation split is carved.
    """
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"manifest not found: {p}")
    header, rows, rej = _read_rows(p)
    has_split = "split" in header and any(r.values.get("split") for r in rows)
    good = _valid_rows(_uniquely_named(rows, rej), rej, has_split)
    classes, good = _classes(p, good, rej, classes, has_split=has_split, partial=partial)
    if not good:
        detail = "; ".join(rej.by_line[n] for n in sorted(rej.by_line)[:_MAX_LISTED])
        raise ManifestError(f"manifest {p} has no usable slide. {detail}")

    extra = [c for c in header if c not in (*REQUIRED_COLUMNS, "split", "mpp", "label_index")]
    class_index = {c: i for i, c in enumerate(classes)}
    df = pd.DataFrame(
        {
            "slide_id": [r.values["slide_id"] for r in good],
            "path": [_resolve_path(r.values["path"], p.parent) for r in good],
            "label": [r.values["label"] for r in good],
            "label_index": [class_index[r.values["label"]] for r in good],
            "split": [r.values.get("split", "") for r in good],
            "mpp": [float(r.values["mpp"]) if r.values.get("mpp") else np.nan for r in good],
            **{c: [r.values[c] for r in good] for c in extra},
        }
    )
    df["label_index"] = df["label_index"].astype(int)
    df["mpp"] = df["mpp"].astype(float)
    notes = [] if partial else _fill_splits(df, has_split, seed, val_fraction, test_fraction)
    if partial and not has_split:
        df["split"] = _stratified_split(df["label_index"].to_numpy(), seed, val_fraction, test_fraction)
    for note in notes:
        log.info("%s: %s", p.name, note)
    return Manifest(
        slides=df.reset_index(drop=True),
        classes=list(classes),
        errors=rej.by_slide,
        source=str(p),
        rejected=dict(sorted(rej.by_line.items())),
        notes=notes,
    )


def _uniquely_named(rows: list[_Row], rej: _Rejections) -> list[_Row]:
    """The rows with a safe slide id that no other row shares (ignoring letter case); the others rejected.

    Uniqueness is over every row that names a slide, whatever else is wrong with it: a rejected row must never
    share its id (its key in ``errors``, its file names) with a slide that is kept.
    """
    named: list[_Row] = []
    for row in rows:
        sid = row.values["slide_id"]
        if not sid:
            rej.add(row, "empty slide_id; every row needs one")
        elif (why := slide_id_problem(sid)) is not None:
            rej.add(row, f"slide id {sid!r} {why}; rename the slide in the manifest")
        else:
            named.append(row)
    by_key: dict[str, list[_Row]] = defaultdict(list)
    for row in named:
        by_key[id_key(row.values["slide_id"])].append(row)
    unique: list[_Row] = []
    for row in named:
        group = by_key[id_key(row.values["slide_id"])]
        if len(group) == 1:
            unique.append(row)
            continue
        ids = sorted({r.values["slide_id"] for r in group})
        lines = [r.line for r in group]
        rej.add(
            row,
            f"duplicate slide_id on CSV lines {lines}; slide ids must be unique"
            if len(ids) == 1
            else f"slide ids {ids} on CSV lines {lines} differ only by letter case and would share one file "
            "on a case-insensitive filesystem; slide ids must be unique",
        )
    return unique


def _valid_rows(rows: list[_Row], rej: _Rejections, has_split: bool) -> list[_Row]:
    """The rows whose path, label, µm/px and split are usable (splits normalised to lower case)."""
    good: list[_Row] = []
    for row in rows:
        v = row.values
        bad_column = _control_char_field(v)
        raw_mpp = v.get("mpp", "")
        split = v.get("split", "").lower()
        if bad_column is not None:
            rej.add(row, f"the {bad_column} field contains a control character")
        elif (why := _path_problem(v["path"])) is not None:
            rej.add(row, why)
        elif not v["label"]:
            rej.add(row, "empty label")
        elif raw_mpp and not _positive(raw_mpp):
            rej.add(row, f"mpp {raw_mpp!r} is not a positive number (µm per level-0 pixel, e.g. 0.25)")
        elif has_split and split not in SPLITS:
            shown = repr(v.get("split", "")) if v.get("split") else "empty"
            rej.add(
                row,
                f"split {shown} is not one of {list(SPLITS)} (other rows have a split, so every row needs one)",
            )
        else:
            if has_split:
                v["split"] = split
            good.append(row)
    return good


def _positive(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return bool(np.isfinite(value) and value > 0)


def _classes(
    p: Path,
    rows: list[_Row],
    rej: _Rejections,
    classes: list[str] | None,
    *,
    has_split: bool,
    partial: bool,
) -> tuple[list[str], list[_Row]]:
    """The classes and the rows whose label is one of them.

    Given ``classes``: other labels are row errors (with the near class suggested). Otherwise the labels of the
    training rows, after refusing labels written two ways and val/test labels unseen in training
    (:class:`ManifestError`, naming labels and lines); for a ``partial`` manifest simply every label.
    """
    labels_seen: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        labels_seen[row.values["label"]].append(row.line)
    if classes is not None:
        names = [str(c) for c in classes]
        kept = []
        for row in rows:
            label = row.values["label"]
            if label in names:
                kept.append(row)
                continue
            near = _closest(label, names)
            hint = f"; did you mean {near!r}?" if near else " (set `classes` in the config)"
            rej.add(row, f"unknown label {label!r}; allowed labels are {names}{hint}")
        return names, kept
    if partial or not has_split:
        if not partial:
            _check_confusable(p, labels_seen)
        return sorted(labels_seen, key=_label_sort_key), rows
    _check_confusable(p, labels_seen)
    train_labels = {r.values["label"] for r in rows if r.values["split"] == "train"}
    if not train_labels and rows:
        raise ManifestError(
            f"manifest {p} has no usable row in the train split; the classes are the labels of the training "
            "slides (mark training rows with split=train)"
        )
    unseen: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        if row.values["label"] not in train_labels:
            unseen[row.values["label"]].append(row.line)
    if unseen:
        parts = "; ".join(f"{lab!r} ({_lines_text(lines)})" for lab, lines in sorted(unseen.items()))
        raise ManifestError(
            f"manifest {p}: label(s) {parts} appear in val/test rows but never in the train split, whose labels "
            f"are {sorted(train_labels, key=_label_sort_key)}. Fix the typo, move some of those slides to train, "
            "or list the classes in the config (`classes`)"
        )
    return sorted(train_labels, key=_label_sort_key), rows


def _fill_splits(
    df: pd.DataFrame, has_split: bool, seed: int, val_fraction: float, test_fraction: float
) -> list[str]:
    """Make the splits a run needs (in place) and record where each row's split came from; returns notes."""
    notes: list[str] = []
    if not has_split:
        df["split"] = _stratified_split(df["label_index"].to_numpy(), seed, val_fraction, test_fraction)
        df[SPLIT_SOURCE] = (
            f"seeded split (val_fraction={val_fraction}, test_fraction={test_fraction}, seed={seed})"
        )
        return notes
    if SPLIT_SOURCE not in df:
        df[SPLIT_SOURCE] = "manifest"
    if (df["split"] == "val").any():
        return notes
    n_train = int((df["split"] == "train").sum())
    before = df["split"].copy()
    moved = _carve_val(df, seed, val_fraction)
    df.loc[before != df["split"], SPLIT_SOURCE] = (
        f"carved from train (val_fraction={val_fraction}, seed={seed})"
    )
    if moved:
        notes.append(
            f"the manifest's split column has no val rows: carved a stratified validation split of {moved} of "
            f"the {n_train} training slides (val_fraction={val_fraction}, seed={seed}); the test rows are unchanged"
        )
    return notes


def _check_confusable(p: Path, labels_seen: dict[str, list[int]]) -> None:
    """Raise when labels look like one label written several ways (each group named with its lines)."""
    labels = sorted(labels_seen)
    group = {label: label for label in labels}  # union-find: labels written two ways form one group

    def root(label: str) -> str:
        while group[label] != label:
            label = group[label]
        return label

    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            if confusable_labels(a, b):
                group[root(b)] = root(a)
    groups: dict[str, list[str]] = defaultdict(list)
    for label in labels:
        groups[root(label)].append(label)
    clashes = [members for members in groups.values() if len(members) > 1]
    if clashes:
        text = "; ".join(
            " / ".join(f"{m!r} ({_lines_text(labels_seen[m])})" for m in members) for members in clashes
        )
        raise ManifestError(
            f"manifest {p}: labels that differ only by case, spacing or a small typo: {text}. Write each "
            "class one way, or list the classes in the config (`classes`) if they really are different"
        )


def check_trainable(manifest: Manifest, *, val_fraction: float | None = None) -> None:
    """Raise :class:`ManifestError` unless the manifest can train a bag head: two or more classes among the
    training slides and at least one validation slide. A validation split lacking a class only warns (its AUC
    is undefined, so tuning and model selection have less to go on).

    >>> import pandas as pd
    >>> rows = pd.DataFrame({"slide_id": ["a", "b"], "label": ["x", "y"], "split": ["train", "train"]})
    >>> check_trainable(Manifest(rows, ["x", "y"], source="m.csv"))  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    icmil.errors.ManifestError: manifest m.csv has no val slides ...
    """
    train, val = manifest.split("train"), manifest.split("val")
    where = f"manifest {manifest.source}" if manifest.source else "the manifest"
    counts = manifest.slides.groupby("split")["slide_id"].count().to_dict()
    have = ", ".join(f"{counts.get(s, 0)} {s}" for s in SPLITS)
    if train["label"].nunique() < 2:
        raise ManifestError(
            f"{where}: the train split needs slides of at least two classes; it has "
            f"{sorted(set(train['label']))} ({have} slides)"
        )
    if val.empty:
        fix = (
            "set val_fraction > 0 to carve one from train"
            if val_fraction is not None and val_fraction <= 0
            else "add val rows or raise val_fraction (too few training slides per class to carve one)"
        )
        raise ManifestError(f"{where} has no val slides ({have} slides): {fix}")
    missing = sorted(set(train["label"]) - set(val["label"]), key=_label_sort_key)
    if missing:
        log.warning(
            "%s: the val split has no slide of class(es) %s; validation AUC is undefined for them",
            where,
            missing,
        )


def read_run_manifest(cfg: ICMILConfig, path: str | os.PathLike[str], *, partial: bool = False) -> Manifest:
    """:func:`read_manifest` with the run's settings (classes, seed, split fractions) from ``cfg``.

    On a resolved manifest (``RUN/manifest.csv``) the split column is used as it is, so every stage and round
    reads the same split.

    >>> from icmil.config import ICMILConfig
    >>> read_run_manifest(ICMILConfig(), "missing.csv")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    icmil.errors.ManifestError: manifest not found: missing.csv
    """
    return read_manifest(
        path,
        classes=cfg.classes,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        partial=partial,
    )
