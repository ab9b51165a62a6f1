"""The embedded default model: a small CE-OLMoE trained on this package's synthetic task language.

Two checkpoints ship with the package (weights/, fp16, written out as fp32): the plain top-4 MoE
and its Compressed-Experts fine-tune (n_ce = 2: 2 main experts run, 2 compressed), both trained on
the CPU by `python -m ce_export.demo.training` (weights/training.json records the command, the
machine, the time and the accuracy). They are written in the on-disk format of the CE reference
code (transformers' save_pretrained layout, per-expert tensors, `use_ce` / `n_ce` in config.json,
`mlp.ces` [E, 3, H] per layer), so the demo goes through exactly the loading path a real
checkpoint does, with a byte-level tokenizer (tokenizer.json), generation_config.json (a newline
ends an answer) and task.json: held-out problems of the language, which every build's quality
report measures (ce_export/task.py).

`demo_tensors` draws random weights of the demo's layout (or any other sizes) from a seed: test
and benchmark models whose numbers do not matter.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ce_export.artifacts import staged_folder, writing

DEMO_NAME = "demo"
DEMO_SEED = 1234  # random weights (demo_tensors)
WEIGHTS = Path(__file__).with_name("weights")
TRAINING_RECORD = "training.json"
TASK_SEED = 20261205  # the held-out problems and the calibration text of task.json
TASK_PROBLEMS_PER_KIND = 100
TASK_CALIBRATION_LINES = 2000

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
    "eos_token_id": 10,  # the newline that ends every answer (language.STOP)
    "dtype": "float32",
    # demo_tensors' scale: random tiny models decode greedily into one repeated token with the
    # usual 0.02; a wider init keeps generated sequences varied (token-equality checks mean something).
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


def weights_file(compressed: bool, weights: Path = WEIGHTS) -> Path:
    return Path(weights) / ("ce.safetensors" if compressed else "plain.safetensors")


def trained_tensors(compressed: bool = True, weights: Path = WEIGHTS) -> dict[str, torch.Tensor]:
    """The trained demo's tensors by on-disk name, as fp32."""
    from safetensors.torch import load_file

    return {name: tensor.float().contiguous() for name, tensor in load_file(weights_file(compressed, weights)).items()}


def demo_task():
    """task.json's content: the demo language's held-out problems and calibration text."""
    from ce_export.demo import language
    from ce_export.task import Task

    return Task(name="ce_export demo language", description=language.__doc__.strip().splitlines()[0],
                stop=language.STOP, calibration=language.text(TASK_SEED, TASK_CALIBRATION_LINES),
                held_out=[p.to_json() for p in language.evaluation_set(TASK_SEED, TASK_PROBLEMS_PER_KIND)])


def write_demo_checkpoint(out: str | Path, compressed: bool = True, force: bool = False,
                          weights: Path = WEIGHTS) -> Path:
    """The trained demo (CE, or the plain top-4 MoE it was fine-tuned from) as a checkpoint folder."""
    from ce_export.demo import language
    from ce_export.task import write_task

    config = demo_config(compressed)
    with staged_folder(out, force=force) as staging:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"do_sample": False, "eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tensors = trained_tensors(compressed, weights)
        with writing(staging / "model.safetensors", sum(t.nbytes for t in tensors.values())):
            save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        language.write_tokenizer(staging)
        write_task(staging, demo_task())
    return Path(out)
