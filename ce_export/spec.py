"""Typed descriptions passed between stages: one ModelSpec, one MoeLayerSpec per decoder layer.

These are plain, JSON-serialisable facts (no tensors): they go into manifest.json and are all a
later stage (export, build, verify, bench) needs to know about the model's MoE structure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ce_export.moe_math import SOFTMAX_TOPK

LAYER_MOE = "moe"
LAYER_REMOVED = "removed"  # MoE sub-layer dropped (compression study: -1, or 0 experts)
LAYER_DENSE = "dense"  # an ordinary MLP layer of the architecture (not exported as our op)


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
    routing: str = SOFTMAX_TOPK  # see moe_math.ROUTINGS
    routing_scale: float = 1.0  # multiplies the routing weights (DeepSeek's routed_scaling_factor)
    jitter_eps: float = 0.0  # SparseMixer's band (Phi-3.5-MoE's router_jitter_noise)
    router_fp32: bool = False  # router matmul in fp32 whatever the model dtype (DeepSeek)
    expert_ids: tuple[int, ...] = ()  # original indices of the kept experts (trimmed models)
    shared_intermediate_size: int = 0  # always-on shared expert (a dense SwiGLU MLP), 0 = none
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared expert's output times sigmoid(h @ g)
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
    kv_heads: int  # per layer, the KV cache holds key [B, kv_heads, P, key_dim], value [..., value_dim]
    key_dim: int
    value_dim: int
    use_ce: bool
    n_ce: int
    checkpoint_dtype: str
    moe_layers: tuple[MoeLayerSpec, ...]
    hf_config: dict = field(repr=False, default_factory=dict)  # the config.json as read

    def past_shapes(self, batch: int, past: int) -> list[tuple[int, int, int, int]]:
        """Shapes of the flat past_key_values inputs: key, value for each layer."""
        key = (batch, self.kv_heads, past, self.key_dim)
        value = (batch, self.kv_heads, past, self.value_dim)
        return [key, value] * self.num_layers

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
    shared_gate_up: torch.Tensor | None = None  # [2Is, H]
    shared_down: torch.Tensor | None = None  # [H, Is]
    shared_gate: torch.Tensor | None = None  # [1, H]


@dataclass
class LoadedModel:
    """A checkpoint as load.load_checkpoint describes it: the spec, the MoE weights and every other
    tensor by name. The weights are read when accessed (load.LazyMoeWeights / load.LazyTensors,
    which also describe each tensor without reading it), afresh on each access."""

    spec: ModelSpec
    moe_weights: Mapping[int, MoeLayerWeights]  # by layer index; absent for removed layers
    dense_tensors: Mapping[str, torch.Tensor]  # everything else, transformers' names
    source: str  # the folder it came from, or "demo"
