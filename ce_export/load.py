"""Stage 1, load: a checkpoint folder (config.json + safetensors) -> LoadedModel.

Reads both on-disk expert layouts (per-expert `mlp.experts.{e}.gate_proj.weight` ... as written by
transformers 4.x and the CE reference code, and fused 3-D `mlp.experts.gate_up_proj` /
`down_proj`), CE checkpoints (`use_ce`, `n_ce`, `mlp.ces`) and trimmed checkpoints with per-layer
expert counts. Every tensor is accounted for: an unexpected tensor is an error, never dropped.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from ce_export.checkpoint_check import check_checkpoint
from ce_export.errors import LoadError
from ce_export.moe_math import SOFTMAX_TOPK, SPARSEMIXER
from ce_export.spec import (
    LAYER_DENSE,
    LAYER_MOE,
    LAYER_REMOVED,
    LoadedModel,
    ModelSpec,
    MoeLayerSpec,
    MoeLayerWeights,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


def _softmax_routing(norm_default: bool):
    def routing(config: dict) -> dict:
        return {"routing": SOFTMAX_TOPK, "norm_topk_prob": bool(config.get("norm_topk_prob", norm_default))}
    return routing


def _mixtral_routing(config: dict) -> dict:
    return {"routing": SOFTMAX_TOPK, "norm_topk_prob": True}


def _deepseek_routing(config: dict) -> dict:
    method = config.get("topk_method", "greedy")
    if method != "greedy":
        raise LoadError(f"deepseek topk_method {method!r} is not supported (only 'greedy')")
    return {"routing": SOFTMAX_TOPK, "norm_topk_prob": False, "router_fp32": True,
            "routing_scale": float(config.get("routed_scaling_factor", 1.0))}


def _phimoe_routing(config: dict) -> dict:
    return {"routing": SPARSEMIXER, "norm_topk_prob": False, "jitter_eps": float(config.get("router_jitter_noise", 0.01))}


def _every_layer(config: dict, layer: int) -> bool:
    return True


def _qwen_sparse_layer(config: dict, layer: int) -> bool:
    step = config.get("decoder_sparse_step", 1) or 1
    return layer not in (config.get("mlp_only_layers") or []) and (layer + 1) % step == 0


def _deepseek_sparse_layer(config: dict, layer: int) -> bool:
    step = config.get("moe_layer_freq", 1) or 1
    return layer >= config.get("first_k_dense_replace", 0) and layer % step == 0


@dataclass(frozen=True)
class Architecture:
    """How one transformers model family names its MoE config keys and on-disk tensors.

    Everything outside the MoE blocks is taken from transformers' own model class, whose
    parameter names and shapes say which other tensors the checkpoint must hold.
    """

    model_type: str
    experts_keys: tuple[str, ...]  # config keys with the expert count (int, or a per-layer list when trimmed)
    intermediate_key: str  # the routed experts' intermediate size
    moe_module: str  # the MoE block's name on disk, under model.layers.{l}.
    expert_names: tuple[str, str, str]  # gate, up, down projection names on disk
    routing: Callable[[dict], dict]
    is_moe_layer: Callable[[dict, int], bool] = _every_layer
    shared_module: str | None = None  # the shared expert's name on disk, under the MoE block
    shared_intermediate: Callable[[dict], int] | None = None
    shared_gate: str | None = None  # the shared expert gate's name on disk, under the MoE block
    top_k_key: str = "num_experts_per_tok"


SWIGLU_NAMES = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = ("w1", "w3", "w2")

ARCHITECTURES = {arch.model_type: arch for arch in (
    Architecture("olmoe", ("num_experts",), "intermediate_size", "mlp", SWIGLU_NAMES, _softmax_routing(False)),
    Architecture("mixtral", ("num_local_experts",), "intermediate_size", "block_sparse_moe", MIXTRAL_NAMES, _mixtral_routing),
    Architecture("qwen2_moe", ("num_experts", "num_local_experts"), "moe_intermediate_size", "mlp", SWIGLU_NAMES,
                 _softmax_routing(False), _qwen_sparse_layer, "shared_expert",
                 lambda c: c["shared_expert_intermediate_size"], "shared_expert_gate"),
    Architecture("qwen3_moe", ("num_experts", "num_local_experts"), "moe_intermediate_size", "mlp", SWIGLU_NAMES,
                 _softmax_routing(False), _qwen_sparse_layer),
    Architecture("deepseek_v2", ("n_routed_experts",), "moe_intermediate_size", "mlp", SWIGLU_NAMES, _deepseek_routing,
                 _deepseek_sparse_layer, "shared_experts",
                 lambda c: c["moe_intermediate_size"] * c.get("n_shared_experts", 1)),
    Architecture("phimoe", ("num_local_experts",), "intermediate_size", "block_sparse_moe", MIXTRAL_NAMES, _phimoe_routing),
)}


def load_checkpoint(folder: str | Path) -> LoadedModel:
    folder = Path(folder)
    config = read_config(folder)
    check_checkpoint(folder, config)  # config.json and the safetensors headers, before any tensor is read
    arch = architecture_for(config, folder)
    tensors = read_safetensors(folder)
    spec = model_spec_from_config(config, arch, tensors, folder)
    moe_weights = {}
    for layer in spec.moe_layers:
        if layer.kind == LAYER_MOE:
            moe_weights[layer.layer] = take_moe_weights(tensors, arch, layer, folder)
    dense = take_dense_tensors(tensors, spec, arch, folder)
    leftover = sorted(name for name in tensors if not IGNORED_TENSORS.match(name))
    if leftover:
        raise LoadError(
            f"{folder}: {len(leftover)} tensor(s) the {arch.model_type} layout does not use, "
            f"e.g. {leftover[0]!r} (refusing to drop weights silently)"
        )
    return LoadedModel(spec=spec, moe_weights=moe_weights, dense_tensors=dense, source=str(folder))


def read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise LoadError(f"{folder}: not a checkpoint folder (does not exist or is not a directory)")
    path = folder / "config.json"
    if not path.is_file():
        raise LoadError(f"{path}: missing (a checkpoint folder needs config.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LoadError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:
        raise LoadError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(config, dict):
        raise LoadError(f"{path}: expected a JSON object")
    return config


def architecture_for(config: dict, folder: Path) -> Architecture:
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise LoadError(
            f"{folder / 'config.json'}: unknown model_type {model_type!r} "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[model_type]


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index_path = folder / SAFETENSORS_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise LoadError(f"{index_path}: not a safetensors index ({error!r})") from None
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = sorted(path.name for path in folder.glob("*.safetensors"))
        if not files:
            raise LoadError(f"{folder}: no *.safetensors files and no {SAFETENSORS_INDEX}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise LoadError(f"{path}: listed in {SAFETENSORS_INDEX} but missing")
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
        except LoadError:
            raise
        except Exception as error:  # safetensors raises several types for damaged files
            raise LoadError(f"{path}: unreadable safetensors file ({type(error).__name__}: {error})") from None
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise LoadError(f"{index_path}: lists {missing[0]!r}, which its shard does not contain")
    return tensors


def config_int(config: dict, key: str, folder: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise LoadError(f"{folder / 'config.json'}: {key} must be a positive integer, got {value!r}")
    return value


def model_spec_from_config(config: dict, arch: Architecture, tensors: dict, folder: Path) -> ModelSpec:
    where = folder / "config.json"
    hidden = config_int(config, "hidden_size", folder)
    num_layers = config_int(config, "num_hidden_layers", folder)
    heads = config_int(config, "num_attention_heads", folder)
    intermediate = config_int(config, arch.intermediate_key, folder)
    top_k = config_int(config, arch.top_k_key, folder)
    use_ce = bool(config.get("use_ce", False))
    n_ce = config.get("n_ce", 0) if use_ce else 0
    if use_ce and (not isinstance(n_ce, int) or isinstance(n_ce, bool) or not 1 <= n_ce < top_k):
        raise LoadError(f"{where}: n_ce={n_ce!r} is invalid for {arch.top_k_key}={top_k} (need 1..{top_k - 1})")
    kv_heads, key_dim, value_dim = kv_cache_dims(config, arch, folder)
    routing = arch.routing(config)
    shared_size = arch.shared_intermediate(config) if arch.shared_intermediate else 0

    expert_counts = per_layer_expert_counts(config, arch, num_layers, where)
    kept_ids = config.get("layer_experts_idx")
    if kept_ids is not None and (not isinstance(kept_ids, list) or len(kept_ids) != num_layers):
        raise LoadError(f"{where}: layer_experts_idx must be a list with one entry per layer ({num_layers})")

    layers = []
    for layer, count in enumerate(expert_counts):
        if not arch.is_moe_layer(config, layer) or count is None:
            layers.append(MoeLayerSpec(layer=layer, kind=LAYER_DENSE))
            continue
        if count in (-1, 0):
            layers.append(MoeLayerSpec(layer=layer, kind=LAYER_REMOVED))
            continue
        if top_k > count:
            raise LoadError(f"{where}: layer {layer} keeps {count} experts, fewer than {arch.top_k_key}={top_k}")
        ids = tuple(kept_ids[layer]) if kept_ids is not None else tuple(range(count))
        if len(ids) != count:
            raise LoadError(f"{where}: layer_experts_idx[{layer}] has {len(ids)} entries, expected {count}")
        layers.append(MoeLayerSpec(
            layer=layer, num_experts=count, hidden_size=hidden, intermediate_size=intermediate,
            top_k=top_k, n_ce=n_ce, expert_ids=ids, ces_width=max(hidden, intermediate) if n_ce else 0,
            shared_intermediate_size=shared_size, shared_expert_gate=arch.shared_gate is not None, **routing,
        ))
    if not use_ce:
        stray = next((name for name in tensors if name.endswith(".ces")), None)
        if stray is not None:
            raise LoadError(f"{where}: checkpoint has {stray!r} but use_ce is not true (compressed experts would be ignored)")
    floats = [tensor.dtype for tensor in tensors.values() if tensor.is_floating_point()]
    checkpoint_dtype = str(max(set(floats), key=floats.count)).removeprefix("torch.") if floats else "unknown"
    return ModelSpec(
        architecture=arch.model_type, vocab_size=config_int(config, "vocab_size", folder), hidden_size=hidden,
        num_layers=num_layers, num_attention_heads=heads, kv_heads=kv_heads, key_dim=key_dim, value_dim=value_dim,
        use_ce=use_ce, n_ce=n_ce, checkpoint_dtype=checkpoint_dtype, moe_layers=tuple(layers), hf_config=config,
    )


def kv_cache_dims(config: dict, arch: Architecture, folder: Path) -> tuple[int, int, int]:
    """(kv heads, key dim, value dim) of each layer's cache, as transformers' attention stores it."""
    heads = config_int(config, "num_attention_heads", folder)
    if arch.model_type == "deepseek_v2":
        # Multi-head latent attention caches the compressed latent ("key": [B, 1, P, kv_lora_rank])
        # and the shared rotary key ("value": [B, 1, P, qk_rope_head_dim]), not per-head K and V.
        return 1, config_int(config, "kv_lora_rank", folder), config_int(config, "qk_rope_head_dim", folder)
    kv_heads = config_int(config, "num_key_value_heads", folder, default=heads)
    if heads % kv_heads:
        raise LoadError(f"{folder / 'config.json'}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = config.get("head_dim") or config_int(config, "hidden_size", folder) // heads
    return kv_heads, head_dim, head_dim


def per_layer_expert_counts(config: dict, arch: Architecture, num_layers: int, where: Path) -> list:
    key = next((key for key in arch.experts_keys if config.get(key) is not None), arch.experts_keys[0])
    counts = config.get(key)
    if isinstance(counts, list):
        if len(counts) != num_layers:
            raise LoadError(f"{where}: {key} lists {len(counts)} layers, num_hidden_layers={num_layers}")
        for count in counts:
            if count is not None and (not isinstance(count, int) or count < -1):
                raise LoadError(f"{where}: {key} entry {count!r} is not -1, 0, null or a count")
        return counts
    if not isinstance(counts, int) or isinstance(counts, bool) or counts <= 0:
        raise LoadError(f"{where}: {key} must be a positive integer or a per-layer list, got {counts!r}")
    return [counts] * num_layers


def take(tensors: dict, name: str, shape: tuple, folder: Path) -> torch.Tensor:
    if name not in tensors:
        raise LoadError(f"{folder}: missing tensor {name!r}")
    tensor = tensors.pop(name)
    if tuple(tensor.shape) != tuple(shape):
        raise LoadError(f"{folder}: tensor {name!r} has shape {list(tensor.shape)}, config implies {list(shape)}")
    if not tensor.is_floating_point():
        raise LoadError(f"{folder}: tensor {name!r} has dtype {tensor.dtype}, expected floating point")
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise LoadError(f"{folder}: tensor {name!r} has {bad} non-finite value(s) (NaN or Inf)")
    return tensor


def take_moe_weights(tensors: dict, arch: Architecture, layer: MoeLayerSpec, folder: Path) -> MoeLayerWeights:
    prefix = f"model.layers.{layer.layer}.{arch.moe_module}."
    experts, hidden, inter = layer.num_experts, layer.hidden_size, layer.intermediate_size
    router = take(tensors, prefix + "gate.weight", (experts, hidden), folder)
    fused = prefix + "experts.gate_up_proj"
    if fused in tensors:
        gate_up = take(tensors, fused, (experts, 2 * inter, hidden), folder)
        down = take(tensors, prefix + "experts.down_proj", (experts, hidden, inter), folder)
    else:
        gate_name, up_name, down_name = arch.expert_names
        gates, ups, downs = [], [], []
        for expert in range(experts):
            name = f"{prefix}experts.{expert}."
            gates.append(take(tensors, f"{name}{gate_name}.weight", (inter, hidden), folder))
            ups.append(take(tensors, f"{name}{up_name}.weight", (inter, hidden), folder))
            downs.append(take(tensors, f"{name}{down_name}.weight", (hidden, inter), folder))
        gate_up = torch.cat([torch.stack(gates), torch.stack(ups)], dim=1)
        down = torch.stack(downs)
    weights = MoeLayerWeights(router=router, gate_up=gate_up, down=down, ces=None)
    if layer.is_compressed:
        if prefix + "ces" in tensors and tensors[prefix + "ces"].ndim == 3 and tensors[prefix + "ces"].shape[2] < layer.ces_width:
            raise LoadError(
                f"{folder}: {prefix}ces has width {tensors[prefix + 'ces'].shape[2]}, but the activation scale needs "
                f"{inter} (intermediate_size > hidden_size); store ces as [E, 3, max(H, I)]"
            )
        weights.ces = take(tensors, prefix + "ces", (experts, 3, layer.ces_width), folder)
    if layer.shared_intermediate_size:
        shared = f"{prefix}{arch.shared_module}."
        size = layer.shared_intermediate_size
        gate_name, up_name, down_name = SWIGLU_NAMES
        weights.shared_gate_up = torch.cat([take(tensors, f"{shared}{gate_name}.weight", (size, hidden), folder),
                                            take(tensors, f"{shared}{up_name}.weight", (size, hidden), folder)])
        weights.shared_down = take(tensors, f"{shared}{down_name}.weight", (hidden, size), folder)
        if arch.shared_gate:
            weights.shared_gate = take(tensors, f"{prefix}{arch.shared_gate}.weight", (1, hidden), folder)
    return weights


def take_dense_tensors(tensors: dict, spec: ModelSpec, arch: Architecture, folder: Path) -> dict[str, torch.Tensor]:
    """Every parameter of transformers' model outside our MoE blocks, checked against its shape."""
    shapes = dense_parameter_shapes(spec)
    for layer in spec.moe_layers:
        prefix = f"model.layers.{layer.layer}."
        if layer.kind != LAYER_DENSE:
            shapes = {name: shape for name, shape in shapes.items() if not name.startswith(prefix + "mlp.")}
        norm = prefix + "post_attention_layernorm."
        if layer.kind == LAYER_REMOVED and not any(name.startswith(norm) for name in tensors):
            shapes = {name: shape for name, shape in shapes.items() if not name.startswith(norm)}
    if spec.hf_config.get("tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return {name: take(tensors, name, shape, folder) for name, shape in shapes.items()}


def dense_parameter_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    from ce_export.capture import hf_config_for

    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config_for(spec))
    return {name: tuple(param.shape) for name, param in model.state_dict().items()}


def parameter_count(model: LoadedModel) -> tuple[int, int]:
    """(total parameters, parameters active per token)."""
    total = active = sum(t.numel() for t in model.dense_tensors.values())
    for layer in model.spec.moe_layers:
        if layer.kind != LAYER_MOE:
            continue
        weights = model.moe_weights[layer.layer]
        per_expert = math.prod(weights.gate_up.shape[1:]) + math.prod(weights.down.shape[1:])
        always = weights.router.numel() + sum(
            t.numel() for t in (weights.shared_gate_up, weights.shared_down, weights.shared_gate) if t is not None)
        total += always + per_expert * layer.num_experts + (weights.ces.numel() if weights.ces is not None else 0)
        active += always + per_expert * layer.n_main + (3 * layer.ces_width * layer.n_ce if weights.ces is not None else 0)
    return total, active
