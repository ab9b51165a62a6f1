"""Checkpoint folders in the layouts users bring, written from the demo model's tensors (the trained
ones; `demo_resized`: random weights of other sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ce_export.demo import demo_config, demo_tensors, trained_tensors


def write(folder: Path, config: dict, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    names = sorted(tensors)
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name].contiguous() for name in names[shard::shards]}
        save_file(part, str(folder / file))
        weight_map.update({name: file for name in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def fused_expert_tensors(config: dict, tensors: dict) -> dict:
    """Per-expert tensors -> transformers 5's fused 3-D gate_up_proj [E, 2I, H] / down_proj [E, H, I]."""
    fused = dict(tensors)
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts."
        gates, ups, downs = [], [], []
        for expert in range(config["num_experts"]):
            gates.append(fused.pop(f"{p}{expert}.gate_proj.weight"))
            ups.append(fused.pop(f"{p}{expert}.up_proj.weight"))
            downs.append(fused.pop(f"{p}{expert}.down_proj.weight"))
        fused[p + "gate_up_proj"] = torch.cat([torch.stack(gates), torch.stack(ups)], dim=1)
        fused[p + "down_proj"] = torch.stack(downs)
    return fused


def trimmed(config: dict, tensors: dict, keep: list) -> tuple[dict, dict]:
    """The compression study's expert-drop format: per layer a list of kept original expert ids,
    or -1 for a dropped MoE sub-layer (its post-attention norm removed too)."""
    config = dict(config)
    out = dict(tensors)
    counts, kept_ids = [], []
    for layer, kept in enumerate(keep):
        p = f"model.layers.{layer}."
        experts = [name for name in out if name.startswith(p + "mlp.")]
        old = {name: out.pop(name) for name in experts}
        if kept == -1:
            out.pop(p + "post_attention_layernorm.weight")
            counts.append(-1)
            kept_ids.append([])
            continue
        counts.append(len(kept))
        kept_ids.append(list(kept))
        out[p + "mlp.gate.weight"] = old[p + "mlp.gate.weight"][kept].clone()
        if p + "mlp.ces" in old:
            out[p + "mlp.ces"] = old[p + "mlp.ces"][kept].clone()
        for new_id, old_id in enumerate(kept):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[f"{p}mlp.experts.{new_id}.{proj}.weight"] = old[f"{p}mlp.experts.{old_id}.{proj}.weight"]
    config["num_experts"] = counts
    config["layer_experts_idx"] = kept_ids
    return config, out


def demo_variant(folder: Path, compressed: bool = True, layout: str = "per_expert", shards: int = 1, keep=None) -> Path:
    config = demo_config(compressed)
    tensors = trained_tensors(compressed)
    if keep is not None:
        config, tensors = trimmed(config, tensors, keep)
    if layout == "fused":
        tensors = fused_expert_tensors(config, tensors)
    return write(folder, config, tensors, shards)


TRT_LIMITS = {"max_batch": 4, "max_seq": 64, "max_context": 128}


def trt_demo(tmp_path_factory) -> Path:
    """`build demo --target trt` (no parity check, small limits), once per session (cached on disk)."""
    from ce_export import pipeline
    from ce_export.artifacts import MANIFEST

    folder = tmp_path_factory.getbasetemp() / "trt_demo"
    if not (folder / MANIFEST).is_file():
        pipeline.build("demo", folder, pipeline.BuildOptions(target="trt", verify=False, **TRT_LIMITS),
                       report=lambda line: None)
    return folder


def demo_resized(folder: Path, compressed: bool = True, **sizes) -> Path:
    """The demo model with other sizes, e.g. intermediate_size=128 so that every quantized GEMM's
    input size is a multiple of 128 (int4-g128); the weights are drawn as the demo's are."""
    config = demo_config(compressed) | sizes
    return write(folder, config, demo_tensors(config))


# The smallest CE model the pipeline takes (2 layers, hidden 32, 4 experts, top-2 with 1 compressed):
# for tests that build often (fault injection, fuzzing).
TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2, "n_ce": 1}
TINY_LIMITS = ("--max-batch", "2", "--max-seq", "8", "--max-context", "16")


def tiny_checkpoint(folder: Path) -> Path:
    config = demo_config(True) | TINY
    return write(folder, config, demo_tensors(config))
