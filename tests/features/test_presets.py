"""Encoder presets: every architecture is built (full size on the meta device, reduced depth for real) and a
checkpoint in its official key layout round-trips through the loader; wrong files and digests are clear errors;
official weights are found in a local hub cache without touching the network."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from icmil.config import EncoderConfig, load_config
from icmil.errors import ConfigError
from icmil.features import create_encoder, load_encoder, save_encoder
from icmil.features.encoders import PatchEncoder, build_preset_backbone, timm_kwargs
from icmil.features.presets import EncoderPreset, get_preset, list_presets, register_preset

PRESETS = {p.name: p for p in list_presets()}
REQUIRED = {"resnet50_trunc", "uni", "uni2_h", "virchow2", "h_optimus_0", "h_optimus_1", "prov_gigapath"}


def _patches(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _small(preset: EncoderPreset) -> PatchEncoder:
    """The preset at reduced depth (1 block; the ResNet trunk as is) with real, seeded random weights."""
    torch.manual_seed(0)
    over = {} if preset.architecture == "registered" else {"depth": 1}
    backbone, dim = build_preset_backbone(preset, **over)
    return PatchEncoder(
        backbone, dim, preset.name, preset.normalization, preset.input_size, preset.interpolation
    )


@pytest.fixture
def shallow(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], EncoderPreset]:
    """``shallow(name)``: the preset with one transformer block, registered under ``<name>_d1`` for this test
    only (same official file, repo, layout, normalisation), so the whole user path runs in seconds."""
    from icmil.features import presets

    monkeypatch.setattr(presets, "_PRESETS", dict(presets._PRESETS))

    def make(name: str) -> EncoderPreset:
        base = PRESETS[name]
        if base.architecture == "registered":
            return base
        kwargs = dict(base.timm_kwargs) | {"depth": 1}
        return register_preset(dataclasses.replace(base, name=f"{name}_d1", aliases=(), timm_kwargs=kwargs))

    return make


def _official_state(enc: PatchEncoder, preset: EncoderPreset) -> dict[str, torch.Tensor]:
    """The encoder's weights in the key layout of the preset's published checkpoint."""
    timm_keys = {
        k.removeprefix("backbone.model.").removeprefix("backbone.trunk."): v.clone()
        for k, v in enc.state_dict().items()
    }
    if preset.checkpoint_layout == "timm":
        return timm_keys
    assert preset.checkpoint_layout == "hf_dinov2"
    # Hugging Face Dinov2Model names (written out independently of the loader's converter).
    out: dict[str, torch.Tensor] = {"embeddings.mask_token": torch.zeros(1, timm_keys["cls_token"].shape[-1])}
    top = {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    block = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": "attention.output.dense",
        "ls1.gamma": "layer_scale1.lambda1",
        "ls2.gamma": "layer_scale2.lambda1",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for key, value in timm_keys.items():
        if key in top:
            out[top[key]] = value
            continue
        _, i, rest = key.split(".", 2)
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                out[f"encoder.layer.{i}.attention.attention.{name}.{kind}"] = part.clone()
            continue
        stem = next(s for s in block if rest.startswith(s))
        out[f"encoder.layer.{i}.{block[stem]}{rest[len(stem) :]}"] = value
    return out


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def test_the_required_presets_exist_with_their_contract() -> None:
    assert set(PRESETS) >= REQUIRED | {"phikon_v2"}
    for p in PRESETS.values():
        assert p.out_dim > 0 and p.mpp > 0 and p.licence and len(p.mean) == len(p.std) == 3
        assert p.hf_repo and p.weight_files and p.checkpoint_layout in ("timm", "hf_dinov2")
    # Each model's own normalisation, not ImageNet's for everyone.
    assert get_preset("H-optimus-0").mean == (0.707223, 0.578729, 0.703617)
    assert get_preset("h_optimus_1").std == (0.211883, 0.230117, 0.177517)
    assert get_preset("UNI2-h").mean == (0.485, 0.456, 0.406)
    assert get_preset("Virchow2").out_dim == 2560 and get_preset("Virchow2").pooling == "cls_mean_patch"
    assert get_preset("Prov-GigaPath") is PRESETS["prov_gigapath"]


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.architecture != "registered"])
def test_full_architecture_on_meta_device(name: str) -> None:
    """Full-size model without memory: parameter count as published, official key shapes, output size."""
    preset = PRESETS[name]
    with torch.device("meta"):
        backbone, dim = build_preset_backbone(preset)
        enc = PatchEncoder(backbone, dim, name, preset.normalization, preset.input_size)
        out = enc.backbone(torch.zeros(2, 3, preset.input_size or 224, preset.input_size or 224))
    n_params = sum(p.numel() for p in enc.backbone.parameters()) / 1e6
    assert abs(n_params - preset.params_m) / preset.params_m < 0.01, (name, n_params)
    assert tuple(out.shape) == (2, preset.out_dim)
    official = _official_state(enc, preset)
    for key, shape in preset.checkpoint_keys.items():
        assert tuple(official[key].shape) == shape, (name, key)


def test_resnet50_trunc_preset_is_the_registered_encoder() -> None:
    enc = create_encoder(EncoderConfig(name="resnet50_trunc"), quiet_random=True)
    official = _official_state(enc, PRESETS["resnet50_trunc"])
    for key, shape in PRESETS["resnet50_trunc"].checkpoint_keys.items():
        assert tuple(official[key].shape) == shape
    assert sum(p.numel() for p in enc.parameters()) / 1e6 == pytest.approx(8.54, abs=0.01)
    assert enc.input_size is None and enc.normalization == "imagenet"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_official_checkpoint_round_trips_through_the_loader(
    name: str, tmp_path: Path, shallow: Callable[[str], EncoderPreset]
) -> None:
    """A file in the preset's official layout (and file name) loads through `encoder.weights` + `sha256`,
    gives the same network, and survives our own save/load."""
    preset = shallow(name)
    src = create_encoder(EncoderConfig(name=preset.name, seed=3), quiet_random=True).eval()
    path = _save(_official_state(src, preset), tmp_path / preset.weight_files[0])
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    dst = create_encoder(EncoderConfig(name=preset.name, weights=str(path), sha256=sha)).eval()
    assert dst.digest() == src.digest()
    assert (dst.normalization, dst.input_size) == (PRESETS[name].normalization, PRESETS[name].input_size)
    x = _patches(2, 256)  # tiles of 256 px: resized inside to the preset's input size
    with torch.no_grad():
        out = dst(x)
        torch.testing.assert_close(out, src(x))
    assert out.shape == (2, preset.out_dim)
    saved = load_encoder(save_encoder(dst, tmp_path / "saved")).eval()
    assert saved.digest() == src.digest() and saved.weights_source == dst.weights_source
    with torch.no_grad():
        torch.testing.assert_close(saved(x), out)


def test_wrong_file_and_wrong_sha256_are_clear_errors(tmp_path: Path) -> None:
    uni = PRESETS["uni"]
    uni_file = _save(_official_state(_small(uni), uni), tmp_path / "pytorch_model.bin")
    # Another model's checkpoint (the full-size H-optimus-0 is built on the meta device: no memory, no time).
    with pytest.raises(ConfigError, match=r"does not fit encoder 'h_optimus_0'.*bioptimus/H-optimus-0"):
        create_encoder(EncoderConfig(name="h_optimus_0", weights=str(uni_file)))
    # UNI's own file at the wrong depth: keys missing, named.
    with pytest.raises(ConfigError, match=r"does not fit encoder 'uni': \d+ missing key.*blocks\.1"):
        create_encoder(EncoderConfig(name="uni", weights=str(uni_file)))
    with pytest.raises(ConfigError, match=r"SHA-256 is [0-9a-f]{64} but encoder.sha256 expects 0{64}"):
        create_encoder(EncoderConfig(name="uni", weights=str(uni_file), sha256="0" * 64))
    with pytest.raises(ConfigError, match="64 hexadecimal"):
        load_config(None, ["encoder.name=uni", "encoder.sha256=abc"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "text"])
def test_corrupt_weights_file_is_one_config_error(tmp_path: Path, suffix: str, damage: str) -> None:
    good = _save({"w": torch.arange(1000.0)}, tmp_path / f"good{suffix}").read_bytes()
    data = {
        "truncated": good[: len(good) // 2],
        "garbage": bytes(range(256)) * 8,
        "empty": b"",
        "text": b"<html>404 Not Found</html>",
    }[damage]
    bad = tmp_path / f"weights{suffix}"
    bad.write_bytes(data)
    with pytest.raises(ConfigError) as err:
        create_encoder(EncoderConfig(name="tiny_cnn", weights=str(bad)))
    message = str(err.value)
    assert str(bad) in message and "\n" not in message
    if suffix == ".safetensors":
        assert "not a readable .safetensors file" in message
    elif damage == "truncated":
        assert "damaged or incomplete" in message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message


def test_load_encoder_with_damaged_weights(tmp_path: Path) -> None:
    d = save_encoder(create_encoder(EncoderConfig(name="tiny_cnn"), quiet_random=True), tmp_path / "enc")
    (d / "weights.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ConfigError, match=r"saved encoder weights .*weights.safetensors is not a readable"):
        load_encoder(d)


# --------------------------------------------------------------------------- offline hub cache


@pytest.fixture
def uni_small(shallow: Callable[[str], EncoderPreset]) -> EncoderPreset:
    return shallow("uni")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kw: object) -> None:
        raise AssertionError("the network was contacted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


def _hub_cache(root: Path, repo: str, files: dict[str, Path]) -> Path:
    """A Hugging Face hub cache laid out as `hf download` leaves it (blobs, snapshot symlinks, refs/main)."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0123abcd")
    snap = base / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (base / "blobs").mkdir()
    for name, src in files.items():
        blob = base / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
        blob.write_bytes(src.read_bytes())
        (snap / name).symlink_to(blob)
    return root


