"""The reference op (ce_export.moe_math, via torch.ops.ce_export.moe) against the independent oracle."""

import pytest
import torch

from ce_export import moe_math, ops  # noqa: F401
from ce_oracle import ce_moe_loop


def random_layer(tokens=9, hidden=16, intermediate=12, experts=6, ces_width=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ces_width = ces_width or max(hidden, intermediate)
    return dict(
        hidden=torch.randn(tokens, hidden, generator=gen),
        router_logits=torch.randn(tokens, experts, generator=gen) * 2,
        gate_up=torch.randn(experts, 2 * intermediate, hidden, generator=gen) * 0.3,
        down=torch.randn(experts, hidden, intermediate, generator=gen) * 0.3,
        ces=1 + 0.3 * torch.randn(experts, 3, ces_width, generator=gen),
    )


@pytest.mark.parametrize("top_k,n_ce", [(4, 2), (4, 1), (4, 3), (2, 1), (6, 3), (4, 0), (1, 0), (6, 0)])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_reference_matches_plain_loop_oracle(top_k, n_ce, norm_topk_prob):
    layer = random_layer(seed=top_k * 10 + n_ce)
    if n_ce == 0:
        layer["ces"] = None
    got = torch.ops.ce_export.moe(*layer.values(), top_k, n_ce, norm_topk_prob)
    want = ce_moe_loop(*layer.values(), top_k, n_ce, norm_topk_prob)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_intermediate_larger_than_hidden_uses_a_full_length_activation_scale():
    layer = random_layer(hidden=8, intermediate=20, ces_width=20)
    got = moe_math.moe_reference(*layer.values(), 4, 2, False)
    want = ce_moe_loop(*layer.values(), 4, 2, False)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_unit_ces_equal_top_main_of_top_k_without_renormalisation():
    layer = random_layer()
    layer["ces"] = torch.ones_like(layer["ces"])
    compressed = moe_math.moe_reference(*layer.values(), 4, 2, False)
    layer["ces"] = None
    top_main = moe_math.moe_reference(*layer.values(), 2, 0, False)
    torch.testing.assert_close(compressed, top_main)


def test_compressed_experts_change_the_output():
    layer = random_layer()
    compressed = moe_math.moe_reference(*layer.values(), 4, 2, False)
    layer["ces"] = torch.ones_like(layer["ces"])
    assert not torch.allclose(compressed, moe_math.moe_reference(*layer.values(), 4, 2, False))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_fp32(dtype):
    layer = random_layer(tokens=33)
    want = moe_math.moe_reference(*layer.values(), 4, 2, False)
    low = {k: v.to(dtype) for k, v in layer.items()}
    got = moe_math.moe_reference(*low.values(), 4, 2, False)
    assert got.dtype == dtype
    assert (got.float() - want).abs().max() / want.abs().max() < 5e-2


@pytest.mark.parametrize("bad,message", [
    (dict(top_k=4, n_ce=4), "n_ce=4"),
    (dict(top_k=9, n_ce=0), "top_k=9"),
    (dict(top_k=4, n_ce=2, ces=None), "needs the ces"),
])
def test_invalid_arguments_are_rejected(bad, message):
    layer = random_layer()
    if "ces" in bad:
        layer["ces"] = bad["ces"]
    with pytest.raises(ValueError, match=message):
        moe_math.moe_reference(*layer.values(), bad["top_k"], bad["n_ce"], False)


def test_op_traces_with_a_dynamic_token_count():
    from ce_export.capture import MoeBlock
    from ce_export.spec import MoeLayerSpec, MoeLayerWeights

    layer = random_layer()
    spec = MoeLayerSpec(layer=0, num_experts=6, hidden_size=16, intermediate_size=12, top_k=4, n_ce=2, ces_width=16)
    block = MoeBlock(spec, MoeLayerWeights(torch.randn(6, 16), layer["gate_up"], layer["down"], layer["ces"]))
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=1024)
    program = torch.export.export(block, (torch.randn(2, 5, 16),), dynamic_shapes=({0: batch, 1: seq},))
    moe_calls = [n for n in program.graph.nodes if n.target is torch.ops.ce_export.moe.default]
    assert len(moe_calls) == 1
    x = torch.randn(3, 17, 16)
    torch.testing.assert_close(program.module()(x), block(x))


