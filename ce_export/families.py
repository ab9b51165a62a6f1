"""The model families ce_export serves, and where their MoE blocks are in transformers' own classes.

A family is one transformers `model_type`. Almost everything about its MoE blocks is read from
transformers' model class, built on the meta device from the checkpoint's config: which decoder
layers have an MoE block (an experts module: transformers 5's experts interface, a module holding
3-D `gate_up_proj` / `down_proj`), the block's router (the module beside the experts holding an
[E, H] weight, with its optional bias), the routing's selection bias (`e_score_correction_bias`),
the experts' layout (transposed, interleaved gate/up, biases: the interface's own flags) and top-K.
The on-disk tensor names come from transformers' weight-conversion mapping (load.py). What a
family adds is its routing entry (its `Architecture` in `ARCHITECTURES`): how its router turns
logits into weights, and, for a block that does not call `router(h)` then
`experts(h, index, weights)`, a capture adapter (capture.py).

Families that cannot work are refused up front with one line (`REFUSED`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ce_export.moe_math import CLAMPED_SWIGLU, SIGMOID_TOPK, SOFTMAX_TOPK, SPARSEMIXER

# Config keys that hold the routed expert count: an int, or (trimmed checkpoints) a per-layer list.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

UNIFORM = "router_then_experts"  # block calls router(h) -> (logits, weights, index), then experts(h, index, weights)
LLAMA4 = "llama4"  # Llama4TextMoe: router -> [T, E] scores, experts on every expert's scaled copy of the input


@dataclass(frozen=True)
class Architecture:
    """One family: its routing entry and the few facts transformers' module tree does not say."""

    model_type: str
    routing: Callable[[nn.Module, nn.Module, object], dict]  # (router, block, transformers config) -> spec fields
    block: str = UNIFORM  # how capture enters the MoE block
    moe_module: str = "mlp"  # the MoE block's name on disk under model.layers.{l} (what trimming writes)
    latent_kv_cache: bool = False  # multi-head latent attention: the cache holds the latent and the rotary key
    block_returns_tuple: bool = False  # the block returns (hidden, router output), which the decoder layer unpacks
    experts_keys: tuple[str, ...] = EXPERT_COUNT_KEYS


# ---------------------------------------------------------------- routing entries
# Each reads the router module transformers built (its attributes come from the config, with
# transformers' own defaults and aliases) and returns MoeLayerSpec's routing fields.

def _softmax(norm_topk_prob: bool | None = None, router_fp32: bool = False):
    """softmax top-k; norm_topk_prob None: the router's own attribute (default False)."""
    def routing(router, block, config) -> dict:
        norm = getattr(router, "norm_topk_prob", False) if norm_topk_prob is None else norm_topk_prob
        return {"routing": SOFTMAX_TOPK, "norm_topk_prob": bool(norm), "router_fp32": router_fp32}
    return routing


def _deepseek_v2(router, block, config) -> dict:
    method = getattr(config, "topk_method", "greedy")
    if method != "greedy":
        raise UnsupportedFamily(f"deepseek_v2 topk_method {method!r} is not supported (only 'greedy')")
    return {"routing": SOFTMAX_TOPK, "norm_topk_prob": False, "router_fp32": True,
            "routing_scale": float(config.routed_scaling_factor)}


def _deepseek_v3(router, block, config) -> dict:
    """DeepSeek-V3's router and its copies (GLM-4.5, dots1): sigmoid, correction bias, groups."""
    return {"routing": SIGMOID_TOPK, "norm_topk_prob": bool(router.norm_topk_prob), "router_fp32": True,
            "routing_scale": float(router.routed_scaling_factor), "n_group": int(router.num_group),
            "topk_group": int(router.topk_group)}


def _minimax_m2(router, block, config) -> dict:
    """Sigmoid scores, choice by scores + the block's correction bias, always renormalised."""
    return {"routing": SIGMOID_TOPK, "norm_topk_prob": True}


def _gpt_oss(router, block, config) -> dict:
    """Top-k of the biased logits, softmax over those K (= renormalised softmax top-k); experts with
    biases and the clamped SwiGLU."""
    experts = block.experts
    return {"routing": SOFTMAX_TOPK, "norm_topk_prob": True, "activation": CLAMPED_SWIGLU,
            "swiglu_alpha": float(experts.alpha), "swiglu_limit": float(experts.limit)}


def _llama4(router, block, config) -> dict:
    """Top-k of the logits, sigmoid of those, applied to the expert's input (top-1)."""
    return {"routing": SIGMOID_TOPK, "norm_topk_prob": False, "weights_on_input": True}


def _phimoe(router, block, config) -> dict:
    return {"routing": SPARSEMIXER, "norm_topk_prob": False, "jitter_eps": float(config.router_jitter_noise)}


