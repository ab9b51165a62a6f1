"""ce_kernels against the reference math (ce_export.moe_math) and each stage against its torch twin.

Without CUDA the kernels run on CPU tensors through Triton's interpreter. Triton decides
interpreted-or-compiled when it is first imported (its own library functions are decorated then),
so TRITON_INTERPRET=1 is set here before anything imports triton, and stays set; nothing else in
the suite runs Triton kernels on CPU. If triton was already imported in compiled mode (another test
module imported torch._dynamo first, which imports triton), the in-process tests skip and
`test_kernels_in_a_fresh_interpreter_process` runs this file in a new process instead.

The interpreter multiplies bf16 `tl.dot` operands as raw bits (triton-lang/triton#11584), so bf16
runs only on the GPU; fp32 and fp16 run everywhere.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ON_GPU = torch.cuda.is_available()
TRITON_IMPORTED_COMPILED = (
    not ON_GPU and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
)
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from ce_export import moe_math  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from ce_kernels.tile_configs import FP32_TILE_TABLE, H100_TILE_TABLE, SMALL_SHARED_TILE_TABLE  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
REPO_ROOT = Path(__file__).resolve().parents[1]
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (bf16 tl.dot and CUDA graphs)")


@pytest.fixture(scope="module")
def ck():
    if TRITON_IMPORTED_COMPILED:
        pytest.skip("triton was imported in compiled mode before this module; "
                    "test_kernels_in_a_fresh_interpreter_process runs these tests")
    return importlib.import_module("ce_kernels")


def test_kernels_in_a_fresh_interpreter_process():
    if not TRITON_IMPORTED_COMPILED:
        pytest.skip("not needed: this process runs the kernels directly")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
        cwd=REPO_ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def small_tiles(block_m=16, group_m=2, swap_ab=False, gate_up=(16, 16), down=(16, 16)):
    """Tiles small enough that tiny shapes still take several blocks and K steps."""
    def gemm(block_n, block_k):
        return {"block_n": block_n, "block_k": block_k, "num_warps": 4, "num_stages": 2}

    return {"max_tokens": 0, "block_m": block_m, "group_m": group_m, "swap_ab": swap_ab,
            "gate_up": gemm(*gate_up), "down": gemm(*down)}


SMALL_TILES = small_tiles()
SMALL_TILES_SWAPPED = small_tiles(group_m=1, swap_ab=True, gate_up=(32, 16), down=(16, 32))
SMALL_TILES_M32 = small_tiles(block_m=32, group_m=8, gate_up=(32, 32), down=(32, 16))


def make_layer(tokens, hidden, inter, experts, *, dtype=torch.float32, ces_columns=None, seed=0, device=DEVICE):
    """Random (not zero) inputs at the reference's layouts, weights scaled to keep outputs O(1).
    Router logits stay fp32: rounded to 16 bits they tie often, and torch.topk leaves tie order open.
    Drawn on `device` (OLMoE-sized weights take seconds to draw on a CPU)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    ces_columns = ces_columns or max(hidden, inter)

    def rand(*shape, scale=1.0, offset=0.0):
        return (offset + scale * torch.randn(*shape, generator=gen, device=device)).to(dtype)

    return {
        "hidden": rand(tokens, hidden),
        "router_logits": torch.randn(tokens, experts, generator=gen, device=device),
        "gate_up": rand(experts, 2 * inter, hidden, scale=hidden ** -0.5),
        "down": rand(experts, hidden, inter, scale=inter ** -0.5),
        "ces": rand(experts, 3, ces_columns, scale=0.3, offset=1.0),
    }


def reference_fp32(layer, top_k, n_ce, norm_topk_prob, **routing):
    """moe_reference on the same inputs upcast to fp32: same routing, fp32 math."""
    f = {k: v.float() for k, v in layer.items()}
    return moe_math.moe_reference(
        f["hidden"], f["router_logits"], f["gate_up"], f["down"], f["ces"] if n_ce else None,
        top_k, n_ce, norm_topk_prob, **routing,
    )


def relative_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def run_fused(ck, layer, top_k, n_ce, norm_topk_prob, tiles=None, **routing):
    args = (layer["hidden"], layer["router_logits"], layer["gate_up"], layer["down"],
            layer["ces"] if n_ce else None, top_k, n_ce, norm_topk_prob)
    if tiles is None:
        return ck.fused_moe(*args, **routing)
    return ck.fused_moe_with_config(*args, ck.MoeTileConfig.from_dict(tiles), **routing)