def test_pretrained_weights_come_from_the_local_hub_cache_offline(
    tmp_path: Path, uni_small: EncoderPreset, no_network: None
) -> None:
    src = _small(uni_small)
    file = _save(_official_state(src, uni_small), tmp_path / "pytorch_model.bin")
    cache = _hub_cache(tmp_path / "hub", "MahmoodLab/UNI", {"pytorch_model.bin": file})
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    enc = create_encoder(EncoderConfig(name="uni_d1", pretrained=True, hub_cache=str(cache), sha256=sha))
    assert enc.digest() == src.digest()
    assert enc.weights_source is not None and enc.weights_source["origin"] == "hub-cache"
    assert enc.input_size == 224 and enc.normalization == "imagenet"
    # A folder holding the official file (e.g. `hf download ... --local-dir`) works as encoder.weights.
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(file.read_bytes())
    (folder / "README.md").write_text("UNI")
    assert create_encoder(EncoderConfig(name="uni_d1", weights=str(folder))).digest() == src.digest()


def test_missing_weights_never_download_unless_allowed(
    tmp_path: Path, uni_small: EncoderPreset, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    src = _small(uni_small)
    file = _save(_official_state(src, uni_small), tmp_path / "pytorch_model.bin")

    def fake_download(repo_id: str, filename: str, cache_dir: str) -> str:
        calls.append((repo_id, filename))
        return str(file)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    empty = tmp_path / "empty-cache"
    with pytest.raises(
        ConfigError, match=r"not found locally: looked for MahmoodLab/UNI.*hf download MahmoodLab/UNI"
    ):
        create_encoder(EncoderConfig(name="uni_d1", pretrained=True, hub_cache=str(empty)))
    assert calls == []
    enc = create_encoder(
        EncoderConfig(name="uni_d1", pretrained=True, hub_cache=str(empty), allow_download=True)
    )
    assert calls == [("MahmoodLab/UNI", "pytorch_model.bin")] and enc.digest() == src.digest()
    assert enc.weights_source is not None and enc.weights_source["origin"] == "download"
    # HF_HUB_OFFLINE (the hub's own switch) wins over the config: nothing is fetched.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        create_encoder(
            EncoderConfig(
                name="uni_d1", pretrained=True, hub_cache=str(tmp_path / "other"), allow_download=True
            )
        )
    assert len(calls) == 1


