"""Tiny random models of each supported architecture, made and saved by transformers' own classes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, pad_token_id=0,
              bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)


def configs(**overrides) -> dict:
    """A tiny config of each architecture; `overrides` replace the common sizes (e.g. num_hidden_layers)."""
    from transformers import (DeepseekV2Config, MixtralConfig, OlmoeConfig, PhimoeConfig, Qwen2MoeConfig,
                              Qwen3MoeConfig)

    common = COMMON | overrides
    return {
        "olmoe": OlmoeConfig(**common, num_experts=8, num_experts_per_tok=4),
        "mixtral": MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2),
        "qwen2_moe": Qwen2MoeConfig(**common, num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=96, norm_topk_prob=False, decoder_sparse_step=1,
                                    mlp_only_layers=[1]),
        "qwen3_moe": Qwen3MoeConfig(**common, num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32,
                                    norm_topk_prob=True),
        "deepseek_v2": DeepseekV2Config(**(common | {"num_key_value_heads": 4}), n_routed_experts=8, num_experts_per_tok=4, moe_intermediate_size=32,
                                        n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
                                        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                                        routed_scaling_factor=1.5, topk_method="greedy"),
        "phimoe": PhimoeConfig(**common, num_local_experts=8, num_experts_per_tok=2),
    }


# The second wave: families whose routing or experts differ from OLMoE's (issue 14). Two layers,
# each family's own MoE options; every routing extra on (groups, renormalisation, scaling, shared
# experts, dense first layers) so that the tiny model exercises what the real ones use.
SECOND_WAVE = dict(num_hidden_layers=2)


def second_wave_configs(**overrides) -> dict:
    from transformers import (DeepseekV3Config, Dots1Config, FlexOlmoConfig, Glm4MoeConfig, GptOssConfig,
                              GraniteMoeConfig, HunYuanMoEV1Config, Llama4TextConfig, MiniMaxM2Config)

    common = COMMON | SECOND_WAVE | overrides
    return {
        "deepseek_v3": DeepseekV3Config(**(common | {"num_key_value_heads": 4}), n_routed_experts=8, num_experts_per_tok=4,
                                        moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                                        kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                        v_head_dim=16, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                        norm_topk_prob=True),
        "glm4_moe": Glm4MoeConfig(**common, n_routed_experts=8, num_experts_per_tok=4, moe_intermediate_size=32,
                                  n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                                  routed_scaling_factor=1.5, norm_topk_prob=True, head_dim=16, partial_rotary_factor=0.5,
                                  use_qk_norm=True),
        "dots1": Dots1Config(**common, n_routed_experts=8, num_experts_per_tok=4, moe_intermediate_size=32,
                             n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                             routed_scaling_factor=1.5, norm_topk_prob=True),
        "minimax_m2": MiniMaxM2Config(**common, num_local_experts=8, num_experts_per_tok=4, head_dim=16),
        "gpt_oss": GptOssConfig(**common, num_local_experts=8, num_experts_per_tok=4, head_dim=16, sliding_window=4,
                                swiglu_limit=1.0),
        "granitemoe": GraniteMoeConfig(**common, num_local_experts=8, num_experts_per_tok=2),
        "flex_olmo": FlexOlmoConfig(**common, num_experts=8, num_experts_per_tok=4),
        "hunyuan_v1_moe": HunYuanMoEV1Config(**common, num_experts=8, moe_topk=2, head_dim=16),
        "llama4_text": Llama4TextConfig(**common, num_local_experts=8, num_experts_per_tok=1, intermediate_size_mlp=96,
                                        interleave_moe_layer_step=1),
    }


def all_configs(**overrides) -> dict:
    return configs(**overrides) | second_wave_configs(**overrides)


def save_tiny(arch: str, folder: Path, seed: int = 0) -> Path:
    """A random tiny model of `arch`, made and saved by transformers' own class. Biases transformers
    initialises to zero (routing score biases, gpt-oss's expert biases) are drawn too."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(all_configs()[arch], attn_implementation="eager").eval()
    with torch.no_grad():
        for name, tensor in (*model.named_parameters(), *model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(0.1 * torch.randn_like(tensor))
            elif name.endswith(("gate_up_proj_bias", "down_proj_bias")):
                tensor.copy_(0.2 * torch.randn_like(tensor))
    model.save_pretrained(folder)
    return folder


def add_compressed_experts(folder: Path, n_ce: int | None = None, seed: int = 0) -> Path:
    """Turn a saved checkpoint into a CE checkpoint: use_ce / n_ce in config.json, `ces` tensors
    [E, 3, max(H, I)] in each MoE block (the CE reference code's name, under the block's module on
    disk, e.g. model.layers.{l}.mlp.ces)."""
    from ce_export import families

    config = json.loads((folder / "config.json").read_text())
    blocks = families.find_moe_blocks(families.meta_model(config))
    top_k = next(iter(blocks.values())).top_k
    config.update(use_ce=True, n_ce=n_ce or top_k // 2)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(folder / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    module = families.ARCHITECTURES[config["model_type"]].moe_module
    per_layer = next((config[k] for k in families.EXPERT_COUNT_KEYS if isinstance(config.get(k), list)), None)
    for layer, block in blocks.items():
        experts = block.num_experts if per_layer is None else per_layer[layer]  # trimmed: the layer's own count
        width = max(config["hidden_size"], block.intermediate_size)
        tensors[f"model.layers.{layer}.{module}.ces"] = 1 + 0.3 * torch.randn(experts, 3, width, generator=gen)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def drop_experts(folder: Path, keep: list) -> Path:
    """Expert and Layer Drop in the compression study's format: per layer a list of kept original
    expert ids (renumbered, router rows sliced), -1 for a dropped MoE sub-layer (its block and
    post-attention norm removed), or None for a dense layer left as it is; the config gets per-layer
    expert counts and `layer_experts_idx`. Works on any of our architectures' on-disk layouts."""
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    key = next(k for k in ("num_local_experts", "num_experts", "n_routed_experts") if isinstance(config.get(k), int))
    for layer, kept in enumerate(keep):
        if kept is None:
            continue
        router = next(n for n in tensors if n.startswith(f"model.layers.{layer}.") and n.endswith(".gate.weight")
                      and ".experts." not in n and "shared" not in n)
        block = router.removesuffix("gate.weight")
        if kept == -1:
            for name in [n for n in tensors if n.startswith(block) or n.startswith(f"model.layers.{layer}.post_attention_layernorm.")]:
                tensors.pop(name)
            continue
        tensors[router] = tensors[router][kept].clone()
        if block + "ces" in tensors:
            tensors[block + "ces"] = tensors[block + "ces"][kept].clone()
        experts = {n: tensors.pop(n) for n in [n for n in tensors if n.startswith(block + "experts.")]}
        for new, old in enumerate(kept):
            for name, tensor in experts.items():
                prefix = f"{block}experts.{old}."
                if name.startswith(prefix):
                    tensors[f"{block}experts.{new}." + name.removeprefix(prefix)] = tensor
    config[key] = [kept if kept in (None, -1) else len(kept) for kept in keep]
    config["layer_experts_idx"] = [list(kept) if isinstance(kept, list) else [] for kept in keep]
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def trim_experts(folder: Path, keep: dict[int, list[int]]) -> Path:
    """Expert drop (uneven, per layer: the kept original expert ids) on any family: transformers
    loads the checkpoint, every routed tensor of the MoE block (families.find_moe_blocks: router
    weight and bias, score bias, experts and their biases) is sliced to the kept experts, and
    transformers saves it in the family's on-disk layout; the config gets the compression study's
    per-layer expert counts and `layer_experts_idx`."""
    from transformers import AutoModelForCausalLM

    from ce_export import families

    lm = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    blocks = families.find_moe_blocks(lm)
    counts = [None] * lm.config.num_hidden_layers
    for layer, block in blocks.items():
        kept = keep.get(layer, list(range(block.num_experts)))
        counts[layer] = kept
        for name in block.routed_names():
            owner, _, attr = name.rpartition(".")
            module = lm.get_submodule(owner)
            tensor = getattr(module, attr)
            sliced = tensor.data[:, kept] if tensor.ndim == 2 and tensor.shape[0] == 1 else tensor.data[kept]
            if isinstance(tensor, torch.nn.Parameter):
                setattr(module, attr, torch.nn.Parameter(sliced.clone(), requires_grad=False))
            else:
                module.register_buffer(attr, sliced.clone())
    lm.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    key = next(k for k in families.EXPERT_COUNT_KEYS if isinstance(config.get(k), int))
    config[key] = [None if kept is None else len(kept) for kept in counts]
    config["layer_experts_idx"] = [kept or [] for kept in counts]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def drop_blocks(folder: Path, dropped: list[int]) -> Path:
    """Block Drop as the compression study stores it: whole decoder blocks removed, the rest
    renumbered, num_hidden_layers lowered, layer_mapping.json beside (new index -> original)."""
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    kept = [layer for layer in range(config["num_hidden_layers"]) if layer not in dropped]
    renamed = {}
    for name, tensor in tensors.items():
        if not name.startswith("model.layers."):
            renamed[name] = tensor
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        if int(layer) in kept:
            renamed[f"model.layers.{kept.index(int(layer))}.{rest}"] = tensor
    config["num_hidden_layers"] = len(kept)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "layer_mapping.json").write_text(json.dumps({str(new): old for new, old in enumerate(kept)}))
    save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
