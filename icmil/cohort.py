"""The cohort a pipeline run works on: synthesise (no manifest given) or read the manifest, split once, shard.

The ``prepare`` step of the pipeline calls :func:`prepare_cohort`. It writes one portable folder (the KFP artifact
``cohort``): the resolved manifest (split and label index filled in; paths of slides inside the folder stay
relative, so the folder works wherever KFP downloads it) and, for a synthetic cohort, the slides themselves.
It also cuts the slides into shards for the tile/embed ``ParallelFor``. Each shard carries its own manifest rows
plus a content fingerprint per slide (S3 ETag or SHA-256), so a tile/embed task is keyed by what it reads and
KFP's cache can reuse it across runs without depending on the (never cached) manifest step.

Example:
    >>> import tempfile
    >>> from icmil.config import load_config
    >>> cfg = load_config(None, ["synth.n_slides=6", "synth.width=768", "synth.height=512"])
    >>> cohort = prepare_cohort(cfg, tempfile.mkdtemp(), n_shards=2)
    >>> len(cohort.shards), sorted(len(s.rows) for s in cohort.shards)
    (2, [3, 3])
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from icmil.config import ICMILConfig
from icmil.errors import ManifestError, check_failure_fraction
from icmil.io import atomic_path, file_digest, text_digest, write_json_atomic, write_text_atomic
from icmil.log import get_logger
from icmil.manifest import Manifest, check_trainable, read_run_manifest

log = get_logger("cohort")

# The cohort folder's layout (the KFP artifact ``cohort``; for ``icmil couple`` the run folder itself).
MANIFEST_NAME = "manifest.csv"  # the resolved manifest: split and label index filled in
SHARDS_NAME = "shards.json"
SYNTH_DIR = "synth"  # a synthetic cohort: slides/, its own manifest.csv and lesions.json
# Lesion boxes {slide_id: [[x0, y0, x1, y1], ...]} (level-0 pixels): the synthetic generator writes them, and a
# user's file of this name next to a local manifest is copied into the cohort. They give the patch-level AUCs.
LESIONS_NAME = "lesions.json"
_ROW_COLUMNS = ("slide_id", "path", "label", "split", "mpp")


@dataclass
class Shard:
    """One ParallelFor item: the manifest rows of a few slides, each with a content fingerprint."""

    index: int
    rows: list[dict[str, Any]]

    @property
    def slide_ids(self) -> list[str]:
        return [str(r["slide_id"]) for r in self.rows]

    def to_json(self) -> str:
        """Compact JSON: the value of the shard parameter in the compiled pipeline."""
        return json.dumps({"index": self.index, "rows": self.rows}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Shard:
        try:
            data = json.loads(text)
            return cls(index=int(data["index"]), rows=list(data["rows"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ManifestError(f"shard parameter is not a shard produced by prepare_cohort: {err}") from None


@dataclass
class PreparedCohort:
    """What :func:`prepare_cohort` wrote and decided."""

    directory: Path
    manifest_csv: Path
    shards: list[Shard]
    manifest_digest: str
    classes: list[str]
    n_slides: int
    errors: dict[str, str] = field(default_factory=dict)
    synthetic: bool = False


def slide_fingerprint(path: str) -> str:
    """Content key of one slide: ``etag:...`` for ``s3://`` objects, ``sha256:...`` for local files.

    A slide that cannot be reached gets ``missing`` (the tile stage reports the real error for it).

    >>> slide_fingerprint("/no/such/slide.svs")
    'missing'
    """
    if path.startswith("s3://"):
        try:
            import boto3

            bucket, _, key = path[len("s3://") :].partition("/")
            head = boto3.client("s3").head_object(Bucket=bucket, Key=key)
            return f"etag:{str(head['ETag']).strip(chr(34))}:{head['ContentLength']}"
        except Exception as err:  # any boto/botocore failure: the tile stage reports it per slide
            log.warning("cannot fingerprint %s: %s", path, err)
            return "missing"
    if os.path.isdir(path):
        # A DICOM-WSI slide: one file per level (and per associated image) in one folder.
        files = sorted(f for f in Path(path).iterdir() if f.is_file())
        return f"sha256-dir:{text_digest([(f.name, file_digest(f)) for f in files])}"
    if not os.path.isfile(path):
        return "missing"
    return f"sha256:{file_digest(path)}"


def _slide_size(path: str) -> int:
    try:
        if path.startswith("s3://"):
            return 0
        if os.path.isdir(path):
            return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
        return os.path.getsize(path)
    except OSError:
        return 0


def _assign_shards(sizes: list[tuple[str, int]], n_shards: int) -> list[list[str]]:
    """Largest slide first onto the lightest shard (LPT), so shards finish at about the same time."""
    loads = [0] * n_shards
    members: list[list[str]] = [[] for _ in range(n_shards)]
    for sid, size in sorted(sizes, key=lambda t: (-t[1], t[0])):
        # Count slides too, so equal-sized (or unknown-size S3) slides still spread evenly.
        target = min(range(n_shards), key=lambda i: (loads[i], len(members[i]), i))
        loads[target] += size
        members[target].append(sid)
    return [sorted(m) for m in members]


def _portable_path(path: str, base: Path) -> str:
    """Paths inside the cohort folder are written relative to it; everything else stays absolute / s3://."""
    if path.startswith("s3://"):
        return path
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path


