"""The ONNX function bodies of one MoE layer, both experts forms, against moe_math.py in ONNX Runtime.

Each case is one custom node with its local functions and the weights as initializers, so the
routing can be steered: adversarial (every token on the same experts, the others empty), token
counts from 1 (decode) up, on both sides of the fixed-shape form's gather / dense switch and of no
particular multiple, uneven expert counts (trimmed models), every routing and CE variant, fp16.
"""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch

from ce_export import onnx_functions
from ce_export.moe_math import CLAMPED_SWIGLU, SIGMOID_TOPK, SOFTMAX_TOPK, SPARSEMIXER, moe_reference

FORMS = tuple(onnx_functions.EXPERTS_FORMS)


def layer_model(op_type: str, form: str, gate_up, down, ces, attributes: dict, **weights) -> onnx.ModelProto:
    arrays = [None if tensor is None else tensor.numpy() for tensor in (gate_up, down, ces)]
    model = onnx_functions.layer_model(op_type, attributes, *arrays, form=form,
                                       **{name: tensor.numpy() for name, tensor in weights.items()})
    onnx.checker.check_model(model, full_check=True)
    return model


def run_layer(model: onnx.ModelProto, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"hidden": hidden.numpy(), "router_logits": logits.float().numpy()})
    return torch.from_numpy(out)


def random_layer(num_experts: int, hidden: int, intermediate: int, ces_width: int | None, seed: int = 0,
                 dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * intermediate, hidden, generator=gen) * hidden ** -0.5
    down = torch.randn(num_experts, hidden, intermediate, generator=gen) * intermediate ** -0.5
    ces = None if ces_width is None else 1.0 + 0.3 * torch.randn(num_experts, 3, ces_width, generator=gen)
    return tuple(None if t is None else t.to(dtype) for t in (gate_up, down, ces))


CASES = {
    # name: (op type, experts, hidden, intermediate, top_k, n_ce, routing, attributes beyond the routing's)
    "olmoe-ce": ("CompressedMoE", 8, 32, 16, 4, 2, SOFTMAX_TOPK, {"norm_topk_prob": 0, "routing_scale": 1.0}),
    "plain-top2-renormalised": ("MoE", 8, 32, 16, 2, 0, SOFTMAX_TOPK, {"norm_topk_prob": 1, "routing_scale": 1.0}),
    "deepseek-scaled-ce": ("CompressedMoE", 6, 32, 16, 3, 1, SOFTMAX_TOPK, {"norm_topk_prob": 0, "routing_scale": 2.5}),
    "sparsemixer-ce-wide-intermediate": ("CompressedSparseMixerMoE", 4, 16, 24, 2, 1, SPARSEMIXER, {"jitter_eps": 0.01}),
    "sparsemixer-plain": ("SparseMixerMoE", 5, 16, 8, 2, 0, SPARSEMIXER, {"jitter_eps": 0.01}),
    # DeepSeek-V3: sigmoid + correction bias, 4 groups of 2, the best 2 groups, renormalised, scaled
    "deepseek-v3-groups": ("SigmoidMoE", 8, 32, 16, 3, 0, SIGMOID_TOPK,
                           {"norm_topk_prob": 1, "routing_scale": 2.5, "n_group": 4, "topk_group": 2}),
    "deepseek-v3-groups-ce": ("CompressedSigmoidMoE", 8, 32, 16, 4, 2, SIGMOID_TOPK,
                              {"norm_topk_prob": 1, "routing_scale": 2.5, "n_group": 4, "topk_group": 2}),
    # MiniMax-M2 / GLM-4.5: no groups
    "sigmoid-bias-ce": ("CompressedSigmoidMoE", 6, 16, 24, 3, 1, SIGMOID_TOPK,
                        {"norm_topk_prob": 0, "routing_scale": 1.0, "n_group": 1, "topk_group": 1}),
    "llama4-top1-on-input": ("SigmoidTop1MoE", 5, 32, 16, 1, 0, SIGMOID_TOPK, {}),
    # gpt-oss: softmax of the top-k logits, expert biases, clamped SwiGLU
    "gpt-oss": ("ClampedSwiGLUMoE", 8, 32, 16, 4, 0, SOFTMAX_TOPK,
                {"norm_topk_prob": 1, "routing_scale": 1.0, "swiglu_alpha": 1.702, "swiglu_limit": 0.7}),
    "gpt-oss-ce": ("CompressedClampedSwiGLUMoE", 8, 32, 16, 4, 2, SOFTMAX_TOPK,
                   {"norm_topk_prob": 1, "routing_scale": 1.0, "swiglu_alpha": 1.702, "swiglu_limit": 0.7}),
}


