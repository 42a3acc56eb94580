"""The registered model: a slide classifier bundling the coupled encoder, the bag head, the settings and the
contract a slide must meet, so one model URI turns slide files into slide predictions.

**The bundle** (``artifacts/bundle`` inside the MLflow model folder) holds only what prediction needs:
``encoder/`` and ``head/`` (``weights.safetensors`` + ``config.json`` each), and ``settings.json`` with the
classes, the decision threshold chosen on validation and its rule, the tiling/embedding settings, the
**contract** (µm/px of the patches and the coarsest slide µm/px allowed, patch size, the encoder's name, digest,
normalisation and feature size) and the SHA-256 of every file. No training checkpoints, optimiser states,
training predictions or slide paths.

**What runs where.** ``icmil predict`` and the promotion gate read the bundle as data (JSON + safetensors,
digests checked) and run it with the code of the *installed* icmil package: nothing stored in the registry is
executed, nothing is unpickled. The same folder is also an MLflow pyfunc model ("models from code",
``_slide_classifier_code.py``) for ``mlflow models serve``; MLflow serving does execute that stored file, so
serve only models from a registry you trust.

Input: slide paths (local or ``s3://``) or feature ``.h5`` files. Output: one row per slide —
``slide_id, path, status, predicted_label, prob_<class>..., n_patches, output_dir, error`` — and per slide
``output_dir/prediction.json``, ``<slide_id>.geojson`` (QuPath) and ``heatmap.png``. A slide that cannot be
read or breaks the contract gets its ``error`` and NaN probabilities; the others go on.

Example:
    >>> uri = log_slide_classifier("RUN/round_1/encoder", "RUN/round_1/head", cfg.tiling, ["normal", "tumor"],
    ...                            run_id=run.run_id, tracking_uri=uri, out_dir="RUN/model")  # doctest: +SKIP
    >>> predict_slides("models:/icmil-slide-classifier@champion", ["slide.svs"], "out/")        # doctest: +SKIP
       slide_id       path status predicted_label  prob_normal  prob_tumor  n_patches  output_dir  error
    0     slide  slide.svs     ok           tumor         0.08        0.92        412  out/slides/slide
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from icmil.errors import ConfigError, ICMILError, SlideError, TrackingError, check_failure_fraction
from icmil.io import file_digest, text_digest, write_json_atomic, write_text_atomic
from icmil.log import get_logger
from icmil.tracking.retry import RetryPolicy
from icmil.tracking.uris import redact_uri

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

    from icmil.config import EmbedConfig, TilingConfig

log = get_logger("registry.model")

MODEL_ARTIFACT_PATH = "slide_classifier"
MODEL_CODE = Path(__file__).with_name("_slide_classifier_code.py")
SETTINGS_FILE = "settings.json"
BUNDLE_IN_MODEL = "artifacts/bundle"  # where MLflow copies the bundle inside a saved model folder
MODEL_FORMAT = "icmil-slide-classifier-v2"
# v1 bundles (before the contract) are still read: their contract is derived from their tiling settings.
READABLE_FORMATS = ("icmil-slide-classifier-v1", MODEL_FORMAT)
BUNDLE_FILES = ("weights.safetensors", "config.json")
HEAD_CONFIG_KEYS = ("head", "in_dim", "n_classes", "kwargs", "classes")
FEATURE_SUFFIXES = (".h5", ".hdf5")
# A slide may be at most this much coarser than the model's patch µm/px: beyond it, patches would be upsampled
# into something the encoder never saw during training.
MPP_UPSAMPLING_LIMIT = 1.1
HEATMAP_SCALES = ("absolute", "rank")
# What the model needs at serving time, pinned to the versions it was built with (no ~10 s inference).
REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "timm",
    "safetensors",
    "numpy",
    "pandas",
    "h5py",
    "openslide-python",
    "openslide-bin",
    "tifffile",
    "opencv-python-headless",
    "scikit-learn",
    "matplotlib",
    "pydantic",
    "PyYAML",
    "boto3",
    "geojson",
)


def prob_columns(classes: Sequence[str]) -> list[str]:
    """Names of the per-class probability columns: ``prob_<class>``."""
    return [f"prob_{c}" for c in classes]


def output_columns(classes: Sequence[str]) -> list[str]:
    return [
        "slide_id",
        "path",
        "status",
        "predicted_label",
        *prob_columns(classes),
        "n_patches",
        "output_dir",
        "error",
    ]


def pip_requirements() -> list[str]:
    """Explicit requirements of the model, pinned to the installed versions."""
    reqs = []
    for dist in REQUIREMENTS:
        try:
            reqs.append(f"{dist}=={importlib_metadata.version(dist)}")
        except importlib_metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def model_signature(classes: Sequence[str]) -> ModelSignature:
    """Input: ``path`` (+ optional ``slide_id``, ``mpp``); output: the prediction table; params: run options."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema(
        [
            ColSpec("string", "path"),
            ColSpec("string", "slide_id", required=False),
            ColSpec("double", "mpp", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "slide_id"),
            ColSpec("string", "path"),
            ColSpec("string", "status"),
            ColSpec("string", "predicted_label"),
            *[ColSpec("double", c) for c in prob_columns(classes)],
            ColSpec("long", "n_patches"),
            ColSpec("string", "output_dir"),
            ColSpec("string", "error"),
        ]
    )
    params = ParamSchema(
        [
            ParamSpec("out_dir", "string", ""),
            ParamSpec("heatmaps", "boolean", True),
            ParamSpec("heatmap_scale", "string", "absolute"),
            ParamSpec("device", "string", ""),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def as_slide_table(slides: pd.DataFrame | Sequence[str | os.PathLike[str]] | str) -> pd.DataFrame:
    """Normalise the input to a DataFrame with ``slide_id, path, mpp`` (ids from file names, made unique;
    globs and manifest CSVs expanded: :func:`icmil.predict.expand_slide_inputs`).

    >>> as_slide_table(["a/s1.svs", "b/s1.svs", "s3://bucket/s2.tiff"])["slide_id"].tolist()
    ['s1', 's1_2', 's2']
    """
    from icmil.predict import expand_slide_inputs

    return expand_slide_inputs(slides)


def _is_features_file(path: str) -> bool:
    if not path.lower().endswith(FEATURE_SUFFIXES) or "://" in path:
        return False
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "features" in f
    except OSError:
        return False


def _finite_or_none(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


# --------------------------------------------------------------------------- contract


def model_contract(tiling: Mapping[str, Any], encoder_meta: Mapping[str, Any]) -> dict[str, Any]:
    """What a slide (or a features file) must match for this model's predictions to mean anything.

    >>> c = model_contract({"target_mpp": 0.5, "patch_size": 256}, {"name": "tiny_cnn", "out_dim": 128})
    >>> c["max_slide_mpp"], c["patch_size"], c["encoder"]["name"]
    (0.55, 256, 'tiny_cnn')
    """
    target = float(tiling["target_mpp"])
    encoder = {k: v for k, v in encoder_meta.items() if k not in ("finetune", "format")}
    return {
        "target_mpp": target,
        "max_slide_mpp": round(target * MPP_UPSAMPLING_LIMIT, 6),
        "patch_size": int(tiling["patch_size"]),
        "feature_dim": encoder.get("out_dim"),
        "encoder": encoder,
        "rule": (
            f"patches of {int(tiling['patch_size'])} px at {target:g} µm/px, read from a slide level at or finer "
            f"than {target * MPP_UPSAMPLING_LIMIT:g} µm/px (never upsampled more than "
            f"{MPP_UPSAMPLING_LIMIT - 1:.0%}), encoded by {encoder.get('name')!r}"
        ),
    }


def check_slide_contract(contract: Mapping[str, Any], slide_id: str, mpp: float, mpp_source: str) -> None:
    """Refuse a slide whose µm/px cannot give the model's patches without upsampling (:class:`SlideError`)."""
    limit = float(contract["max_slide_mpp"])
    if mpp > limit:
        target = float(contract["target_mpp"])
        raise SlideError(
            slide_id,
            f"contract mismatch: the slide's finest level is {mpp:g} µm/px ({mpp_source}), but this model reads "
            f"patches at {target:g} µm/px and accepts slides of at most {limit:g} µm/px; the patches would be "
            f"upsampled {mpp / target:.2f}x into images its encoder never saw",
            "use a slide scanned at a higher magnification, or give the true µm/px in the manifest's mpp column "
            "if the file's resolution tags are wrong",
        )


def check_features_contract(
    contract: Mapping[str, Any], slide_id: str, path: str, attrs: Mapping[str, Any]
) -> None:
    """Refuse a features file made at another µm/px or patch size than the model's (:class:`SlideError`)."""
    problems = []
    mpp = _finite_or_none(attrs.get("target_mpp"))
    if mpp is not None and abs(mpp - float(contract["target_mpp"])) > 0.01 * float(contract["target_mpp"]):
        problems.append(f"{mpp:g} µm/px instead of {float(contract['target_mpp']):g}")
    size = attrs.get("patch_size")
    if size is not None and int(size) != int(contract["patch_size"]):
        problems.append(f"{int(size)}-px patches instead of {int(contract['patch_size'])}")
    if problems:
        raise SlideError(
            slide_id,
            f"contract mismatch: features {path} were made with {' and '.join(problems)}",
            "pass the slide file instead (it is tiled and embedded with the model's settings)",
        )


# --------------------------------------------------------------------------- the classifier


@dataclass
class _Bag:
    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any]
    slide_path: str | None  # local file, for the heatmap's thumbnail
    mpp: float | None = None
    mpp_source: str = ""
    tissue: list[dict[str, Any]] = field(default_factory=list)


class SlideClassifier(PythonModel):
    """Slide paths or feature files in, slide probabilities + per-slide outputs out.

    Built from a bundle folder by :meth:`load` (``icmil predict``, the gate) or by MLflow serving through
    :meth:`load_context`. ``ref`` describes where the model came from (URI, name, version, alias).
    """

    ref: dict[str, Any]

    def load_context(self, context: Any) -> None:
        self.load(Path(context.artifacts["bundle"]))

    def load(self, bundle: Path, ref: Mapping[str, Any] | None = None) -> SlideClassifier:
        """Load from a bundle folder (``encoder/``, ``head/``, ``settings.json``), checking every file's digest
        and the encoder against the contract. Nothing in the folder is executed."""
        from icmil.config import EmbedConfig, TilingConfig
        from icmil.features import load_encoder
        from icmil.mil import load_mil_head
        from icmil.predict import threshold_from_settings

        settings = read_bundle_settings(bundle)
        verify_bundle_files(bundle, settings)
        self.settings = settings
        self.ref = dict(ref or {})
        self.classes: list[str] = list(settings["classes"])
        self.threshold = threshold_from_settings(settings.get("threshold"), self.classes)
        self.tiling = TilingConfig.model_validate(settings["tiling"])
        self.embed = EmbedConfig.model_validate(settings["embed"])
        self.encoder = load_encoder(bundle / "encoder").eval()
        self.head = load_mil_head(bundle / "head").eval()
        self.encoder_digest = self.encoder.digest()
        self.contract = settings.get("contract") or model_contract(
            settings["tiling"], {**settings.get("encoder", {}), "digest": self.encoder_digest}
        )
        want = (self.contract.get("encoder") or {}).get("digest")
        if want and want != self.encoder_digest:
            raise ConfigError(
                f"{bundle}: the encoder weights give digest {self.encoder_digest}, the model's contract says {want}"
            )
        return self

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        params = params or {}
        out_dir = params.get("out_dir") or tempfile.mkdtemp(prefix="icmil-predict-")
        return self.classify(
            as_slide_table(model_input),
            Path(out_dir),
            heatmaps=bool(params.get("heatmaps", True)),
            device=str(params.get("device") or ""),
            heatmap_scale=str(params.get("heatmap_scale") or "absolute"),
        )

    # ------------------------------------------------------------------------------------------ work
    def classify(
        self,
        table: pd.DataFrame,
        out_dir: Path,
        heatmaps: bool = True,
        device: str = "",
        heatmap_scale: str = "absolute",
        outputs: bool = True,
    ) -> pd.DataFrame:
        """Predict every row of ``table`` (``slide_id, path, mpp``) and write each slide's outputs under
        ``out_dir/slides/<slide_id>/`` (``outputs=False``: the table only, e.g. when the gate re-scores);
        per-slide failures land in ``error``."""
        if heatmap_scale not in HEATMAP_SCALES:
            raise ConfigError(f"heatmap scale must be one of {HEATMAP_SCALES}, not {heatmap_scale!r}")
        out_dir.mkdir(parents=True, exist_ok=True)
        errors: dict[str, str] = {}
        bags: dict[str, _Bag] = {}
        slides = []
        for row in table.itertuples(index=False):
            sid, path = str(row.slide_id), str(row.path)
            if _is_features_file(path):
                try:
                    bags[sid] = self._read_features(sid, path)
                except ICMILError as err:
                    errors[sid] = str(err)
            else:
                slides.append(row)
        if slides:
            bags.update(self._embed_slides(pd.DataFrame(slides), out_dir, errors, device))
        rows = []
        for row in table.itertuples(index=False):
            sid, path = str(row.slide_id), str(row.path)
            folder = out_dir / "slides" / sid
            rec: dict[str, Any] = {
                "slide_id": sid,
                "path": path,
                "status": "ok",
                "predicted_label": "",
                "n_patches": 0,
                "output_dir": str(folder.resolve()),
            }
            rec.update(dict.fromkeys(prob_columns(self.classes), math.nan))
            if sid in bags:
                try:
                    rec.update(self._score(sid, path, bags[sid], folder, heatmaps, heatmap_scale, outputs))
                except Exception as err:  # one bad bag must not lose the other slides' predictions
                    errors[sid] = f"slide {sid!r}: scoring failed: {type(err).__name__}: {err}"
            rec["error"] = errors.get(sid, "" if sid in bags else f"slide {sid!r}: not processed")
            if rec["error"]:
                rec["status"], rec["predicted_label"] = "failed", ""
                rec.update(dict.fromkeys(prob_columns(self.classes), math.nan))
                if outputs:
                    self._write_failure(sid, path, folder, rec["error"])
            rows.append(rec)
        result = pd.DataFrame(rows, columns=output_columns(self.classes))
        result["n_patches"] = result["n_patches"].astype("int64")
        return result

    def _read_features(self, sid: str, path: str) -> _Bag:
        from icmil.errors import FeatureStoreError
        from icmil.features import read_features

        bag = read_features(path)
        digest = bag.attrs.get("encoder_digest")
        if digest and str(digest) != self.encoder_digest:
            raise FeatureStoreError(
                f"slide {sid!r}: features {path} were made by encoder {bag.attrs.get('encoder_name')} "
                f"(digest {digest}), not this model's coupled encoder (digest {self.encoder_digest}); "
                "pass the slide file instead, or features embedded with this model's encoder"
            )
        if bag.features.ndim != 2 or bag.features.shape[1] != self.encoder.out_dim or len(bag.features) == 0:
            raise FeatureStoreError(
                f"slide {sid!r}: features {path} have shape {bag.features.shape}, this model needs "
                f"(N>0, {self.encoder.out_dim})"
            )
        check_features_contract(self.contract, sid, path, bag.attrs)
        slide_path = bag.attrs.get("slide_path")
        local = str(slide_path) if slide_path and Path(str(slide_path)).is_file() else None
        return _Bag(
            bag.features, bag.coords, dict(bag.attrs), local, _finite_or_none(bag.attrs.get("slide_mpp"))
        )

    def _inspect_slide(self, row: Any, cache: Path) -> tuple[str, float, str, list[dict[str, Any]]]:
        """Open the slide once: its µm/px (checked against the contract) and its tissue outline (GeoJSON)."""
        from icmil.predict import tissue_features
        from icmil.slides import localize, open_slide, read_thumbnail, slide_mpp, tissue_mask

        sid = str(row.slide_id)
        override = _finite_or_none(row.mpp)
        local = localize(str(row.path), cache, sid)
        slide = open_slide(local, sid)
        try:
            mpp = slide_mpp(slide, sid, override)
            source = "from the manifest's mpp column" if override else "from the slide's resolution tags"
            check_slide_contract(self.contract, sid, mpp, source)
            try:
                thumb = read_thumbnail(slide, mpp, self.tiling.mask_mpp)
                tissue = tissue_features(tissue_mask(thumb.rgb, self.tiling, thumb.mpp), thumb.downsample)
            except Exception as err:  # the outline is a picture: its failure must not cost the prediction
                log.warning("slide %r: no tissue outline for the GeoJSON (%s)", sid, err)
                tissue = []
        finally:
            slide.close()
        return str(local), mpp, source, tissue

    def _embed_slides(
        self, slides: pd.DataFrame, out_dir: Path, errors: dict[str, str], device: str
    ) -> dict[str, _Bag]:
        """Check, tile and embed slides with the bundled settings and encoder (cached under ``out_dir``)."""
        from icmil.errors import StageFailed
        from icmil.features import embed_manifest, read_features
        from icmil.manifest import Manifest
        from icmil.slides import tile_slide

        tiles_dir, feats_dir, cache = out_dir / "tiles", out_dir / "features", out_dir / "cache"
        ok = []
        seen: dict[str, tuple[str, float, str, list[dict[str, Any]]]] = {}
        for row in slides.itertuples(index=False):
            sid = str(row.slide_id)
            try:
                seen[sid] = self._inspect_slide(row, cache)
                tile_slide(
                    sid,
                    str(row.path),
                    tiles_dir / f"{sid}.h5",
                    self.tiling,
                    mpp_override=_finite_or_none(row.mpp),
                    cache_dir=cache,
                )
                ok.append(row)
            except SlideError as err:
                errors[sid] = str(err)
            except Exception as err:  # keep the other slides going, name the slide
                errors[sid] = f"slide {sid!r}: tiling failed: {type(err).__name__}: {err}"
        if not ok:
            return {}
        frame = pd.DataFrame(ok)
        frame = frame.assign(label=self.classes[0], label_index=0, split="test")
        manifest = Manifest(slides=frame, classes=list(self.classes), source="<predict>")
        # Failures are reported per slide in the output table; the batch itself must not stop.
        cfg = self.embed.model_copy(
            update={"max_failed_fraction": 1.0, **({"device": device} if device else {})}
        )
        try:
            report = embed_manifest(manifest, tiles_dir, feats_dir, self.encoder, cfg, cache_dir=cache)
            failures = dict(report.failures)
        except StageFailed as err:
            failures = dict(err.failures)
        errors.update(failures)
        bags = {}
        for row in ok:
            sid = str(row.slide_id)
            if sid in failures:
                continue
            bag = read_features(feats_dir / f"{sid}.h5")
            local, mpp, source, tissue = seen[sid]
            bags[sid] = _Bag(bag.features, bag.coords, dict(bag.attrs), local, mpp, source, tissue)
        return bags

    def _score(
        self, sid: str, path: str, bag: _Bag, folder: Path, heatmaps: bool, heatmap_scale: str, outputs: bool
    ) -> dict[str, Any]:
        import torch

        from icmil.mil.data import patch_size_level0
        from icmil.predict import decide, patch_features, write_geojson, write_prediction_json
        from icmil.predict.outputs import now_utc

        feats = torch.as_tensor(np.asarray(bag.features, dtype=np.float32))
        with torch.inference_mode():
            out = self.head(feats)
            probs = torch.softmax(out.logits.float(), dim=0).numpy()
            patch_probs = torch.softmax(self.head.instance_logits(feats).float(), dim=1).numpy()
            attention = self.head.attention_scores(feats)
        label = decide(probs, self.classes, self.threshold)
        rec: dict[str, Any] = {"predicted_label": label, "n_patches": len(feats)}
        rec.update({c: float(p) for c, p in zip(prob_columns(self.classes), probs, strict=True)})
        if not outputs:
            return rec
        # The heatmap's class: the positive class of a binary model, else the predicted class.
        shown = 1 if len(self.classes) == 2 else self.classes.index(label)
        size = patch_size_level0(bag.coords, bag.attrs)
        measurements: dict[str, np.ndarray | None] = {
            f"{c} probability": patch_probs[:, i] for i, c in enumerate(self.classes)
        }
        if attention is not None:
            att = attention.float().numpy()
            measurements["attention"] = att
            measurements["attention percentile"] = _percentile_rank(att)
        folder.mkdir(parents=True, exist_ok=True)
        geojson_path = write_geojson(
            folder / f"{sid}.geojson", [*bag.tissue, *patch_features(bag.coords, size, measurements)]
        )
        heatmap_path = None
        if heatmaps:
            from icmil.mil.plots import plot_heatmap

            scale_text = "absolute 0-1" if heatmap_scale == "absolute" else "percentile rank within the slide"
            heatmap_path = plot_heatmap(
                bag.coords,
                patch_probs[:, shown],
                size,
                folder / "heatmap.png",
                slide_path=bag.slide_path,
                slide_id=sid,
                title=f"{sid}: {label} ({', '.join(f'{c} {p:.2f}' for c, p in zip(self.classes, probs, strict=True))})",
                scale="absolute" if heatmap_scale == "absolute" else "rank",
                label=f"patch p({self.classes[shown]}) ({scale_text})",
            )
        decision = dict(self.threshold)
        if len(self.classes) == 2 and decision.get("value") is not None:
            positive = self.classes[1]
            op = ">=" if label == positive else "<"
            decision["applied"] = (
                f"p({positive}) = {probs[1]:.4f} {op} {float(decision['value']):.4f} -> {label}"
            )
        else:
            decision["applied"] = f"highest probability: {label} ({probs[self.classes.index(label)]:.4f})"
        write_prediction_json(
            folder,
            {
                "slide_id": sid,
                "path": path,
                "status": "ok",
                "predicted_label": label,
                "probabilities": {c: float(p) for c, p in zip(self.classes, probs, strict=True)},
                "decision": decision,
                "model": self._model_record(),
                "encoder": {"name": self.encoder.name, "digest": self.encoder_digest},
                "contract": self.contract,
                "slide": {
                    "mpp": bag.mpp,
                    "mpp_source": bag.mpp_source or None,
                    "n_patches": len(feats),
                    "patch_size_level0": float(size),
                },
                "outputs": {
                    "geojson": geojson_path.name,
                    "heatmap": heatmap_path.name if heatmap_path else None,
                    "heatmap_scale": heatmap_scale if heatmap_path else None,
                    "heatmap_class": self.classes[shown] if heatmap_path else None,
                },
                "created_at": now_utc(),
            },
        )
        return rec

    def _model_record(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in self.ref.items() if v is not None},
            "bundle_digest": self.settings.get("bundle_digest"),
            "format": self.settings.get("format"),
        }

    def _write_failure(self, sid: str, path: str, folder: Path, error: str) -> None:
        from icmil.predict import write_prediction_json
        from icmil.predict.outputs import now_utc

        with contextlib.suppress(OSError):
            write_prediction_json(
                folder,
                {
                    "slide_id": sid,
                    "path": path,
                    "status": "failed",
                    "error": error,
                    "model": self._model_record(),
                    "contract": self.contract,
                    "created_at": now_utc(),
                },
            )


def _percentile_rank(values: np.ndarray) -> np.ndarray:
    if len(values) < 2:
        return np.full(len(values), 0.5)
    return values.argsort(kind="stable").argsort(kind="stable") / (len(values) - 1)


# --------------------------------------------------------------------------- bundle: write / read / verify


def bundle_digest(encoder_dir: Path, head_dir: Path, settings: Mapping[str, Any]) -> str:
    """Content key of a bundle: both weight files and every setting."""
    return text_digest(
        file_digest(encoder_dir / "weights.safetensors"),
        file_digest(head_dir / "weights.safetensors"),
        {k: v for k, v in settings.items() if k not in ("bundle_digest", "files")},
    )


def _saved_digest(settings_file: Path) -> str | None:
    try:
        value = json.loads(settings_file.read_text(encoding="utf-8")).get("bundle_digest")
    except (OSError, ValueError):
        return None
    return str(value) if value else None


def read_bundle_settings(bundle: Path) -> dict[str, Any]:
    """``settings.json`` of a bundle folder, checked to be a slide-classifier bundle this code can read."""
    path = Path(bundle) / SETTINGS_FILE
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{bundle} is not a slide-classifier bundle: {SETTINGS_FILE} is missing") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is unreadable: {err}") from None
    if not isinstance(settings, dict) or settings.get("format") not in READABLE_FORMATS:
        found = settings.get("format") if isinstance(settings, dict) else None
        raise ConfigError(
            f"{path}: not a slide-classifier bundle this icmil reads ({found!r}; reads {READABLE_FORMATS})"
        )
    return settings


