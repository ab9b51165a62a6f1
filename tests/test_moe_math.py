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
