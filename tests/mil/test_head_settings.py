"""A bag head owns its settings, optimiser defaults and confidence beta; the config reaches them through
icmil.mil.settings, and unknown keys are errors naming the head and what it accepts."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from icmil.cli import main
from icmil.config import MILConfig, load_config
from icmil.errors import ConfigError
from icmil.mil import (
    check_head_settings,
    confidence_beta,
    create_mil_head,
    head_from_config,
    head_settings,
    list_mil_heads,
    mil_head_class,
)
from icmil.mil.base import _REGISTRY, BagOutput, MILHead, register_mil_head
from icmil.mil.optim import Lookahead, build_optimizer
from icmil.mil.settings import describe_heads
from icmil.tuning import validate_space


@pytest.mark.parametrize("name", list_mil_heads())
def test_settings_are_the_constructor_keywords(name: str) -> None:
    cls = mil_head_class(name)
    params = {
        p.name: p.default
        for p in list(inspect.signature(cls.__init__).parameters.values())[3:]  # self, in_dim, n_classes
    }
    model = cls.settings_model()
    assert {k: f.default for k, f in model.model_fields.items()} == params
    head = create_mil_head(name, 4, 2)
    assert head.hparams == params  # what save_mil_head records and load_mil_head rebuilds
    assert cls.default_lr > 0 and cls.default_weight_decay >= 0 and cls.confidence_beta > 0
    with pytest.raises(
        ConfigError, match=rf"MIL head '{name}': unknown setting\(s\) \['bogus'\]; {name} accepts "
    ):
        create_mil_head(name, 4, 2, bogus=1)


def test_the_config_reaches_the_head_in_order_of_precedence() -> None:
    # head defaults < shared trunk settings (to heads that have them) < mil.heads.<head>
    assert head_settings(MILConfig(head="dtfd"))["pseudo_bags"] == 5
    cfg = MILConfig(head="dtfd", hidden_dim=64, heads={"dtfd": {"pseudo_bags": 3, "hidden_dim": 32}})
    assert head_settings(cfg) == {
        "hidden_dim": 32,
        "attention_dim": 128,
        "dropout": 0.0,
        "pseudo_bags": 3,
        "distill": "afs",
        "tier_blend": False,
    }
    assert head_settings(cfg, "abmil")["hidden_dim"] == 64  # the dtfd section is dtfd's alone
    assert "attention_dim" not in head_settings(MILConfig(head="transmil", attention_dim=64))
    head = head_from_config(
        MILConfig(head="transmil", hidden_dim=16, heads={"transmil": {"n_heads": 2}}), 8, 3
    )
    assert (head.hparams["hidden_dim"], head.hparams["n_heads"], head.n_classes) == (16, 2, 3)


def test_unknown_heads_and_settings_are_errors_that_say_what_is_accepted() -> None:
    with pytest.raises(
        ConfigError, match=r"mil\.heads\.dtfd: unknown setting\(s\) \['pseudo_bag'\]; dtfd accepts "
    ):
        check_head_settings(MILConfig(heads={"dtfd": {"pseudo_bag": 3}}))
    with pytest.raises(ConfigError, match=r"mil\.heads\.nope: no MIL head 'nope'; registered heads"):
        check_head_settings(MILConfig(heads={"nope": {}}))
    with pytest.raises(ConfigError, match=r"mil\.heads\.dtfd: pseudo_bags: Input should be a valid integer"):
        check_head_settings(MILConfig(heads={"dtfd": {"pseudo_bags": "many"}}))
    with pytest.raises(
        ConfigError, match="must be a multiple of n_heads"
    ):  # the head's own check, before training
        check_head_settings(MILConfig(head="transmil", heads={"transmil": {"n_heads": 7}}))
    with pytest.raises(ConfigError, match="unknown MIL head 'nope'"):
        check_head_settings(MILConfig(head="nope"))


def test_optimiser_and_beta_defaults_belong_to_the_head() -> None:
    p = [torch.nn.Parameter(torch.zeros(1))]
    opt = build_optimizer("transmil", p, MILConfig(head="transmil"))
    assert isinstance(opt, Lookahead) and opt.param_groups[0]["weight_decay"] == 1e-5
    # mil.weight_decay now applies to TransMIL too (it was silently ignored for it).
    opt = build_optimizer("transmil", p, MILConfig(head="transmil", weight_decay=3e-4))
    assert opt.param_groups[0]["weight_decay"] == 3e-4
    assert build_optimizer("dtfd", p, MILConfig(head="dtfd")).param_groups[0]["lr"] == 1e-4
    assert [confidence_beta(h, {}) for h in ("abmil", "dtfd", "maxpool", "transmil")] == [6.0, 2.0, 6.0, 6.0]
    assert confidence_beta("dtfd", {"dtfd": 4.0, "abmil": 1.0}) == 4.0
    from icmil.coupling.finetune import resolve_beta

    cfg = load_config(None, ["coupling.beta.abmil=3"])
    assert (resolve_beta(cfg, "abmil"), resolve_beta(cfg, "dtfd")) == (3.0, 2.0)


def test_old_flat_keys_are_read_with_a_deprecation_message(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="icmil.config"):
        cfg = MILConfig(head="dtfd", dtfd_pseudo_bags=3, dtfd_distill="maxs", transmil_landmarks=64)
    assert cfg.heads == {"dtfd": {"pseudo_bags": 3, "distill": "maxs"}, "transmil": {"landmarks": 64}}
    assert "mil.dtfd_pseudo_bags is deprecated; it is read as mil.heads.dtfd.pseudo_bags" in caplog.text
    with pytest.raises(ValueError, match=r"dtfd_pseudo_bags=3 contradicts heads\.dtfd\.pseudo_bags=4"):
        MILConfig(dtfd_pseudo_bags=3, heads={"dtfd": {"pseudo_bags": 4}})


def test_a_config_written_before_heads_owned_their_settings_trains_the_same(tmp_path: Path) -> None:
    # Every config.yaml written next to an output before held all the flat keys with their values.
    old = {
        "mil": {
            "head": "transmil",
            "hidden_dim": 64,
            "weight_decay": 1e-4,  # TransMIL ignored this ...
            "transmil_weight_decay": 2e-5,  # ... and trained with this
            "transmil_heads": 4,
            "transmil_landmarks": 32,
            "transmil_teacher": "token_head",
            "dtfd_pseudo_bags": 5,
            "dtfd_distill": "afs",
            "dtfd_tier_blend": False,
        },
        "coupling": {"beta": {"abmil": 6.0, "dtfd": 2.0, "maxpool": 6.0, "transmil": 6.0}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    cfg = load_config(path)
    settings = head_settings(cfg.mil)
    assert (settings["n_heads"], settings["landmarks"], settings["teacher"]) == (4, 32, "token_head")
    opt = build_optimizer("transmil", [torch.nn.Parameter(torch.zeros(1))], cfg.mil)
    assert opt.param_groups[0]["weight_decay"] == 2e-5
    abmil = load_config(path, ["mil.head=abmil"])
    assert (
        build_optimizer("abmil", [torch.nn.Parameter(torch.zeros(1))], abmil.mil).param_groups[0][
            "weight_decay"
        ]
        == 1e-4
    )


def test_search_spaces_name_head_settings_new_and_old() -> None:
    space = load_config(
        None,
        [
            "tuning.mil_space={heads.dtfd.pseudo_bags: {low: 2, high: 8, kind: int}, "
            "dtfd_pseudo_bags: {low: 2, high: 8, kind: int}, lr: {low: 1.0e-5, high: 1.0e-3, log: true}}"
        ],
    ).tuning.mil_space
    validate_space(space, "mil")
    for key, why in (
        ("heads.dtfd.pseudo_bag", "dtfd has no setting 'pseudo_bag' (it has attention_dim"),
        ("heads.nope.x", "no MIL head 'nope'"),
        ("heads", "not a tunable mil setting"),
    ):
        bad = {key: space["lr"]}
        with pytest.raises(ConfigError, match=re.escape(f"tuning.mil_space.{key}: {why}")):
            validate_space(bad, "mil")


class _Twice(MILHead):
    """A head written by a user: mean of ``scale`` x the instance logits."""

    default_lr = 5e-3
    confidence_beta = 3.0

    def __init__(self, in_dim: int, n_classes: int, scale: float = 2.0, width: int = 4) -> None:
        super().__init__(in_dim, n_classes, scale=scale, width=width)
        self.trunk = torch.nn.Linear(in_dim, width)
        self.classifier = torch.nn.Linear(width, n_classes)
        self.scale = scale

    def forward(self, features: torch.Tensor) -> BagOutput:
        return BagOutput(logits=self.scale * self.instance_logits(features).mean(dim=0))

    def instance_embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.trunk(features)

    def instance_classify(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(h)


@pytest.fixture
def twice() -> Iterator[type[MILHead]]:
    cls = register_mil_head("twice")(_Twice)
    yield cls
    _REGISTRY.pop("twice")


def test_a_new_head_needs_no_other_file(twice: type[MILHead], capsys: pytest.CaptureFixture[str]) -> None:
    # Registering the class is all: config keys, checks, optimiser and beta defaults, `icmil heads`.
    cfg = load_config(None, ["mil.head=twice", "mil.heads.twice.scale=0.5", "mil.hidden_dim=99"])
    check_head_settings(cfg.mil)
    head = head_from_config(cfg.mil, in_dim=3, n_classes=2)
    assert isinstance(head, twice) and head.hparams == {"scale": 0.5, "width": 4}
    assert build_optimizer("twice", head.parameters(), cfg.mil).param_groups[0]["lr"] == 5e-3
    assert confidence_beta("twice", cfg.coupling.beta) == 3.0
    with pytest.raises(ConfigError, match=r"twice accepts scale, width"):
        check_head_settings(load_config(None, ["mil.head=twice", "mil.heads.twice.sacle=1"]).mil)
    assert next(r for r in describe_heads() if r["head"] == "twice")["settings"]["scale"] == {
        "type": "float",
        "default": 2.0,
    }
    assert main(["heads"]) == 0
    assert "mil.heads.twice.scale: float = 2.0" in capsys.readouterr().out


def test_cli_checks_head_settings_before_running(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "mil.heads.dtfd.pseudo_bag=3"]) == 2
    err = capsys.readouterr().err
    assert "mil.heads.dtfd: unknown setting(s) ['pseudo_bag']; dtfd accepts" in err and "pseudo_bags" in err


def test_describe_heads_lists_every_registered_head() -> None:
    rows = {r["head"]: r for r in describe_heads()}
    assert set(rows) == set(list_mil_heads())
    assert rows["transmil"]["optimizer"] == "Lookahead(RAdam)" and rows["dtfd"]["confidence_beta"] == 2.0
    assert rows["dtfd"]["settings"]["distill"]["default"] == "afs"


def test_unregistered_subclasses_keep_working() -> None:
    # A head that is used directly (never registered, e.g. in a notebook) still records its settings.
    head: Any = _Twice(3, 2, scale=1.5)
    assert head.hparams == {"scale": 1.5, "width": 4}
    assert _Twice.validate_settings({"width": 8}) == {"scale": 2.0, "width": 8}
