"""Stage 2, capture: LoadedModel -> a torch module tree whose MoE blocks call `ce_export::moe`.

Everything but the MoE blocks' routing and routed experts is transformers' own implementation of
the architecture (attention, norms, rotary embeddings, KV cache, shared experts and their gates,
the block's own sums), so the captured model is faithful to it by construction. In each MoE block
(families.find_moe_blocks) the experts module becomes a MoeBlock, one call of the custom op that
routes too, and the router a DeferredRouter; with no data-dependent Python control flow left,
torch.export traces it with dynamic batch, sequence and past length. Blocks that do not call
router(h) then experts(h, index, weights) get an adapter here (Llama 4).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from ce_export import families
from ce_export import ops  # noqa: F401  (registers torch.ops.ce_export.moe)
from ce_export.spec import LAYER_DENSE, LAYER_MOE, LoadedModel, ModelSpec, MoeLayerSpec, MoeLayerWeights

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def frozen(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return None if tensor is None else nn.Parameter(tensor.clone(), requires_grad=False)


def quantized_input(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x, or x through FP8 fake quantization when a static activation scale is set (quantize.py, fp8-w8a8)."""
    return x if scale is None else torch.ops.ce_export.fake_quantize_fp8(x, scale)


class MoeBlock(nn.Module):
    """Router matmul + one `ce_export::moe` call: the routed part of a transformers MoE block.

    It takes the place of the block's experts module, and the block's router becomes a
    DeferredRouter: transformers' block keeps its own code around them (shared experts and their
    gates, residual sums, output format). Called as the experts are, `experts(h, index, weights)`,
    it ignores the (deferred) routing arguments and routes inside the op.
    """

    def __init__(self, spec: MoeLayerSpec, weights: MoeLayerWeights):
        super().__init__()
        self.spec = spec
        self.router = frozen(weights.router)
        self.router_bias = frozen(weights.router_bias)
        self.score_bias = frozen(weights.score_bias)
        self.gate_up = frozen(weights.gate_up)
        self.down = frozen(weights.down)
        self.gate_up_bias = frozen(weights.gate_up_bias)
        self.down_bias = frozen(weights.down_bias)
        self.ces = frozen(weights.ces)
        self.register_buffer("input_scale", None, persistent=False)  # set for FP8 activations (not the router's)

    def router_logits(self, flat: torch.Tensor) -> torch.Tensor:
        if self.spec.router_fp32:
            bias = None if self.router_bias is None else self.router_bias.float()
            return F.linear(flat.float(), self.router.float(), bias)
        return F.linear(flat, self.router, self.router_bias)

    def forward(self, hidden_states: torch.Tensor, top_k_index=None, top_k_weights=None) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        spec = self.spec
        out = torch.ops.ce_export.moe(
            quantized_input(flat, self.input_scale), self.router_logits(flat), self.gate_up, self.down, self.ces,
            spec.top_k, spec.n_ce, spec.norm_topk_prob, spec.routing, spec.routing_scale, spec.jitter_eps,
            self.score_bias, spec.n_group, spec.topk_group, self.gate_up_bias, self.down_bias, spec.activation,
            spec.swiglu_alpha, spec.swiglu_limit, spec.weights_on_input,
        )
        return out.reshape(hidden_states.shape)


class DeferredRouter(nn.Module):
    """Stands in for a transformers router whose routing now happens inside the MoE op (MoeBlock):
    the block's call `router(h, ...)` returns (None, None, None) for (logits, weights, index)."""

    def forward(self, *args, **kwargs):
        return None, None, None


def activation_sites(lm: nn.Module):
    """(name, module, kind) of every quantized GEMM's input, by the module whose input it is: each
    nn.Linear ("linear": attention projections, LM head, dense MLPs, shared experts) but scalar
    gates, and each MoE block ("moe_experts": the hidden input of the routed experts, not the router's)."""
    for name, module in lm.named_modules():
        if is_quantized_linear(module):
            yield name, module, "linear"
        elif isinstance(module, MoeBlock):
            yield name, module, "moe_experts"


def is_quantized_linear(module: nn.Module) -> bool:
    """An nn.Linear the quantization modes store quantized: all but scalar gates (out_features 1,
    e.g. Qwen2-MoE's shared-expert gate), which stay float like routers."""
    return isinstance(module, nn.Linear) and module.out_features > 1


class RemovedMoe(nn.Module):
    """A dropped MoE sub-layer: contributes nothing to the residual stream."""

    def __init__(self, returns_tuple: bool = False):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.returns_tuple else zeros


def hf_config_for(spec: ModelSpec):
    return families.transformers_config(spec.hf_config)


