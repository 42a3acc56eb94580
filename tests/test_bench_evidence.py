"""The coupling-evidence bench's bookkeeping: paired deltas, per-seed table, plots (no training here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "coupling_evidence.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("coupling_evidence", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(head: str, variant: str, seed: int, rnd: int, test_auc: float, patch: float) -> dict[str, Any]:
    return {
        "head": head,
        "variant": variant,
        "seed": seed,
        "round": rnd,
        "test_auc": test_auc,
        "test_loss": 1.0 - test_auc,
        "val_auc": test_auc,
        "patch_auc_test": patch,
        "patch_auc_all": patch,
        "finetune_best_step": float("nan") if rnd == 0 else 10.0 * rnd,
    }


def _rows() -> list[dict[str, Any]]:
    # round 0 is shared by both variants; seed 1 starts lower, so unpaired and paired deltas differ
    return [
        _row("abmil", "faithful", 0, 0, 0.6, 0.70),
        _row("abmil", "faithful", 1, 0, 0.2, 0.50),
        _row("abmil", "faithful", 0, 1, 0.8, 0.75),
        _row("abmil", "faithful", 1, 1, 0.2, 0.60),
        _row("abmil", "stain", 0, 1, 1.0, 0.90),
        _row("abmil", "stain", 1, 1, 0.6, 0.70),
    ]


def test_aggregate_pairs_each_seed_with_its_own_round0(bench: ModuleType) -> None:
    table, markdown = bench.aggregate(_rows())
    by_key = {(r["variant"], r["round"]): r for r in table}
    assert set(by_key) == {("—", 0), ("faithful", 1), ("stain", 1)}
    faithful, stain = by_key[("faithful", 1)], by_key[("stain", 1)]
    assert faithful["test_auc_delta_mean"] == pytest.approx(0.1)  # (+0.2 + 0.0) / 2
    assert faithful["test_auc_delta_sd"] == pytest.approx(0.1414, abs=1e-4)
    assert stain["patch_auc_all_delta_mean"] == pytest.approx(0.2)  # (+0.2 + 0.2) / 2
    assert stain["patch_auc_all_delta_sd"] == pytest.approx(0.0)
    assert faithful["finetune_best_step"] == [10, 10]
    assert "| abmil | stain | 1 | 0.800 ± 0.283 |" in markdown


def test_per_seed_table_and_plots(bench: ModuleType, tmp_path: Path) -> None:
    rows = _rows()
    lines = bench.per_seed_table(rows).splitlines()
    assert "| abmil | stain | 1 | 0.200 → 0.600 | 0.500 → 0.700 | 0.500 → 0.700 |" in lines
    assert len(lines) == 2 + 4  # header + 2 variants x 2 seeds

    bench.plot_evidence(rows, tmp_path / "evidence.png")
    bench.plot_variant_deltas(rows, tmp_path / "evidence_variants.png")
    for name in ("evidence.png", "evidence_variants.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replot_redraws_from_evidence_json(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = {"per_run": _rows(), "variants": {"faithful": [], "stain": ["coupling.stain_augment=true"]}}
    (tmp_path / "evidence.json").write_text(json.dumps(done))
    monkeypatch.setattr("sys.argv", ["coupling_evidence.py", "--out", str(tmp_path), "--replot"])
    bench.main()
    assert (tmp_path / "evidence.png").is_file() and (tmp_path / "evidence_variants.png").is_file()
    assert not (tmp_path / "cohort").exists()  # replotting never synthesises or trains