# ---------------------------------------------------------------- whole layer vs moe_reference

LAYER_CASES = {
    # name: (T, H, I, E, K, n_ce, norm_topk_prob, tiles; None = the H100 table)
    "one_token_ce": (1, 32, 16, 8, 4, 2, False, SMALL_TILES),
    "tokens_not_multiple_of_block_ce": (37, 32, 16, 8, 4, 2, False, SMALL_TILES),
    "plain_moe_renormalised": (21, 32, 16, 6, 3, 0, True, SMALL_TILES),
    "top_k_equals_experts_ce": (19, 32, 16, 4, 4, 1, False, SMALL_TILES),
    "top_k_equals_experts_plain": (19, 32, 16, 4, 4, 0, True, SMALL_TILES),
    "intermediate_wider_than_hidden": (23, 32, 48, 5, 3, 1, False, SMALL_TILES),
    "odd_sizes_masked_k_and_n": (17, 40, 24, 7, 4, 2, True, SMALL_TILES),
    "swap_ab": (29, 32, 48, 6, 4, 2, False, SMALL_TILES_SWAPPED),
    "swap_ab_plain": (29, 32, 48, 6, 4, 0, False, SMALL_TILES_SWAPPED),
    "block_m_32": (45, 32, 16, 8, 4, 2, False, SMALL_TILES_M32),
    "h100_table_chosen_by_fused_moe": (3, 32, 16, 8, 4, 2, False, None),
}
# Every distinct entry of every tile table (fed directly: the tiles matter, not the T that would
# select them), with H and I spanning two BLOCK_K steps; in fp32 here, whatever dtype a table serves.
TABLES = {"h100": H100_TILE_TABLE, "small_shared": SMALL_SHARED_TILE_TABLE, "fp32": FP32_TILE_TABLE}


def distinct_table_entries() -> dict[str, dict]:
    entries = {}
    for name, table in TABLES.items():
        for i, entry in enumerate(table):
            entries.setdefault(json.dumps(entry, sort_keys=True), (f"{name}_table_entry_{i}", entry))
    return dict(entries.values())


LAYER_CASES.update({case: (70, 128, 128, 8, 4, 2, False, entry) for case, entry in distinct_table_entries().items()})


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_fused_moe_matches_reference_fp32(ck, case):
    tokens, hidden, inter, experts, top_k, n_ce, norm, tiles = LAYER_CASES[case]
    layer = make_layer(tokens, hidden, inter, experts, seed=len(case))
    out = run_fused(ck, layer, top_k, n_ce, norm, tiles)
    expected = reference_fp32(layer, top_k, n_ce, norm)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert relative_error(out, expected) < 1e-5, case


@pytest.mark.parametrize(("top_k", "n_ce", "norm", "routing"), [
    (3, 1, True, {"routing_scale": 2.5}),
    (3, 0, False, {"routing_scale": 0.5}),
    (2, 1, False, {"routing": moe_math.SPARSEMIXER, "jitter_eps": 0.3}),
    (2, 0, False, {"routing": moe_math.SPARSEMIXER, "jitter_eps": 0.01}),
], ids=["scaled_ce", "scaled_plain", "sparsemixer_ce", "sparsemixer_plain"])
def test_fused_moe_routing_options(ck, top_k, n_ce, norm, routing):
    layer = make_layer(25, 32, 48, 6, seed=8)
    out = run_fused(ck, layer, top_k, n_ce, norm, SMALL_TILES, **routing)
    assert relative_error(out, reference_fp32(layer, top_k, n_ce, norm, **routing)) < 1e-5


