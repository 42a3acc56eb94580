"""Embedding stage: stream every tiled slide's patches through an encoder into one features HDF5 per slide.

Reading hides behind compute: one DataLoader runs over the batches of ALL slides to embed, its workers decode
(each with its own OpenSlide handles) while the main process runs the model, so there is no pipeline bubble
between slides. The model runs under ``torch.inference_mode``; on CUDA with autocast (bf16 by default),
channels_last and pinned, non-blocking uint8 copies (normalisation happens on the device).

Resume: a slide is skipped when its features file exists with the same slide digest, tiles digest, encoder
digest and settings digest (all stored as attrs) and its content still matches the checksum stored in it (a
corrupt file is embedded again). Temporary files left by a killed run are removed first. A slide whose file
changed after it was tiled fails, naming the slide: its patch grid belongs to the old bytes. A bad slide is
recorded in the status CSV with its ``SlideError`` and the others go on; :class:`StageFailed` only past
``cfg.max_failed_fraction``.

Example:
    >>> report = embed_manifest(manifest, "run/tiles", "run/round_0/features", encoder, EmbedConfig())  # doctest: +SKIP
    >>> report.n_failed, report.status_path.name  # doctest: +SKIP
    (0, 'status.csv')
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from icmil.config import EmbedConfig
from icmil.errors import FeatureStoreError, ICMILError, SlideError, check_failure_fraction
from icmil.features.encoders import PatchEncoder
from icmil.features.store import CACHE_KEYS, FeatureWriter, read_feature_attrs, verify_features
from icmil.io import file_digest, remove_stale_temp_files, text_digest, write_text_atomic
from icmil.log import get_logger, progress
from icmil.manifest import Manifest
from icmil.slide_ids import slide_file
from icmil.slides.patches import SlideSource, patch_loader

log = get_logger("embed")

FEATURES_FORMAT = "icmil-features/1"
# Same leading columns as the tiling status table (status ok/error; skipped = the output was already up to date).
STATUS_COLUMNS = [
    "slide_id",
    "status",
    "n_patches",
    "error",
    "seconds",
    "skipped",
    "n_corrupt",
    "patches_per_s",
]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ICMILError(
            f"embed.device={name!r} but CUDA is not available here; use embed.device=auto or cpu"
        )
    return dev


def auto_num_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader workers: ``requested`` if set, else enough decoders to keep the device busy.

    A GPU embeds ResNet-50 patches faster than one core decodes them (~400 patches/s for 256-px zlib tiles),
    so on CUDA every core but the main one decodes (up to 16); on a CPU the model itself needs the cores.
    """
    if requested is not None:
        return requested
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(16, cpus - 1))
    return max(1, min(2, cpus - 1))


def _amp_dtype(cfg: EmbedConfig, device: torch.device) -> torch.dtype | None:
    if not cfg.amp or device.type != "cuda":
        return None
    if cfg.amp_dtype == "bfloat16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def embed_settings_digest(cfg: EmbedConfig, device: torch.device) -> str:
    """What (besides slide, tiles and encoder) changes the numbers: the compute precision and the file format.

    Batch size, workers and read merging do not change features, so changing them keeps the cache.
    """
    dtype = _amp_dtype(cfg, device)
    return text_digest({"format": FEATURES_FORMAT, "precision": str(dtype or torch.float32)})


@dataclass
class EmbedReport:
    """Outcome of :func:`embed_manifest`: per-slide status table (also written as CSV) and totals."""

    out_dir: Path
    status: pd.DataFrame
    status_path: Path
    encoder_name: str
    encoder_digest: str
    seconds: float
    n_embedded_patches: int
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def n_ok(self) -> int:
        """Slides with a usable features file (embedded now or skipped as up to date)."""
        return int((self.status["status"] == "ok").sum())

    @property
    def n_skipped(self) -> int:
        """Slides whose features were already up to date (not recomputed)."""
        return int(self.status["skipped"].astype(bool).sum())

    @property
    def n_failed(self) -> int:
        return int((self.status["status"] == "error").sum())

    @property
    def patches_per_s(self) -> float:
        return self.n_embedded_patches / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        text = (
            f"embed {self.encoder_name} ({self.encoder_digest}): {self.n_ok - self.n_skipped} embedded, "
            f"{self.n_skipped} up to date, "
            f"{self.n_failed} failed; {self.n_embedded_patches} patches in {self.seconds:.1f} s "
            f"({self.patches_per_s:.0f} patches/s); status: {self.status_path}"
        )
        for sid, why in sorted(self.failures.items()):
            text += f"\n  - {sid}: {why}"
        return text


