"""Stage 2, capture: LoadedModel -> a torch module tree whose MoE blocks call `ce_export::moe`.

Everything but the MoE blocks is transformers' own implementation of the architecture (attention,
norms, rotary embeddings, KV cache), so the captured model is faithful to it by construction. Each
MoE block becomes one call of the custom op, with no data-dependent Python control flow, so
torch.export traces it with dynamic batch, sequence and past length.
"""

from __future__ import annotations

from typing import Callable

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

    from ce_export.load import ARCHITECTURES

    config = dict(spec.hf_config)
    counts = [layer.num_experts for layer in spec.moe_layers if layer.kind == LAYER_MOE]
    # transformers' config takes one expert count; our blocks carry their own per-layer counts.
    for key in ARCHITECTURES[spec.architecture].experts_keys:
        if key in config:
            config[key] = max(counts, default=2)
    for key in ("use_ce", "n_ce", "bottom_k", "layer_experts_idx"):
        config.pop(key, None)
    hf_config = AutoConfig.for_model(**config)
    hf_config._attn_implementation = "eager"
    return hf_config


# MoeLayerWeights / load.MoeLayerSource field -> the MoeBlock parameter holding it
MOE_PARAMETERS = {"router": "router", "gate_up": "gate_up", "down": "down", "ces": "ces",
                  "shared_gate_up": "shared.gate_up", "shared_down": "shared.down", "shared_gate": "shared.gate"}
ROUTED_EXPERT_PARAMETERS = ("gate_up", "down")
EXACT_UPCASTS = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}

WeightTransform = Callable[[str, nn.Module, torch.Tensor], torch.Tensor]


def parameter_sources(model: LoadedModel) -> dict:
    """Every parameter of the captured model, by its name there, and the stored tensor (load.StoredTensor)
    it is read from."""
    sources = dict(model.dense_tensors.stored)
    if model.spec.hf_config.get("tie_word_embeddings", False):
        sources.setdefault("lm_head.weight", sources["model.embed_tokens.weight"])
    for layer, source in model.moe_weights.sources.items():
        for name, stored in source.items():
            sources[f"model.layers.{layer}.mlp.{MOE_PARAMETERS[name]}"] = stored
    return sources


def build_torch_model(model: LoadedModel, dtype: torch.dtype = torch.float32, *, weights: WeightTransform | None = None,
                      keep_expert_dtype: bool = False, progress: bool = False) -> nn.Module:
    """The captured causal LM (a transformers *ForCausalLM with our MoE blocks), in eval mode, computing in `dtype`.

    The weights are read one tensor at a time, each converted as it arrives, so building never
    holds more than the finished model and one tensor. `weights(name, module, tensor)` may first
    replace each tensor as read (e.g. by the values an artifact stores: rounded, quantized).
    keep_expert_dtype: the routed experts' weights stay in their own dtype when `dtype` holds it
    exactly (bf16 or fp16 in an fp32 model) and are upcast one expert at a time inside the op
    (moe_math), which computes exactly what an upcast copy of the whole layer would.
    progress: a progress bar over the bytes read (progress.progress_bar).
    """
    from ce_export.progress import progress_bar

    lm = _captured_skeleton(model)
    slots = list(_parameter_slots(lm, model))
    bar = progress_bar(total=sum(stored.nbytes for *_, stored in slots), unit="B", unit_scale=True,
                       unit_divisor=1024, desc="  reading weights", disable=not progress)
    for name, module, attribute, stored in slots:
        bar.update(stored.nbytes)
        tensor = stored.read()
        if weights is not None:
            tensor = weights(name, module, tensor)
        if not (keep_expert_dtype and _is_routed_expert(module, attribute) and (tensor.dtype, dtype) in EXACT_UPCASTS):
            tensor = tensor.to(dtype)
        _assign(module, attribute, tensor)
        del tensor
    bar.close()
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
            tensor = torch.empty(stored.shape, dtype=dtype)
        _assign(module, attribute, tensor)
    lm = _finish(lm, model, dtype)
    if separate_head and lm.config.tie_word_embeddings:
        with fake_mode:
            lm.lm_head.weight = nn.Parameter(torch.empty_like(lm.lm_head.weight), requires_grad=False)
    lm.fake_mode = fake_mode
    return lm


def _is_routed_expert(module: nn.Module, attribute: str) -> bool:
    return isinstance(module, MoeBlock) and attribute in ROUTED_EXPERT_PARAMETERS


def _captured_skeleton(model: LoadedModel) -> nn.Module:
    """transformers' model for the spec on the meta device, our MoE blocks in place (meta weights)."""
    from transformers import AutoModelForCausalLM

    config = hf_config_for(model.spec)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        for spec in model.spec.moe_layers:
            decoder_layer = lm.model.layers[spec.layer]
            if spec.kind == LAYER_DENSE:
                continue
            if spec.kind == LAYER_MOE:
                source = model.moe_weights.sources[spec.layer]
                meta = MoeLayerWeights(**{name: None for name in MOE_PARAMETERS} | {
                    name: stored.meta() for name, stored in source.items()})
                decoder_layer.mlp = MoeBlock(spec, meta)
            else:
                decoder_layer.mlp = RemovedMoe()
                norm_name = f"model.layers.{spec.layer}.post_attention_layernorm.weight"
                if norm_name not in model.dense_tensors:
                    decoder_layer.post_attention_layernorm = nn.Identity()
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
    if model.spec.architecture == "deepseek_v2":
        use_real_rotary_for_deepseek(lm)
    lm.compute_dtype = dtype
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