def variant_tensors(experts, hidden, inter, seed=11, dtype=torch.float32):
    """DeepSeek-V3's score bias and gpt-oss's expert biases, random (transformers starts them at 0)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return {"score_bias": 0.2 * torch.randn(experts, generator=gen, device=DEVICE),
            "gate_up_bias": (0.3 * torch.randn(experts, 2 * inter, generator=gen, device=DEVICE)).to(dtype),
            "down_bias": (0.3 * torch.randn(experts, hidden, generator=gen, device=DEVICE)).to(dtype)}


@pytest.mark.parametrize(("top_k", "n_ce", "variant"), [
    (4, 2, "deepseek_v3"), (3, 0, "deepseek_v3"), (4, 1, "sigmoid_bias"), (4, 2, "gpt_oss"), (4, 0, "gpt_oss"),
])
@pytest.mark.parametrize("tiles", [SMALL_TILES, SMALL_TILES_SWAPPED], ids=["plain_tiles", "swap_ab"])
def test_fused_moe_routing_and_expert_variants(ck, top_k, n_ce, variant, tiles):
    """DeepSeek-V3 (sigmoid, correction bias, 4 groups of 2 / best 2, renormalised, x2.5), MiniMax-M2
    (sigmoid with bias, no groups) and gpt-oss (expert biases, clamped SwiGLU that clips) against
    moe_reference, CE on and off."""
    layer = make_layer(27, 32, 48, 8, seed=top_k + n_ce)
    extra = variant_tensors(8, 32, 48)
    options = {
        "deepseek_v3": dict(routing=moe_math.SIGMOID_TOPK, routing_scale=2.5, score_bias=extra["score_bias"],
                            n_group=4, topk_group=2),
        "sigmoid_bias": dict(routing=moe_math.SIGMOID_TOPK, score_bias=extra["score_bias"]),
        "gpt_oss": dict(gate_up_bias=extra["gate_up_bias"], down_bias=extra["down_bias"],
                        activation=moe_math.CLAMPED_SWIGLU, swiglu_alpha=1.702, swiglu_limit=0.5),
    }[variant]
    out = run_fused(ck, layer, top_k, n_ce, True, tiles, **options)
    assert relative_error(out, reference_fp32(layer, top_k, n_ce, True, **options)) < 1e-5
    if variant == "gpt_oss":  # the clamp bites: without it the result differs
        unclamped = reference_fp32(layer, top_k, n_ce, True, **(options | {"swiglu_limit": 50.0}))
        assert relative_error(out, unclamped) > 1e-3


@pytest.mark.parametrize("n_ce", [0, 2])
def test_fused_moe_fp16(ck, n_ce):
    layer = make_layer(33, 32, 48, 8, dtype=torch.float16, seed=3)
    out = run_fused(ck, layer, 4, n_ce, False, SMALL_TILES)
    assert out.dtype == torch.float16
    assert relative_error(out, reference_fp32(layer, 4, n_ce, False)) < 3e-3


def test_all_main_pairs_on_one_expert(ck):
    """km = 1 and one dominant logit: every pair lands on expert 3, across several blocks."""
    layer = make_layer(40, 32, 16, 6, seed=4)
    layer["router_logits"][:, 3] += 12.0
    weights, experts = moe_math.route_softmax_topk(layer["router_logits"], 2, False)
    assert (experts[:, 0] == 3).all()
    out = run_fused(ck, layer, 2, 1, False, SMALL_TILES)
    assert relative_error(out, reference_fp32(layer, 2, 1, False)) < 1e-5


def test_experts_that_get_no_tokens(ck):
    layer = make_layer(26, 32, 16, 8, seed=5)
    layer["router_logits"][:, 5:] -= 30.0  # experts 5..7 never reach the top 4
    _, experts = moe_math.route_softmax_topk(layer["router_logits"], 4, False)
    assert experts.max() < 5
    out = run_fused(ck, layer, 4, 2, False, SMALL_TILES)
    assert relative_error(out, reference_fp32(layer, 4, 2, False)) < 1e-5


def test_fused_moe_rejects_mixed_dtypes(ck):
    layer = make_layer(4, 32, 16, 4)
    with pytest.raises(ValueError, match="dtypes differ"):
        ck.fused_moe(layer["hidden"], layer["router_logits"], layer["gate_up"].half(), layer["down"],
                     None, 2, 0, False)


# ---------------------------------------------------------------- stages vs their torch twins

def distinct_logits(tokens, experts, seed):
    """Distinct multiples of 1/8, exact in every float dtype: no ties, whose order torch leaves open."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(experts, generator=gen) for _ in range(tokens)]) / 8 - 2