ARCHITECTURES = {arch.model_type: arch for arch in (
    Architecture("olmoe", _softmax()),
    Architecture("mixtral", _softmax(norm_topk_prob=True), moe_module="block_sparse_moe"),
    Architecture("qwen2_moe", _softmax()),
    Architecture("qwen3_moe", _softmax()),
    Architecture("deepseek_v2", _deepseek_v2, latent_kv_cache=True),
    Architecture("phimoe", _phimoe, moe_module="block_sparse_moe"),
    Architecture("deepseek_v3", _deepseek_v3, latent_kv_cache=True),
    Architecture("glm4_moe", _deepseek_v3),
    Architecture("dots1", _deepseek_v3),
    Architecture("minimax_m2", _minimax_m2, moe_module="block_sparse_moe"),
    Architecture("gpt_oss", _gpt_oss, block_returns_tuple=True),
    Architecture("granitemoe", _softmax(norm_topk_prob=True), moe_module="block_sparse_moe"),
    Architecture("flex_olmo", _softmax()),
    Architecture("hunyuan_v1_moe", _softmax(norm_topk_prob=True, router_fp32=True)),
    Architecture("llama4_text", _llama4, block=LLAMA4, moe_module="feed_forward", block_returns_tuple=True),
)}

# model_type -> why it cannot work, said before anything is read.
REFUSED = {
    "qwen3_5_moe": "its Gated DeltaNet linear-attention layers keep a recurrent state, not a KV cache "
                   "(the exported decoder's interface), and do not export",
    "qwen3_5_moe_text": "its Gated DeltaNet linear-attention layers keep a recurrent state, not a KV cache "
                        "(the exported decoder's interface), and do not export",
    "qwen3_next": "its Gated DeltaNet linear-attention layers keep a recurrent state, not a KV cache",
    "minimax": "its lightning (linear) attention layers keep a recurrent state, not a KV cache",
    "jamba": "its Mamba layers keep a recurrent state, not a KV cache",
    "granitemoehybrid": "its Mamba-2 layers keep a recurrent state, not a KV cache",
    "nemotron_h": "its Mamba-2 layers keep a recurrent state, not a KV cache",
    "lfm2_moe": "its short-convolution layers keep a convolution state, not a KV cache",
    "kimi_linear": "its Kimi Delta Attention layers keep a recurrent state, not a KV cache",
    "llama4": "a multimodal checkpoint; export its text model (model_type llama4_text)",
}


class UnsupportedFamily(ValueError):
    """A family, or a configuration of one, that ce_export cannot serve (load turns it into a LoadError)."""


def refusal(model_type) -> str | None:
    """Why `model_type` (config.json's value, any JSON type) cannot work, or None when it is served."""
    if not isinstance(model_type, str):
        return f"unknown model_type {model_type!r} (supported: {', '.join(sorted(ARCHITECTURES))})"
    if model_type in REFUSED:
        return f"model_type {model_type!r} is not supported: {REFUSED[model_type]}"
    if model_type not in ARCHITECTURES:
        return f"unknown model_type {model_type!r} (supported: {', '.join(sorted(ARCHITECTURES))})"
    return None


# ---------------------------------------------------------------- transformers' model on the meta device

# Training-time output switches a checkpoint may carry (e.g. Mixtral fine-tunes save
# output_router_logits: true for the auxiliary loss): the exported decoder returns logits and the
# KV cache only, so transformers' model is always built for that.
INFERENCE_OUTPUTS = {"output_router_logits": False, "output_hidden_states": False, "output_attentions": False,
                     "return_dict": True, "use_cache": True}


def transformers_config(config: dict):
    """transformers' config for a checkpoint's config.json, minus ce_export's keys, for inference
    (INFERENCE_OUTPUTS); a per-layer expert-count list (trimmed checkpoints) becomes its largest
    count (our blocks carry their own)."""
    from transformers import AutoConfig

    config = dict(config) | INFERENCE_OUTPUTS
    for key in EXPERT_COUNT_KEYS:
        if isinstance(config.get(key), list):
            config[key] = max((count for count in config[key] if isinstance(count, int) and count > 0), default=2)
    for key in ("use_ce", "n_ce", "bottom_k", "layer_experts_idx"):
        config.pop(key, None)
    hf_config = AutoConfig.for_model(**config)
    hf_config._attn_implementation = "eager"
    return hf_config


def meta_model(config: dict) -> nn.Module:
    """transformers' causal LM for `config`, every tensor on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(transformers_config(config), attn_implementation="eager")


def decoder_layers(lm: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, modules) of the decoder layers: the ModuleList of num_hidden_layers entries."""
    count = lm.config.num_hidden_layers
    for name, module in lm.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and name.endswith(("layers", "blocks")):
            return name, module
    raise UnsupportedFamily(f"{type(lm).__name__}: no list of {count} decoder layers found")


# ---------------------------------------------------------------- MoE blocks

