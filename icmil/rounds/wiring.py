"""The ICMIL round wiring: which stage of round k consumes which output of which earlier round.

This is the ONE description of an ICMIL run. The local driver (:func:`icmil.rounds.run_rounds`, ``icmil couple``)
runs it with folders; the Kubeflow pipeline (``icmil_kfp.pipelines.icmil_pipeline``, ``icmil run``) builds its
DAG from it with artifacts. Both walk the same :class:`Stage` lists and resolve every input through the same
:class:`Lineage`, so they cannot wire a round differently::

    once           prepare (cohort) -> tile
    round 0        encoder -> embed -> [tune] -> train -> evaluate
    round k >= 1   finetune    teacher = encoder of round k-1 + head and features of the model round of k-1
                   ├ a student won:   embed -> [tune] -> train -> evaluate     (round k is its own model round)
                   └ teacher kept:    keep-teacher (the model round's evaluation, marked teacher_kept)
                   round k+1 runs if k < coupling.rounds and (a student won or coupling.force_rounds)

The *model round* of round k is k itself, or - when round k kept its teacher - the round whose features and head
it reused (followed back to a round that trained its own head). A kept teacher's encoder has the teacher's
weights, so round k's encoder is still the teacher of round k+1.

Example:
    >>> from icmil.config import load_config
    >>> [s.name for s in trained_round(load_config(None, ["tuning.enabled=true"]), 1)]
    ['embed', 'tune', 'train', 'evaluate']
    >>> dict(finetune_stage().uses)["head"]
    Use(output='head', source=<Source.MODEL: 'model round'>)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from icmil.config import ICMILConfig, calibrates_initial_encoder

T = TypeVar("T")

# Outputs of the run (made once) and of each round, by name.
COHORT = "cohort"  # resolved manifest (+ synthetic slides, lesion boxes)
TILES = "tiles"
ENCODER = "encoder"
FEATURES = "features"
TUNED = "tuned"  # the round's best bag-head settings (Optuna)
HEAD = "head"
EVALUATION = "evaluation"  # the round's metrics (the row of the per-round table)


class Source(enum.Enum):
    """Where an input comes from, seen from round k."""

    RUN = "run"  # made once for the whole run (cohort, tiles)
    THIS = "this round"  # made earlier in round k
    PREVIOUS = "previous round"  # made by round k-1
    MODEL = "model round"  # made by the model round of k-1 (k-1, or the round a kept teacher reused)


@dataclass(frozen=True)
class Use:
    """One input of a stage: output ``output`` of ``source``."""

    output: str
    source: Source


@dataclass(frozen=True)
class Stage:
    """One stage of a round.

    ``name`` is the stage (the KFP task ``<name>-r<k>``); ``output`` what it writes; ``uses`` its inputs as
    ``(argument, Use)`` pairs in call order. ``tracked``: it logs to MLflow (child run ``round<k>/<stage>``);
    untracked stages are content-addressed (the pipeline caches them and never passes them the parent run id).
    ``per_shard``: the pipeline runs it once per slide shard (ParallelFor); the local driver runs it once.
    """

    name: str
    output: str
    uses: tuple[tuple[str, Use], ...]
    tracked: bool
    per_shard: bool = False

    @property
    def inputs(self) -> dict[str, Use]:
        return dict(self.uses)


def _run(output: str) -> Use:
    return Use(output, Source.RUN)


def _this(output: str) -> Use:
    return Use(output, Source.THIS)


# The run-level stages (the pipeline's cohort and shard loop; the driver's prepare_run and tile stage).
PREPARE = Stage("prepare", COHORT, (), tracked=False)
TILE = Stage("tile", TILES, (("cohort", _run(COHORT)),), tracked=False, per_shard=True)


def initial_encoder_stage(cfg: ICMILConfig) -> Stage:
    """Round 0's encoder: the configured one, materialised once. When its BatchNorm is calibrated on training
    patches (a random init; pretrained weights with ``coupling.calibrate_pretrained_bn``) it reads the tiles;
    otherwise it needs nothing (the pipeline builds it while tiling)."""
    uses = (("tiles", _run(TILES)),) if calibrates_initial_encoder(cfg) else ()
    return Stage(ENCODER, ENCODER, uses, tracked=False)


def finetune_stage() -> Stage:
    """Stage 2 of round k: the teacher is round k-1's encoder with the model round's head; the model round's
    features give the teacher's per-patch view without re-encoding."""
    return Stage(
        "finetune",
        ENCODER,
        (
            ("tiles", _run(TILES)),
            ("encoder", Use(ENCODER, Source.PREVIOUS)),
            ("head", Use(HEAD, Source.MODEL)),
            ("features", Use(FEATURES, Source.MODEL)),
        ),
        tracked=True,
    )


def round_start(cfg: ICMILConfig, k: int) -> Stage:
    """The stage that makes round ``k``'s encoder."""
    return initial_encoder_stage(cfg) if k == 0 else finetune_stage()