@pytest.mark.parametrize(("experts", "top_k", "norm", "scale", "logits_dtype"), [
    (8, 4, False, 1.0, torch.float32), (8, 4, True, 1.0, torch.float32), (7, 7, False, 1.0, torch.float32),
    (5, 1, True, 1.0, torch.float16), (64, 8, False, 1.0, torch.bfloat16), (6, 3, True, 2.5, torch.float32),
])
def test_softmax_topk_routing_matches_torch(ck, experts, top_k, norm, scale, logits_dtype):
    logits = distinct_logits(37, experts, experts + top_k).to(logits_dtype).to(DEVICE)
    weights, ids = ck.route(logits, top_k, norm, routing_scale=scale)
    expected_weights, expected_ids = moe_math.route(logits, top_k, norm, routing_scale=scale)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.long(), expected_ids)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("experts", "jitter_eps", "band_admits_others"),
                         [(8, 0.01, False), (16, 0.2, True), (5, 2.0, True)])
def test_sparsemixer_routing_matches_torch(ck, experts, jitter_eps, band_admits_others):
    logits = (distinct_logits(29, experts, experts) * 0.7).to(DEVICE)  # negative and positive scores
    weights, ids = ck.route(logits, 2, False, moe_math.SPARSEMIXER, jitter_eps=jitter_eps)
    expected_weights, expected_ids = moe_math.route(logits, 2, False, moe_math.SPARSEMIXER, jitter_eps=jitter_eps)
    assert torch.equal(ids.long(), expected_ids)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-6, atol=1e-7)
    assert bool((weights < 1).any()) == band_admits_others and (weights > 0).all()