def attributes_for(op_type: str, top_k: int, n_ce: int, extra: dict) -> dict:
    attributes = dict(extra)
    if "top_k" in onnx_functions.OPS[op_type][0].to_function_proto().attribute:
        attributes["top_k"] = top_k
    if n_ce:
        attributes["n_ce"] = n_ce
    return attributes


def variant_weights(op_type: str, experts: int, hidden: int, intermediate: int, seed: int = 5) -> dict:
    """The op type's inputs beyond gate_up, down and ces: a score bias, expert biases."""
    gen = torch.Generator().manual_seed(seed)
    inputs = onnx_functions.node_inputs(op_type)
    weights = {}
    if "score_bias" in inputs:
        weights["score_bias"] = 0.1 * torch.randn(experts, generator=gen)
    if "gate_up_bias" in inputs:
        weights["gate_up_bias"] = 0.3 * torch.randn(experts, 2 * intermediate, generator=gen)
        weights["down_bias"] = 0.3 * torch.randn(experts, hidden, generator=gen)
    return weights


def reference(hidden, logits, gate_up, down, ces, top_k, n_ce, routing, extra, weights=None) -> torch.Tensor:
    weights = {name: tensor.float() for name, tensor in (weights or {}).items()}
    return moe_reference(hidden.float(), logits.float(), gate_up.float(), down.float(),
                         None if ces is None else ces.float(), top_k, n_ce, bool(extra.get("norm_topk_prob", 0)),
                         routing, extra.get("routing_scale", 1.0), extra.get("jitter_eps", 0.0),
                         weights.get("score_bias"), extra.get("n_group", 1), extra.get("topk_group", 1),
                         weights.get("gate_up_bias"), weights.get("down_bias"),
                         CLAMPED_SWIGLU if "swiglu_limit" in extra else "swiglu", extra.get("swiglu_alpha", 1.0),
                         extra.get("swiglu_limit", 0.0), weights_on_input=not extra and routing == SIGMOID_TOPK)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_both_forms_equal_the_reference_across_the_switch(case, form):
    op_type, experts, hidden_size, intermediate, top_k, n_ce, routing, extra = CASES[case]
    ces_width = max(hidden_size, intermediate) if n_ce else None
    gate_up, down, ces = random_layer(experts, hidden_size, intermediate, ces_width)
    weights = variant_weights(op_type, experts, hidden_size, intermediate)
    model = layer_model(op_type, form, gate_up, down, ces, attributes_for(op_type, top_k, n_ce, extra), **weights)
    gen = torch.Generator().manual_seed(1)
    for tokens in (1, 2, 3, 5, 9, 37, 64):
        hidden = torch.randn(tokens, hidden_size, generator=gen)
        logits = torch.randn(tokens, experts, generator=gen)
        expected = reference(hidden, logits, gate_up, down, ces, top_k, n_ce, routing, extra, weights)
        assert relative_error(run_layer(model, hidden, logits), expected) < 1e-5, f"T={tokens}"


@pytest.mark.parametrize("form", FORMS)
def test_adversarial_routing_every_token_on_the_same_experts(form):
    """The busiest experts hold every token (capacity C = T) and the rest are empty."""
    experts, hidden_size, intermediate, top_k, n_ce = 8, 32, 16, 4, 2
    gate_up, down, ces = random_layer(experts, hidden_size, intermediate, hidden_size)
    model = layer_model("CompressedMoE", form, gate_up, down, ces,
                        {"top_k": top_k, "n_ce": n_ce, "norm_topk_prob": 0, "routing_scale": 1.0})
    tokens = 45
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(tokens, hidden_size, generator=gen)
    logits = torch.randn(tokens, experts, generator=gen) * 0.1
    logits[:, [5, 2, 7, 0]] += torch.tensor([40.0, 30.0, 20.0, 10.0])  # the same four experts, same order, for all
    expected = reference(hidden, logits, gate_up, down, ces, top_k, n_ce, SOFTMAX_TOPK, {})
    assert relative_error(run_layer(model, hidden, logits), expected) < 1e-5