@dataclass
class _Job:
    """One slide to embed in this run."""

    slide_id: str
    source: SlideSource
    out_path: Path
    attrs: dict[str, Any]
    n_batches: int
    seen: int = 0
    writer: FeatureWriter | None = None
    corrupt: list[tuple[int, int, str]] = field(default_factory=list)
    error: str = ""
    t0: float = 0.0
    seconds: float = 0.0


def _status_name(shard: str | int | None, slide_ids: Sequence[str] | None) -> str:
    # Same names as the tiling stage: shards running side by side must not overwrite one status file.
    if shard is not None:
        return f"status-{shard}.csv"
    if slide_ids is not None:
        return f"status-{text_digest(sorted(str(s) for s in slide_ids))[:8]}.csv"
    return "status.csv"


def _plan_slide(
    row: pd.Series, tiles_dir: Path, out_dir: Path, cache_dir: Path | None, base_attrs: dict[str, Any]
) -> tuple[SlideSource, dict[str, Any], Path]:
    """Validate one slide and compute its cache key; raises SlideError with what to do."""
    from icmil.slides import localize, open_slide, read_tiles, slide_digest

    sid = str(row["slide_id"])
    tiles_path = slide_file(tiles_dir, sid, ".h5")
    out_path = slide_file(out_dir, sid, ".h5")
    if not tiles_path.is_file():
        raise SlideError(
            sid, f"no tiles file {tiles_path}", hint="run `icmil tile` first; see the tiling status.csv"
        )
    try:
        tiles = read_tiles(tiles_path)
    except FeatureStoreError as err:
        raise SlideError(sid, str(err), hint="delete the tiles file and re-run `icmil tile`") from None
    if len(tiles.coords) == 0:
        raise SlideError(
            sid,
            f"tiles file {tiles_path} holds no patches (no tissue found)",
            hint="check the tissue mask settings (tiling.*)",
        )
    local = localize(str(row["path"]), cache_dir, sid)
    current = slide_digest(local)
    if tiles.slide_digest and tiles.slide_digest != current:
        # The patch grid was made for other bytes: embedding it would read the wrong places (or fail later).
        raise SlideError(
            sid,
            f"the slide file {local} changed after it was tiled (digest recorded in {tiles_path.name}: "
            f"{tiles.slide_digest[:12]}..., the file now: {current[:12]}...)",
            hint="run `icmil tile` again, it re-tiles slides whose file changed, then embed again; for a run "
            "folder of `icmil couple` or `icmil run`, start a new run folder",
        )
    slide = open_slide(str(local), sid)  # fail early (missing/unsupported) instead of in every worker
    try:
        if tiles.read_level >= slide.level_count:
            raise SlideError(
                sid,
                f"tiles read level {tiles.read_level} but the slide has {slide.level_count} levels",
                hint="the tiles belong to another slide file; re-run tiling",
            )
    finally:
        slide.close()
    attrs = base_attrs | {
        "slide_id": sid,
        "slide_digest": tiles.slide_digest or current,
        "tiles_digest": file_digest(tiles_path),
        "patch_size": int(tiles.patch_size),
        "target_mpp": float(getattr(tiles, "target_mpp", float("nan"))),
        "read_level": int(tiles.read_level),
        "read_size": int(tiles.read_size),
    }
    return SlideSource(sid, str(local), tiles), attrs, out_path


def _is_cached(out_path: Path, attrs: dict[str, Any]) -> bool:
    """Whether ``out_path`` holds these features already: same cache keys and content matching its checksum."""
    if not out_path.is_file():
        return False
    try:
        have = read_feature_attrs(out_path)
    except FeatureStoreError:
        return False  # unreadable: recompute (the write is atomic, so this is an outside edit)
    if not all(str(have.get(k)) == str(attrs.get(k)) for k in CACHE_KEYS):
        return False
    try:
        verify_features(out_path)
    except FeatureStoreError as err:
        # Bit rot, a bad copy or an edit: never reuse it. Writing the new file replaces it atomically.
        log.warning("%s; embedding slide %r again", err, attrs.get("slide_id"))
        return False
    return True


