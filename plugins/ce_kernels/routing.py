"""Stage 1, routing: router logits [T, E] -> (weights fp32 [T, K], expert ids int32 [T, K]).

The routings of `ce_export.moe_math.route` (the torch twin; its ids are int64):
- softmax_topk: softmax over all experts in fp32, top-k sorted descending, optional renormalisation,
  then times routing_scale (OLMoE, Qwen-MoE, Mixtral, DeepSeek-style scaling, gpt-oss);
- sparsemixer: Phi-3.5-MoE's inference-time top-2, two argmax rounds each weighted by a softmax
  over the logits within a relative band 2 * jitter_eps of that round's maximum;
- sigmoid_topk: DeepSeek-V3's, sigmoid scores, the choice by score + score_bias within the best
  topk_group of n_group expert groups, weighted by the unbiased scores (optionally renormalised),
  times routing_scale (DeepSeek-V3, GLM-4.5, dots1, MiniMax-M2).
Ties between equal values go to the lower expert id (and, between groups, the lower group id).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ce_export.moe_math import RENORMALISE_EPS, SIGMOID_TOPK, SOFTMAX_TOPK, SPARSEMIXER

ROUTING_TOKENS_PER_PROGRAM = 16
SUPPORTED_ROUTINGS = (SOFTMAX_TOPK, SPARSEMIXER, SIGMOID_TOPK)


@triton.jit
def topk_softmax_kernel(
    logits_ptr, weights_ptr, expert_ids_ptr,
    num_tokens, num_experts, stride_logits_t,
    TOP_K: tl.constexpr, NORM_TOPK_PROB: tl.constexpr, ROUTING_SCALE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program routes BLOCK_T tokens. weights fp32 [T, TOP_K], expert_ids int32 [T, TOP_K]."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    expert_ok = experts < num_experts
    logits = tl.load(
        logits_ptr + rows[:, None].to(tl.int64) * stride_logits_t + experts[None, :],
        mask=row_ok[:, None] & expert_ok[None, :], other=0.0,
    ).to(tl.float32)
    logits = tl.where(expert_ok[None, :], logits, float("-inf"))
    shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = shifted / tl.sum(shifted, axis=1)[:, None]
    # A real expert's probability can underflow to 0; -1 keeps padding lanes below it.
    probs = tl.where(expert_ok[None, :], probs, -1.0)

    slots = tl.arange(0, BLOCK_K)
    top_weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    top_ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for k in range(TOP_K):
        best = tl.max(probs, axis=1)
        best_id = tl.argmax(probs, axis=1)
        top_weights = tl.where(slots[None, :] == k, best[:, None], top_weights)
        top_ids = tl.where(slots[None, :] == k, best_id[:, None], top_ids)
        probs = tl.where(experts[None, :] == best_id[:, None], -2.0, probs)
    if NORM_TOPK_PROB:
        top_weights = top_weights / tl.sum(top_weights, axis=1)[:, None]
    if ROUTING_SCALE != 1.0:
        top_weights = top_weights * ROUTING_SCALE

    out_offsets = rows[:, None].to(tl.int64) * TOP_K + slots[None, :]
    out_mask = row_ok[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out_offsets, top_weights, mask=out_mask)
    tl.store(expert_ids_ptr + out_offsets, top_ids, mask=out_mask)


@triton.jit
def sparsemixer_top2_kernel(
    logits_ptr, weights_ptr, expert_ids_ptr,
    num_tokens, num_experts, stride_logits_t,
    JITTER_EPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """One program routes BLOCK_T tokens. weights fp32 [T, 2], expert_ids int32 [T, 2]."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    expert_ok = experts < num_experts
    scores = tl.load(
        logits_ptr + rows[:, None].to(tl.int64) * stride_logits_t + experts[None, :],
        mask=row_ok[:, None] & expert_ok[None, :], other=0.0,
    ).to(tl.float32)
    scores = tl.where(expert_ok[None, :], scores, float("-inf"))

    slots = tl.arange(0, 2)
    top_weights = tl.zeros((BLOCK_T, 2), dtype=tl.float32)
    top_ids = tl.zeros((BLOCK_T, 2), dtype=tl.int32)
    remaining = scores
    for k in tl.static_range(2):
        top = tl.max(remaining, axis=1)
        best_id = tl.argmax(remaining, axis=1)
        # Padding lanes read as `top` (gap 0); `remaining` keeps them at -inf regardless. A zero
        # denominator (the reference's 0/0 or x/0) always lands inside the band; so does gap/1.
        finite = tl.where(expert_ok[None, :], scores, top[:, None])
        denominator = tl.maximum(tl.abs(finite), top[:, None])
        relative_gap = (top[:, None] - finite) / tl.where(denominator == 0.0, 1.0, denominator)
        in_band = tl.where(relative_gap > 2 * JITTER_EPS, float("-inf"), remaining)
        shifted = tl.exp(in_band - top[:, None])
        gates = shifted / tl.sum(shifted, axis=1)[:, None]
        is_best = experts[None, :] == best_id[:, None]
        weight = tl.sum(tl.where(is_best, gates, 0.0), axis=1)
        top_weights = tl.where(slots[None, :] == k, weight[:, None], top_weights)
        top_ids = tl.where(slots[None, :] == k, best_id[:, None], top_ids)
        remaining = tl.where(is_best, float("-inf"), remaining)

    out_offsets = rows[:, None].to(tl.int64) * 2 + slots[None, :]
    tl.store(weights_ptr + out_offsets, top_weights, mask=row_ok[:, None])
    tl.store(expert_ids_ptr + out_offsets, top_ids, mask=row_ok[:, None])