def cohort_lesions(cohort_dir: str | os.PathLike[str]) -> Path | None:
    """The cohort's lesion boxes: ``lesions.json`` copied from beside a user's manifest, else the synthetic
    cohort's; None when the cohort has none (no patch-level AUCs then).

    >>> import tempfile
    >>> cohort_lesions(tempfile.mkdtemp()) is None
    True
    """
    for path in (Path(cohort_dir) / LESIONS_NAME, Path(cohort_dir) / SYNTH_DIR / LESIONS_NAME):
        if path.is_file():
            return path
    return None


def copy_lesions(manifest: str | None, out_dir: str | os.PathLike[str]) -> Path | None:
    """Copy ``lesions.json`` from beside a local ``manifest`` into the cohort folder ``out_dir`` (a newer file
    replaces an older copy); returns the copy, or None when there is none to copy (no manifest, ``s3://``, no
    such file). The file is read (and checked) where it is used: :func:`icmil.stages.read_lesions`."""
    import shutil

    if not manifest or manifest.startswith("s3://"):
        return None
    source = Path(manifest).parent / LESIONS_NAME
    if not source.is_file():
        return None
    target = Path(out_dir) / LESIONS_NAME
    if not target.is_file() or file_digest(target) != file_digest(source):
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    return target


def check_cohort(cfg: ICMILConfig, manifest_csv: str | os.PathLike[str]) -> Manifest:
    """Every check of a training cohort, in seconds and before anything expensive; returns the manifest.

    The manifest's own checks (ids, labels, splits; each rejected row is logged with its CSV line), a train
    split with two or more classes and a non-empty val split (:func:`~icmil.manifest.check_trainable`), and
    rejected rows plus missing local slide files within ``tiling.max_failed_fraction`` (past it the tile
    stage would fail anyway, after tiling everything else).
    """
    m = read_run_manifest(cfg, manifest_csv)
    for line in sorted(m.rejected):
        log.warning("manifest %s", m.rejected[line])
    check_trainable(m, val_fraction=cfg.val_fraction)
    missing = {
        str(sid): f"slide file not found: {path}"
        for sid, path in zip(m.slides["slide_id"], m.slides["path"], strict=True)
        if not str(path).startswith("s3://") and not os.path.exists(path)
    }
    check_failure_fraction(
        "manifest check",
        {**m.errors, **missing},
        len(m.slides) + len(m.errors),
        cfg.tiling.max_failed_fraction,
    )
    return m


def preflight_cohort(cfg: ICMILConfig) -> None:
    """:func:`check_cohort` on ``cfg.manifest`` before a pipeline starts (nothing to check for a synthetic
    cohort); an ``s3://`` manifest is fetched into a temporary folder first. Writes nothing."""
    if cfg.manifest is None:
        return
    if cfg.manifest.startswith("s3://"):
        import tempfile

        from icmil.slides import localize

        with tempfile.TemporaryDirectory(prefix="icmil-preflight-") as tmp:
            check_cohort(cfg, localize(cfg.manifest, Path(tmp)))
        return
    check_cohort(cfg, cfg.manifest)


