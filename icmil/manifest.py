"""The slide manifest: ``slide_id,path,label[,split][,mpp]`` — read, validated, split once for every stage.

Problems with single rows (duplicate id, unknown label, bad split, empty path) do not stop the run: the row is
dropped and its reason kept in :attr:`Manifest.errors`, so a stage can report it with the other slide failures.
Problems with the file as a whole (unreadable, missing column, no usable row) raise :class:`ManifestError`.

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

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from icmil.errors import ManifestError
from icmil.io import text_digest, write_text_atomic

if TYPE_CHECKING:
    from icmil.config import ICMILConfig

REQUIRED_COLUMNS = ("slide_id", "path", "label")
SPLITS = ("train", "val", "test")


@dataclass
class Manifest:
    """Validated slides (columns ``slide_id, path, label, label_index, split, mpp``) plus per-row errors."""

    slides: pd.DataFrame
    classes: list[str]
    errors: dict[str, str] = field(default_factory=dict)
    source: str = ""

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


def read_manifest(
    path: str | os.PathLike[str],
    *,
    classes: list[str] | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> Manifest:
    """Read and validate a manifest CSV; fill in splits (stratified by label, seeded) where the column is absent.

    Relative slide paths resolve against the manifest's folder; ``s3://`` paths are kept as they are.
    Labels are class names or integers; ``classes`` fixes the allowed names and their order.
    """
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"manifest not found: {p}")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except Exception as err:  # pandas raises many types for unreadable CSVs
        raise ManifestError(f"manifest {p} is not a readable CSV: {err}") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(
            f"manifest {p} is missing column(s) {missing}; expected header "
            f"'slide_id,path,label[,split][,mpp]', found {list(df.columns)}"
        )
    errors: dict[str, str] = {}
    df = df.apply(lambda col: col.str.strip())
    df = df[~(df["slide_id"] == "")].copy() if (df["slide_id"] == "").any() else df
    dup = df["slide_id"].duplicated(keep=False)
    for sid in sorted(set(df.loc[dup, "slide_id"])):
        rows = [int(i) + 2 for i in df.index[df["slide_id"] == sid]]
        errors[sid] = f"duplicate slide_id on CSV lines {rows}; slide ids must be unique"
    df = df[~dup].copy()

    empty_path = df["path"] == ""
    for sid in df.loc[empty_path, "slide_id"]:
        errors[sid] = "empty path in the manifest"
    df = df[~empty_path].copy()

    def _resolve(value: str) -> str:
        if value.startswith("s3://") or os.path.isabs(value):
            return value
        return str((p.parent / value).resolve())

    df["path"] = df["path"].map(_resolve)

    if classes is None:
        classes = sorted(set(df["label"]) - {""}, key=lambda s: (not s.lstrip("-").isdigit(), _int_or(s), s))
    class_index = {c: i for i, c in enumerate(classes)}
    unknown = ~df["label"].isin(class_index)
    for sid, label in df.loc[unknown, ["slide_id", "label"]].itertuples(index=False):
        errors[sid] = f"unknown label {label!r}; allowed labels are {classes} (set `classes` in the config)"
    df = df[~unknown].copy()
    df["label_index"] = df["label"].map(class_index).astype(int)

    if "mpp" in df.columns:
        mpp = pd.to_numeric(df["mpp"].replace("", np.nan), errors="coerce")
        bad = mpp.isna() & (df["mpp"] != "") | (mpp <= 0)
        for sid, raw in df.loc[bad, ["slide_id", "mpp"]].itertuples(index=False):
            errors[sid] = f"mpp {raw!r} is not a positive number"
        df = df[~bad].copy()
        df["mpp"] = mpp[~bad]
    else:
        df["mpp"] = np.nan

    if "split" in df.columns and (df["split"] != "").any():
        bad_split = ~df["split"].isin(SPLITS)
        for sid, raw in df.loc[bad_split, ["slide_id", "split"]].itertuples(index=False):
            errors[sid] = f"split {raw!r} is not one of {list(SPLITS)}"
        df = df[~bad_split].copy()
    else:
        df["split"] = (
            _stratified_split(df["label_index"].to_numpy(), seed, val_fraction, test_fraction)
            if len(df)
            else []
        )

    if df.empty:
        detail = "; ".join(f"{k}: {v}" for k, v in sorted(errors.items())[:10])
        raise ManifestError(f"manifest {p} has no usable slide. {detail}")
    extra = [c for c in df.columns if c not in ("slide_id", "path", "label", "label_index", "split", "mpp")]
    df = df[["slide_id", "path", "label", "label_index", "split", "mpp", *extra]].reset_index(drop=True)
    return Manifest(slides=df, classes=list(classes), errors=errors, source=str(p))


def _int_or(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        return 0


def read_run_manifest(cfg: ICMILConfig, path: str | os.PathLike[str]) -> Manifest:
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
    )
