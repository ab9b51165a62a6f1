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

import torch
from safetensors import safe_open

from ce_export.errors import LoadError
from ce_export.spec import (
    LAYER_MOE,
    LAYER_REMOVED,
    LoadedModel,
    ModelSpec,
    MoeLayerSpec,
    MoeLayerWeights,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Architecture:
    """How one transformers model family names its config keys and tensors."""

    model_type: str
    experts_key: str  # config key with the expert count (int, or a per-layer list when trimmed)
    top_k_key: str
    layer_prefix: str  # format string with {layer}
    moe_prefix: str  # relative to the layer prefix


ARCHITECTURES = {
    "olmoe": Architecture(
        model_type="olmoe",
        experts_key="num_experts",
        top_k_key="num_experts_per_tok",
        layer_prefix="model.layers.{layer}.",
        moe_prefix="mlp.",
    ),
}


def load_checkpoint(folder: str | Path) -> LoadedModel:
    folder = Path(folder)
    config = read_config(folder)
    arch = architecture_for(config, folder)
    tensors = read_safetensors(folder)
    spec = model_spec_from_config(config, arch, tensors, folder)
    moe_weights = {}
    for layer in spec.moe_layers:
        if layer.kind == LAYER_MOE:
            moe_weights[layer.layer] = take_moe_weights(tensors, arch, layer, spec, folder)
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
    if not isinstance(config, dict):
        raise LoadError(f"{path}: expected a JSON object")
    return config


def architecture_for(config: dict, folder: Path) -> Architecture:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
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
    kv_heads = config_int(config, "num_key_value_heads", folder, default=heads)
    head_dim = config.get("head_dim") or hidden // heads
    intermediate = config_int(config, "intermediate_size", folder)
    top_k = config_int(config, arch.top_k_key, folder)
    use_ce = bool(config.get("use_ce", False))
    n_ce = config.get("n_ce", 0) if use_ce else 0
    if use_ce and (not isinstance(n_ce, int) or not 1 <= n_ce < top_k):
        raise LoadError(f"{where}: n_ce={n_ce!r} is invalid for {arch.top_k_key}={top_k} (need 1..{top_k - 1})")
    if heads % kv_heads:
        raise LoadError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")

    expert_counts = per_layer_expert_counts(config, arch, num_layers, where)
    kept_ids = config.get("layer_experts_idx")
    if kept_ids is not None and (not isinstance(kept_ids, list) or len(kept_ids) != num_layers):
        raise LoadError(f"{where}: layer_experts_idx must be a list with one entry per layer ({num_layers})")

    layers = []
    for layer, count in enumerate(expert_counts):
        if count in (-1, 0):
            layers.append(MoeLayerSpec(layer=layer, kind=LAYER_REMOVED))
            continue
        if count is None:
            raise LoadError(f"{where}: layer {layer} is a dense MLP (null expert count); {arch.model_type} has none")
        if top_k > count:
            raise LoadError(f"{where}: layer {layer} keeps {count} experts, fewer than {arch.top_k_key}={top_k}")
        ids = tuple(kept_ids[layer]) if kept_ids is not None else tuple(range(count))
        if len(ids) != count:
            raise LoadError(f"{where}: layer_experts_idx[{layer}] has {len(ids)} entries, expected {count}")
        layers.append(MoeLayerSpec(
            layer=layer, num_experts=count, hidden_size=hidden, intermediate_size=intermediate,
            top_k=top_k, n_ce=n_ce, norm_topk_prob=bool(config.get("norm_topk_prob", False)),
            expert_ids=ids, ces_width=hidden if n_ce else 0,
        ))
    if not use_ce:
        stray = next((name for name in tensors if name.endswith(".mlp.ces")), None)
        if stray is not None:
            raise LoadError(f"{where}: checkpoint has {stray!r} but use_ce is not true (compressed experts would be ignored)")
    dtypes = {tensor.dtype for tensor in tensors.values()}
    checkpoint_dtype = str(max(dtypes, key=lambda dt: torch.finfo(dt).bits if dt.is_floating_point else 0)).removeprefix("torch.")
    return ModelSpec(
        architecture=arch.model_type, vocab_size=config_int(config, "vocab_size", folder), hidden_size=hidden,
        num_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        use_ce=use_ce, n_ce=n_ce, checkpoint_dtype=checkpoint_dtype, moe_layers=tuple(layers), hf_config=config,
    )


def per_layer_expert_counts(config: dict, arch: Architecture, num_layers: int, where: Path) -> list:
    counts = config.get(arch.experts_key)
    if isinstance(counts, list):
        if len(counts) != num_layers:
            raise LoadError(f"{where}: {arch.experts_key} lists {len(counts)} layers, num_hidden_layers={num_layers}")
        for count in counts:
            if count is not None and (not isinstance(count, int) or count < -1):
                raise LoadError(f"{where}: {arch.experts_key} entry {count!r} is not -1, 0, null or a count")
        return counts
    if not isinstance(counts, int) or isinstance(counts, bool) or counts <= 0:
        raise LoadError(f"{where}: {arch.experts_key} must be a positive integer or a per-layer list, got {counts!r}")
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


def take_moe_weights(tensors: dict, arch: Architecture, layer: MoeLayerSpec, spec: ModelSpec, folder: Path) -> MoeLayerWeights:
    prefix = arch.layer_prefix.format(layer=layer.layer) + arch.moe_prefix
    experts, hidden, inter = layer.num_experts, layer.hidden_size, layer.intermediate_size
    router = take(tensors, prefix + "gate.weight", (experts, hidden), folder)
    fused = prefix + "experts.gate_up_proj"
    if fused in tensors:
        gate_up = take(tensors, fused, (experts, 2 * inter, hidden), folder)
        down = take(tensors, prefix + "experts.down_proj", (experts, hidden, inter), folder)
    else:
        gates, ups, downs = [], [], []
        for expert in range(experts):
            name = f"{prefix}experts.{expert}."
            gates.append(take(tensors, name + "gate_proj.weight", (inter, hidden), folder))
            ups.append(take(tensors, name + "up_proj.weight", (inter, hidden), folder))
            downs.append(take(tensors, name + "down_proj.weight", (hidden, inter), folder))
        gate_up = torch.cat([torch.stack(gates), torch.stack(ups)], dim=1)
        down = torch.stack(downs)
    ces = None
    if layer.is_compressed:
        ces = take(tensors, prefix + "ces", (experts, 3, hidden), folder)
        if inter > hidden:
            raise LoadError(
                f"{folder}: layer {layer.layer} has intermediate_size {inter} > hidden_size {hidden}; "
                "CE checkpoints store the activation scale in ces[:, 1, :hidden] and cannot cover it"
            )
    return MoeLayerWeights(router=router, gate_up=gate_up, down=down, ces=ces)


def take_dense_tensors(tensors: dict, spec: ModelSpec, arch: Architecture, folder: Path) -> dict[str, torch.Tensor]:
    hidden, q_dim = spec.hidden_size, spec.num_attention_heads * spec.head_dim
    kv_dim = spec.num_key_value_heads * spec.head_dim
    bias = bool(spec.hf_config.get("attention_bias", False))
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not spec.hf_config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (spec.vocab_size, hidden)
    for layer in spec.moe_layers:
        prefix = arch.layer_prefix.format(layer=layer.layer)
        projections = {"q_proj": (q_dim, hidden), "k_proj": (kv_dim, hidden), "v_proj": (kv_dim, hidden), "o_proj": (hidden, q_dim)}
        for proj, shape in projections.items():
            shapes[f"{prefix}self_attn.{proj}.weight"] = shape
            if bias:
                shapes[f"{prefix}self_attn.{proj}.bias"] = (shape[0],)
        shapes[f"{prefix}self_attn.q_norm.weight"] = (q_dim,)
        shapes[f"{prefix}self_attn.k_norm.weight"] = (kv_dim,)
        shapes[f"{prefix}input_layernorm.weight"] = (hidden,)
        if layer.kind == LAYER_MOE or f"{prefix}post_attention_layernorm.weight" in tensors:
            shapes[f"{prefix}post_attention_layernorm.weight"] = (hidden,)
    return {name: take(tensors, name, shape, folder) for name, shape in shapes.items()}


def parameter_count(model: LoadedModel) -> tuple[int, int]:
    """(total parameters, parameters active per token)."""
    dense = sum(t.numel() for t in model.dense_tensors.values())
    total = active = dense
    for layer in model.spec.moe_layers:
        if layer.kind != LAYER_MOE:
            continue
        weights = model.moe_weights[layer.layer]
        per_expert = math.prod(weights.gate_up.shape[1:]) + math.prod(weights.down.shape[1:])
        ces = weights.ces.numel() if weights.ces is not None else 0
        total += weights.router.numel() + per_expert * layer.num_experts + ces
        active += weights.router.numel() + per_expert * layer.n_main + (3 * weights.ces.shape[2] * layer.n_ce if ces else 0)
    return total, active
