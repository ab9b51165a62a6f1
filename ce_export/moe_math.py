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

A CE layer routes top-K as usual. The best K - n_ce experts ("main") run in full; the other n_ce
("auxiliary") never run: their `ces` vectors, mixed by their renormalised routing weights, scale
the main experts' inputs and activation. n_ce = 0 is a plain MoE. See ../shared/notes/ce-math.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CES_GATE_INPUT, CES_ACTIVATION, CES_UP_INPUT = 0, 1, 2

SOFTMAX_TOPK = "softmax_topk"  # OLMoE, Qwen-MoE, Mixtral (renormalised), DeepSeek (scaled)
SPARSEMIXER = "sparsemixer"  # Phi-3.5-MoE, inference form (top-2)
ROUTINGS = (SOFTMAX_TOPK, SPARSEMIXER)


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


def route(router_logits, top_k: int, norm_topk_prob: bool, routing: str = SOFTMAX_TOPK,
          routing_scale: float = 1.0, jitter_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32 [T, K], expert ids [T, K]) in rank order, which CE splits into main and aux:
    softmax top-k by descending weight; SparseMixer by selection round (its argmax first)."""
    if routing == SOFTMAX_TOPK:
        weights, experts = route_softmax_topk(router_logits, top_k, norm_topk_prob)
        return weights * routing_scale, experts
    if routing == SPARSEMIXER:
        if top_k != 2:
            raise ValueError(f"sparsemixer routing is defined for top_k=2, got {top_k}")
        return route_sparsemixer_top2(router_logits, jitter_eps)
    raise ValueError(f"unknown routing {routing!r} (known: {', '.join(ROUTINGS)})")


def mix_compressed_experts(
    aux_weights: torch.Tensor, aux_experts: torch.Tensor, ces: torch.Tensor
) -> torch.Tensor:
    """theta[t] = sum_j a_j * ces[aux_experts[t, j]], a = aux_weights renormalised to sum 1.

    aux_weights fp32 [T, n_ce], aux_experts [T, n_ce], ces [E, 3, C] -> theta fp32 [T, 3, C].
    """
    mix = aux_weights / aux_weights.sum(dim=-1, keepdim=True)
    return torch.einsum("tj,tjrc->trc", mix, ces.float()[aux_experts])


def swiglu_expert(
    x_gate: torch.Tensor, x_up: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
    activation_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """down @ (silu(gate @ x_gate) * (up @ x_up) [* activation_scale]) for one expert's rows."""
    intermediate = down.shape[-1]
    gate = F.linear(x_gate, gate_up[:intermediate])
    up = F.linear(x_up, gate_up[intermediate:])
    act = F.silu(gate) * up
    if activation_scale is not None:
        act = act * activation_scale
    return F.linear(act, down)


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
) -> torch.Tensor:
    """One MoE block's routed experts (plain when n_ce == 0, Compressed Experts otherwise): [T, H].

    Shared experts, where an architecture has them, are dense MLPs added beside this (capture.py).
    """
    check_moe_arguments(hidden, router_logits, gate_up, down, ces, top_k, n_ce)
    weights, experts = route(router_logits, top_k, norm_topk_prob, routing, routing_scale, jitter_eps)
    n_main = top_k - n_ce
    main_weights, main_experts = weights[:, :n_main], experts[:, :n_main]

    hidden_size, intermediate = hidden.shape[1], down.shape[2]
    x_gate = x_up = hidden
    activation_scale = None
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
        )
        out.index_add_(0, tokens, y * main_weights[tokens, slots, None].to(hidden.dtype))
    return out


def check_moe_arguments(hidden, router_logits, gate_up, down, ces, top_k: int, n_ce: int) -> None:
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
