"""Which encoder layers stage 2 trains: all of them (ICMIL), only the last N blocks, or low-rank adapters.

A *block* is found generically, so the same setting means the same thing for every encoder: starting at the
encoder, the parameter-holding children are listed in order, and a child that is a ``Sequential`` /
``ModuleList`` of composite modules (a ResNet stage of bottlenecks, a ViT's ``blocks``) is replaced by those
modules. ``tiny_cnn``: its 4 conv blocks; ``resnet50_trunc``: stem conv, stem BN, then the 3+4+6 bottlenecks of
layer1–3; a timm ViT: patch embedding, then each transformer block, then the final norm.

Freezing a block turns off its gradients and keeps its BatchNorm layers in eval mode (their running statistics
are part of what the pretrained weights know).

Example:
    >>> from torch import nn
    >>> enc = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.Sequential(nn.Conv2d(4, 4, 3)))
    >>> len(encoder_blocks(enc))
    2
    >>> frozen = freeze_leading_blocks(enc, train_blocks=1)
    >>> [p.requires_grad for p in enc.parameters()]
    [False, False, False, False, True, True]
"""

from __future__ import annotations

import torch
from torch import nn


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_block_list(module: nn.Module) -> bool:
    """A container whose parameter-holding children are themselves composite modules."""
    if not isinstance(module, (nn.Sequential, nn.ModuleList)):
        return False
    kids = [c for c in module.children() if _has_params(c)]
    return len(kids) >= 2 and all(any(True for _ in c.children()) for c in kids)


def encoder_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's blocks in forward order (see the module docstring). Direct parameters of a module that is
    not itself a block (e.g. a ViT's ``cls_token``) belong to no block and are trained with the first one."""
    node = encoder
    # Descend through single-child wrappers (PatchEncoder -> backbone -> trunk).
    while True:
        kids = [c for c in node.children() if _has_params(c)]
        if len(kids) == 1 and not any(True for _ in node.parameters(recurse=False)):
            node = kids[0]
            continue
        break
    blocks: list[nn.Module] = []
    for child in node.children():
        if not _has_params(child):
            continue
        if _is_block_list(child):
            blocks.extend(c for c in child.children() if _has_params(c))
        else:
            blocks.append(child)
    return blocks or [node]


def freeze_leading_blocks(encoder: nn.Module, train_blocks: int | None) -> list[nn.Module]:
    """Keep only the last ``train_blocks`` blocks trainable (``None``: everything). Returns the frozen blocks;
    the caller keeps them in eval mode (:func:`set_frozen_eval`)."""
    if train_blocks is None:
        return []
    blocks = encoder_blocks(encoder)
    frozen = blocks[: max(0, len(blocks) - train_blocks)]
    trainable = {id(p) for b in blocks[len(frozen) :] for p in b.parameters()}
    for p in encoder.parameters():
        # Loose parameters (cls token, position embedding) go with the first block: frozen unless it trains.
        if id(p) not in trainable and (frozen or train_blocks == 0):
            p.requires_grad_(False)
    return frozen


def set_frozen_eval(blocks: list[nn.Module]) -> None:
    """Eval mode for frozen blocks (BatchNorm keeps its running statistics, dropout is off)."""
    for b in blocks:
        b.eval()


def lora_targets(encoder: nn.Module, blocks: list[nn.Module] | None = None) -> list[str]:
    """Names of the Linear / Conv2d layers LoRA adapts: all of them, or those inside ``blocks``."""
    allowed = None if blocks is None else {id(m) for b in blocks for m in b.modules()}
    return [
        name
        for name, m in encoder.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and (allowed is None or id(m) in allowed)
    ]


def add_lora(encoder: nn.Module, rank: int, alpha: int, blocks: list[nn.Module] | None = None) -> nn.Module:
    """Low-rank adapters (LoRA, via ``peft``) on the encoder's Linear/Conv2d layers, in place: only the
    adapters train (``B`` starts at zero, so the adapted encoder starts as exactly the original). Tens of
    thousands of trainable parameters instead of hundreds of millions on a ViT foundation encoder."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_targets(encoder, blocks)
    if not targets:
        raise ValueError("coupling.lora_rank: the encoder has no Linear/Conv2d layer to adapt")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    return inject_adapter_in_model(config, encoder)


def merged_state_dict(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``encoder`` with every LoRA adapter merged into its base layer: the original keys,
    loadable into the encoder without adapters (``encoder`` itself is not modified)."""
    import copy

    from peft.tuners.lora import LoraLayer

    plain = copy.deepcopy(encoder)
    for name, module in list(plain.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = plain.get_submodule(parent_name) if parent_name else plain
            setattr(parent, child, module.get_base_layer())
    return {k: v.detach().cpu().clone() for k, v in plain.state_dict().items()}
