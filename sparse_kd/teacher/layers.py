"""Which transformer layers a shrunk teacher keeps, and cutting a BERT-family model down to them
(:mod:`.shrink` tunes the result to the full teacher's embeddings).

Notation: L layers in the source model, k kept.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sparse_kd.teacher.encoder import TeacherModelError


def pick_layers(num_layers: int, k: int) -> list[int]:
    """k of ``num_layers`` layer indices (0-based), evenly spaced and ending with the last layer.

    6 layers: k=1 -> [5], k=2 -> [2, 5], k=3 -> [1, 3, 5], k=6 -> [0..5].
    """
    if not 1 <= k <= num_layers:
        raise ValueError(f"layers: keep between 1 and {num_layers} layers, got {k}")
    return [round((j + 1) * num_layers / k) - 1 for j in range(k)]



def _resolve_layers(layers: int | Sequence[int], num_layers: int) -> list[int]:
    if isinstance(layers, int):
        return pick_layers(num_layers, layers)
    kept = [int(i) for i in layers]
    if not kept or sorted(set(kept)) != kept or kept[0] < 0 or kept[-1] >= num_layers:
        raise ValueError(f"layers: {list(layers)} must be increasing, distinct indices in 0..{num_layers - 1}")
    return kept



def _layer_list(model: torch.nn.Module, num_layers: int) -> str:
    """Name of the ModuleList holding the transformer layers (``encoder.layer`` for BERT)."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == num_layers and name.split(".")[-1] in ("layer", "layers"):
            return name
    raise TeacherModelError(f"cannot find the {num_layers} transformer layers of {type(model).__name__} to shrink")



def cut_layers(model: torch.nn.Module, kept: Sequence[int]) -> torch.nn.Module:
    """A new model of the same class with only layers ``kept`` of ``model`` (weights copied), fp32."""
    from transformers import AutoModel

    n = int(model.config.num_hidden_layers)
    name = _layer_list(model, n)
    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.num_hidden_layers = len(kept)
    student = AutoModel.from_config(cfg)
    prefix = name + "."
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            idx, rest = key[len(prefix):].split(".", 1)
            if int(idx) in kept:
                state[f"{prefix}{kept.index(int(idx))}.{rest}"] = value
        else:
            state[key] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise TeacherModelError(f"cutting layers: weights missing {missing[:5]}, unexpected {unexpected[:5]}")
    return student.to(torch.float32)