def embed_manifest(
    manifest: Manifest,
    tiles_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    encoder: PatchEncoder,
    cfg: EmbedConfig,
    slide_ids: Sequence[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    shard: str | int | None = None,
) -> EmbedReport:
    """Embed every tiled slide of ``manifest`` (or the shard ``slide_ids``) into ``out_dir/<slide_id>.h5``.

    Writes ``out_dir/status.csv`` (``status-<shard>.csv`` for a shard) with one row per slide: ``ok`` (with
    ``skipped=True`` when the existing file was up to date) or ``error`` and the reason. Raises ``StageFailed``
    (after writing the status) when more than ``cfg.max_failed_fraction`` of the slides failed.

    >>> enc = create_encoder(EncoderConfig(name="tiny_cnn"))  # doctest: +SKIP
    >>> print(embed_manifest(read_manifest("run/manifest.csv"), "run/tiles", "run/feats", enc, EmbedConfig()))  # doctest: +SKIP
    embed tiny_cnn (3f2a...): 24 embedded, 0 cached, 0 failed; 5120 patches in 9.8 s (522 patches/s); ...
    """
    t_start = time.perf_counter()
    tiles_root, out_root = Path(tiles_dir), Path(out_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temp_files(out_root):
        log.info("removed %s, a temporary file left by an interrupted run", stale)
    cache = Path(cache_dir) if cache_dir is not None else None
    device = resolve_device(cfg.device)
    encoder_digest = encoder.digest()
    base_attrs = {
        "encoder_name": encoder.name,
        "encoder_digest": encoder_digest,
        "settings_digest": embed_settings_digest(cfg, device),
        "format": FEATURES_FORMAT,
    }

    rows = manifest.slides
    status: dict[str, dict[str, Any]] = {}
    if slide_ids is not None:
        wanted = list(dict.fromkeys(str(s) for s in slide_ids))
        known = set(rows["slide_id"].astype(str))
        for sid in wanted:
            if sid not in known:
                status[sid] = _row(
                    sid, "error", error=manifest.errors.get(sid, "slide id not in the manifest")
                )
        rows = rows[rows["slide_id"].astype(str).isin(wanted)]

    jobs: list[_Job] = []
    for _, row in rows.iterrows():
        sid = str(row["slide_id"])
        try:
            source, attrs, out_path = _plan_slide(row, tiles_root, out_root, cache, base_attrs)
        except ICMILError as err:
            status[sid] = _row(sid, "error", error=str(err))
            log.warning("%s", err)
            continue
        except Exception as err:  # an unexpected failure on one slide must not lose the others
            status[sid] = _row(sid, "error", error=f"slide {sid!r}: unexpected {type(err).__name__}: {err}")
            log.exception("planning the embedding of %s failed unexpectedly", sid)
            continue
        if _is_cached(out_path, attrs):
            status[sid] = _row(sid, "ok", n_patches=source.n_patches, skipped=True)
            continue
        n_batches = -(-source.n_patches // cfg.batch_size)
        jobs.append(_Job(sid, source, out_path, attrs, n_batches))

    n_embedded = _run_jobs(jobs, encoder, cfg, device) if jobs else 0
    for job in jobs:
        if job.error:
            status[job.slide_id] = _row(
                job.slide_id,
                "error",
                n_corrupt=len(job.corrupt),
                seconds=round(job.seconds, 3),
                error=job.error,
            )
        else:
            n = job.source.n_patches - len(job.corrupt)
            status[job.slide_id] = _row(
                job.slide_id,
                "ok",
                n_patches=n,
                n_corrupt=len(job.corrupt),
                seconds=round(job.seconds, 3),
                patches_per_s=round(n / job.seconds, 1) if job.seconds > 0 else 0.0,
            )

    table = pd.DataFrame([status[s] for s in sorted(status)], columns=STATUS_COLUMNS)
    status_path = write_text_atomic(out_root / _status_name(shard, slide_ids), table.to_csv(index=False))
    failures = {
        str(r["slide_id"]): str(r["error"]) for r in table.to_dict("records") if r["status"] == "error"
    }
    report = EmbedReport(
        out_root,
        table,
        status_path,
        encoder.name,
        encoder_digest,
        time.perf_counter() - t_start,
        n_embedded,
        failures,
    )
    log.info("%s", report)
    check_failure_fraction("embed", failures, len(table), cfg.max_failed_fraction)
    return report


def _row(sid: str, status: str, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(STATUS_COLUMNS, 0)
    row.update({"slide_id": sid, "status": status, "error": "", "seconds": 0.0, "skipped": False})
    row.update(kw)
    return row


def _finish(job: _Job, cfg: EmbedConfig) -> None:
    assert job.writer is not None
    n = job.source.n_patches
    if job.corrupt and len(job.corrupt) > cfg.max_corrupt_fraction * n:
        x, y, cause = job.corrupt[0]
        job.error = str(
            SlideError(
                job.slide_id,
                f"{len(job.corrupt)} of {n} patches are corrupt (more than embed.max_corrupt_fraction="
                f"{cfg.max_corrupt_fraction}); first at level-0 (x={x}, y={y}): {cause}",
                hint="re-export or re-scan the slide",
            )
        )
        job.writer.abort()
        return
    extra: dict[str, Any] = {"n_corrupt": len(job.corrupt)}
    if job.corrupt:
        # Recorded in the file itself, so a reader of the features can see what is missing and why.
        extra["corrupt_coords"] = np.array([[x, y] for x, y, _ in job.corrupt], dtype=np.int64)
        log.warning(
            "slide %r: skipped %d corrupt patch(es), e.g. at (x=%d, y=%d): %s",
            job.slide_id,
            len(job.corrupt),
            *job.corrupt[0],
        )
    job.writer.commit(extra)


def _fail(job: _Job, error: str) -> None:
    job.error = error
    if job.writer is not None:
        job.writer.abort()
        job.writer = None
    log.warning("%s", error)


def _run_jobs(jobs: list[_Job], encoder: PatchEncoder, cfg: EmbedConfig, device: torch.device) -> int:
    """Run the model over every job's patches; returns the number of patches embedded."""
    amp_dtype = _amp_dtype(cfg, device)
    n_workers = min(auto_num_workers(cfg.num_workers, device), sum(j.n_batches for j in jobs))
    loader = patch_loader(
        [j.source for j in jobs],
        batch_size=cfg.batch_size,
        num_workers=n_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=cfg.prefetch_factor,
        on_corrupt=cfg.on_corrupt_patch,
        merge_reads=cfg.merge_reads,
    )
    log.info(
        "embedding %d slide(s), %d patches on %s: batch %d, %d worker(s), amp %s, channels_last %s",
        len(jobs),
        sum(j.source.n_patches for j in jobs),
        device,
        cfg.batch_size,
        n_workers,
        amp_dtype,
        cfg.channels_last,
    )
    was_training = encoder.training
    first_param = next(encoder.parameters(), None)
    orig_device = first_param.device if first_param is not None else torch.device("cpu")
    encoder.eval().to(device)
    if cfg.channels_last:
        encoder.to(memory_format=torch.channels_last)
    total = sum(j.source.n_patches for j in jobs)
    bar = cast(tqdm, progress(iter(()), desc=f"embed {encoder.name}", total=total, unit="patch"))
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    n_done = 0
    try:
        with torch.inference_mode(), autocast:
            for item in loader:
                job = jobs[int(item["slide"])]
                job.seen += 1
                if job.t0 == 0.0:
                    job.t0 = time.perf_counter()
                n_items = int(item["stop"]) - int(item["start"])
                bar.update(n_items)
                if job.error:
                    continue  # the slide already failed: drain its remaining batches without computing
                if item["error"]:
                    _fail(job, str(item["error"]))
                    continue
                x = item["patches"].to(device, non_blocking=True).permute(0, 3, 1, 2)
                if not cfg.channels_last:
                    x = x.contiguous()
                feats = encoder(x).float().cpu().numpy()
                ok = item["ok"].numpy()
                coords = np.asarray(job.source.tiles.coords)[int(item["start"]) : int(item["stop"])]
                job.corrupt.extend(item["corrupt"])
                if job.writer is None:
                    job.writer = FeatureWriter(job.out_path, job.source.n_patches, feats.shape[1], job.attrs)
                job.writer.append(feats[ok], coords[ok])
                n_done += int(ok.sum())
                if job.seen == job.n_batches:
                    job.seconds = time.perf_counter() - job.t0
                    _finish(job, cfg)
                    job.writer = None
    finally:
        bar.close()
        for job in jobs:
            if job.writer is not None:  # interrupted: never leave a half-written file that looks finished
                job.writer.abort()
                job.writer = None
        encoder.train(was_training)
        if cfg.channels_last:
            encoder.to(memory_format=torch.contiguous_format)
        encoder.to(orig_device)
    return n_done
