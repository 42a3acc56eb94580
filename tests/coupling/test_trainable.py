"""Which encoder layers stage 2 trains: blocks found generically, freezing, LoRA adapters merged back."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from icmil.config import EncoderConfig
from icmil.coupling.teacher import make_teacher_student
from icmil.coupling.trainable import add_lora, encoder_blocks, freeze_leading_blocks, merged_state_dict
from icmil.features import create_encoder
from icmil.mil import create_mil_head


def _tiny() -> nn.Module:
    return create_encoder(EncoderConfig(name="tiny_cnn"), quiet_random=True)


@pytest.mark.parametrize(("name", "n_blocks"), [("tiny_cnn", 4), ("resnet50_trunc", 15)])
def test_blocks_are_found_generically(name: str, n_blocks: int) -> None:
    blocks = encoder_blocks(create_encoder(EncoderConfig(name=name), quiet_random=True))
    assert len(blocks) == n_blocks
    # resnet50_trunc: stem conv + BN, then the 3 + 4 + 6 bottlenecks of layer1-3 (layer3's last one last)
    assert all(any(True for _ in b.parameters()) for b in blocks)


@pytest.mark.parametrize(("train_blocks", "trainable"), [(None, 4), (1, 1), (2, 2), (0, 0), (9, 4)])
def test_only_the_last_blocks_train(train_blocks: int | None, trainable: int) -> None:
    enc = _tiny()
    frozen = freeze_leading_blocks(enc, train_blocks)
    blocks = encoder_blocks(enc)
    trains = [all(p.requires_grad for p in b.parameters()) for b in blocks]
    assert trains == [False] * (4 - trainable) + [True] * trainable
    assert len(frozen) == 4 - trainable


def test_frozen_blocks_stay_in_eval_mode_in_the_student() -> None:
    head = create_mil_head("abmil", 128, 2, hidden_dim=8, attention_dim=4)
    pair = make_teacher_student(_tiny(), head, train_blocks=1)
    blocks = encoder_blocks(pair.student_encoder)
    assert [b.training for b in blocks] == [False, False, False, True]
    assert {id(p) for p in pair.encoder_parameters()} == {id(p) for p in blocks[-1].parameters()}


def test_lora_starts_as_the_encoder_and_merges_back_into_its_own_layout() -> None:
    enc = _tiny().eval()
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    student = add_lora(copy.deepcopy(enc), rank=2, alpha=4).eval()
    assert torch.allclose(student(x), enc(x))  # B starts at zero
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    merged = merged_state_dict(student)
    assert sorted(merged) == sorted(enc.state_dict())
    plain = copy.deepcopy(enc)
    plain.load_state_dict(merged)
    assert torch.allclose(plain(x), student(x), atol=1e-5)
    assert not torch.allclose(plain(x), enc(x), atol=1e-4)


def test_lora_pair_trains_adapters_only_and_reports_merged_weights() -> None:
    head = create_mil_head("abmil", 128, 2, hidden_dim=8, attention_dim=4)
    enc = _tiny()
    pair = make_teacher_student(enc, head, lora_rank=2)
    names = {n for n, p in pair.student_encoder.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert sorted(pair.student_encoder_state()) == sorted(enc.state_dict())