def test_normalisation_and_resize_reach_the_digest() -> None:
    hopt = PRESETS["h_optimus_0"]
    enc = _small(hopt)
    assert enc.normalization == "hoptimus"
    torch.testing.assert_close(enc.mean.flatten(), torch.tensor(hopt.mean))
    same = PatchEncoder(enc.backbone, enc.out_dim, enc.name, "imagenet", enc.input_size, enc.interpolation)
    bigger = PatchEncoder(enc.backbone, enc.out_dim, enc.name, "hoptimus", 256, enc.interpolation)
    assert len({enc.digest(), same.digest(), bigger.digest()}) == 3


def test_phikon_v2_accepts_transformers_5_key_names(
    tmp_path: Path, shallow: Callable[[str], EncoderPreset]
) -> None:
    """transformers 5 renamed Dinov2's attention (q_proj, k_proj, v_proj, o_proj): both spellings load."""
    preset = shallow("phikon_v2")
    src = create_encoder(EncoderConfig(name=preset.name, seed=4), quiet_random=True)
    v4 = _official_state(src, preset)
    renames = {
        "attention.attention.query": "attention.q_proj",
        "attention.attention.key": "attention.k_proj",
        "attention.attention.value": "attention.v_proj",
        "attention.output.dense": "attention.o_proj",
    }
    v5 = {}
    for key, value in v4.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        v5[key] = value
    assert any("q_proj" in k for k in v5)
    path = _save(v5, tmp_path / "model.safetensors")
    assert create_encoder(EncoderConfig(name=preset.name, weights=str(path))).digest() == src.digest()


