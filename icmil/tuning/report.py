"""What a finished study leaves behind: ``best_params.json``, ``trials.csv`` and Optuna's plots as PNG.

Example:
    >>> params = load_best_params("RUN/round_0/tune/best_params.json")  # doctest: +SKIP
    >>> params  # doctest: +SKIP
    {'attention_dim': 64, 'dropout': 0.12, 'lr': 0.00031, 'weight_decay': 2.1e-05}
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icmil.errors import ConfigError
from icmil.io import atomic_path, write_json_atomic
from icmil.log import get_logger

if TYPE_CHECKING:
    import optuna

log = get_logger("tuning")

BEST_PARAMS_FILE = "best_params.json"


def write_best_params(path: Path, summary: dict[str, Any]) -> Path:
    """Write the study summary (``params`` = the best trial's settings) atomically."""
    return write_json_atomic(path, summary)


def load_best_params(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The tuned settings from a ``best_params.json`` (a file or the folder holding it).

    Raises :class:`ConfigError` naming the file when it is missing or has no ``params`` mapping.
    """
    p = Path(path)
    if p.is_dir():
        p = p / BEST_PARAMS_FILE
    if not p.is_file():
        raise ConfigError(f"tuned parameters not found: {p} (run `icmil tune` for this round first)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{p} is not valid JSON: {err}") from None
    params = data.get("params") if isinstance(data, dict) else None
    if not isinstance(params, dict):
        raise ConfigError(f"{p} has no 'params' mapping")
    return params


def write_trials_csv(study: optuna.Study, path: Path) -> Path:
    """One row per trial: number, state, value, parameters, timings."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "datetime_start", "duration"))
    with atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)
    return path


def write_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Optimisation history, per-epoch curves (pruning) and parameter importances as PNG files.

    A plot that cannot be drawn (e.g. importances need two completed trials with different values) is skipped
    with a log line; the study result does not depend on it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as oplt

    plots = {
        "optimization_history.png": oplt.plot_optimization_history,
        "intermediate_values.png": oplt.plot_intermediate_values,
        "param_importances.png": oplt.plot_param_importances,
    }
    written = []
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                plot(study)
            fig = plt.gcf()
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            with atomic_path(out_dir / name, suffix=".png") as tmp:
                fig.savefig(tmp, dpi=100, format="png")
            plt.close(fig)
            written.append(out_dir / name)
        except Exception as err:  # plotting is a report, never a reason to fail the round
            log.info("skipped %s: %s", name, err)
            plt.close("all")
    return written