@pytest.mark.parametrize(("experts", "top_k", "norm", "scale", "with_bias", "n_group", "topk_group"), [
    (8, 4, True, 2.5, True, 4, 2), (8, 2, False, 1.0, True, 2, 1), (16, 6, True, 1.0, True, 8, 3),
    (6, 3, True, 1.0, True, 1, 1), (7, 2, False, 1.0, False, 1, 1), (64, 8, True, 2.5, True, 8, 4),
    (512, 8, True, 2.5, True, 8, 4),  # 8 tokens per program (routing.sigmoid_routing_tiling)
])
def test_sigmoid_topk_routing_matches_torch(ck, experts, top_k, norm, scale, with_bias, n_group, topk_group):
    """DeepSeek-V3's routing: ids in the reference's rank order, weights the unbiased scores."""
    logits = distinct_logits(37, experts, experts + top_k).to(DEVICE)
    bias = variant_tensors(experts, 4, 4, seed=experts)["score_bias"] if with_bias else None
    options = dict(routing_scale=scale, score_bias=bias, n_group=n_group, topk_group=topk_group)
    weights, ids = ck.route(logits, top_k, norm, moe_math.SIGMOID_TOPK, **options)
    expected_weights, expected_ids = moe_math.route(logits, top_k, norm, moe_math.SIGMOID_TOPK, **options)
    assert torch.equal(ids.long(), expected_ids)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-6, atol=1e-7)
    if n_group > 1:  # every chosen expert sits in one of the topk_group groups
        assert all(len(set((row // (experts // n_group)).tolist())) <= topk_group for row in ids.long())


def test_routing_rejects_unknown_routing_and_sparsemixer_beyond_top2(ck):
    logits = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="unknown routing"):
        ck.route(logits, 2, False, "sigmoid")
    with pytest.raises(ValueError, match="top_k=2"):
        ck.route(logits, 3, False, moe_math.SPARSEMIXER)


def test_routing_breaks_ties_towards_the_lower_expert_id(ck):
    logits = torch.tensor([[0.0, 1.0, 0.5, 1.0, 0.5, -40.0, -40.0]], device=DEVICE)
    weights, ids = ck.route(logits, 7, False)
    assert ids.tolist() == [[1, 3, 2, 4, 0, 5, 6]]
    assert weights[0, 0] == weights[0, 1] and weights[0, 5] == weights[0, 6]


@pytest.mark.parametrize(("n_ce", "columns", "out_dtype"), [
    (1, 32, torch.float32), (3, 300, torch.float32), (2, 48, torch.float16),
])
def test_theta_matches_torch(ck, n_ce, columns, out_dtype):
    tokens, experts, top_k = 11, 6, n_ce + 2
    layer = make_layer(tokens, 32, 16, experts, ces_columns=columns, seed=n_ce)
    weights, ids = moe_math.route_softmax_topk(layer["router_logits"], top_k, False)
    km = top_k - n_ce
    theta = ck.mix_compressed_experts_theta(
        weights[:, km:], ids[:, km:].to(torch.int32), layer["ces"], out_dtype=out_dtype
    )
    expected = moe_math.mix_compressed_experts(weights[:, km:], ids[:, km:], layer["ces"])
    assert theta.shape == (tokens, 3, columns) and theta.dtype == out_dtype
    tolerance = 1e-6 if out_dtype == torch.float32 else 1e-3
    torch.testing.assert_close(theta.float(), expected, rtol=tolerance, atol=tolerance)


def _expert_ids(tokens, km, experts, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(experts, generator=gen)[:km] for _ in range(tokens)]).to(torch.int32)


ALIGN_CASES = {
    "random": (_expert_ids(37, 3, 8, 0), 8, 16),
    "one_token": (_expert_ids(1, 4, 8, 1), 8, 16),
    "block_m_32_odd_experts": (_expert_ids(50, 2, 5, 2), 5, 32),
    "all_on_one_expert": (torch.full((40, 1), 2, dtype=torch.int32), 4, 16),
    "empty_experts": (_expert_ids(20, 2, 3, 3), 9, 16),
    "multiple_of_block": (_expert_ids(32, 2, 2, 4), 2, 16),
    "more_pairs_than_one_chunk": (_expert_ids(700, 2, 6, 5), 6, 16),  # 1400 pairs > PAIRS_PER_CHUNK
}


@pytest.mark.parametrize("case", sorted(ALIGN_CASES))
def test_align_matches_torch_twin(ck, case):
    ids, experts, block_m = ALIGN_CASES[case]
    tokens, km = ids.shape
    got = ck.align_pairs_by_expert(ids.to(DEVICE), experts, block_m)
    want = ck.align_pairs_by_expert_torch(ids, experts, block_m)
    num_padded = int(got.num_padded.item())
    assert num_padded == int(want.num_padded.item()) and num_padded % block_m == 0
    assert got.sorted_pair_ids.numel() >= num_padded  # the worst-case buffer holds the real result
    assert torch.equal(got.sorted_pair_ids[:num_padded].cpu(), want.sorted_pair_ids)
    assert torch.equal(got.block_expert_ids[: num_padded // block_m].cpu(), want.block_expert_ids)
    real = got.sorted_pair_ids[:num_padded].cpu()
    assert torch.equal(real[real < tokens * km].sort().values, torch.arange(tokens * km, dtype=torch.int32))


def test_align_reads_a_row_strided_view(ck):
    """fused_moe passes expert_ids[:, :km] of a [T, K] tensor straight to the kernels."""
    ids = _expert_ids(21, 5, 8, 6)
    got = ck.align_pairs_by_expert(ids.to(DEVICE)[:, :3], 8, 16)
    want = ck.align_pairs_by_expert_torch(ids[:, :3].contiguous(), 8, 16)
    num_padded = int(got.num_padded.item())
    assert torch.equal(got.sorted_pair_ids[:num_padded].cpu(), want.sorted_pair_ids)


@pytest.mark.parametrize("tiles", [SMALL_TILES, SMALL_TILES_SWAPPED], ids=["plain_tiles", "swap_ab"])
@pytest.mark.parametrize("with_ce", [False, True])
def test_grouped_gemms_and_combine_match_torch_twins(ck, tiles, with_ce):
    config = ck.MoeTileConfig.from_dict(tiles)
    tokens, km, experts = 27, 3, 6
    layer = make_layer(tokens, 40, 24, experts, seed=7)
    weights, ids = ck.route(layer["router_logits"], km + 1, False)
    theta = ck.mix_compressed_experts_theta(weights[:, km:], ids[:, km:], layer["ces"]) if with_ce else None
    main_ids = ids[:, :km]
    alignment = ck.align_pairs_by_expert(main_ids, experts, config.block_m)

    act = ck.gate_up_swiglu(layer["hidden"], theta, layer["gate_up"], alignment, km, config)
    torch.testing.assert_close(
        act.cpu(), ck.gate_up_swiglu_torch(layer["hidden"], theta, layer["gate_up"], main_ids).cpu(),
        rtol=1e-5, atol=1e-5,
    )
    pair_out = ck.down_weighted(act, layer["down"], weights, alignment, km, config)
    torch.testing.assert_close(
        pair_out.cpu(), ck.down_weighted_torch(act, layer["down"], weights, main_ids).cpu(), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        ck.sum_main_slots(pair_out, tokens, km), ck.sum_main_slots_torch(pair_out, tokens, km), rtol=1e-6, atol=1e-6
    )


def test_tile_config_selection(ck):
    assert ck.select_tile_config(1).max_tokens >= 1
    assert ck.select_tile_config(4096).block_m == 64
    from ce_kernels import tile_configs as tc

    for table in (tc.H100_TILE_TABLE, tc.SMALL_SHARED_TILE_TABLE, tc.FP32_TILE_TABLE):
        sizes = [tc.select_tile_config(t, table=table).max_tokens for t in (1, 32, 33, 256, 257, 1024, 1025, 10 ** 6)]
        assert sizes == sorted(sizes) and sizes[-1] == table[-1]["max_tokens"]


def test_the_table_follows_the_dtype_and_the_devices_shared_memory(ck):
    from ce_kernels import tile_configs as tc

    assert tc.arch_tile_table("bf16", 90) is tc.H100_TILE_TABLE is tc.arch_tile_table("fp16", 80)
    assert tc.arch_tile_table("bf16", 86) is tc.SMALL_SHARED_TILE_TABLE is tc.arch_tile_table("fp16", 89)
    assert all(tc.arch_tile_table("fp32", arch) is tc.FP32_TILE_TABLE for arch in (80, 86, 89, 90))
    assert tc.tile_table(torch.bfloat16, None) is tc.H100_TILE_TABLE  # no device: the interpreter
    assert tc.select_tile_config(4096, torch.float32, 232448) == tc.MoeTileConfig.from_dict(tc.FP32_TILE_TABLE[-1])
    assert tc.select_tile_config(4096, "bf16", 101376) == tc.MoeTileConfig.from_dict(tc.SMALL_SHARED_TILE_TABLE[-1])
    with pytest.raises(ValueError, match="no tile table fits 65536 B"):
        tc.arch_tile_table("fp16", 75)


# ---------------------------------------------------------------- GPU only

# Each dtype at OLMoE-1B-7B shapes through the tile table the device gets, every T bucket of it
# (1 / 8 <= 32, 64 <= 256, 512 <= 1024, 4096 beyond) for bf16 and fp32. Tolerances vs the fp32
# reference with the same routing: bf16 ~1e-2 is its rounding of h*theta and act, fp16 ~1e-3,
# fp32 (full-precision dot) only the summation order.
GPU_OLMOE_CASES = [("bf16", t) for t in (1, 8, 64, 512, 4096)] + [("fp16", t) for t in (8, 4096)] + \
    [("fp32", t) for t in (1, 64, 512, 4096)]
GPU_TOLERANCE = {"bf16": 2e-2, "fp16": 3e-3, "fp32": 1e-5}
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@gpu_only
@pytest.mark.parametrize(("dtype", "tokens"), GPU_OLMOE_CASES)
def test_olmoe_shapes_match_reference_on_gpu(ck, dtype, tokens):
    layer = make_layer(tokens, 2048, 1024, 64, dtype=TORCH_DTYPE[dtype], ces_columns=2048, seed=tokens)
    out = run_fused(ck, layer, 8, 4, False)
    assert out.dtype == TORCH_DTYPE[dtype]
    assert relative_error(out, reference_fp32(layer, 8, 4, False)) < GPU_TOLERANCE[dtype]


@gpu_only
def test_cuda_op_runs_the_kernels_not_the_reference(ck):
    """The op as models call it, strict: it must dispatch to fused_moe (same result bit for bit)."""
    from ce_export import ops

    layer = make_layer(24, 256, 128, 16, dtype=torch.bfloat16, seed=11)
    args = (layer["hidden"], layer["router_logits"], layer["gate_up"], layer["down"], layer["ces"], 6, 2, False)
    assert ops.why_not_kernels(layer["hidden"], layer["gate_up"], layer["down"]) is None
    with ops.strict_kernels():
        assert torch.equal(torch.ops.ce_export.moe(*args), ck.fused_moe(*args))


@gpu_only
def test_cuda_graph_replay_matches_eager(ck):
    layer = make_layer(40, 256, 128, 16, dtype=torch.bfloat16, seed=9)
    static_in = layer["hidden"].clone()
    eager = run_fused(ck, layer, 6, 2, False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run_fused(ck, {**layer, "hidden": static_in}, 6, 2, False)  # warm up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run_fused(ck, {**layer, "hidden": static_in}, 6, 2, False)
    static_in.copy_(layer["hidden"])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)
