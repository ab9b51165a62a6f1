"""Stage 2, capture: LoadedModel -> a torch module tree whose MoE blocks call `ce_export::moe`.

Everything but the MoE blocks is transformers' own implementation of the architecture (attention,
norms, rotary embeddings, KV cache), so the captured model is faithful to it by construction. Each
MoE block becomes one call of the custom op, with no data-dependent Python control flow, so
torch.export traces it with dynamic batch, sequence and past length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from ce_export import ops  # noqa: F401  (registers torch.ops.ce_export.moe)
from ce_export.spec import LAYER_MOE, LoadedModel, MoeLayerSpec, MoeLayerWeights

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class MoeBlock(nn.Module):
    """Router matmul + one `ce_export::moe` call; replaces a transformers sparse MoE block."""

    def __init__(self, spec: MoeLayerSpec, weights: MoeLayerWeights):
        super().__init__()
        self.spec = spec
        self.router = nn.Parameter(weights.router.clone(), requires_grad=False)
        self.gate_up = nn.Parameter(weights.gate_up.clone(), requires_grad=False)
        self.down = nn.Parameter(weights.down.clone(), requires_grad=False)
        ces = None if weights.ces is None else nn.Parameter(weights.ces.clone(), requires_grad=False)
        self.ces = ces

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        router_logits = F.linear(flat, self.router)
        out = torch.ops.ce_export.moe(
            flat, router_logits, self.gate_up, self.down, self.ces,
            self.spec.top_k, self.spec.n_ce, self.spec.norm_topk_prob,
        )
        return out.reshape(hidden_states.shape)


class RemovedMoe(nn.Module):
    """A dropped MoE sub-layer: contributes nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def hf_config_for(model: LoadedModel):
    from transformers import AutoConfig

    config = dict(model.spec.hf_config)
    counts = [layer.num_experts for layer in model.spec.moe_layers if layer.kind == LAYER_MOE]
    # transformers' config takes one expert count; our blocks carry their own per-layer counts.
    config["num_experts"] = max(counts, default=1)
    for key in ("use_ce", "n_ce", "bottom_k", "layer_experts_idx"):
        config.pop(key, None)
    hf_config = AutoConfig.for_model(**config)
    hf_config._attn_implementation = "eager"
    return hf_config


def build_torch_model(model: LoadedModel, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The captured causal LM (a transformers *ForCausalLM with our MoE blocks), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = hf_config_for(model)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    moe_param_names = set()
    for spec in model.spec.moe_layers:
        decoder_layer = lm.model.layers[spec.layer]
        if spec.kind == LAYER_MOE:
            decoder_layer.mlp = MoeBlock(spec, model.moe_weights[spec.layer])
        else:
            decoder_layer.mlp = RemovedMoe()
            norm_name = f"model.layers.{spec.layer}.post_attention_layernorm.weight"
            if norm_name not in model.dense_tensors:
                decoder_layer.post_attention_layernorm = nn.Identity()
        moe_param_names.update(f"model.layers.{spec.layer}.mlp.{name}" for name, _ in decoder_layer.mlp.named_parameters())
    result = lm.load_state_dict(model.dense_tensors, strict=False, assign=True)
    missing = set(result.missing_keys) - moe_param_names
    if config.tie_word_embeddings:
        lm.lm_head.weight = lm.model.embed_tokens.weight
        missing.discard("lm_head.weight")
    if missing or result.unexpected_keys:
        raise RuntimeError(f"captured model does not match the loaded tensors: missing {sorted(missing)[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")
    lm = lm.to(dtype)
    # Rotary frequencies stay fp32 (transformers computes the angles in fp32); casting them to
    # bf16 would shift every position's phase. Rebuilding also replaces the meta-device buffer.
    lm.model.rotary_emb = type(lm.model.rotary_emb)(config=config)
    return lm.eval()


def flatten_cache(cache: DynamicCache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


class KvCacheDecoder(nn.Module):
    """Flat-tensor interface of the causal LM for export: one graph for prefill and decode.

    inputs  input_ids [B, S], attention_mask [B, P+S], position_ids [B, S], past K/V [B, h, P, d] x 2L
    outputs logits [B, S, V], present K/V [B, h, P+S, d] x 2L
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: tuple[torch.Tensor, ...]):
        cache = DynamicCache(
            ddp_cache_data=[(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(len(past_key_values) // 2)],
        )
        out = self.lm(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True,
        )
        return (out.logits, *flatten_cache(out.past_key_values))


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Optimum / ONNX Runtime GenAI naming."""
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def empty_past(model: LoadedModel, batch: int, past: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    spec = model.spec
    shape = (batch, spec.num_key_value_heads, past, spec.head_dim)
    return tuple(torch.zeros(shape, dtype=dtype) for _ in range(2 * spec.num_layers))