def trained_round(cfg: ICMILConfig, k: int) -> tuple[Stage, ...]:
    """The stages after the encoder in a round that trains its own head (round 0, or a student won)."""
    tuning = cfg.tuning.enabled
    stages = [
        Stage(
            "embed",
            FEATURES,
            (("tiles", _run(TILES)), ("encoder", _this(ENCODER))),
            tracked=False,
            per_shard=True,
        )
    ]
    if tuning:
        stages.append(Stage("tune", TUNED, (("features", _this(FEATURES)),), tracked=True))
    train_uses = (("features", _this(FEATURES)), *((("tuned", _this(TUNED)),) if tuning else ()))
    stages.append(Stage("train", HEAD, train_uses, tracked=True))
    evaluate_uses = (
        ("features", _this(FEATURES)),
        ("head", _this(HEAD)),
        *((("finetune", _this(ENCODER)),) if k > 0 else ()),
    )
    stages.append(Stage("evaluate", EVALUATION, evaluate_uses, tracked=True))
    return tuple(stages)


def kept_round(k: int) -> tuple[Stage, ...]:
    """The stages after stage 2 in a round that kept its teacher: no embedding, no training."""
    if k < 1:
        raise ValueError("round 0 has no teacher to keep")
    return (
        Stage(
            "keep-teacher",
            EVALUATION,
            (("evaluation", Use(EVALUATION, Source.MODEL)), ("finetune", _this(ENCODER))),
            tracked=True,
        ),
    )


def teacher_kept(finetune_result: Mapping[str, Any]) -> bool:
    """Stage 2 kept the teacher: no student beat it, so the selected step is 0.

    >>> teacher_kept({"best_step": 0}), teacher_kept({"best_step": 40})
    (True, False)
    """
    return int(finetune_result.get("best_step", -1)) == 0


def next_round_runs(cfg: ICMILConfig, k: int, kept: bool) -> bool:
    """Whether round ``k + 1`` runs after round ``k``: rounds remain, and round ``k`` changed the encoder
    (a kept teacher means the coupling converged) or ``coupling.force_rounds`` asks for every round."""
    return k < cfg.coupling.rounds and (not kept or cfg.coupling.force_rounds)


@dataclass
class RoundOutputs(Generic[T]):
    """What round ``index`` made (``outputs``: folders or pipeline artifacts) and its model round."""

    index: int
    outputs: dict[str, T] = field(default_factory=dict)
    model: int | None = None  # None while the round runs; its own index once it trained a head
    teacher_kept: bool = False


class Lineage(Generic[T]):
    """The outputs of a run so far, and which round each round's model is: resolves a :class:`Use` of round k
    to a value (a folder for the local driver, a task output for the pipeline).

    >>> lin = Lineage({TILES: "tiles"})
    >>> for name, value in [(ENCODER, "e0"), (FEATURES, "f0"), (HEAD, "h0"), (EVALUATION, "m0")]:
    ...     lin.add(0, name, value)
    >>> lin.close_round(0, kept=False)
    >>> lin.add(1, ENCODER, "e1"); lin.add(1, EVALUATION, "m1"); lin.close_round(1, kept=True)
    >>> [lin.resolve(u, 2) for _, u in finetune_stage().uses]
    ['tiles', 'e1', 'h0', 'f0']
    >>> lin.model_round(1), lin.final_model()
    (0, {'encoder': 'e1', 'head': 'h0', 'evaluation': 'm1'})
    """

    def __init__(self, run_outputs: Mapping[str, T]) -> None:
        self.run: dict[str, T] = dict(run_outputs)
        self.rounds: dict[int, RoundOutputs[T]] = {}

    def branch(self) -> Lineage[T]:
        """An independent copy (one per branch of the pipeline's ``teacher kept?`` condition)."""
        twin: Lineage[T] = Lineage(self.run)
        twin.rounds = {
            k: RoundOutputs(r.index, dict(r.outputs), r.model, r.teacher_kept) for k, r in self.rounds.items()
        }
        return twin

    def add(self, k: int, output: str, value: T) -> None:
        """Record that round ``k`` made ``output``."""
        self.rounds.setdefault(k, RoundOutputs(k)).outputs[output] = value

    def close_round(self, k: int, kept: bool) -> None:
        """Round ``k`` is done: its own model round, or (teacher kept) round k-1's model round."""
        record = self.rounds.setdefault(k, RoundOutputs(k))
        record.teacher_kept = kept
        record.model = self.model_round(k - 1) if kept else k

    def model_round(self, k: int) -> int:
        """The round whose features and head round ``k`` stands for."""
        model = self.rounds[k].model
        if model is None:
            raise KeyError(f"round {k} has not finished")
        return model

    def resolve(self, use: Use, k: int) -> T:
        """The value of ``use`` for a stage of round ``k``."""
        if use.source is Source.RUN:
            return self.run[use.output]
        if use.source is Source.THIS:
            return self.rounds[k].outputs[use.output]
        if use.source is Source.PREVIOUS:
            return self.rounds[k - 1].outputs[use.output]
        return self.rounds[self.model_round(k - 1)].outputs[use.output]

    def last_round(self) -> int:
        return max(self.rounds)

    def final_model(self) -> dict[str, T]:
        """What the run delivers: the last round's encoder (a kept teacher's weights are its teacher's), the
        head of its model round, and the last round's evaluation (marked teacher_kept when it is one)."""
        last = self.last_round()
        model = self.rounds[self.model_round(last)]
        return {
            ENCODER: self.rounds[last].outputs[ENCODER],
            HEAD: model.outputs[HEAD],
            EVALUATION: self.rounds[last].outputs[EVALUATION],
        }
