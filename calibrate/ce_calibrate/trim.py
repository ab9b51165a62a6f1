"""Expert Drop, Layer Drop and Block Drop from calibration statistics, written in the compression
study's checkpoint format (see /work/shared/notes/compression-formats.md).

The new checkpoint keeps the source's on-disk names and dtypes: every tensor is read from the
original safetensors and only sliced (router rows, fused expert tensors, `ces` rows), renamed
(renumbered experts, renumbered layers) or removed; all other tensors are written unchanged, and
every non-weight file of the folder (tokenizer, generation config, ...) is copied byte for byte.
The weights go into one `model.safetensors` (a sharded source is not re-sharded).

Order when several methods are asked for at once: Block Drop first (highest block similarity),
then Layer Drop among the remaining MoE sub-layers (highest MoE similarity), then Expert Drop among
the experts of the MoE layers left (lowest softmax mass). A layer always keeps at least top_k
experts, so the fraction actually dropped can be lower than asked; `trim.json` records what was done.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ce_export.artifacts import read_json, staged_folder, write_json
from ce_export.checkpoint_check import SAFETENSORS_INDEX
from ce_export.errors import CeExportError, LoadError
from ce_export.load import ARCHITECTURES, load_checkpoint, read_config, read_safetensors
from ce_export.spec import DenseLayerSpec, LayerSpec, MoeLayerSpec, RemovedLayerSpec

from ce_calibrate.stats import STATS_FORMAT

SCOPES = ("global", "layer")
WEIGHTS = "model.safetensors"
LAYER_MAPPING = "layer_mapping.json"
RESERVED_LAYERS = "reserved_layers.json"
TRIM_RECORD = "trim.json"
PER_LAYER_CONFIG_KEYS = ("layer_experts_idx", "layer_types")


class TrimError(CeExportError):
    """The statistics or trimming options cannot be applied to this checkpoint."""


def read_stats(stats_json: str | Path, spec) -> list[dict]:
    """The per-layer statistics, checked against the checkpoint they are applied to."""
    stats = read_json(stats_json, "calibration statistics (written by calibrate)")
    if not isinstance(stats, dict) or stats.get("format") != STATS_FORMAT or not isinstance(stats.get("layers"), list):
        raise TrimError(f"{stats_json}: not a calibration statistics file (format {STATS_FORMAT})")
    layers = stats["layers"]
    if stats["model"].get("architecture") != spec.architecture or len(layers) != spec.num_layers:
        raise TrimError(f"{stats_json}: statistics of a {stats['model'].get('architecture')} model with {len(layers)} "
                        f"layers, but the checkpoint is {spec.architecture} with {spec.num_layers}")
    for layer, entry in zip(spec.moe_layers, layers):
        if entry.get("kind") != layer.kind or (isinstance(layer, MoeLayerSpec) and (
                entry.get("num_experts") != layer.num_experts or entry.get("expert_ids") != list(layer.expert_ids))):
            raise TrimError(f"{stats_json}: layer {layer.layer} does not match the checkpoint "
                            f"(statistics of a different model or trim?)")
    return layers


def choose_expert_drop(layers: list[dict], spec, candidates: list[int], fraction: float, scope: str) -> dict[int, list[int]]:
    """Local expert indices to drop per layer (lowest softmax mass), keeping >= top_k in every layer."""
    by_layer = {entry["layer"]: entry for entry in layers}
    dropped: dict[int, list[int]] = {layer: [] for layer in candidates}
    if fraction == 0 or not candidates:
        return dropped
    room = {layer: spec.moe_layers[layer].num_experts - spec.moe_layers[layer].top_k for layer in candidates}
    if scope == "global":
        ranked = sorted((mass, layer, expert) for layer in candidates
                        for expert, mass in enumerate(by_layer[layer]["softmax_mass"]))
        budget = round(fraction * len(ranked))
        for mass, layer, expert in ranked:
            if budget == 0:
                break
            if len(dropped[layer]) < room[layer]:
                dropped[layer].append(expert)
                budget -= 1
    else:
        for layer in candidates:
            masses = by_layer[layer]["softmax_mass"]
            want = min(round(fraction * len(masses)), room[layer])
            dropped[layer] = sorted(range(len(masses)), key=lambda e: (masses[e], e))[:want]
    return {layer: sorted(experts) for layer, experts in dropped.items()}


def _highest(layers: list[dict], key: str, candidates: list[int], count: int) -> list[int]:
    ranked = sorted(candidates, key=lambda layer: (-layers[layer][key], layer))
    return sorted(ranked[:count])


def _check_options(expert_drop, scope, layer_drop, block_drop, spec):
    if isinstance(expert_drop, bool) or not isinstance(expert_drop, (int, float)) or not 0.0 <= expert_drop < 1.0:
        raise TrimError(f"expert_drop must be a fraction in [0, 1), got {expert_drop!r}")
    if scope not in SCOPES:
        raise TrimError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    moe = sum(isinstance(layer, MoeLayerSpec) for layer in spec.moe_layers)
    for name, value, limit in (("layer_drop", layer_drop, moe), ("block_drop", block_drop, spec.num_layers - 1)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            raise TrimError(f"{name} must be an integer in [0, {limit}] for this model, got {value!r}")
    if expert_drop == 0 and layer_drop == 0 and block_drop == 0:
        raise TrimError("nothing to trim: expert_drop, layer_drop and block_drop are all 0")


def _expert_count(layer: LayerSpec) -> int | None:
    """The layer's entry in the config's per-layer expert counts: null for a dense layer, -1 for a removed one."""
    match layer:
        case MoeLayerSpec():
            return layer.num_experts
        case RemovedLayerSpec():
            return -1
        case DenseLayerSpec():
            return None


def _expert_total(layers: tuple[LayerSpec, ...]) -> int:
    return sum(layer.num_experts for layer in layers if isinstance(layer, MoeLayerSpec))


def _moe_prefix(arch, layer: int) -> str:
    return f"model.layers.{layer}.{arch.moe_module}."


def _drop_experts(tensors: dict, prefix: str, num_experts: int, drop: list[int]) -> list[int]:
    """Slice one MoE block's tensors in place; returns the kept local indices."""
    keep = [e for e in range(num_experts) if e not in set(drop)]
    index = torch.tensor(keep)
    for name in (prefix + "gate.weight", prefix + "ces", prefix + "experts.gate_up_proj", prefix + "experts.down_proj"):
        if name in tensors:
            tensors[name] = tensors[name].index_select(0, index).contiguous()
    per_expert = {name: tensors.pop(name) for name in [n for n in tensors if n.startswith(prefix + "experts.")
                                                       and n.removeprefix(prefix + "experts.").split(".")[0].isdigit()]}
    for new, old in enumerate(keep):
        old_prefix = f"{prefix}experts.{old}."
        for name, tensor in per_expert.items():
            if name.startswith(old_prefix):
                tensors[f"{prefix}experts.{new}." + name.removeprefix(old_prefix)] = tensor
    return keep