def test_sparse_form_never_computes_an_unrouted_expert():
    """NaN weights in every expert that no token routes to: the sparse form never reads them into
    arithmetic (exact FLOPs), while the fixed-shape form multiplies them by zero and returns NaN."""
    experts, hidden_size, intermediate, top_k, n_ce = 8, 32, 16, 4, 2
    gate_up, down, ces = random_layer(experts, hidden_size, intermediate, hidden_size)
    gen = torch.Generator().manual_seed(3)
    tokens = 33
    hidden = torch.randn(tokens, hidden_size, generator=gen)
    logits = torch.randn(tokens, experts, generator=gen)
    logits[:, 6:] = -100.0  # experts 6 and 7: never routed, neither main nor compressed
    gate_up[6:], down[6:] = float("nan"), float("nan")
    attributes = {"top_k": top_k, "n_ce": n_ce, "norm_topk_prob": 0, "routing_scale": 1.0}
    expected = reference(hidden, logits, gate_up, down, ces, top_k, n_ce, SOFTMAX_TOPK, {})
    sparse = run_layer(layer_model("CompressedMoE", onnx_functions.SPARSE, gate_up, down, ces, attributes), hidden, logits)
    assert torch.isfinite(sparse).all() and relative_error(sparse, expected) < 1e-5
    fixed = run_layer(layer_model("CompressedMoE", onnx_functions.FIXED_SHAPE, gate_up, down, ces, attributes), hidden, logits)
    assert torch.isnan(fixed).any()


@pytest.mark.parametrize("form", FORMS)
def test_fp16_layer(form):
    experts, hidden_size, intermediate, top_k, n_ce = 8, 32, 16, 4, 2
    gate_up, down, ces = random_layer(experts, hidden_size, intermediate, hidden_size, dtype=torch.float16)
    model = layer_model("CompressedMoE", form, gate_up, down, ces,
                        {"top_k": top_k, "n_ce": n_ce, "norm_topk_prob": 0, "routing_scale": 1.0})
    gen = torch.Generator().manual_seed(4)
    for tokens in (1, 40):
        hidden = torch.randn(tokens, hidden_size, generator=gen).half()
        logits = torch.randn(tokens, experts, generator=gen)
        expected = reference(hidden, logits, gate_up, down, ces, top_k, n_ce, SOFTMAX_TOPK, {})
        assert relative_error(run_layer(model, hidden, logits), expected) < 5e-3, f"T={tokens}"



@pytest.mark.parametrize("case", sorted(CASES))
def test_tensorrt_reads_the_fixed_shape_form_with_its_attributes(case):
    """TensorRT's parser reads a function attribute as 0 through a nested call (top_k 0: an engine
    that silently routes to no expert), so the trt form is flat: every TopK gets its K and the
    engine builds over a profile that crosses the gathered / dense switch."""
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (the installable builder) is not installed")
    op_type, experts, hidden_size, intermediate, top_k, n_ce, routing, extra = CASES[case]
    gate_up, down, ces = random_layer(experts, hidden_size, intermediate, max(hidden_size, intermediate) if n_ce else None)
    weights = variant_weights(op_type, experts, hidden_size, intermediate)
    model = layer_model(op_type, onnx_functions.FIXED_SHAPE, gate_up, down, ces,
                        attributes_for(op_type, top_k, n_ce, extra), **weights)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    ks = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type == trt.LayerType.TOPK:
            ks.append(layer.get_output(0).shape[-1])
    expected = {top_k} | ({2, extra["topk_group"]} if "n_group" in extra else set())
    assert set(ks) == (expected if routing != SPARSEMIXER else {1}), ks
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("hidden", (1, hidden_size), (8, hidden_size), (64, hidden_size))
    profile.set_shape("router_logits", (1, experts), (8, experts), (64, experts))
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is not None
