"""The MoE / Compressed-Experts math: the single source of truth.

Every fast path (the ONNX function bodies, the Triton kernels, the TensorRT plugin) is tested
against the functions in this file. They are written to be read, not to be fast.

Shapes (T tokens, H hidden, I expert intermediate, E experts, K routed experts per token):
    hidden         [T, H]
    router_logits  [T, E]
    gate_up        [E, 2I, H]   gate rows first, then up rows (transformers 5 layout)
    down           [E, H, I]
    ces            [E, 3, C]    C >= max(H, I); row 0 scales the gate input (first H entries),
                                row 2 the up input (first H), row 1 the SwiGLU activation (first I)

Optional per-layer extras (None / defaults when a family has none):
    score_bias     [E]          added to the scores only to choose experts (DeepSeek-V3's e_score_correction_bias)
    gate_up_bias   [E, 2I]      expert biases (gpt-oss), gate rows first, then up rows
    down_bias      [E, H]

A CE layer routes top-K as usual. The best K - n_ce experts by the routing's own order ("main") run
in full; the other n_ce ("auxiliary") never run: their `ces` vectors, mixed by their renormalised
routing weights, scale the main experts' inputs and activation. n_ce = 0 is a plain MoE. See
../shared/notes/ce-math.md.

Routings (`route`), each returning the K selected experts in rank order with their weights:
    softmax_topk   softmax over all experts, top-K, optional renormalisation, times routing_scale
                   (OLMoE, Qwen-MoE, Mixtral, DeepSeek-V2; gpt-oss and Granite-MoE take the softmax of
                   the top-K logits, which is the renormalised softmax top-K)
    sparsemixer    Phi-3.5-MoE's SparseMixer at inference (top-2)
    sigmoid_topk   sigmoid scores; the choice is by scores + score_bias, within the best topk_group of
                   n_group expert groups (a group's score: the sum of its two best); the weights are
                   the unbiased scores, optionally renormalised, times routing_scale (DeepSeek-V3,
                   Kimi-K2, GLM-4.5, dots1, MiniMax-M2). Without a score bias the choice is by the
                   logits (Llama 4: the same order, without the sigmoid's saturation ties).
Expert activations (`activate`):
    swiglu          silu(gate) * up
    clamped_swiglu  gpt-oss: gate = min(gate, limit), up = clamp(up, -limit, limit),
                    gate * sigmoid(alpha * gate) * (up + 1)
With weights_on_input (Llama 4, top-1 only) the routing weight scales the expert's input instead of
its output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CES_GATE_INPUT, CES_ACTIVATION, CES_UP_INPUT = 0, 1, 2

SOFTMAX_TOPK = "softmax_topk"  # OLMoE, Qwen-MoE, Mixtral (renormalised), DeepSeek-V2 (scaled), gpt-oss
SPARSEMIXER = "sparsemixer"  # Phi-3.5-MoE, inference form (top-2)
SIGMOID_TOPK = "sigmoid_topk"  # DeepSeek-V3 (bias, groups, scaled), GLM-4.5, dots1, MiniMax-M2, Llama 4
ROUTINGS = (SOFTMAX_TOPK, SPARSEMIXER, SIGMOID_TOPK)

SWIGLU = "swiglu"
CLAMPED_SWIGLU = "clamped_swiglu"  # gpt-oss
ACTIVATIONS = (SWIGLU, CLAMPED_SWIGLU)
RENORMALISE_EPS = 1e-20  # DeepSeek-V3's denominator guard for sigmoid weights (an fp32 no-op unless the sum < 1e-13)


def route_softmax_topk(
    router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, top-k sorted descending, optional renormalisation.

    Returns (weights fp32 [T, K], expert ids int64 [T, K]).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def route_sparsemixer_top2(router_logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3.5-MoE's SparseMixer at inference: two argmax rounds, each weighted by a softmax over
    the logits within a relative band 2 * jitter_eps of that round's maximum.

    Returns (weights fp32 [T, 2], expert ids int64 [T, 2]); the first column is the argmax.
    """
    scores = router_logits.float()
    weights, experts = [], []
    remaining = scores
    for _ in range(2):
        top, index = remaining.max(dim=-1, keepdim=True)
        outside_band = (top - scores) / scores.abs().clamp(min=top) > 2 * jitter_eps
        gates = torch.softmax(remaining.masked_fill(outside_band, float("-inf")), dim=-1)
        weights.append(gates.gather(-1, index))
        experts.append(index)
        remaining = remaining.scatter(-1, index, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(experts, dim=-1)


def route_sigmoid_topk(
    router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool, score_bias: torch.Tensor | None = None,
    n_group: int = 1, topk_group: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's routing: sigmoid scores; the experts are chosen by scores + score_bias among
    the experts of the best `topk_group` of `n_group` equal groups (a group scores the sum of its
    two best choice values); their weights are the unbiased scores, renormalised (with
    RENORMALISE_EPS) when norm_topk_prob. Without a score bias the choice is by the logits.

    Returns (weights fp32 [T, K], expert ids int64 [T, K]) sorted by descending choice value.
    """
    scores = torch.sigmoid(router_logits.float())
    choice = router_logits.float() if score_bias is None else scores + score_bias.float()
    if n_group > 1:
        tokens, num_experts = choice.shape
        per_group = num_experts // n_group
        group_scores = choice.view(tokens, n_group, per_group).topk(2, dim=-1).values.sum(dim=-1)
        best_groups = group_scores.topk(topk_group, dim=-1).indices
        kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, best_groups, True)
        choice = choice.masked_fill(~kept.repeat_interleave(per_group, dim=1), float("-inf"))
    experts = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, experts)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORMALISE_EPS)
    return weights, experts


def route(router_logits, top_k: int, norm_topk_prob: bool, routing: str = SOFTMAX_TOPK,
          routing_scale: float = 1.0, jitter_eps: float = 0.0, score_bias: torch.Tensor | None = None,
          n_group: int = 1, topk_group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32 [T, K], expert ids [T, K]) in rank order, which CE splits into main and aux:
    softmax top-k by descending weight; SparseMixer by selection round (its argmax first);
    sigmoid top-k by descending choice value (biased score)."""
    if routing == SOFTMAX_TOPK:
        weights, experts = route_softmax_topk(router_logits, top_k, norm_topk_prob)
        return weights * routing_scale, experts
    if routing == SPARSEMIXER:
        if top_k != 2:
            raise ValueError(f"sparsemixer routing is defined for top_k=2, got {top_k}")
        return route_sparsemixer_top2(router_logits, jitter_eps)
    if routing == SIGMOID_TOPK:
        weights, experts = route_sigmoid_topk(router_logits, top_k, norm_topk_prob, score_bias, n_group, topk_group)
        return weights * routing_scale, experts
    raise ValueError(f"unknown routing {routing!r} (known: {', '.join(ROUTINGS)})")


def mix_compressed_experts(
    aux_weights: torch.Tensor, aux_experts: torch.Tensor, ces: torch.Tensor
) -> torch.Tensor:
    """theta[t] = sum_j a_j * ces[aux_experts[t, j]], a = aux_weights renormalised to sum 1.

    aux_weights fp32 [T, n_ce], aux_experts [T, n_ce], ces [E, 3, C] -> theta fp32 [T, 3, C].
    """
    mix = aux_weights / aux_weights.sum(dim=-1, keepdim=True)
    return torch.einsum("tj,tjrc->trc", mix, ces.float()[aux_experts])


def activate(gate: torch.Tensor, up: torch.Tensor, activation: str = SWIGLU, swiglu_alpha: float = 1.0,
             swiglu_limit: float = 0.0) -> torch.Tensor:
    """The expert's gated activation of its gate and up projections (see the module docstring)."""
    if activation == SWIGLU:
        return F.silu(gate) * up
    if activation == CLAMPED_SWIGLU:
        gate = gate.clamp(max=swiglu_limit)
        up = up.clamp(min=-swiglu_limit, max=swiglu_limit)
        return gate * torch.sigmoid(gate * swiglu_alpha) * (up + 1)
    raise ValueError(f"unknown activation {activation!r} (known: {', '.join(ACTIVATIONS)})")


def swiglu_expert(
    x_gate: torch.Tensor, x_up: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
    activation_scale: torch.Tensor | None = None, gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None, activation: str = SWIGLU, swiglu_alpha: float = 1.0,
    swiglu_limit: float = 0.0,
) -> torch.Tensor:
    """down @ (act(gate @ x_gate + b_gate, up @ x_up + b_up) [* activation_scale]) + b_down for one
    expert's rows."""
    intermediate = down.shape[-1]
    gate_bias = up_bias = None
    if gate_up_bias is not None:
        gate_bias, up_bias = gate_up_bias[:intermediate], gate_up_bias[intermediate:]
    gate = F.linear(x_gate, gate_up[:intermediate], gate_bias)
    up = F.linear(x_up, gate_up[intermediate:], up_bias)
    act = activate(gate, up, activation, swiglu_alpha, swiglu_limit)
    if activation_scale is not None:
        act = act * activation_scale
    return F.linear(act, down, down_bias)


def moe_reference(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    ces: torch.Tensor | None,
    top_k: int,
    n_ce: int,
    norm_topk_prob: bool,
    routing: str = SOFTMAX_TOPK,
    routing_scale: float = 1.0,
    jitter_eps: float = 0.0,
    score_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    activation: str = SWIGLU,
    swiglu_alpha: float = 1.0,
    swiglu_limit: float = 0.0,
    weights_on_input: bool = False,
) -> torch.Tensor:
    """One MoE block's routed experts (plain when n_ce == 0, Compressed Experts otherwise): [T, H].

    Shared experts, where an architecture has them, are transformers' own modules beside this
    (capture.py).
    """
    check_moe_arguments(hidden, router_logits, gate_up, down, ces, top_k, n_ce, routing, score_bias, n_group,
                        topk_group, gate_up_bias, down_bias, activation, weights_on_input)
    weights, experts = route(router_logits, top_k, norm_topk_prob, routing, routing_scale, jitter_eps, score_bias,
                             n_group, topk_group)
    n_main = top_k - n_ce
    main_weights, main_experts = weights[:, :n_main], experts[:, :n_main]

    hidden_size, intermediate = hidden.shape[1], down.shape[2]
    x_gate = x_up = hidden
    activation_scale = None
    if weights_on_input:  # top-1: the expert runs on hidden * w and its output is not weighted
        x_gate = x_up = hidden * main_weights.to(hidden.dtype)
        main_weights = torch.ones_like(main_weights)
    if n_ce > 0:
        theta = mix_compressed_experts(weights[:, n_main:], experts[:, n_main:], ces).to(hidden.dtype)
        x_gate = hidden * theta[:, CES_GATE_INPUT, :hidden_size]
        x_up = hidden * theta[:, CES_UP_INPUT, :hidden_size]
        activation_scale = theta[:, CES_ACTIVATION, :intermediate]

    out = torch.zeros_like(hidden)
    for expert in torch.unique(main_experts).tolist():
        tokens, slots = torch.where(main_experts == expert)
        # Weights stored narrower than the activations (bf16 experts of an fp32 reference) are
        # upcast one expert at a time: the same values as an upcast copy of the whole layer.
        y = swiglu_expert(
            x_gate[tokens], x_up[tokens], gate_up[expert].to(hidden.dtype), down[expert].to(hidden.dtype),
            None if activation_scale is None else activation_scale[tokens],
            None if gate_up_bias is None else gate_up_bias[expert], None if down_bias is None else down_bias[expert],
            activation, swiglu_alpha, swiglu_limit,
        )
        out.index_add_(0, tokens, y * main_weights[tokens, slots, None].to(hidden.dtype))
    return out


def check_moe_arguments(hidden, router_logits, gate_up, down, ces, top_k: int, n_ce: int, routing: str = SOFTMAX_TOPK,
                        score_bias=None, n_group: int = 1, topk_group: int = 1, gate_up_bias=None, down_bias=None,
                        activation: str = SWIGLU, weights_on_input: bool = False) -> None:
    """Shape and argument checks shared by every implementation of the op."""
    tokens, hidden_size = hidden.shape
    num_experts = gate_up.shape[0]
    intermediate = down.shape[2]
    if router_logits.shape != (tokens, num_experts):
        raise ValueError(f"router_logits {tuple(router_logits.shape)} != [{tokens}, {num_experts}]")
    if gate_up.shape != (num_experts, 2 * intermediate, hidden_size):
        raise ValueError(f"gate_up {tuple(gate_up.shape)} != [{num_experts}, {2 * intermediate}, {hidden_size}]")
    if down.shape != (num_experts, hidden_size, intermediate):
        raise ValueError(f"down {tuple(down.shape)} != [{num_experts}, {hidden_size}, {intermediate}]")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} outside 1..{num_experts}")
    if n_ce:
        if not 1 <= n_ce < top_k:
            raise ValueError(f"n_ce={n_ce} outside 1..{top_k - 1} (top_k={top_k})")
        if ces is None:
            raise ValueError("n_ce > 0 needs the ces tensor")
        if ces.shape[:2] != (num_experts, 3) or ces.shape[2] < max(hidden_size, intermediate):
            raise ValueError(
                f"ces {tuple(ces.shape)} != [{num_experts}, 3, >= {max(hidden_size, intermediate)}]"
            )
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r} (known: {', '.join(ROUTINGS)})")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r} (known: {', '.join(ACTIVATIONS)})")
    if score_bias is not None and (routing != SIGMOID_TOPK or tuple(score_bias.shape) != (num_experts,)):
        raise ValueError(f"score_bias {tuple(score_bias.shape)}: needs sigmoid_topk routing and shape [{num_experts}]")
    if (n_group, topk_group) != (1, 1):
        if routing != SIGMOID_TOPK or score_bias is None:
            raise ValueError("group-limited routing (n_group > 1) needs sigmoid_topk routing with a score bias")
        if n_group < 1 or num_experts % n_group or num_experts // n_group < 2 or not 1 <= topk_group <= n_group:
            raise ValueError(f"n_group={n_group}, topk_group={topk_group} do not fit {num_experts} experts "
                             f"(equal groups of at least 2, 1 <= topk_group <= n_group)")
        if top_k > topk_group * (num_experts // n_group):
            raise ValueError(f"top_k={top_k} exceeds the {topk_group * (num_experts // n_group)} experts of the kept groups")
    if gate_up_bias is not None and tuple(gate_up_bias.shape) != (num_experts, 2 * intermediate):
        raise ValueError(f"gate_up_bias {tuple(gate_up_bias.shape)} != [{num_experts}, {2 * intermediate}]")
    if down_bias is not None and tuple(down_bias.shape) != (num_experts, hidden_size):
        raise ValueError(f"down_bias {tuple(down_bias.shape)} != [{num_experts}, {hidden_size}]")
    if weights_on_input and (top_k != 1 or n_ce):
        raise ValueError(f"weights_on_input is defined for top_k=1 without CE, got top_k={top_k}, n_ce={n_ce}")
