"""What ``icmil encoders`` shows: every preset, its contract, and whether its weights are on this machine.

Only the local file system is looked at (``encoder.weights`` when it names that preset, and the hub cache);
the hub is never contacted.

Example:
    >>> from icmil.config import EncoderConfig
    >>> rows = encoder_catalog(EncoderConfig(hub_cache="/nonexistent"))
    >>> [r["name"] for r in rows][:3], rows[0]["weights_found"]
    (['resnet50_trunc', 'uni', 'uni2_h'], False)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from icmil.config import EncoderConfig
from icmil.features.presets import get_preset, list_presets
from icmil.features.weights import find_in_hub_cache, hub_cache_dir


def encoder_catalog(cfg: EncoderConfig) -> list[dict[str, Any]]:
    """One dict per preset: :meth:`EncoderPreset.summary` plus ``weights_found``, ``weights_path`` and
    ``weights_origin`` (``encoder.weights`` or ``hub-cache``) for this machine and config."""
    cache = hub_cache_dir(cfg.hub_cache)
    configured = get_preset(cfg.name)
    rows = []
    for preset in list_presets():
        path: Path | None = None
        origin = None
        if cfg.weights and configured is not None and configured.name == preset.name:
            candidate = Path(cfg.weights).expanduser()
            if candidate.is_dir():
                candidate = next(
                    (candidate / f for f in preset.weight_files if (candidate / f).is_file()), candidate
                )
            if candidate.is_file():
                path, origin = candidate, "encoder.weights"
        if path is None and preset.hf_repo:
            path = find_in_hub_cache(preset.hf_repo, preset.weight_files, cache)
            origin = "hub-cache" if path is not None else None
        rows.append(
            preset.summary()
            | {
                "weights_found": path is not None,
                "weights_path": str(path) if path is not None else None,
                "weights_origin": origin,
                "hub_cache": str(cache),
            }
        )
    return rows


def format_catalog(rows: list[dict[str, Any]]) -> str:
    """The table ``icmil encoders`` prints, then where it looked and how to use a preset."""
    header = ("preset", "dim", "input", "µm/px", "normalisation", "weights here", "licence / access")
    lines = [header]
    for r in rows:
        size = f"{r['input_size']}px" if r["input_size"] else "any"
        weights = r["weights_path"] if r["weights_found"] else f"no ({r['hf_repo']})"
        lines.append(
            (
                r["name"],
                str(r["out_dim"]),
                size,
                f"{r['mpp']:g}",
                r["normalization"],
                str(weights),
                str(r["licence"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line[:-1])) + "  " + line[-1]
        for line in lines
    ]
    cache = rows[0]["hub_cache"] if rows else ""
    text += [
        "",
        f"hub cache searched: {cache} (set encoder.hub_cache or HF_HUB_CACHE; the hub itself is never contacted)",
        "use one: --set encoder.name=uni --set encoder.pretrained=true   (weights from the hub cache)",
        "     or: --set encoder.name=uni --set encoder.weights=/models/uni/pytorch_model.bin "
        "[--set encoder.sha256=...]",
    ]
    return "\n".join(text)
