"""The build folder as the field's clients read it: ONNX Runtime GenAI and Optimum.

Every build copies the checkpoint's config.json, generation_config.json and tokenizer files to the
folder root and writes genai_config.json from the manifest, so `og.Model(DIR)` and Optimum's
`ORTModelForCausalLM.from_pretrained(DIR)` load the folder as it is. Where a client cannot serve a
build, manifest.json's "clients" says why and no file pretending otherwise is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ce_export.errors import LoadError
from ce_export.io_schema import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    PAST_KEY,
    PAST_VALUE,
    POSITION_IDS,
    PRESENT_KEY,
    PRESENT_VALUE,
)
from ce_export.manifest import Manifest, ModelFacts

GENAI_CONFIG = "genai_config.json"
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")
# generation_config.json's sampling defaults that genai_config.json's "search" also has.
SEARCH_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
# Optimum (optimum-onnx 0.1.0, ORTModelForCausalLM) sizes the first, empty KV cache itself:
# [batch, heads, 0, hidden_size / num_attention_heads], where heads is num_key_value_heads only for
# the model types it lists as grouped-query (of ours, qwen3_moe) and num_attention_heads otherwise.
OPTIMUM_KV_HEADS_MODEL_TYPES = frozenset({"qwen3_moe"})
MLA_NOTE = ("DeepSeek-V2's multi-head latent attention caches the compressed latent [B, 1, P, kv_lora_rank] as "
            "the key and the rotary key [B, 1, P, qk_rope_head_dim] as the value")


def special_tokens(checkpoint: Path) -> dict:
    """bos / eos / pad token ids: generation_config.json's, else config.json's (None when neither has one)."""
    tokens = {name: None for name in SPECIAL_TOKENS}
    for name in CONFIG_FILES:  # config.json first, generation_config.json overrides
        data = read_optional_json(checkpoint / name)
        for key in SPECIAL_TOKENS:
            if data.get(key) is not None:
                tokens[key] = data[key]
    return tokens


def read_optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LoadError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path}: expected a JSON object")
    return data


def genai_support(model: ModelFacts, dtype: str) -> dict:
    """Whether onnxruntime-genai's "decoder" model type can run the build, and on what."""
    if model.key_dim != model.value_dim:
        return {"supported": False,
                "reason": f"{MLA_NOTE}; onnxruntime-genai allocates key and value caches of one head_size, so it "
                          "cannot hold them (use `generate --runtime ort`, ONNX Runtime directly, or TensorRT)"}
    if dtype == "bf16":
        return {"supported": True, "provider": "cuda",
                "notes": ["bf16: ONNX Runtime's CPU provider has no bf16 kernels, so genai_config.json names the "
                          "CUDA provider (onnxruntime-genai-cuda); not run here (no GPU)"]}
    return {"supported": True, "provider": "cpu"}


def optimum_support(model: ModelFacts, model_type: str, dtype: str, quantized: bool) -> dict:
    """Whether Optimum's ORTModelForCausalLM (optimum-onnx 0.1.0) feeds this build's KV cache the right shape."""
    if model.key_dim != model.value_dim:
        return {"supported": False, "reason": f"{MLA_NOTE}; Optimum sizes both like an ordinary key / value cache"}
    heads = model.kv_heads if model_type in OPTIMUM_KV_HEADS_MODEL_TYPES else model.num_attention_heads
    head_size = model.hidden_size // model.num_attention_heads
    if (heads, head_size) != (model.kv_heads, model.key_dim):
        return {"supported": False,
                "reason": f"Optimum sizes the empty KV cache of a {model_type} model as [batch, {heads}, 0, {head_size}] "
                          f"(num_key_value_heads only for the model types it knows as grouped-query); this model's "
                          f"cache is [batch, {model.kv_heads}, past, {model.key_dim}]"}
    if dtype == "bf16":
        return {"supported": False, "reason": "bf16 on CPU: ONNX Runtime's CPU provider has no bf16 kernels "
                                              "(on a GPU provider: not tested here)"}
    notes = []
    if quantized:
        notes.append("pass session_options with session.disable_quant_qdq=1 (as genai_config.json does): by default "
                     "ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits, which also quantizes activations")
    return {"supported": True, **({"notes": notes} if notes else {})}




def genai_config(manifest: Manifest, tokens: dict, generation: dict, provider: str) -> dict:
    """onnxruntime-genai's "decoder" model over our I/O names; the graph concatenates the cache itself,
    so past and present are separate buffers (past_present_share_buffer false)."""
    model, onnx = manifest.model, manifest.onnx
    session_options = {"log_id": "onnxruntime-genai", "provider_options": [] if provider == "cpu" else [{provider: {}}]}
    if manifest.quantization is not None:
        # Run the Q/DQ nodes as written (verify does the same): ONNX Runtime would otherwise fuse
        # DequantizeLinear + MatMul into MatMulNBits, which also quantizes the activations.
        session_options["session.disable_quant_qdq"] = "1"
    context = onnx.limits.max_context
    decoder = {
        "filename": onnx.file,
        "session_options": session_options,
        "head_size": model.key_dim,
        "hidden_size": model.hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.kv_heads,
        "num_hidden_layers": model.num_layers,
        "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK, "position_ids": POSITION_IDS,
                   "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE},
        "outputs": {"logits": LOGITS, "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
    }
    search = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "min_length": 0, "max_length": context,
              "past_present_share_buffer": False}
    search.update({key: generation[key] for key in SEARCH_KEYS if generation.get(key) is not None})
    config_model = {"type": "decoder", "vocab_size": model.vocab_size, "context_length": context, "decoder": decoder}
    config_model.update({key: value for key, value in tokens.items() if value is not None})
    return {"model": config_model, "search": search}


def write_client_files(folder: Path, checkpoint: Path, manifest: Manifest) -> dict:
    """Copy the checkpoint's config, generation config and tokenizer files to `folder`, write
    genai_config.json where onnxruntime-genai can serve the build, and return manifest.json's
    "clients": what each client can do with the build and the files written for them."""
    model, dtype = manifest.model, manifest.dtype
    tokens = special_tokens(checkpoint)
    generation = read_optional_json(checkpoint / "generation_config.json")
    genai = genai_support(model, dtype)
    optimum = optimum_support(model, model.architecture, dtype, manifest.quantization is not None)
    written = []
    for name in CONFIG_FILES + TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, folder / name)
            written.append(name)
    if genai["supported"]:
        if tokens["eos_token_id"] is None:
            # onnxruntime-genai has no "no EOS": without one it ends generation at the pad token.
            genai.setdefault("notes", []).append(
                f"the checkpoint names no eos_token_id: onnxruntime-genai then ends generation at the pad token "
                f"({tokens['pad_token_id'] if tokens['pad_token_id'] is not None else 0})")
        config = genai_config(manifest, tokens, generation, genai["provider"])
        (folder / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        written.append(GENAI_CONFIG)
    return {"onnxruntime_genai": genai, "optimum": optimum, "files": written}