def variant_layer(seed=7, experts=8, hidden=16, intermediate=12):
    layer = random_layer(tokens=11, hidden=hidden, intermediate=intermediate, experts=experts, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    extras = dict(score_bias=0.2 * torch.randn(experts, generator=gen),
                  gate_up_bias=0.3 * torch.randn(experts, 2 * intermediate, generator=gen),
                  down_bias=0.3 * torch.randn(experts, hidden, generator=gen))
    return layer, extras


@pytest.mark.parametrize(("top_k", "n_ce", "n_group", "topk_group", "norm"), [
    (4, 2, 4, 2, True), (4, 1, 1, 1, True), (3, 0, 2, 1, False), (4, 0, 4, 3, True), (6, 3, 2, 2, False)])
def test_sigmoid_grouped_routing_matches_the_oracle(top_k, n_ce, n_group, topk_group, norm):
    """DeepSeek-V3's routing (CE: main = the best by biased score), against the loop oracle."""
    layer, extras = variant_layer(seed=top_k + n_group)
    if n_ce == 0:
        layer["ces"] = None
    args = (*layer.values(), top_k, n_ce, norm, moe_math.SIGMOID_TOPK, 2.5, 0.0, extras["score_bias"], n_group, topk_group)
    torch.testing.assert_close(torch.ops.ce_export.moe(*args).double(), ce_moe_loop(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_ce", [0, 1, 2])
def test_clamped_swiglu_with_biases_matches_the_oracle(n_ce):
    """gpt-oss's experts (biases, clamped SwiGLU) under renormalised softmax routing, CE on top."""
    layer, extras = variant_layer(seed=n_ce)
    if n_ce == 0:
        layer["ces"] = None
    args = (*layer.values(), 4, n_ce, True, moe_math.SOFTMAX_TOPK, 1.0, 0.0, None, 1, 1, extras["gate_up_bias"],
            extras["down_bias"], moe_math.CLAMPED_SWIGLU, 1.702, 0.6)
    got, want = torch.ops.ce_export.moe(*args).double(), ce_moe_loop(*args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unclamped = ce_moe_loop(*args[:-1], 100.0)
    assert not torch.allclose(want, unclamped)  # the clamp is exercised


def test_sigmoid_top1_on_the_expert_input_matches_the_oracle():
    """Llama 4: the routing weight scales the input of the one expert, whose output is not weighted."""
    layer, _ = variant_layer(seed=3)
    layer["ces"] = None
    args = (*layer.values(), 1, 0, False, moe_math.SIGMOID_TOPK, 1.0, 0.0, None, 1, 1, None, None, moe_math.SWIGLU,
            1.0, 0.0, True)
    torch.testing.assert_close(torch.ops.ce_export.moe(*args).double(), ce_moe_loop(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("variant", "message"), [
    (dict(n_group=3), "n_group=3"),
    (dict(n_group=4, topk_group=5), "topk_group=5"),
    (dict(score_bias_routing="softmax_topk"), "score_bias"),
    (dict(weights_on_input=True), "weights_on_input"),
])
def test_invalid_variants_are_rejected(variant, message):
    layer, extras = variant_layer()
    routing = variant.pop("score_bias_routing", moe_math.SIGMOID_TOPK)
    kwargs = dict(score_bias=extras["score_bias"], n_group=1, topk_group=1) | variant
    with pytest.raises(ValueError, match=message):
        moe_math.moe_reference(*layer.values(), 4, 2, False, routing, **kwargs)
