"""The embedded default model: a small CE-OLMoE with random weights, deterministic from a seed.

It is written in the on-disk format of the CE reference code (transformers' save_pretrained
layout, per-expert tensors, `use_ce` / `n_ce` in config.json, `mlp.ces` [E, 3, H] per layer), so
the demo goes through exactly the loading path a real checkpoint does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ce_export.artifacts import staged_folder, writing

DEMO_NAME = "demo"
DEMO_SEED = 1234

DEMO_CONFIG = {
    "architectures": ["OlmoeForCausalLM"],
    "model_type": "olmoe",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_experts": 8,
    "num_experts_per_tok": 4,
    "norm_topk_prob": False,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "attention_bias": False,
    "clip_qkv": None,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": None,
    "eos_token_id": None,
    "dtype": "float32",
    # Random tiny models decode greedily into one repeated token with the usual 0.02; a wider
    # init keeps generated sequences varied, which makes token-equality checks meaningful.
    "initializer_range": 0.2,
}
DEMO_N_CE = 2


def demo_config(compressed: bool = True) -> dict:
    config = dict(DEMO_CONFIG)
    config["use_ce"] = compressed
    if compressed:
        config["n_ce"] = DEMO_N_CE
    return config


def demo_tensors(config: dict, seed: int = DEMO_SEED, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of an OLMoE-layout checkpoint of `config`'s sizes, by its on-disk name, on the CPU.

    `device` is where the numbers are drawn (a GPU draws billions of them in seconds; the values
    then differ from a CPU draw of the same seed), `dtype` how they are stored.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    std = config["initializer_range"]
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, experts = config["num_attention_heads"], config["num_experts"]
    head_dim = hidden // heads

    def normal(*shape, scale=std):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype).cpu().contiguous()

    def norm_weight(size):
        return (1.0 + normal(size, scale=0.1)).to(dtype).contiguous()

    tensors = {
        "model.embed_tokens.weight": normal(config["vocab_size"], hidden, scale=1.0),
        "model.norm.weight": norm_weight(hidden),
        "lm_head.weight": normal(config["vocab_size"], hidden),
    }
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{p}self_attn.{proj}.weight"] = normal(hidden, hidden)
        tensors[f"{p}self_attn.q_norm.weight"] = norm_weight(heads * head_dim)
        tensors[f"{p}self_attn.k_norm.weight"] = norm_weight(heads * head_dim)
        tensors[f"{p}input_layernorm.weight"] = norm_weight(hidden)
        tensors[f"{p}post_attention_layernorm.weight"] = norm_weight(hidden)
        tensors[f"{p}mlp.gate.weight"] = normal(experts, hidden)
        for expert in range(experts):
            e = f"{p}mlp.experts.{expert}."
            tensors[e + "gate_proj.weight"] = normal(inter, hidden)
            tensors[e + "up_proj.weight"] = normal(inter, hidden)
            tensors[e + "down_proj.weight"] = normal(hidden, inter)
        # Drawn for plain models too, so the CE and plain demos share every other weight.
        ces = (1.0 + normal(experts, 3, hidden, scale=0.3)).to(dtype)
        if config.get("use_ce"):
            tensors[f"{p}mlp.ces"] = ces
    return tensors


def write_demo_checkpoint(out: str | Path, compressed: bool = True, force: bool = False, seed: int = DEMO_SEED) -> Path:
    config = demo_config(compressed)
    with staged_folder(out, force=force) as staging:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tensors = demo_tensors(config, seed)
        with writing(staging / "model.safetensors", sum(t.nbytes for t in tensors.values())):
            save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    return Path(out)
