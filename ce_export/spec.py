"""Typed descriptions passed between stages: one ModelSpec, one LayerSpec per decoder layer.

These are plain, JSON-serialisable facts (no tensors): they go into manifest.json and are all a
later stage (export, build, verify, bench) needs to know about the model's MoE structure. A
decoder layer's feed-forward part is a routed MoE block (MoeLayerSpec), the architecture's
ordinary MLP (DenseLayerSpec) or an MoE block that trimming removed (RemovedLayerSpec).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, TypeAlias

import torch

from ce_export.moe_math import SOFTMAX_TOPK, SWIGLU


@dataclass(frozen=True)
class MoeLayerSpec:
    """What one decoder layer's routed MoE block computes (see moe_math.py for the math)."""

    kind: ClassVar[str] = "moe"  # the layer's tag in manifest.json and the calibration statistics

    layer: int
    num_experts: int
    hidden_size: int
    intermediate_size: int
    top_k: int
    n_ce: int = 0  # compressed experts out of top_k; 0 = plain MoE
    norm_topk_prob: bool = False
    routing: str = SOFTMAX_TOPK  # see moe_math.ROUTINGS
    routing_scale: float = 1.0  # multiplies the routing weights (DeepSeek's routed_scaling_factor)
    jitter_eps: float = 0.0  # SparseMixer's band (Phi-3.5-MoE's router_jitter_noise)
    score_bias: bool = False  # sigmoid_topk: a per-expert bias on the choice scores (e_score_correction_bias)
    n_group: int = 1  # sigmoid_topk: experts in n_group equal groups, the choice within the best topk_group
    topk_group: int = 1
    router_fp32: bool = False  # router matmul in fp32 whatever the model dtype (DeepSeek)
    router_bias: bool = False  # the router matmul has a bias (gpt-oss)
    expert_bias: bool = False  # the experts' gate/up and down projections have biases (gpt-oss)
    activation: str = SWIGLU  # see moe_math.ACTIVATIONS
    swiglu_alpha: float = 1.0  # clamped_swiglu's sigmoid slope
    swiglu_limit: float = 0.0  # clamped_swiglu's clamp
    weights_on_input: bool = False  # Llama 4 (top-1): the routing weight scales the expert's input
    expert_ids: tuple[int, ...] = ()  # original indices of the kept experts (trimmed models)
    ces_width: int = 0  # C in ces [E, 3, C]; 0 when n_ce == 0
    module: str = ""  # the transformers MoE block's path in the model, e.g. "model.layers.3.mlp"

    def op_variant(self) -> dict:
        """The ce_export::moe arguments beyond (hidden, logits, weights, ces, top_k, n_ce, norm_topk_prob)
        whose tensors are in MoeLayerWeights: scalars here, tensors as None/True markers."""
        return dict(routing=self.routing, routing_scale=self.routing_scale, jitter_eps=self.jitter_eps,
                    n_group=self.n_group, topk_group=self.topk_group, activation=self.activation,
                    swiglu_alpha=self.swiglu_alpha, swiglu_limit=self.swiglu_limit,
                    weights_on_input=self.weights_on_input)

    @property
    def n_main(self) -> int:
        return self.top_k - self.n_ce

    @property
    def is_compressed(self) -> bool:
        return self.n_ce > 0


@dataclass(frozen=True)
class DenseLayerSpec:
    """A decoder layer with the architecture's ordinary MLP (not exported as our op)."""

    kind: ClassVar[str] = "dense"

    layer: int


@dataclass(frozen=True)
class RemovedLayerSpec:
    """A decoder layer whose MoE block was dropped (compression study: -1, or 0 experts)."""

    kind: ClassVar[str] = "removed"

    layer: int
    module: str = ""  # the removed block's path in transformers' model, e.g. "model.layers.3.mlp"


LayerSpec: TypeAlias = MoeLayerSpec | DenseLayerSpec | RemovedLayerSpec
LAYER_TYPES: dict[str, type[LayerSpec]] = {cls.kind: cls for cls in (MoeLayerSpec, DenseLayerSpec, RemovedLayerSpec)}


def layer_json(layer: LayerSpec) -> dict:
    """A layer as manifest.json records it: its index, its kind tag, then its fields."""
    data = dataclasses.asdict(layer)
    return {"layer": data.pop("layer"), "kind": layer.kind, **data}


def layer_from_json(data: Mapping) -> LayerSpec:
    """A layer from its manifest.json form. Manifests written before the layer types also carry
    every MoE field (zeroed) on dense and removed layers: fields a layer type does not have are ignored."""
    kind = data.get("kind")
    if kind not in LAYER_TYPES:
        raise ValueError(f"layer kind {kind!r} is not one of {', '.join(LAYER_TYPES)}")
    layer_type = LAYER_TYPES[kind]
    names = {f.name for f in dataclasses.fields(layer_type)}
    values = {name: value for name, value in data.items() if name in names}
    if "expert_ids" in values:
        values["expert_ids"] = tuple(values["expert_ids"])
    return layer_type(**values)


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
    moe_layers: tuple[LayerSpec, ...]  # one per decoder layer, whatever its kind
    hf_config: dict = field(repr=False, default_factory=dict)  # the config.json as read

    def past_shapes(self, batch: int, past: int) -> list[tuple[int, int, int, int]]:
        """Shapes of the flat past_key_values inputs: key, value for each layer."""
        key = (batch, self.kv_heads, past, self.key_dim)
        value = (batch, self.kv_heads, past, self.value_dim)
        return [key, value] * self.num_layers

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["moe_layers"] = [layer_json(layer) for layer in self.moe_layers]
        data.pop("hf_config")
        return data


@dataclass
class MoeLayerWeights:
    """The tensors of one MoE block, in the op's layout (see moe_math.py)."""

    router: torch.Tensor  # [E, H]
    gate_up: torch.Tensor  # [E, 2I, H]
    down: torch.Tensor  # [E, H, I]
    ces: torch.Tensor | None  # [E, 3, C] or None
    router_bias: torch.Tensor | None = None  # [E]
    score_bias: torch.Tensor | None = None  # [E]
    gate_up_bias: torch.Tensor | None = None  # [E, 2I]
    down_bias: torch.Tensor | None = None  # [E, H]


@dataclass
class LoadedModel:
    """A checkpoint as load.load_checkpoint describes it: the spec, the MoE weights and every other
    tensor by name. The weights are read when accessed (load.LazyMoeWeights / load.LazyTensors,
    which also describe each tensor without reading it), afresh on each access."""

    spec: ModelSpec
    moe_weights: Mapping[int, MoeLayerWeights]  # by layer index; absent for removed layers
    dense_tensors: Mapping[str, torch.Tensor]  # everything else (shared experts too), transformers' in-memory names
    source: str  # the folder it came from, or "demo"
