from __future__ import annotations

from pathlib import Path

import pytest

from icmil.config import ICMILConfig, config_from_yaml, config_to_yaml, dump_config, load_config
from icmil.errors import ConfigError


def test_defaults_follow_method_md() -> None:
    cfg = ICMILConfig()
    assert cfg.tiling.patch_size == 256 and cfg.tiling.target_mpp == 0.5
    assert cfg.tiling.min_tissue_fraction == 0.8
    # "auto": the preset's own normalisation, which for resnet50_trunc is ImageNet's.
    assert cfg.encoder.name == "resnet50_trunc" and cfg.encoder.normalization == "auto"
    assert cfg.mil.weight_decay is None and cfg.mil.grad_clip == 5.0 and cfg.mil.epochs == 200
    assert cfg.coupling.lr == 1e-5 and cfg.coupling.batch_size == 100
    assert (cfg.coupling.loss_weight_wide1, cfg.coupling.loss_weight_wide2) == (0.5, 0.5)
    assert cfg.coupling.crop_scale == (0.5, 1.0)
    # Per-head defaults (lr, weight decay, confidence beta) are the heads' own: tests/mil/test_heads.py.
    assert cfg.mil.heads == {} and cfg.coupling.beta == {}


def test_yaml_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("mil:\n  head: dtfd\n  lr: 0.001\ncoupling:\n  rounds: 2\n")
    cfg = load_config(path, ["mil.lr=3e-4", "tiling.use_otsu=true", "pipeline.gpu_node_selector.pool=a100"])
    assert cfg.mil.head == "dtfd"
    assert cfg.mil.lr == pytest.approx(3e-4)  # override beats the file
    assert cfg.coupling.rounds == 2
    assert cfg.tiling.use_otsu is True
    assert cfg.pipeline.gpu_node_selector == {"pool": "a100"}


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["mil.head=transmil", "seed=7"])
    assert config_from_yaml(config_to_yaml(cfg)) == cfg
    written = dump_config(cfg, tmp_path / "out")
    assert load_config(written) == cfg
    assert cfg.digest() == load_config(written).digest()


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["mil.epochs=0"], "mil.epochs"),
        (["mil.typo=1"], "mil.typo"),
        (["tiling.median_blur=4"], "median_blur"),
        (["nonsense"], "a.b=value"),
        (["tiling.patch_size.x=1"], "tiling.patch_size"),
    ],
)
def test_bad_values_name_the_field(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(None, overrides)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
