"""Typed descriptions passed between stages: one ModelSpec, one MoeLayerSpec per decoder layer.

These are plain, JSON-serialisable facts (no tensors): they go into manifest.json and are all a
later stage (export, build, verify, bench) needs to know about the model's MoE structure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

ROUTING_SOFTMAX_TOPK = "softmax_topk"
ROUTINGS = (ROUTING_SOFTMAX_TOPK,)

LAYER_MOE = "moe"
LAYER_REMOVED = "removed"  # MoE sub-layer dropped (compression study: -1, or 0 experts)


@dataclass(frozen=True)
class MoeLayerSpec:
    """What one decoder layer's MoE block computes (see moe_math.py for the math)."""

    layer: int
    kind: str = LAYER_MOE
    num_experts: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    top_k: int = 0
    n_ce: int = 0  # compressed experts out of top_k; 0 = plain MoE
    norm_topk_prob: bool = False
    routing: str = ROUTING_SOFTMAX_TOPK
    expert_ids: tuple[int, ...] = ()  # original indices of the kept experts (trimmed models)
    shared_intermediate_size: int = 0  # always-on shared expert, 0 = none
    ces_width: int = 0  # C in ces [E, 3, C]; 0 when n_ce == 0

    @property
    def n_main(self) -> int:
        return self.top_k - self.n_ce

    @property
    def is_compressed(self) -> bool:
        return self.n_ce > 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts of the whole decoder."""

    architecture: str  # a key of load.ARCHITECTURES, e.g. "olmoe"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    use_ce: bool
    n_ce: int
    checkpoint_dtype: str
    moe_layers: tuple[MoeLayerSpec, ...]
    hf_config: dict = field(repr=False, default_factory=dict)  # the config.json as read

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["moe_layers"] = [layer.to_json() for layer in self.moe_layers]
        data.pop("hf_config")
        return data


@dataclass
class MoeLayerWeights:
    """The tensors of one MoE block, in the op's layout (see moe_math.py)."""

    router: torch.Tensor  # [E, H]
    gate_up: torch.Tensor  # [E, 2I, H]
    down: torch.Tensor  # [E, H, I]
    ces: torch.Tensor | None  # [E, 3, C] or None


@dataclass
class LoadedModel:
    """A checkpoint read into memory: the spec, the MoE weights and every other tensor by name."""

    spec: ModelSpec
    moe_weights: dict[int, MoeLayerWeights]  # by layer index; absent for removed layers
    dense_tensors: dict[str, torch.Tensor]  # everything else, transformers' names
    source: str  # the folder it came from, or "demo"
