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
from ce_export.spec import LAYER_DENSE, LAYER_MOE, LoadedModel, ModelSpec, MoeLayerSpec, MoeLayerWeights

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def frozen(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return None if tensor is None else nn.Parameter(tensor.clone(), requires_grad=False)


def quantized_input(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x, or x through FP8 fake quantization when a static activation scale is set (quantize.py, fp8-w8a8)."""
    return x if scale is None else torch.ops.ce_export.fake_quantize_fp8(x, scale)


class SharedExpert(nn.Module):
    """An always-on SwiGLU expert beside the routed ones, optionally gated by sigmoid(h @ g)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, gate: torch.Tensor | None):
        super().__init__()
        self.gate_up, self.down, self.gate = frozen(gate_up), frozen(down), frozen(gate)
        self.register_buffer("input_scale", None, persistent=False)  # set for FP8 activations

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(quantized_input(flat, self.input_scale), self.gate_up).chunk(2, dim=-1)
        out = F.linear(F.silu(gate) * up, self.down)
        if self.gate is not None:
            out = out * torch.sigmoid(F.linear(flat, self.gate))
        return out


class MoeBlock(nn.Module):
    """Router matmul + one `ce_export::moe` call (+ shared expert); replaces a transformers MoE block."""

    def __init__(self, spec: MoeLayerSpec, weights: MoeLayerWeights):
        super().__init__()
        self.spec = spec
        self.router = frozen(weights.router)
        self.gate_up = frozen(weights.gate_up)
        self.down = frozen(weights.down)
        self.ces = frozen(weights.ces)
        self.shared = None
        if weights.shared_gate_up is not None:
            self.shared = SharedExpert(weights.shared_gate_up, weights.shared_down, weights.shared_gate)
        self.register_buffer("input_scale", None, persistent=False)  # set for FP8 activations (not the router's)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        spec = self.spec
        if spec.router_fp32:
            router_logits = F.linear(flat.float(), self.router.float())
        else:
            router_logits = F.linear(flat, self.router)
        out = torch.ops.ce_export.moe(
            quantized_input(flat, self.input_scale), router_logits, self.gate_up, self.down, self.ces,
            spec.top_k, spec.n_ce, spec.norm_topk_prob, spec.routing, spec.routing_scale, spec.jitter_eps,
        )
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.reshape(hidden_states.shape)


def activation_sites(lm: nn.Module):
    """(name, module, kind) of every quantized GEMM's input, by the module whose input it is: each
    nn.Linear ("linear": attention projections, LM head, dense MLPs), each MoE block ("moe_experts":
    the hidden input of the routed experts, not the router's) and each shared expert."""
    for name, module in lm.named_modules():
        if isinstance(module, nn.Linear):
            yield name, module, "linear"
        elif isinstance(module, MoeBlock):
            yield name, module, "moe_experts"
        elif isinstance(module, SharedExpert):
            yield name, module, "shared_expert"


class RemovedMoe(nn.Module):
    """A dropped MoE sub-layer: contributes nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def hf_config_for(spec: ModelSpec):
    from transformers import AutoConfig

    from ce_export.checkpoint_check import transformers_config_dict
    from ce_export.load import ARCHITECTURES

    counts = [layer.num_experts for layer in spec.moe_layers if layer.kind == LAYER_MOE]
    config = transformers_config_dict(spec.hf_config, ARCHITECTURES[spec.architecture].experts_keys,
                                      max(counts, default=2))
    hf_config = AutoConfig.for_model(**config)
    hf_config._attn_implementation = "eager"
    return hf_config


def build_torch_model(model: LoadedModel, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The captured causal LM (a transformers *ForCausalLM with our MoE blocks), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = hf_config_for(model.spec)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    moe_param_names = set()
    for spec in model.spec.moe_layers:
        decoder_layer = lm.model.layers[spec.layer]
        if spec.kind == LAYER_DENSE:
            continue
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
    if model.spec.architecture == "deepseek_v2":
        use_real_rotary_for_deepseek(lm)
    return lm.eval()


def use_real_rotary_for_deepseek(lm: nn.Module) -> None:
    """transformers' DeepSeek-V2 rotates q/k with complex tensors, which ONNX cannot express.

    Swap in the same rotation in real arithmetic: the rotary module returns (cos, sin) pairs and
    the attention's rotation function (patched at module level, and still delegating to the
    original for complex inputs, so stock models in the process are unaffected) applies them.
    """
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as deepseek

    original_rotary = type(lm.model.rotary_emb)

    class RealRotaryEmbedding(original_rotary):
        def forward(self, x, position_ids):
            freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
            return torch.stack([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling

    rotary = lm.model.rotary_emb
    rotary.__class__ = RealRotaryEmbedding
    if not getattr(deepseek.apply_rotary_emb, "handles_real", False):
        complex_rotation = deepseek.apply_rotary_emb

        def apply_rotary_emb(xq, xk, freqs):
            if freqs.is_complex():
                return complex_rotation(xq, xk, freqs)
            cos, sin = (part.unsqueeze(1) for part in freqs.unbind(-1))  # [B, 1, S, d/2]

            def rotate(x):
                real, imag = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
                return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(3).type_as(x)

            return rotate(xq), rotate(xk)

        apply_rotary_emb.handles_real = True
        deepseek.apply_rotary_emb = apply_rotary_emb


def flatten_cache(cache: DynamicCache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


LOGITS = ("all", "last")  # logits of every position, or of the last one only (what generation uses)


class KvCacheDecoder(nn.Module):
    """Flat-tensor interface of the causal LM for export: one graph for prefill and decode.

    inputs  input_ids [B, S], attention_mask [B, P+S], position_ids [B, S], past K/V [B, h, P, d] x 2L
    outputs logits [B, S, V] (or [B, 1, V] with logits="last"), present K/V [B, h, P+S, d] x 2L
    """

    def __init__(self, lm: nn.Module, logits: str = "all"):
        super().__init__()
        if logits not in LOGITS:
            raise ValueError(f"logits={logits!r} (choose from {', '.join(LOGITS)})")
        self.lm = lm
        self.logits_to_keep = 1 if logits == "last" else 0  # transformers: 0 keeps every position

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: tuple[torch.Tensor, ...]):
        cache = DynamicCache(
            ddp_cache_data=[(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(len(past_key_values) // 2)],
        )
        out = self.lm(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True, logits_to_keep=self.logits_to_keep,
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


def empty_past(spec: ModelSpec, batch: int, past: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(torch.zeros(shape, dtype=dtype) for shape in spec.past_shapes(batch, past))
