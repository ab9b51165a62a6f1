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

import inspect
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from ce_export import families
from ce_export import ops  # noqa: F401  (registers torch.ops.ce_export.moe)
from ce_export.spec import DenseLayerSpec, LoadedModel, ModelSpec, MoeLayerSpec, MoeLayerWeights


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


# MoeLayerWeights / load.MoeLayerSource fields: MoeBlock's parameters of the same names
MOE_PARAMETERS = ("router", "router_bias", "score_bias", "gate_up", "down", "gate_up_bias", "down_bias", "ces")
ROUTED_EXPERT_PARAMETERS = ("gate_up", "down")
EXACT_UPCASTS = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}

WeightTransform = Callable[[str, nn.Module, torch.Tensor], torch.Tensor]


def parameter_sources(model: LoadedModel) -> dict:
    """Every parameter of the captured model, by its name there, and the stored tensor (load.StoredTensor)
    it is read from."""
    sources = dict(model.dense_tensors.stored)
    if "lm_head.weight" not in sources:  # tied to the embedding (the checkpoint stores it once)
        embedding = next((name for name in sources if name.endswith("embed_tokens.weight")), None)
        if embedding is not None:
            sources["lm_head.weight"] = sources[embedding]
    for source in model.moe_weights.sources.values():
        for name, stored in source.items():
            sources[f"{source.experts}.{name}"] = stored  # the MoeBlock's parameter of the same name
    return sources


def build_torch_model(model: LoadedModel, dtype: torch.dtype = torch.float32, *, weights: WeightTransform | None = None,
                      keep_expert_dtype: bool = False, progress: bool = False) -> nn.Module:
    """The captured causal LM (transformers' *ForCausalLM, each MoE block's router and experts
    replaced by one MoeBlock), in eval mode, computing in `dtype`.

    The weights are read one tensor at a time, each converted as it arrives, so building never
    holds more than the finished model and one tensor. `weights(name, module, tensor)` may first
    replace each tensor as read (e.g. by the values an artifact stores: rounded, quantized).
    keep_expert_dtype: the routed experts' weights stay in their own dtype when `dtype` holds it
    exactly (bf16 or fp16 in an fp32 model) and are upcast one expert at a time inside the op
    (moe_math), which computes exactly what an upcast copy of the whole layer would; so does an
    untied input embedding, whose looked-up rows are upcast (the same values as an upcast table).
    progress: a progress bar over the bytes read (progress.progress_bar).
    """
    from ce_export.progress import progress_bar

    lm = _captured_skeleton(model)
    embedding = lm.get_input_embeddings() if keep_expert_dtype and not lm.config.tie_word_embeddings else None
    slots = list(_parameter_slots(lm, model))
    bar = progress_bar(total=sum(stored.nbytes for *_, stored in slots), unit="B", unit_scale=True,
                       unit_divisor=1024, desc="  reading weights", disable=not progress)
    for name, module, attribute, stored in slots:
        bar.update(stored.nbytes)
        tensor = stored.read()
        if weights is not None:
            tensor = weights(name, module, tensor)
        kept = keep_expert_dtype and (_is_routed_expert(module, attribute) or module is embedding)
        if not (kept and (tensor.dtype, dtype) in EXACT_UPCASTS):
            tensor = tensor.to(parameter_dtype(module, attribute, dtype))
        _assign(module, attribute, tensor)
        del tensor
    bar.close()
    if embedding is not None and embedding.weight.dtype != dtype:
        embedding.register_forward_hook(lambda module, args, output: output.to(dtype))
    return _finish(lm, model, dtype)


def build_traced_model(model: LoadedModel, dtype: torch.dtype, separate_head: bool = False) -> nn.Module:
    """The captured model with fake weights (FakeTensor parameters of the right shapes and dtype, no
    data), for torch.export: the graph is traced without reading the checkpoint. `lm.fake_mode` is
    the FakeTensorMode its sample inputs must be created in. separate_head: a tied LM head gets a
    parameter of its own (quantized weights: the head is quantized, the embedding is not)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    lm = _captured_skeleton(model)
    for _, module, attribute, stored in _parameter_slots(lm, model):
        with fake_mode:
            tensor = torch.empty(stored.shape, dtype=parameter_dtype(module, attribute, dtype))
        _assign(module, attribute, tensor)
    lm = _finish(lm, model, dtype)
    if separate_head and lm.config.tie_word_embeddings:
        with fake_mode:
            lm.lm_head.weight = nn.Parameter(torch.empty_like(lm.lm_head.weight), requires_grad=False)
    lm.fake_mode = fake_mode
    return lm


def _is_routed_expert(module: nn.Module, attribute: str) -> bool:
    return isinstance(module, MoeBlock) and attribute in ROUTED_EXPERT_PARAMETERS


def parameter_dtype(module: nn.Module, attribute: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of `module`'s parameter `attribute` in a model of `dtype` (the captured model and the
    artifact alike): `dtype`, but fp32 as transformers keeps them (`_keep_in_fp32_modules_strict`): router weights
    where the router computes in fp32 (DeepSeek, GLM-4.5, dots1, HunYuan), and score biases."""
    if isinstance(module, MoeBlock) and (
            attribute == "score_bias" or (module.spec.router_fp32 and attribute in ("router", "router_bias"))):
        return torch.float32
    return dtype