def build_torch_model(model: LoadedModel, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The captured causal LM (transformers' *ForCausalLM, each MoE block's router and experts
    replaced by one MoeBlock), in eval mode."""
    arch = families.ARCHITECTURES[model.spec.architecture]
    lm = families.meta_model(model.spec.hf_config)
    config = lm.config
    blocks = families.find_moe_blocks(lm)
    layers_path, _ = families.decoder_layers(lm)
    ours = set()  # parameter names of our modules (not in the checkpoint's dense tensors)
    for spec in model.spec.moe_layers:
        if spec.kind == LAYER_DENSE:
            continue
        layout = blocks[spec.layer]
        if spec.kind == LAYER_MOE:
            block = MoeBlock(spec, model.moe_weights[spec.layer])
            enter_block(lm, arch, layout, block)
            ours.update(f"{layout.experts}.{name}" for name, _ in block.named_parameters())
        else:
            replace_module(lm, layout.block, RemovedMoe(arch.block_returns_tuple))
            norm_name = f"{layers_path}.{spec.layer}.post_attention_layernorm"
            if f"{norm_name}.weight" not in model.dense_tensors:
                replace_module(lm, norm_name, nn.Identity())
    result = lm.load_state_dict(model.dense_tensors, strict=False, assign=True)
    missing = set(result.missing_keys) - ours
    if config.tie_word_embeddings:
        lm.lm_head.weight = lm.model.embed_tokens.weight
        missing.discard("lm_head.weight")
    if missing or result.unexpected_keys:
        raise RuntimeError(f"captured model does not match the loaded tensors: missing {sorted(missing)[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")
    lm = lm.to(dtype)
    keep_routing_in_fp32(lm, model, blocks)
    # Rotary frequencies stay fp32 (transformers computes the angles in fp32); casting them to
    # bf16 would shift every position's phase. Rebuilding also replaces the meta-device buffer.
    lm.model.rotary_emb = type(lm.model.rotary_emb)(config=config)
    if model.spec.architecture in COMPLEX_ROTARY:
        use_real_rotary(lm, model.spec.architecture)
    return lm.eval()


def keep_routing_in_fp32(lm: nn.Module, model: LoadedModel, blocks: dict) -> None:
    """As transformers keeps them (`_keep_in_fp32_modules_strict`): fp32 router weights where the
    router computes in fp32 (DeepSeek, GLM-4.5, dots1, HunYuan), and fp32 score biases."""
    for spec in model.spec.moe_layers:
        if spec.kind != LAYER_MOE:
            continue
        block, weights = lm.get_submodule(blocks[spec.layer].experts), model.moe_weights[spec.layer]
        if spec.router_fp32:
            block.router = frozen(weights.router.float())
            block.router_bias = frozen(None if weights.router_bias is None else weights.router_bias.float())
        if weights.score_bias is not None:
            block.score_bias = frozen(weights.score_bias.float())


def replace_module(lm: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(lm.get_submodule(parent), name, module)


def enter_block(lm: nn.Module, arch: families.Architecture, layout: families.MoeBlockLayout, block: MoeBlock) -> None:
    """Put `block` in the place of the transformers block's routed part; the rest stays transformers'."""
    transformers_block = lm.get_submodule(layout.block)
    replace_module(lm, layout.experts, block)
    if arch.block == families.LLAMA4:
        transformers_block.forward = types.MethodType(_llama4_block_forward, transformers_block)
        replace_module(lm, layout.router, nn.Identity())  # unused: routing is in the op
        return
    replace_module(lm, layout.router, DeferredRouter())
    if layout.score_bias is not None and not layout.score_bias.startswith(layout.router + "."):
        # A selection bias the block itself holds and hands to its router (MiniMax-M2): ours now.
        replace_tensor_with_none(lm, layout.score_bias)


def replace_tensor_with_none(lm: nn.Module, path: str) -> None:
    owner, _, name = path.rpartition(".")
    setattr(lm.get_submodule(owner), name, None)


def _llama4_block_forward(self, hidden_states):
    """Llama4TextMoe, with its routed experts one MoeBlock (sigmoid top-1 on the expert input)."""
    flat = hidden_states.reshape(-1, self.hidden_dim)
    return self.shared_expert(flat) + self.experts(flat), None


# Families whose attention rotates q/k with complex tensors, which ONNX cannot express: their
# modeling module and where the heads axis sits in q/k relative to the [B, S, d/2] frequencies.
COMPLEX_ROTARY = {
    "deepseek_v2": ("transformers.models.deepseek_v2.modeling_deepseek_v2", 1),  # q, k [B, heads, S, d]
    "llama4_text": ("transformers.models.llama4.modeling_llama4", 2),  # q, k [B, S, heads, d]
}


def use_real_rotary(lm: nn.Module, architecture: str) -> None:
    """Swap in the same rotation in real arithmetic: the rotary module returns (cos, sin) pairs and
    the attention's rotation function (patched at module level, and still delegating to the
    original for complex inputs, so stock models in the process are unaffected) applies them."""
    import importlib

    module_name, heads_axis = COMPLEX_ROTARY[architecture]
    modeling = importlib.import_module(module_name)
    original_rotary = type(lm.model.rotary_emb)

    class RealRotaryEmbedding(original_rotary):
        def forward(self, x, position_ids):
            freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
            return torch.stack([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling

    lm.model.rotary_emb.__class__ = RealRotaryEmbedding
    if not getattr(modeling.apply_rotary_emb, "handles_real", False):
        complex_rotation = modeling.apply_rotary_emb

        def apply_rotary_emb(xq, xk, freqs):
            if freqs.is_complex():
                return complex_rotation(xq, xk, freqs)
            cos, sin = (part.unsqueeze(heads_axis) for part in freqs.unbind(-1))  # heads axis of size 1

            def rotate(x):
                real, imag = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
                return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(3).type_as(x)

            return rotate(xq), rotate(xk)

        apply_rotary_emb.handles_real = True
        modeling.apply_rotary_emb = apply_rotary_emb


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