@dataclass(frozen=True)
class MoeBlockLayout:
    """Where one MoE block's routed parts are, by transformers' in-memory names."""

    layer: int
    block: str  # the MoE block's path, e.g. "model.layers.3.mlp"
    router: str  # the router module's path
    router_weight: str  # [E, H]
    experts: str  # the experts module's path
    gate_up: str  # [E, 2I, H], or [E, H, 2I] when transposed
    down: str  # [E, H, I], or [E, I, H] when transposed
    num_experts: int
    intermediate_size: int
    top_k: int
    transposed: bool = False
    interleaved: bool = False  # gate/up rows alternate (gpt-oss) instead of gate rows then up rows
    router_bias: str | None = None  # [E]
    score_bias: str | None = None  # [E] (or [1, E])
    gate_up_bias: str | None = None  # [E, 2I]
    down_bias: str | None = None  # [E, H]

    def routed_names(self) -> set[str]:
        """The tensors our op takes over from transformers' block (the rest of the block stays transformers')."""
        names = {self.router_weight, self.gate_up, self.down, self.router_bias, self.score_bias, self.gate_up_bias,
                 self.down_bias}
        return {name for name in names if name is not None}


def find_moe_blocks(lm: nn.Module) -> dict[int, MoeBlockLayout]:
    """The MoE block of each decoder layer that has one, found by module types and shapes."""
    prefix, layers = decoder_layers(lm)
    hidden = lm.config.hidden_size
    blocks = {}
    for index, layer in enumerate(layers):
        experts_name = next((name for name, module in layer.named_modules() if _is_experts(module)), None)
        if experts_name is None:
            continue
        experts = layer.get_submodule(experts_name)
        block_name = experts_name.rpartition(".")[0]
        block = layer.get_submodule(block_name)
        base = f"{prefix}.{index}.{block_name}"
        num_experts = experts.gate_up_proj.shape[0]
        transposed = bool(getattr(experts, "is_transposed", type(experts).__name__ == "Llama4TextExperts"))
        intermediate = experts.down_proj.shape[1 if transposed else 2]
        router_name, weight_name = _router_of(block, experts_name.rpartition(".")[2], num_experts, hidden)
        router = block.get_submodule(router_name)
        weight_owner, _, _ = weight_name.rpartition(".")
        router_bias = getattr(router.get_submodule(weight_owner) if weight_owner else router, "bias", None)
        score_bias = next((name for name, _ in (*block.named_parameters(), *block.named_buffers())
                           if name.endswith("e_score_correction_bias")), None)
        has_bias = bool(getattr(experts, "has_bias", False))
        top_k = getattr(router, "top_k", None) or getattr(block, "top_k", None) or lm.config.num_experts_per_tok
        blocks[index] = MoeBlockLayout(
            layer=index, block=base, router=f"{base}.{router_name}", router_weight=f"{base}.{router_name}.{weight_name}",
            experts=f"{prefix}.{index}.{experts_name}", gate_up=f"{prefix}.{index}.{experts_name}.gate_up_proj",
            down=f"{prefix}.{index}.{experts_name}.down_proj", num_experts=num_experts, intermediate_size=intermediate,
            top_k=int(top_k), transposed=transposed, interleaved=not getattr(experts, "is_concatenated", True),
            router_bias=f"{base}.{router_name}.{weight_owner + '.' if weight_owner else ''}bias"
            if isinstance(router_bias, torch.Tensor) else None,
            score_bias=f"{base}.{score_bias}" if score_bias else None,
            gate_up_bias=f"{prefix}.{index}.{experts_name}.gate_up_proj_bias" if has_bias else None,
            down_bias=f"{prefix}.{index}.{experts_name}.down_proj_bias" if has_bias else None,
        )
    return blocks


def _is_experts(module: nn.Module) -> bool:
    """An experts module: the experts interface's (`is_concatenated` set by use_experts_implementation)
    or Llama 4's, holding every expert's gated projections as 3-D tensors."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.ndim == down.ndim == 3


def _router_of(block: nn.Module, experts_name: str, num_experts: int, hidden: int) -> tuple[str, str]:
    """(the block's child the block calls as its router, that child's [E, H] weight): the child
    outside the experts and any shared expert that owns an [E, H] parameter."""
    for name, child in block.named_children():
        if name == experts_name or "shared" in name:
            continue
        weight = next((path for path, p in child.named_parameters() if tuple(p.shape) == (num_experts, hidden)), None)
        if weight is not None:
            return name, weight
    raise UnsupportedFamily(f"{type(block).__name__}: no router with an [{num_experts}, {hidden}] weight found")


def routing_fields(arch: Architecture, lm: nn.Module, layout: MoeBlockLayout) -> dict:
    """MoeLayerSpec's routing and expert-variant fields for one block, from the family's routing entry."""
    block = lm.get_submodule(layout.block)
    router = lm.get_submodule(layout.router)
    fields = arch.routing(router, block, lm.config)
    fields.update(score_bias=layout.score_bias is not None, router_bias=layout.router_bias is not None,
                  expert_bias=layout.gate_up_bias is not None)
    return fields


def kv_cache_dims(arch: Architecture, config) -> tuple[int, int, int]:
    """(kv heads, key dim, value dim) of each layer's cache, as transformers' attention stores it."""
    if arch.latent_kv_cache:
        # Multi-head latent attention caches the compressed latent ("key": [B, 1, P, kv_lora_rank])
        # and the shared rotary key ("value": [B, 1, P, qk_rope_head_dim]), not per-head K and V.
        return 1, config.kv_lora_rank, config.qk_rope_head_dim
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim, head_dim