def verify_bundle_files(bundle: Path, settings: Mapping[str, Any]) -> None:
    """Check every file listed in ``settings["files"]`` against its SHA-256 (a tampered or truncated model
    is refused before anything is loaded)."""
    for rel, want in (settings.get("files") or {}).items():
        path = Path(bundle) / rel
        if not path.is_file():
            raise ConfigError(f"model bundle {bundle}: {rel} is missing")
        got = file_digest(path)
        if got != want:
            raise ConfigError(
                f"model bundle {bundle}: {rel} has SHA-256 {got[:16]}..., the bundle records {str(want)[:16]}...: "
                "the model was altered or damaged in storage; register it again"
            )


def write_bundle(encoder_dir: Path, head_dir: Path, settings: dict[str, Any], dst: Path) -> dict[str, Any]:
    """Copy only what prediction needs into ``dst`` (weights + slim configs) and write ``settings.json``
    with the files' digests; returns the final settings."""
    (dst / "encoder").mkdir(parents=True, exist_ok=True)
    (dst / "head").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(encoder_dir / "weights.safetensors", dst / "encoder" / "weights.safetensors")
    shutil.copyfile(encoder_dir / "config.json", dst / "encoder" / "config.json")
    shutil.copyfile(head_dir / "weights.safetensors", dst / "head" / "weights.safetensors")
    # The head's config.json also records its training (run key, epochs, mil config): only the architecture.
    write_json_atomic(dst / "head" / "config.json", settings["head"])
    files = {
        f"{part}/{name}": file_digest(dst / part / name)
        for part in ("encoder", "head")
        for name in BUNDLE_FILES
    }
    final = {**settings, "files": files}
    write_json_atomic(dst / SETTINGS_FILE, final)
    return final


