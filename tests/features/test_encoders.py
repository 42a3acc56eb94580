"""Encoder registry, normalisation, digests, weights files and save/load round trips."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

from icmil.config import EncoderConfig
from icmil.errors import ConfigError
from icmil.features import (
    PatchEncoder,
    RandomWeightsWarning,
    create_encoder,
    list_encoders,
    load_encoder,
    save_encoder,
)

EXPECTED_DIM = {"resnet50_trunc": 1024, "tiny_cnn": 128}


def _enc(name: str, **kw: object) -> PatchEncoder:
    return create_encoder(EncoderConfig(name=name, **kw), quiet_random=True).eval()


@functools.cache
def _shared(name: str) -> PatchEncoder:
    """One instance per encoder name for the read-only tests (building ResNet-50 is the slow part)."""
    return _enc(name)


def _patches(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("name", list_encoders())
def test_every_registered_encoder(name: str) -> None:
    enc = _shared(name)
    x = _patches()
    with torch.no_grad():
        out_u8 = enc(x)
        out_float = enc(x.float() / 255.0)
    assert out_u8.shape == (2, enc.out_dim)
    if name in EXPECTED_DIM:
        assert enc.out_dim == EXPECTED_DIM[name]
    assert out_u8.dtype == torch.float32 and torch.isfinite(out_u8).all()
    torch.testing.assert_close(out_u8, out_float)  # uint8 and float in [0, 1] are the same input
    # The normalisation setting reaches the network and the digest (same weights, other normalisation).
    raw = PatchEncoder(enc.backbone, enc.out_dim, name, normalization="none").eval()
    with torch.no_grad():
        assert not torch.allclose(raw(x), out_u8)
        torch.testing.assert_close(raw(x), enc.backbone(x.float() / 255.0))
    assert raw.digest() != enc.digest()
    assert enc.name == name


def test_resnet50_trunc_is_layer3_plus_pooling() -> None:
    enc = _shared("resnet50_trunc")
    names = {n.split(".")[2] for n, _ in enc.named_parameters() if n.startswith("backbone.trunk.")}
    assert "layer3" in names and "layer4" not in names and "fc" not in names
    with torch.no_grad():
        fmap = enc.backbone.trunk(enc.normalize(_patches(1, 64)))[-1]
        assert fmap.shape == (1, 1024, 4, 4)  # stride 16 after layer3
        torch.testing.assert_close(enc(_patches(1, 64)), fmap.mean(dim=(2, 3)))


def test_any_timm_model_and_unknown_name() -> None:
    enc = _enc("resnet18")
    assert enc.out_dim == 512
    with pytest.raises(ConfigError, match=r"neither a preset.*a registered encoder.*nor a timm model"):
        create_encoder(EncoderConfig(name="no_such_model_xyz"), quiet_random=True)


def test_random_init_warns_and_is_seeded() -> None:
    with pytest.warns(RandomWeightsWarning, match="RANDOM"):
        a = create_encoder(EncoderConfig(name="tiny_cnn"))
    b = _enc("tiny_cnn")
    c = _enc("tiny_cnn", seed=1)
    assert a.digest() == b.digest()  # same seed, same weights: features stay cacheable across processes
    assert c.digest() != a.digest()


def test_digest_tracks_weights() -> None:
    enc = _enc("tiny_cnn")
    before = enc.digest()
    with torch.no_grad():
        next(enc.parameters()).add_(1e-3)
    assert enc.digest() != before


def test_save_load_round_trip_and_finetune(tmp_path) -> None:
    enc = _enc("tiny_cnn", normalization="none")
    student = copy.deepcopy(enc).train()
    assert all(p.requires_grad for p in student.parameters())
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    loss = student(_patches(4)).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())  # every layer trains
    opt.step()
    assert student.digest() != enc.digest()
    out = save_encoder(student, tmp_path / "enc", extra={"round": 1})
    meta = json.loads((out / "config.json").read_text())
    assert meta["name"] == "tiny_cnn" and meta["normalization"] == "none" and meta["round"] == 1
    loaded = load_encoder(out).eval()
    assert loaded.digest() == student.digest() == meta["digest"]
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(_patches()), student(_patches()))


def test_load_encoder_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not a saved encoder"):
        load_encoder(tmp_path)


def test_weights_file_safetensors_and_pth(tmp_path) -> None:
    from safetensors.torch import save_file

    src = _shared("resnet50_trunc")
    # A full timm/torchvision resnet50 checkpoint: bare trunk keys plus layer4 / fc, which must be ignored.
    full = {k.removeprefix("backbone.trunk."): v.clone() for k, v in src.state_dict().items()}
    full |= {"layer4.0.conv1.weight": torch.zeros(512, 1024, 1, 1), "fc.weight": torch.zeros(1000, 2048)}
    torch.save(full, tmp_path / "r50.pth")
    save_file(full, str(tmp_path / "r50.safetensors"))
    for name in ("r50.pth", "r50.safetensors"):
        loaded = create_encoder(EncoderConfig(name="resnet50_trunc", weights=str(tmp_path / name), seed=7))
        assert loaded.digest() == src.digest(), name
    # Our own layout (backbone.* keys), wrapped like a training checkpoint.
    tiny = _enc("tiny_cnn", seed=5)
    torch.save({"state_dict": tiny.state_dict()}, tmp_path / "ours.pth")
    assert (
        create_encoder(EncoderConfig(name="tiny_cnn", weights=str(tmp_path / "ours.pth"))).digest()
        == tiny.digest()
    )


def test_weights_file_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        create_encoder(EncoderConfig(name="tiny_cnn", weights=str(tmp_path / "missing.pth")))
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match="missing key"):
        create_encoder(EncoderConfig(name="tiny_cnn", weights=str(tmp_path / "wrong.pth")))

    import pathlib

    # Arbitrary pickled objects are refused (weights_only): a PurePosixPath stands in for malicious code. The
    # error names the object and never passes on PyTorch's advice to load with weights_only=False.
    torch.save({"x": pathlib.PurePosixPath("/etc")}, tmp_path / "pickled.pth")
    with pytest.raises(ConfigError, match=r"pickled Python objects \(pathlib.PurePosixPath\)") as err:
        create_encoder(EncoderConfig(name="tiny_cnn", weights=str(tmp_path / "pickled.pth")))
    assert "weights_only=False" not in str(err.value) and "pickled.pth" in str(err.value)
    with pytest.raises(ConfigError, match="not both"):
        create_encoder(EncoderConfig(name="tiny_cnn", weights="x.pth", pretrained=True))


def test_pretrained_offline_error_points_to_local_weights(tmp_path) -> None:
    # Nothing in the hub cache and no permission to download: the error says where it looked and what to do.
    with pytest.raises(ConfigError, match=r"timm/resnet50.*not contacted.*internet.*encoder\.weights") as err:
        create_encoder(EncoderConfig(name="resnet50_trunc", pretrained=True, hub_cache=str(tmp_path)))
    assert str(tmp_path) in str(err.value) and "hf download timm/resnet50.a1_in1k" in str(err.value)


def test_bad_input_shape() -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        _enc("tiny_cnn")(torch.zeros(2, 48, 48, 3, dtype=torch.uint8))


def test_timm_vit_takes_256_px_patches() -> None:
    enc = _enc("vit_tiny_patch16_224")  # 224-px position embeddings, 256-px patches: interpolated
    with torch.no_grad():
        assert enc(_patches(1, 256)).shape == (1, 192)