@triton.jit
def sigmoid_topk_kernel(
    logits_ptr, score_bias_ptr, weights_ptr, expert_ids_ptr,
    num_tokens, num_experts, stride_logits_t,
    TOP_K: tl.constexpr, NORM_TOPK_PROB: tl.constexpr, ROUTING_SCALE: tl.constexpr, HAS_SCORE_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, RENORM_EPS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program routes BLOCK_T tokens. weights fp32 [T, TOP_K], expert_ids int32 [T, TOP_K].
    Without a score bias the choice is by the logits (the same order as by the scores)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    expert_ok = experts < num_experts
    logits = tl.load(
        logits_ptr + rows[:, None].to(tl.int64) * stride_logits_t + experts[None, :],
        mask=row_ok[:, None] & expert_ok[None, :], other=0.0,
    ).to(tl.float32)
    scores = tl.sigmoid(logits)
    if HAS_SCORE_BIAS:
        bias = tl.load(score_bias_ptr + experts, mask=expert_ok, other=0.0).to(tl.float32)
        choice = scores + bias[None, :]
    else:
        choice = logits
    choice = tl.where(expert_ok[None, :], choice, float("-inf"))

    if N_GROUP > 1:
        # Each lane learns its group's worth (the sum of the group's two best choice values); the
        # best TOPK_GROUP groups stay, the other lanes drop to -inf.
        group = experts // (num_experts // N_GROUP)
        worth = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        for g in tl.static_range(N_GROUP):
            in_group = (group == g)[None, :] & expert_ok[None, :]
            values = tl.where(in_group, choice, float("-inf"))
            first = tl.max(values, axis=1)
            first_id = tl.argmax(values, axis=1)
            second = tl.max(tl.where(experts[None, :] == first_id[:, None], float("-inf"), values), axis=1)
            worth = tl.where(in_group, (first + second)[:, None], worth)
        worth = tl.where(expert_ok[None, :], worth, float("-inf"))
        kept = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            best_group = tl.argmax(worth, axis=1) // (num_experts // N_GROUP)  # lowest lane: lowest group on ties
            chosen = group[None, :] == best_group[:, None]
            kept = kept | chosen
            worth = tl.where(chosen, float("-inf"), worth)
        choice = tl.where(kept & expert_ok[None, :], choice, float("-inf"))

    slots = tl.arange(0, BLOCK_K)
    top_weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    top_ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for k in range(TOP_K):
        best_id = tl.argmax(choice, axis=1)
        is_best = experts[None, :] == best_id[:, None]
        weight = tl.sum(tl.where(is_best, scores, 0.0), axis=1)
        top_weights = tl.where(slots[None, :] == k, weight[:, None], top_weights)
        top_ids = tl.where(slots[None, :] == k, best_id[:, None], top_ids)
        # The chosen lane leaves the race at -inf, with the dropped groups' lanes; enough kept lanes
        # stay above them (check_moe_arguments: TOP_K <= the kept groups' experts).
        choice = tl.where(is_best, float("-inf"), choice)
    if NORM_TOPK_PROB:
        top_weights = top_weights / (tl.sum(top_weights, axis=1)[:, None] + RENORM_EPS)
    if ROUTING_SCALE != 1.0:
        top_weights = top_weights * ROUTING_SCALE

    out_offsets = rows[:, None].to(tl.int64) * TOP_K + slots[None, :]
    out_mask = row_ok[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out_offsets, top_weights, mask=out_mask)
    tl.store(expert_ids_ptr + out_offsets, top_ids, mask=out_mask)


def routing_block_sizes(num_experts: int, top_k: int) -> dict[str, int]:
    return {
        "BLOCK_T": ROUTING_TOKENS_PER_PROGRAM,
        "BLOCK_E": triton.next_power_of_2(num_experts),
        "BLOCK_K": triton.next_power_of_2(top_k),
    }


# sigmoid_topk keeps several [BLOCK_T, BLOCK_E] fp32 tiles live (logits, scores, choice, group worth):
# at 16 tokens x 256 experts, 4 warps spill on sm_80 and sm_90 (DeepSeek-V3). A program gets 8 warps
# past 2048 lanes and fewer tokens past 4096 (ptxas reports no spills at E = 256 and 512 then).
SIGMOID_LANES_PER_4_WARPS = 2048
SIGMOID_MAX_LANES = 4096


def sigmoid_routing_tiling(num_experts: int, top_k: int) -> tuple[dict[str, int], int]:
    """(BLOCK_T / BLOCK_E / BLOCK_K, num_warps) of sigmoid_topk_kernel, here and ahead of time."""
    blocks = routing_block_sizes(num_experts, top_k)
    blocks["BLOCK_T"] = min(blocks["BLOCK_T"], max(1, SIGMOID_MAX_LANES // blocks["BLOCK_E"]))
    num_warps = 4 if blocks["BLOCK_T"] * blocks["BLOCK_E"] <= SIGMOID_LANES_PER_4_WARPS else 8
    return blocks, num_warps


def route(
    router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool,
    routing: str = SOFTMAX_TOPK, routing_scale: float = 1.0, jitter_eps: float = 0.0,
    score_bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] (any float dtype) -> (weights fp32 [T, K], expert ids int32 [T, K]);
    score_bias [E], n_group and topk_group are sigmoid_topk's."""
    if routing not in SUPPORTED_ROUTINGS:
        raise ValueError(f"unknown routing {routing!r} (known: {', '.join(SUPPORTED_ROUTINGS)})")
    if routing == SPARSEMIXER and top_k != 2:
        raise ValueError(f"sparsemixer routing is defined for top_k=2, got {top_k}")
    num_tokens, num_experts = router_logits.shape
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    expert_ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if num_tokens == 0:
        return weights, expert_ids
    blocks, num_warps = (sigmoid_routing_tiling(num_experts, top_k) if routing == SIGMOID_TOPK
                         else (routing_block_sizes(num_experts, top_k), 4))
    grid = (triton.cdiv(num_tokens, blocks["BLOCK_T"]),)
    args = (router_logits, weights, expert_ids, num_tokens, num_experts, router_logits.stride(0))
    if routing == SOFTMAX_TOPK:
        topk_softmax_kernel[grid](
            *args, TOP_K=top_k, NORM_TOPK_PROB=norm_topk_prob, ROUTING_SCALE=float(routing_scale), **blocks,
        )
    elif routing == SIGMOID_TOPK:
        bias = router_logits if score_bias is None else score_bias.contiguous()  # never read without a bias
        sigmoid_topk_kernel[grid](
            router_logits, bias, weights, expert_ids, num_tokens, num_experts, router_logits.stride(0),
            TOP_K=top_k, NORM_TOPK_PROB=norm_topk_prob, ROUTING_SCALE=float(routing_scale),
            HAS_SCORE_BIAS=score_bias is not None, N_GROUP=n_group, TOPK_GROUP=topk_group,
            RENORM_EPS=RENORMALISE_EPS, **blocks, num_warps=num_warps,
        )
    else:
        sparsemixer_top2_kernel[grid](
            *args, JITTER_EPS=float(jitter_eps), BLOCK_T=blocks["BLOCK_T"], BLOCK_E=blocks["BLOCK_E"],
        )
    return weights, expert_ids