def test_phikon_v2_matches_the_transformers_reference(
    tmp_path: Path, shallow: Callable[[str], EncoderPreset]
) -> None:
    """Where Hugging Face transformers is installed: our timm-based Phikon-v2 gives the model card's embedding
    (``last_hidden_state[:, 0]`` of ``Dinov2Model``) for the same checkpoint."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    cfg = transformers.Dinov2Config(
        hidden_size=1024, num_hidden_layers=1, num_attention_heads=16, patch_size=16, image_size=224,
        layerscale_value=1e-5, mlp_ratio=4, use_swiglu_ffn=False, layer_norm_eps=1e-6,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.Dinov2Model(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    enc = create_encoder(EncoderConfig(name=shallow("phikon_v2").name, weights=str(tmp_path))).eval()
    x = _patches(2, 224)
    mean, std = enc.mean, enc.std
    with torch.no_grad():
        ref = hf(pixel_values=(x.float() / 255 - mean) / std).last_hidden_state[:, 0]
        torch.testing.assert_close(enc(x), ref, atol=1e-4, rtol=1e-4)


def test_icmil_encoders_lists_presets_and_local_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from icmil.cli import main

    file = tmp_path / "pytorch_model.bin"
    file.write_bytes(b"not checked here")
    cache = _hub_cache(tmp_path / "hub", "MahmoodLab/UNI2-h", {"pytorch_model.bin": file})
    assert main(["encoders", "--set", f"encoder.hub_cache={cache}"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "1536" in lines["uni2_h"] and str(cache) in lines["uni2_h"]
    assert "2560" in lines["virchow2"] and "no (paige-ai/Virchow2)" in lines["virchow2"]
    assert "hoptimus" in lines["h_optimus_0"] and "gated" in lines["prov_gigapath"]
    assert main(["encoders", "--json", "--set", f"encoder.hub_cache={cache}"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["uni2_h"]["weights_found"] and not rows["uni"]["weights_found"]
    assert (
        rows["h_optimus_1"]["mean"] == [0.707223, 0.578729, 0.703617] and rows["phikon_v2"]["out_dim"] == 1024
    )


def test_position_embeddings_of_another_grid_are_resampled(
    tmp_path: Path, shallow: Callable[[str], EncoderPreset]
) -> None:
    """A checkpoint saved at another image size (e.g. timm at 256 px) loads: its grid is resampled."""
    import timm

    preset = shallow("uni")
    kwargs = timm_kwargs(preset) | {"img_size": 256}
    model = timm.create_model(preset.architecture, pretrained=False, **kwargs)
    state = model.state_dict()
    assert state["pos_embed"].shape == (1, 257, 1024)  # 16 x 16 + class token
    path = _save(state, tmp_path / "pytorch_model.bin")
    enc = create_encoder(EncoderConfig(name=preset.name, weights=str(path)))
    assert enc.state_dict()["backbone.model.pos_embed"].shape == (1, 197, 1024)
    torch.testing.assert_close(enc.state_dict()["backbone.model.cls_token"], state["cls_token"])


def test_timm_names_are_not_shadowed_by_presets() -> None:
    """`resnet50` stays timm's full ResNet-50 (2048-d), as before presets; only the preset names are taken."""
    assert get_preset("resnet50") is None
    import timm

    taken = {p.name for p in list_presets()} | {a for p in list_presets() for a in p.aliases}
    assert not [n for n in taken if n != "resnet50_trunc" and timm.is_model(n)]