def save_slide_classifier(
    encoder_dir: str | os.PathLike[str],
    head_dir: str | os.PathLike[str],
    tiling_cfg: TilingConfig,
    classes: Sequence[str] | None,
    out_dir: str | os.PathLike[str],
    *,
    embed_cfg: EmbedConfig | None = None,
    threshold: float | Mapping[str, Any] | None = None,
) -> Path:
    """Write the model folder ``out_dir``: an MLflow pyfunc model (MLmodel, code) around the slim bundle.

    ``threshold``: the decision rule chosen on validation (:func:`icmil.predict.choose_threshold`), a bare
    number, or None (then 0.5 for binary models, argmax otherwise, said so in the rule).
    The folder appears complete or not at all (built beside it, then renamed); an existing folder with the
    same weights and settings is kept as it is, so a resumed register step does not rebuild it.
    """
    import mlflow.pyfunc

    from icmil.config import EmbedConfig
    from icmil.features import load_encoder
    from icmil.mil import read_head_config
    from icmil.predict import default_threshold, threshold_from_settings

    enc, head, out = Path(encoder_dir), Path(head_dir), Path(out_dir)
    for folder, what in ((enc, "encoder"), (head, "bag head")):
        if not (folder / "weights.safetensors").is_file() or not (folder / "config.json").is_file():
            raise ConfigError(
                f"{what} folder {folder} lacks weights.safetensors/config.json (train it first)"
            )
    head_cfg = read_head_config(head)
    classes = list(classes or head_cfg.get("classes") or [])
    if len(classes) != int(head_cfg["n_classes"]):
        raise ConfigError(
            f"{len(classes)} class names {classes} for a head with {head_cfg['n_classes']} outputs: "
            "pass classes= in the head's label order"
        )
    embed = embed_cfg or EmbedConfig.model_validate({})
    encoder_meta = json.loads((enc / "config.json").read_text(encoding="utf-8"))
    if not encoder_meta.get("digest"):
        encoder_meta["digest"] = load_encoder(enc).digest()
    tiling = tiling_cfg.model_dump(mode="json")
    settings: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "classes": classes,
        "threshold": threshold_from_settings(threshold, classes)
        if threshold is not None
        else default_threshold(
            classes, "no threshold chosen on validation was given when the model was saved"
        ),
        "contract": model_contract(tiling, encoder_meta),
        "tiling": tiling,
        # Inference reads patches in this process: no DataLoader workers (a serving container may lack /dev/shm).
        "embed": embed.model_dump(mode="json") | {"num_workers": 0},
        "encoder": encoder_meta,
        "head": {k: head_cfg[k] for k in HEAD_CONFIG_KEYS if k in head_cfg} | {"classes": classes},
    }
    settings["bundle_digest"] = bundle_digest(enc, head, settings)
    existing = out / BUNDLE_IN_MODEL / SETTINGS_FILE
    if (
        (out / "MLmodel").is_file()
        and existing.is_file()
        and _saved_digest(existing) == settings["bundle_digest"]
    ):
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        bundle = staging / "bundle"
        final = write_bundle(enc, head, settings, bundle)
        model_dir = staging / "model"
        example = pd.DataFrame({"path": ["/data/slides/example.svs"], "slide_id": ["example"], "mpp": [0.5]})
        mlflow.pyfunc.save_model(
            str(model_dir),
            python_model=str(MODEL_CODE),
            artifacts={"bundle": str(bundle)},
            signature=model_signature(classes),
            input_example=example,
            pip_requirements=pip_requirements(),
            metadata={"icmil": {k: final[k] for k in ("format", "classes", "threshold", "bundle_digest")}},
        )
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(model_dir, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("slide classifier saved to %s (%s)", out, ", ".join(classes))
    return out


def log_slide_classifier(
    encoder_dir: str | os.PathLike[str],
    head_dir: str | os.PathLike[str],
    tiling_cfg: TilingConfig,
    classes: Sequence[str] | None,
    *,
    run_id: str,
    tracking_uri: str,
    out_dir: str | os.PathLike[str] | None = None,
    embed_cfg: EmbedConfig | None = None,
    threshold: float | Mapping[str, Any] | None = None,
    artifact_path: str = MODEL_ARTIFACT_PATH,
    retry: RetryPolicy | None = None,
) -> str:
    """Save the model to ``out_dir`` (on disk first), then upload it to run ``run_id``; return ``runs:/`` URI.

    The upload is retried with backoff; if the server stays down the saved folder is intact and the
    :class:`~icmil.errors.TrackingError` names it, so a rerun only uploads.
    """
    from mlflow import MlflowClient

    with contextlib.ExitStack() as stack:
        folder = (
            Path(out_dir) if out_dir else Path(stack.enter_context(tempfile.TemporaryDirectory())) / "model"
        )
        saved = save_slide_classifier(
            encoder_dir, head_dir, tiling_cfg, classes, folder, embed_cfg=embed_cfg, threshold=threshold
        )
        client = MlflowClient(tracking_uri)
        (retry or RetryPolicy()).call(
            lambda: client.log_artifacts(run_id, str(saved), artifact_path),
            f"upload the slide classifier {saved} to run {run_id} at {redact_uri(tracking_uri)}",
        )
    return f"runs:/{run_id}/{artifact_path}"


# --------------------------------------------------------------------------- fetch / load


def _local_bundle(folder: Path) -> Path | None:
    """The bundle inside a local model folder (or the folder itself when it is a bundle)."""
    for candidate in (folder / BUNDLE_IN_MODEL, folder):
        if (candidate / SETTINGS_FILE).is_file():
            return candidate
    return None


def resolve_model(
    model_uri: str, tracking_uri: str | None, registry_uri: str | None, retry: RetryPolicy | None = None
) -> tuple[str, dict[str, Any]]:
    """Where the model behind ``model_uri`` is stored, and what it is (name, version, alias, run) for the
    records. ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN/PATH``, ``models:/m-ID`` or a folder."""
    from urllib.parse import unquote, urlsplit

    ref: dict[str, Any] = {"uri": model_uri}
    if not model_uri.startswith(("models:/", "runs:/")):
        if "://" in model_uri or model_uri.startswith("mlflow-artifacts:"):
            return model_uri, ref
        folder = unquote(urlsplit(model_uri).path) if model_uri.startswith("file:") else model_uri
        if not Path(folder).exists():
            raise ConfigError(
                f"model {model_uri!r}: no such folder (give models:/NAME@ALIAS or a model folder)"
            )
        return str(Path(folder).resolve()), ref
    from mlflow import MlflowClient

    from icmil.registry.sources import resolve_artifact_source

    policy = retry or RetryPolicy()
    where = redact_uri(registry_uri or tracking_uri or "")
    # Only here: a client built without a URI would create ./mlflow.db (MLflow's default store) as a side effect.
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
    source = model_uri
    if model_uri.startswith("models:/") and not model_uri.startswith("models:/m-"):
        name_ref = model_uri[len("models:/") :].strip("/")
        if "@" in name_ref:
            name, alias = name_ref.split("@", 1)
            mv = policy.call(
                lambda: client.get_model_version_by_alias(name, alias), f"read {model_uri} at {where}"
            )
            ref.update(name=name, alias=alias)
        elif "/" in name_ref:
            name, version = name_ref.rsplit("/", 1)
            mv = policy.call(lambda: client.get_model_version(name, version), f"read {model_uri} at {where}")
            ref.update(name=name, alias=None)
        else:
            raise ConfigError(f"model URI {model_uri!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")
        ref.update(version=str(mv.version), run_id=mv.run_id or None)
        source = str(mv.source)
    if source.startswith(("models:/", "runs:/")):
        source = policy.call(lambda: resolve_artifact_source(client, source), f"resolve {source} at {where}")
    ref["source"] = redact_uri(source)
    if source.startswith("file:"):
        return unquote(urlsplit(source).path), ref
    return source, ref


def fetch_bundle(source: str, dst: Path, tracking_uri: str | None, retry: RetryPolicy | None = None) -> Path:
    """A local bundle folder for a model ``source``: used in place when local, else ONLY the bundle
    (``artifacts/bundle``: JSON + safetensors) is downloaded — never the model's code."""
    if "://" not in source and not source.startswith("mlflow-artifacts:"):
        bundle = _local_bundle(Path(source))
        if bundle is None:
            raise ConfigError(
                f"{source} holds no slide-classifier bundle ({BUNDLE_IN_MODEL}/{SETTINGS_FILE})"
            )
        return bundle
    import mlflow.artifacts

    remote = f"{source.rstrip('/')}/{BUNDLE_IN_MODEL}"
    path = (retry or RetryPolicy()).call(
        lambda: mlflow.artifacts.download_artifacts(
            artifact_uri=remote, dst_path=str(dst), tracking_uri=tracking_uri
        ),
        f"download the model bundle {redact_uri(remote)}",
    )
    return Path(path)


@contextlib.contextmanager
def open_slide_classifier(
    model_uri: str,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    retry: RetryPolicy | None = None,
) -> Iterator[SlideClassifier]:
    """The slide classifier behind ``model_uri`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``runs:/...``, a model or bundle folder), built by the installed icmil from the bundle's JSON and
    safetensors files: no code stored with the model runs.

    Explicit ``tracking_uri`` / ``registry_uri`` are used as given (no process-wide MLflow state).
    """
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="icmil-model-") as tmp:
        where = redact_uri(registry_uri or tracking_uri or "the default MLflow store")
        try:
            source, ref = resolve_model(model_uri, tracking_uri, registry_uri, retry)
            bundle = fetch_bundle(source, Path(tmp), tracking_uri, retry)
        except TrackingError as err:
            cause = err.__cause__
            if isinstance(cause, MlflowException) and cause.error_code in (
                "RESOURCE_DOES_NOT_EXIST",
                "NOT_FOUND",
            ):
                raise TrackingError(f"model {model_uri} not found in {where}: {cause.message}") from cause
            raise
        except MlflowException as err:
            raise TrackingError(f"cannot load model {model_uri} from {where}: {err.message}") from err
        yield SlideClassifier().load(bundle, ref)