def _captured_skeleton(model: LoadedModel) -> nn.Module:
    """transformers' model for the spec on the meta device, our MoE blocks in place (meta weights)."""
    arch = families.ARCHITECTURES[model.spec.architecture]
    lm = families.meta_model(model.spec.hf_config)
    blocks = families.find_moe_blocks(lm)
    layers_path, _ = families.decoder_layers(lm)
    with torch.device("meta"):
        for spec in model.spec.moe_layers:
            if isinstance(spec, DenseLayerSpec):
                continue
            layout = blocks[spec.layer]
            if isinstance(spec, MoeLayerSpec):
                source = model.moe_weights.sources[spec.layer]
                meta = MoeLayerWeights(**{name: None for name in MOE_PARAMETERS} | {
                    name: stored.meta() for name, stored in source.items()})
                enter_block(lm, arch, layout, MoeBlock(spec, meta))
            else:
                replace_module(lm, layout.block, RemovedMoe(arch.block_returns_tuple))
                norm_name = f"{layers_path}.{spec.layer}.post_attention_layernorm"
                if f"{norm_name}.weight" not in model.dense_tensors:
                    replace_module(lm, norm_name, nn.Identity())
    return lm


def _parameter_slots(lm: nn.Module, model: LoadedModel):
    """(name, owning module, attribute, stored tensor) of every weight of `lm` (tied ones once)."""
    sources = parameter_sources(model)
    names = list(dict.fromkeys(lm.state_dict(keep_vars=True)))
    tied = lm.config.tie_word_embeddings
    if tied and "lm_head.weight" in names:
        names.remove("lm_head.weight")  # the embedding's parameter, tied again in _finish
    missing = sorted(set(names) - set(sources))
    unexpected = sorted(set(sources) - set(names) - ({"lm_head.weight"} if tied else set()))
    if missing or unexpected:
        raise RuntimeError(f"captured model does not match the loaded tensors: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    for name in names:
        if name in sources:
            prefix, _, attribute = name.rpartition(".")
            yield name, lm.get_submodule(prefix), attribute, sources[name]


def _assign(module: nn.Module, attribute: str, tensor: torch.Tensor) -> None:
    if attribute in module._buffers:
        module._buffers[attribute] = tensor
    else:
        setattr(module, attribute, nn.Parameter(tensor, requires_grad=False))


def _finish(lm: nn.Module, model: LoadedModel, dtype: torch.dtype) -> nn.Module:
    config = lm.config
    if config.tie_word_embeddings:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    # Rotary frequencies stay fp32 (transformers computes the angles in fp32); casting them to
    # bf16 would shift every position's phase. Rebuilding also replaces the meta-device buffer.
    lm.model.rotary_emb = type(lm.model.rotary_emb)(config=config)
    if model.spec.architecture in COMPLEX_ROTARY:
        use_real_rotary(lm, model.spec.architecture)
    lm.compute_dtype = dtype
    return lm.eval()


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


# Families whose attention rotates q/k with complex tensors, which ONNX cannot express: where the
# heads axis sits in q/k relative to the [B, S, d/2] frequencies.
COMPLEX_ROTARY = {
    "deepseek_v2": 1,  # q, k [B, heads, S, d]
    "llama4_text": 2,  # q, k [B, S, heads, d]
}
ROTATION_FUNCTION = "apply_rotary_emb"  # the global the family's attention forward rotates q and k with


def use_real_rotary(lm: nn.Module, architecture: str) -> None:
    """The same rotation in real arithmetic, in this model instance only: its rotary module returns
    (cos, sin) pairs instead of complex frequencies, and each of its attention modules runs a copy
    of the family's attention forward whose `apply_rotary_emb` applies them. Neither transformers'
    classes nor its modeling module change."""
    heads_axis = COMPLEX_ROTARY[architecture]
    rotary = lm.model.rotary_emb
    rotary.forward = types.MethodType(_real_rotary_forward, rotary)
    real_forwards = {}
    for module in lm.modules():
        # The attention's own forward function; its decorators (they rename deprecated keywords
        # that the decoder layer does not pass) are not kept.
        forward = inspect.unwrap(type(module).forward)
        if ROTATION_FUNCTION not in getattr(getattr(forward, "__code__", None), "co_names", ()):
            continue
        if type(module) not in real_forwards:
            real_forwards[type(module)] = _with_global(forward, ROTATION_FUNCTION, _real_rotation(heads_axis))
        module.forward = types.MethodType(real_forwards[type(module)], module)
    if not real_forwards:
        raise RuntimeError(f"{architecture}: no module of the model calls {ROTATION_FUNCTION}; "
                           f"transformers' attention changed, the real rotation has nothing to replace")


def _real_rotary_forward(self, x, position_ids):
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling


def _real_rotation(heads_axis: int) -> Callable:
    def apply_rotary_emb(xq, xk, freqs):
        cos, sin = (part.unsqueeze(heads_axis) for part in freqs.unbind(-1))  # heads axis of size 1

        def rotate(x):
            real, imag = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
            return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(3).type_as(x)

        return rotate(xq), rotate(xk)

    return apply_rotary_emb


def _with_global(function: types.FunctionType, name: str, value) -> types.FunctionType:
    """A copy of `function` that sees `value` as its global `name` (its module keeps its own)."""
    copy = types.FunctionType(function.__code__, {**function.__globals__, name: value}, function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy


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


def empty_past(spec: ModelSpec, batch: int, past: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(torch.zeros(shape, dtype=dtype) for shape in spec.past_shapes(batch, past))