def _renumber_layers(tensors: dict, kept: list[int]) -> dict:
    new_index = {old: new for new, old in enumerate(kept)}
    out = {}
    for name, tensor in tensors.items():
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            if int(layer) in new_index:
                out[f"model.layers.{new_index[int(layer)]}.{rest}"] = tensor
        else:
            out[name] = tensor
    return out


def _config_after_block_drop(config: dict, arch, kept: list[int], layers: tuple[LayerSpec, ...], folder: Path) -> None:
    """Renumber every per-layer config fact so that the kept layers keep their kind."""
    num_layers = config["num_hidden_layers"]
    for key in (*arch.experts_keys, *PER_LAYER_CONFIG_KEYS):
        if isinstance(config.get(key), list) and len(config[key]) == num_layers:
            config[key] = [config[key][old] for old in kept]
    config["num_hidden_layers"] = len(kept)
    dense_new = [new for new, old in enumerate(kept) if isinstance(layers[old], DenseLayerSpec)]
    if arch.model_type == "qwen2_moe" or arch.model_type == "qwen3_moe":
        if config.get("decoder_sparse_step", 1) not in (1, None) or config.get("mlp_only_layers"):
            config["decoder_sparse_step"] = 1
            config["mlp_only_layers"] = dense_new
    elif arch.model_type == "deepseek_v2":
        if dense_new != list(range(len(dense_new))):
            raise TrimError(f"{folder}: after block drop the dense layers {dense_new} are not the leading layers, "
                            f"which DeepSeek-V2's config (first_k_dense_replace) cannot express")
        config["first_k_dense_replace"] = len(dense_new)
        config["moe_layer_freq"] = 1
    elif dense_new:
        raise TrimError(f"{folder}: dense layers in a {arch.model_type} model are not supported by block drop")