def model_classes(model: SlideClassifier) -> list[str]:
    """Class names of a loaded slide classifier, in the order of its ``prob_<class>`` columns."""
    return list(model.classes)


def run_predictions(
    model_uri: str,
    slides: pd.DataFrame | Sequence[str | os.PathLike[str]] | str,
    out_dir: str | os.PathLike[str],
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    heatmaps: bool = True,
    heatmap_scale: str = "absolute",
    retry: RetryPolicy | None = None,
    arguments: Mapping[str, Any] | None = None,
) -> tuple[pd.DataFrame, float]:
    """Predict slides and write every output; never raises for failed slides (they are rows with an error).

    Writes ``out_dir/predictions.csv``, ``out_dir/run_metadata.json`` and ``out_dir/slides/<slide_id>/``
    (``prediction.json``, ``<slide_id>.geojson``, ``heatmap.png``); tiles, features and the slide cache stay
    under ``out_dir`` so a rerun reuses them. Returns ``(table, the model's max_failed_fraction)``.
    """
    from icmil.predict import write_run_metadata

    table = as_slide_table(slides)
    out = Path(out_dir)
    with open_slide_classifier(model_uri, tracking_uri, registry_uri, retry) as model:
        out.mkdir(parents=True, exist_ok=True)  # only once the model is there: a failed load writes nothing
        write_run_metadata(
            out,
            dict(arguments or {"model": model_uri, "heatmap_scale": heatmap_scale}),
            model._model_record(),
            slides=table["path"].tolist(),
        )
        result = model.classify(table, out.resolve(), heatmaps=heatmaps, heatmap_scale=heatmap_scale)
        limit = float(model.tiling.max_failed_fraction)
    write_text_atomic(out / "predictions.csv", result.to_csv(index=False))
    return result, limit


def predict_slides(
    model_uri: str,
    slides: pd.DataFrame | Sequence[str | os.PathLike[str]] | str,
    out_dir: str | os.PathLike[str],
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    heatmaps: bool = True,
    max_failed_fraction: float | None = None,
    heatmap_scale: str = "absolute",
    retry: RetryPolicy | None = None,
) -> pd.DataFrame:
    """Predict slides (or feature files) with a logged/registered slide classifier (:func:`run_predictions`).

    Raises :class:`~icmil.errors.StageFailed` after writing everything when more slides failed than
    ``max_failed_fraction`` (default: the model's ``tiling.max_failed_fraction``).

    Example:
        >>> predict_slides("models:/icmil-slide-classifier@champion", ["a.svs", "b.svs"], "preds/")  # doctest: +SKIP
    """
    result, limit = run_predictions(
        model_uri, slides, out_dir, tracking_uri, registry_uri, heatmaps, heatmap_scale, retry
    )
    failures = {str(r.slide_id): str(r.error) for r in result.itertuples() if str(r.error)}
    check_failure_fraction(
        "predict", failures, len(result), limit if max_failed_fraction is None else max_failed_fraction
    )
    return result