def prepare_cohort(
    cfg: ICMILConfig,
    out_dir: str | os.PathLike[str],
    n_shards: int | None = None,
    manifest: str | None = None,
) -> PreparedCohort:
    """Synthesise (``cfg.manifest`` is None) or read the manifest, split it once, and cut it into shards.

    ``manifest`` overrides ``cfg.manifest`` (the pipeline parameter of the same name). Writes
    ``out_dir/manifest.csv`` (resolved), ``out_dir/shards.json`` and ``out_dir/manifest_errors.json``; a
    synthetic cohort goes to ``out_dir/synth/``; a local manifest's ``lesions.json`` is copied to
    ``out_dir/lesions.json`` (:func:`cohort_lesions` finds either). Rows the manifest reader rejected are listed in ``errors``
    (and logged with their CSV line) and left out of every shard.

    All cohort checks (:func:`check_cohort`) run first; nothing is written when they fail, so a rerun checks
    again.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = manifest or cfg.manifest
    synthetic = source is None
    if source is None:
        from icmil.slides import synthesize_cohort

        source_path = synthesize_cohort(out / SYNTH_DIR, cfg.synth)
    elif source.startswith("s3://"):
        from icmil.slides import localize

        source_path = localize(source, out / "source")
    else:
        source_path = Path(source)
    m = check_cohort(cfg, source_path)
    if not synthetic:
        copy_lesions(source, out)
    slides = m.slides.copy()
    slides["path"] = [_portable_path(p, out) for p in slides["path"]]
    manifest_csv = write_text_atomic(out / MANIFEST_NAME, slides.to_csv(index=False))

    absolute = {
        sid: str(out / p) if not (p.startswith("s3://") or os.path.isabs(p)) else p
        for sid, p in zip(slides["slide_id"], slides["path"], strict=True)
    }
    count = max(1, min(n_shards or cfg.pipeline.shards, len(slides)))
    groups = _assign_shards([(sid, _slide_size(p)) for sid, p in absolute.items()], count)
    records = {str(r["slide_id"]): r for r in slides.to_dict("records")}
    shards = []
    for index, ids in enumerate(groups):
        rows = []
        for sid in ids:
            row = records[sid]
            mpp = row["mpp"]
            rows.append(
                {
                    "slide_id": sid,
                    "path": str(row["path"]),
                    "label": str(row["label"]),
                    "split": str(row["split"]),
                    "mpp": "" if mpp is None or (isinstance(mpp, float) and math.isnan(mpp)) else float(mpp),
                    "fingerprint": slide_fingerprint(absolute[sid]),
                }
            )
        shards.append(Shard(index=index, rows=rows))
    write_json_atomic(out / SHARDS_NAME, [json.loads(s.to_json()) for s in shards])
    write_json_atomic(out / "manifest_errors.json", m.errors)
    log.info(
        "cohort: %d slides (%s), %d shard(s), %d manifest row(s) rejected",
        len(slides),
        "synthetic" if synthetic else source,
        len(shards),
        len(m.errors),
    )
    return PreparedCohort(
        directory=out,
        manifest_csv=manifest_csv,
        shards=shards,
        manifest_digest=text_digest(m.digest, [s.to_json() for s in shards]),
        classes=list(m.classes),
        n_slides=len(slides),
        errors=dict(m.errors),
        synthetic=synthetic,
    )


def shard_manifest(
    shard: Shard | str, out_csv: str | os.PathLike[str], base_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Write the manifest CSV of one shard; relative slide paths resolve against ``base_dir`` (the cohort folder).

    >>> import tempfile, pathlib
    >>> s = Shard(0, [{"slide_id": "a", "path": "synth/slides/a.tiff", "label": "tumor", "split": "train",
    ...                "mpp": "", "fingerprint": "missing"}])
    >>> p = shard_manifest(s, pathlib.Path(tempfile.mkdtemp()) / "m.csv", base_dir="/data/cohort")
    >>> p.read_text().splitlines()[1]
    'a,/data/cohort/synth/slides/a.tiff,tumor,train,'
    """
    if isinstance(shard, str):
        shard = Shard.from_json(shard)
    rows = []
    for r in shard.rows:
        path = str(r["path"])
        if not (path.startswith("s3://") or os.path.isabs(path)):
            if base_dir is None:
                raise ManifestError(
                    f"slide {r['slide_id']!r} has the relative path {path!r} but no cohort folder was given"
                )
            path = str(Path(base_dir) / path)
        rows.append({**{k: r.get(k, "") for k in _ROW_COLUMNS}, "path": path})
    frame = pd.DataFrame(rows, columns=list(_ROW_COLUMNS))
    return write_text_atomic(out_csv, frame.to_csv(index=False))


def merge_shard_dirs(
    parts: Sequence[str | os.PathLike[str]], dest: str | os.PathLike[str], link: bool = False
) -> Path:
    """One folder holding the files of every shard's output folder (tiles or features of all slides).

    ``link=True`` makes symlinks (a read-only view for a consumer, no copy); otherwise files are copied (the
    merged folder is itself an artifact). Two shards writing the same slide file is a bug and raises; other
    same-named files (status tables, config dumps) are kept side by side as ``<stem>-part<i><suffix>``.

    >>> import tempfile, pathlib
    >>> a, b = (pathlib.Path(tempfile.mkdtemp()) for _ in range(2))
    >>> _ = (a / "s1.h5").write_text("1"); _ = (b / "s2.h5").write_text("2")
    >>> sorted(p.name for p in merge_shard_dirs([a, b], tempfile.mkdtemp()).iterdir())
    ['s1.h5', 's2.h5']
    """
    import shutil

    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    owner: dict[str, int] = {}
    for i, part in enumerate(parts):
        src_dir = Path(part)
        if not src_dir.is_dir():
            raise ManifestError(f"shard output folder {src_dir} does not exist (did the shard task fail?)")
        for src in sorted(src_dir.iterdir()):
            if not src.is_file():
                continue
            name = src.name
            if name in owner:
                if src.suffix == ".h5":
                    raise ManifestError(
                        f"{name} was written by shard outputs {owner[name]} and {i}; a slide must be in one shard"
                    )
                name = f"{src.stem}-part{i}{src.suffix}"
            owner[name] = i
            target = out / name
            if link:
                if target.exists() or target.is_symlink():
                    target.unlink()
                target.symlink_to(src.resolve())
            else:
                with atomic_path(target) as tmp:
                    shutil.copyfile(src, tmp)
    return out