def trim(model_folder: str | Path, stats_json: str | Path, out_folder: str | Path, expert_drop: float = 0.25,
         scope: str = "global", layer_drop: int = 0, block_drop: int = 0, force: bool = False,
         report: Callable[[str], None] = print) -> Path:
    """Write a trimmed copy of `model_folder` into `out_folder` (study format); returns out_folder."""
    model_folder, out_folder = Path(model_folder), Path(out_folder)
    loaded = load_checkpoint(model_folder)
    spec = loaded.spec
    del loaded  # only the spec is needed; tensors are re-read untouched below
    _check_options(expert_drop, scope, layer_drop, block_drop, spec)
    layers = read_stats(stats_json, spec)
    config = read_config(model_folder)
    arch = ARCHITECTURES[spec.architecture]

    blocks = _highest(layers, "block_similarity", list(range(spec.num_layers)), block_drop)
    moe_left = [layer.layer for layer in spec.moe_layers if isinstance(layer, MoeLayerSpec) and layer.layer not in blocks]
    if layer_drop > len(moe_left):
        raise TrimError(f"layer_drop={layer_drop} but only {len(moe_left)} MoE sub-layers remain after block drop")
    sublayers = _highest(layers, "moe_similarity", moe_left, layer_drop)
    expert_layers = [layer for layer in moe_left if layer not in sublayers]
    experts = choose_expert_drop(layers, spec, expert_layers, expert_drop, scope)

    tensors = read_safetensors(model_folder)
    metadata = _metadata(model_folder)
    count_key = next((key for key in arch.experts_keys if config.get(key) is not None), arch.experts_keys[0])
    counts = [_expert_count(layer) for layer in spec.moe_layers]
    if isinstance(config.get(count_key), list):  # keep an earlier trim's -1 / 0 as written
        counts = [old if isinstance(layer, RemovedLayerSpec) else new
                  for layer, new, old in zip(spec.moe_layers, counts, config[count_key])]
    kept_ids = [list(layer.expert_ids) if isinstance(layer, MoeLayerSpec) else [] for layer in spec.moe_layers]
    for layer in sublayers:
        for name in [n for n in tensors if n.startswith(_moe_prefix(arch, layer))
                     or n.startswith(f"model.layers.{layer}.post_attention_layernorm.")]:
            tensors.pop(name)
        counts[layer], kept_ids[layer] = -1, []
    for layer, drop in experts.items():
        if drop:
            keep = _drop_experts(tensors, _moe_prefix(arch, layer), spec.moe_layers[layer].num_experts, drop)
            kept_ids[layer] = [kept_ids[layer][e] for e in keep]
            counts[layer] = len(keep)
    changed_experts = any(experts.values()) or bool(sublayers) or isinstance(config.get(count_key), list)
    if changed_experts:
        config[count_key] = counts
        config["layer_experts_idx"] = kept_ids

    mapping = _read_mapping(model_folder, spec.num_layers)
    kept_layers = [layer for layer in range(spec.num_layers) if layer not in blocks]
    if blocks:
        tensors = _renumber_layers(tensors, kept_layers)
        _config_after_block_drop(config, arch, kept_layers, spec.moe_layers, model_folder)

    record = {
        "source": str(model_folder.absolute()), "statistics": str(Path(stats_json).absolute()),
        "options": {"expert_drop": expert_drop, "scope": scope, "layer_drop": layer_drop, "block_drop": block_drop},
        "dropped_blocks": [mapping[layer] for layer in blocks],
        "dropped_moe_sublayers": [mapping[layer] for layer in sublayers],
        "dropped_experts": {str(mapping[layer]): [spec.moe_layers[layer].expert_ids[e] for e in drop]
                            for layer, drop in experts.items() if drop},
        "experts_before": _expert_total(spec.moe_layers),
    }
    with staged_folder(out_folder, force=force) as staging:
        for item in model_folder.iterdir():
            if item.is_file() and not (item.suffix == ".safetensors" or item.name in
                                       (SAFETENSORS_INDEX, "config.json", LAYER_MAPPING, RESERVED_LAYERS, TRIM_RECORD)):
                shutil.copy2(item, staging / item.name)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(staging / WEIGHTS), metadata=metadata)
        if blocks or (model_folder / LAYER_MAPPING).is_file():
            write_json(staging / LAYER_MAPPING, {str(new): mapping[old] for new, old in enumerate(kept_layers)})
        if sublayers or (model_folder / RESERVED_LAYERS).is_file():
            reserved = [mapping[layer] for layer in kept_layers if counts[layer] not in (-1, 0)]
            write_json(staging / RESERVED_LAYERS, reserved)
        try:
            result = load_checkpoint(staging)
        except LoadError as error:  # our own output must load; anything else is a bug worth seeing
            raise RuntimeError(f"trimmed checkpoint does not load: {error}") from error
        record["experts_after"] = _expert_total(result.spec.moe_layers)
        write_json(staging / TRIM_RECORD, record)
    report(f"trimmed: {record['experts_before']} -> {record['experts_after']} experts, "
           f"{len(sublayers)} MoE sub-layer(s) and {len(blocks)} block(s) dropped: {out_folder.absolute()}")
    return out_folder


def _metadata(folder: Path) -> dict | None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    with safe_open(str(files[0]), framework="pt") as handle:
        return handle.metadata()


def _read_mapping(folder: Path, num_layers: int) -> list[int]:
    """Current layer index -> original layer index (an earlier Block Drop's layer_mapping.json)."""
    path = folder / LAYER_MAPPING
    if not path.is_file():
        return list(range(num_layers))
    data = read_json(path, LAYER_MAPPING)
    try:
        return [int(data[str(layer)]) for layer in range(num_layers)]
    except (KeyError, TypeError, ValueError):
        raise LoadError(f"{path}: expected {{\"new index\": original index}} for each of {num_layers} layers") from None
