"""The registered model: an MLflow pyfunc "slide classifier" bundling the coupled encoder, the bag head and
the tiling settings, so one model URI turns slide files into slide predictions.

Input: slide paths (local or ``s3://``) or feature ``.h5`` files, as a DataFrame with a ``path`` column
(optional ``slide_id``, ``mpp``) or a list. Output: one row per slide — ``slide_id, path, label,
prob_<class>..., n_patches, heatmap, error`` — where ``heatmap`` is a PNG of the attention over the slide.
A slide that cannot be read gets its ``error`` text and NaN probabilities; the others go on.

The model is saved with MLflow's "models from code" (``_slide_classifier_code.py``) and a loader of our own:
weights stay safetensors files in the model's artifacts (never pickled), a signature, an input example and
explicit pip requirements are written (no dependency inference).

Example:
    >>> uri = log_slide_classifier("RUN/round_1/encoder", "RUN/round_1/head", cfg.tiling, ["normal", "tumor"],
    ...                            run_id=run.run_id, tracking_uri=uri, out_dir="RUN/model")  # doctest: +SKIP
    >>> predict_slides("models:/icmil-slide-classifier@champion", ["slide.svs"], "out/")        # doctest: +SKIP
       slide_id       path  label  prob_normal  prob_tumor  n_patches  heatmap                  error
    0     slide  slide.svs  tumor        0.08        0.92        412  out/heatmaps/slide.png
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from icmil.errors import ConfigError, ICMILError, TrackingError, check_failure_fraction
from icmil.io import file_digest, text_digest, write_json_atomic, write_text_atomic
from icmil.log import get_logger
from icmil.tracking.retry import RetryPolicy
from icmil.tracking.uris import redact_uri

if TYPE_CHECKING:
    from mlflow.models import ModelSignature
    from mlflow.pyfunc import PyFuncModel

    from icmil.config import EmbedConfig, TilingConfig

log = get_logger("tracking.model")

MODEL_ARTIFACT_PATH = "slide_classifier"
MODEL_CODE = Path(__file__).with_name("_slide_classifier_code.py")
SETTINGS_FILE = "settings.json"
MODEL_FORMAT = "icmil-slide-classifier-v1"
FEATURE_SUFFIXES = (".h5", ".hdf5")
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
)


def prob_columns(classes: Sequence[str]) -> list[str]:
    """Names of the per-class probability columns: ``prob_<class>``."""
    return [f"prob_{c}" for c in classes]


def output_columns(classes: Sequence[str]) -> list[str]:
    return ["slide_id", "path", "label", *prob_columns(classes), "n_patches", "heatmap", "error"]


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
            ColSpec("string", "label"),
            *[ColSpec("double", c) for c in prob_columns(classes)],
            ColSpec("long", "n_patches"),
            ColSpec("string", "heatmap"),
            ColSpec("string", "error"),
        ]
    )
    params = ParamSchema(
        [
            ParamSpec("out_dir", "string", ""),
            ParamSpec("heatmaps", "boolean", True),
            ParamSpec("device", "string", ""),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def as_slide_table(slides: pd.DataFrame | Sequence[str | os.PathLike[str]] | str) -> pd.DataFrame:
    """Normalise the input to a DataFrame with ``slide_id, path, mpp`` (ids from file names, made unique).

    >>> as_slide_table(["a/s1.svs", "b/s1.svs", "s3://bucket/s2.tiff"])["slide_id"].tolist()
    ['s1', 's1_2', 's2']
    """
    if isinstance(slides, (str, os.PathLike)):
        slides = [slides]
    if isinstance(slides, pd.DataFrame):
        if "path" not in slides.columns:
            raise ConfigError(f"slide table needs a 'path' column, got columns {list(slides.columns)}")
        df = slides.reset_index(drop=True).copy()
    else:
        df = pd.DataFrame({"path": [str(p) for p in slides]})
    df["path"] = df["path"].astype(str)
    if "slide_id" not in df.columns:
        df["slide_id"] = None
    if "mpp" not in df.columns:
        df["mpp"] = np.nan
    ids: list[str] = []
    seen: dict[str, int] = {}
    for sid, path in zip(df["slide_id"], df["path"], strict=True):
        base = str(sid) if isinstance(sid, str) and sid else Path(path.rstrip("/").rsplit("/", 1)[-1]).stem
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    df["slide_id"] = ids
    return df[["slide_id", "path", "mpp"]]


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


@dataclass
class _Bag:
    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any]
    slide_path: str | None  # for the heatmap's thumbnail


class SlideClassifier(PythonModel):
    """pyfunc model: slide paths or feature files in, slide probabilities + attention heatmaps out."""

    def load_context(self, context: Any) -> None:
        self.load(Path(context.artifacts["bundle"]))

    def load(self, bundle: Path) -> SlideClassifier:
        """Load from a bundle folder (``encoder/``, ``head/``, ``settings.json``); usable without MLflow."""
        from icmil.config import EmbedConfig, TilingConfig
        from icmil.features import load_encoder
        from icmil.mil import load_mil_head

        settings = json.loads((bundle / SETTINGS_FILE).read_text(encoding="utf-8"))
        if settings.get("format") != MODEL_FORMAT:
            raise ConfigError(f"{bundle / SETTINGS_FILE}: not a {MODEL_FORMAT} bundle")
        self.settings = settings
        self.classes: list[str] = list(settings["classes"])
        self.threshold: float | None = settings.get("threshold")
        self.tiling = TilingConfig.model_validate(settings["tiling"])
        self.embed = EmbedConfig.model_validate(settings["embed"])
        self.encoder = load_encoder(bundle / "encoder").eval()
        self.head = load_mil_head(bundle / "head").eval()
        self.encoder_digest = self.encoder.digest()
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
        )

    # ------------------------------------------------------------------------------------------ work
    def classify(
        self, table: pd.DataFrame, out_dir: Path, heatmaps: bool = True, device: str = ""
    ) -> pd.DataFrame:
        """Predict every row of ``table`` (``slide_id, path, mpp``); per-slide failures land in ``error``."""
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
            rec: dict[str, Any] = {"slide_id": sid, "path": path, "label": "", "n_patches": 0, "heatmap": ""}
            rec.update(dict.fromkeys(prob_columns(self.classes), math.nan))
            if sid in bags:
                try:
                    rec.update(self._score(sid, bags[sid], out_dir, heatmaps))
                except Exception as err:  # one bad bag must not lose the other slides' predictions
                    errors[sid] = f"slide {sid!r}: scoring failed: {type(err).__name__}: {err}"
            rec["error"] = errors.get(sid, "" if sid in bags else f"slide {sid!r}: not processed")
            if rec["error"]:
                rec["label"], rec["heatmap"] = "", ""
                rec.update(dict.fromkeys(prob_columns(self.classes), math.nan))
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
        return _Bag(bag.features, bag.coords, dict(bag.attrs), None)

    def _embed_slides(
        self, slides: pd.DataFrame, out_dir: Path, errors: dict[str, str], device: str
    ) -> dict[str, _Bag]:
        """Tile + embed slides with the bundled settings and encoder (cached under ``out_dir``)."""
        from icmil.errors import SlideError, StageFailed
        from icmil.features import embed_manifest, read_features
        from icmil.manifest import Manifest
        from icmil.slides import tile_slide

        tiles_dir, feats_dir, cache = out_dir / "tiles", out_dir / "features", out_dir / "cache"
        ok = []
        for row in slides.itertuples(index=False):
            sid = str(row.slide_id)
            mpp = _finite_or_none(row.mpp)
            try:
                tile_slide(
                    sid,
                    str(row.path),
                    tiles_dir / f"{sid}.h5",
                    self.tiling,
                    mpp_override=mpp,
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
            local = str(row.path) if "://" not in str(row.path) else None
            bags[sid] = _Bag(bag.features, bag.coords, dict(bag.attrs), local)
        return bags

    def _score(self, sid: str, bag: _Bag, out_dir: Path, heatmaps: bool) -> dict[str, Any]:
        import torch

        from icmil.mil.data import patch_size_level0

        feats = torch.as_tensor(np.asarray(bag.features, dtype=np.float32))
        with torch.inference_mode():
            out = self.head(feats)
            probs = torch.softmax(out.logits.float(), dim=0).numpy()
            scores = self.head.attention_scores(feats) if heatmaps else None
            if heatmaps and scores is None:  # no attention (max-pooling): the instance teacher's tumour prob
                scores = 1.0 - torch.softmax(self.head.instance_logits(feats), dim=1)[:, 0]
        if len(self.classes) == 2 and self.threshold is not None:
            label = self.classes[int(probs[1] >= self.threshold)]
        elif len(self.classes) == 2:
            label = self.classes[int(probs[1] >= 0.5)]
        else:
            label = self.classes[int(np.argmax(probs))]
        rec: dict[str, Any] = {"label": label, "n_patches": len(feats)}
        rec.update({c: float(p) for c, p in zip(prob_columns(self.classes), probs, strict=True)})
        if heatmaps and scores is not None:
            from icmil.mil.plots import plot_heatmap

            title = f"{sid}: {label} ({', '.join(f'{c} {p:.2f}' for c, p in zip(self.classes, probs, strict=True))})"
            path = plot_heatmap(
                bag.coords,
                scores.float().numpy(),
                patch_size_level0(bag.coords, bag.attrs),
                out_dir / "heatmaps" / f"{sid}.png",
                slide_path=bag.slide_path,
                slide_id=sid,
                title=title,
            )
            rec["heatmap"] = str(path.resolve())
        return rec


# --------------------------------------------------------------------------- save / log


def bundle_digest(encoder_dir: Path, head_dir: Path, settings: Mapping[str, Any]) -> str:
    """Content key of a bundle: both weight files and every setting."""
    return text_digest(
        file_digest(encoder_dir / "weights.safetensors"),
        file_digest(head_dir / "weights.safetensors"),
        {k: v for k, v in settings.items() if k != "bundle_digest"},
    )


def _saved_digest(settings_file: Path) -> str | None:
    try:
        value = json.loads(settings_file.read_text(encoding="utf-8")).get("bundle_digest")
    except (OSError, ValueError):
        return None
    return str(value) if value else None


def save_slide_classifier(
    encoder_dir: str | os.PathLike[str],
    head_dir: str | os.PathLike[str],
    tiling_cfg: TilingConfig,
    classes: Sequence[str] | None,
    out_dir: str | os.PathLike[str],
    *,
    embed_cfg: EmbedConfig | None = None,
    threshold: float | None = None,
) -> Path:
    """Write the pyfunc model folder ``out_dir`` (an MLflow model: MLmodel, code, bundle of weights).

    The folder appears complete or not at all (built beside it, then renamed); an existing folder with the
    same weights and settings is kept as it is, so a resumed register step does not rebuild it.
    """
    import mlflow.pyfunc

    from icmil.config import EmbedConfig
    from icmil.mil import read_head_config

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
    settings: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "classes": classes,
        "threshold": threshold,
        "tiling": tiling_cfg.model_dump(mode="json"),
        # Inference reads patches in this process: no DataLoader workers (a serving container may lack /dev/shm).
        "embed": embed.model_dump(mode="json") | {"num_workers": 0},
        "encoder": json.loads((enc / "config.json").read_text(encoding="utf-8")),
        "head": head_cfg,
    }
    settings["bundle_digest"] = bundle_digest(enc, head, settings)
    existing = out / "artifacts" / "bundle" / SETTINGS_FILE  # where MLflow copies the bundle
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
        shutil.copytree(enc, bundle / "encoder", ignore=shutil.ignore_patterns(".*"))
        shutil.copytree(head, bundle / "head", ignore=shutil.ignore_patterns(".*", "*.png", "heatmaps"))
        write_json_atomic(bundle / SETTINGS_FILE, settings)
        model_dir = staging / "model"
        example = pd.DataFrame({"path": ["/data/slides/example.svs"], "slide_id": ["example"], "mpp": [0.5]})
        mlflow.pyfunc.save_model(
            str(model_dir),
            python_model=str(MODEL_CODE),
            artifacts={"bundle": str(bundle)},
            signature=model_signature(classes),
            input_example=example,
            pip_requirements=pip_requirements(),
            metadata={"icmil": {k: settings[k] for k in ("format", "classes", "threshold", "bundle_digest")}},
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
    threshold: float | None = None,
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


# --------------------------------------------------------------------------- load / predict


def _local_model(model_uri: str, tracking_uri: str | None, registry_uri: str | None, dst: Path) -> str:
    """A local folder holding the MLflow model behind ``model_uri`` (downloaded only when remote)."""
    from urllib.parse import unquote, urlsplit

    import mlflow.artifacts

    source = model_uri
    if model_uri.startswith(("models:/", "runs:/")):
        from mlflow import MlflowClient

        from icmil.tracking.registry import resolve_artifact_source

        # Only here: a client built without a URI would create ./mlflow.db (MLflow's default store) as a side effect.
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
        if model_uri.startswith("models:/") and not model_uri.startswith("models:/m-"):
            ref = model_uri[len("models:/") :].strip("/")
            if "@" in ref:
                name, alias = ref.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            elif "/" in ref:
                name, version = ref.rsplit("/", 1)
                mv = client.get_model_version(name, version)
            else:
                raise ConfigError(f"model URI {model_uri!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")
            source = str(mv.source)
        if source.startswith(("models:/", "runs:/")):
            source = resolve_artifact_source(client, source)
    if source.startswith("file:"):
        return unquote(urlsplit(source).path)
    if "://" not in source and not source.startswith(("mlflow-artifacts:", "models:", "runs:")):
        if not Path(source).exists():
            raise ConfigError(f"model {model_uri!r}: no such folder {source}")
        return source
    return str(
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri)
    )


@contextlib.contextmanager
def open_slide_classifier(
    model_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None
) -> Iterator[PyFuncModel]:
    """Load the pyfunc model behind ``model_uri`` (``models:/NAME@ALIAS``, ``runs:/...``, a folder).

    Explicit ``tracking_uri`` / ``registry_uri`` are used as given (no process-wide MLflow state); None
    falls back to MLflow's defaults (``MLFLOW_TRACKING_URI``).
    """
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="icmil-model-") as tmp:
        where = redact_uri(registry_uri or tracking_uri or mlflow.get_tracking_uri())
        try:
            local = _local_model(model_uri, tracking_uri, registry_uri, Path(tmp))
            model = mlflow.pyfunc.load_model(local)
        except MlflowException as err:
            raise TrackingError(f"cannot load model {model_uri} from {where}: {err.message}") from err
        if (model.metadata.metadata or {}).get("icmil", {}).get("format") != MODEL_FORMAT:
            raise TrackingError(f"{model_uri} is not an icmil slide classifier ({MODEL_FORMAT})")
        yield model


def model_classes(model: PyFuncModel) -> list[str]:
    """Class names of a loaded slide classifier, in the order of its ``prob_<class>`` columns."""
    meta = model.metadata.metadata or {}
    return list(meta["icmil"]["classes"])


def predict_slides(
    model_uri: str,
    slides: pd.DataFrame | Sequence[str | os.PathLike[str]] | str,
    out_dir: str | os.PathLike[str],
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    heatmaps: bool = True,
    max_failed_fraction: float | None = None,
) -> pd.DataFrame:
    """Predict slides (or feature files) with a logged/registered slide classifier.

    Writes ``out_dir/predictions.csv`` and ``out_dir/heatmaps/<slide_id>.png`` (tiles, features and the
    slide cache stay under ``out_dir`` too, so a rerun skips finished slides) and returns the table. Raises
    :class:`~icmil.errors.StageFailed` after writing the table when more slides failed than
    ``max_failed_fraction`` (default: the model's ``tiling.max_failed_fraction``).

    Example:
        >>> predict_slides("models:/icmil-slide-classifier@champion", ["a.svs", "b.svs"], "preds/")  # doctest: +SKIP
    """
    table = as_slide_table(slides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open_slide_classifier(model_uri, tracking_uri, registry_uri) as model:
        params = {"out_dir": str(out.resolve()), "heatmaps": bool(heatmaps), "device": ""}
        result = pd.DataFrame(model.predict(table, params=params))
        limit = max_failed_fraction
        if limit is None:
            limit = float(model.unwrap_python_model().tiling.max_failed_fraction)
    write_text_atomic(out / "predictions.csv", result.to_csv(index=False))
    failures = {str(r.slide_id): str(r.error) for r in result.itertuples() if str(r.error)}
    check_failure_fraction("predict", failures, len(result), limit)
    return result
