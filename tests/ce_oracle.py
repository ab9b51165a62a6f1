"""An independent, deliberately plain implementation of ce-math.md: loops over tokens and slots,
float64, no shared code with ce_export.moe_math. Tests use it as the oracle for the reference op.

Routings: softmax top-k, SparseMixer top-2 (Phi-3.5-MoE), and sigmoid top-k with a selection bias
and group-limited choice (DeepSeek-V3 and its kin); experts: SwiGLU, or gpt-oss's clamped SwiGLU
with biases. CE takes the main experts by the routing's own order and mixes the auxiliary experts'
ces vectors by their renormalised weights.
"""

from __future__ import annotations

import math

import torch


def silu(x: float) -> float:
    return x / (1.0 + math.exp(-x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def softmax_topk(logits: list[float], top_k: int, norm_topk_prob: bool, scale: float) -> tuple[list[int], list[float]]:
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    probs = [v / sum(exps) for v in exps]
    order = sorted(range(len(logits)), key=lambda e: -probs[e])[:top_k]
    weights = [probs[e] for e in order]
    if norm_topk_prob:
        weights = [w / sum(weights) for w in weights]
    return order, [w * scale for w in weights]


def sparsemixer_top2(logits: list[float], jitter_eps: float) -> tuple[list[int], list[float]]:
    """Phi-3.5-MoE at inference: pick the best remaining expert twice; its weight is a softmax over
    the experts whose logit lies within a relative band 2 * jitter_eps of that round's best."""
    order, weights, excluded = [], [], set()
    for _ in range(2):
        candidates = [e for e in range(len(logits)) if e not in excluded]
        best = max(candidates, key=lambda e: logits[e])
        top = logits[best]
        band = [e for e in candidates if (top - logits[e]) / max(abs(logits[e]), top) <= 2 * jitter_eps]
        weights.append(1.0 / sum(math.exp(logits[e] - top) for e in band))
        order.append(best)
        excluded.add(best)
    return order, weights


def sigmoid_topk(logits: list[float], top_k: int, norm_topk_prob: bool, scale: float, score_bias: list[float] | None,
                 n_group: int, topk_group: int) -> tuple[list[int], list[float]]:
    """DeepSeek-V3: choose by sigmoid score + bias among the experts of the topk_group best groups
    (a group's worth: its two best choice values summed); weigh by the unbiased sigmoid score."""
    experts = len(logits)
    scores = [sigmoid(v) for v in logits]
    choice = list(logits) if score_bias is None else [s + b for s, b in zip(scores, score_bias)]
    per_group = experts // n_group
    worth = [sum(sorted(choice[g * per_group:(g + 1) * per_group], reverse=True)[:2]) for g in range(n_group)]
    groups = sorted(range(n_group), key=lambda g: -worth[g])[:topk_group]
    allowed = [e for e in range(experts) if e // per_group in groups]
    order = sorted(allowed, key=lambda e: -choice[e])[:top_k]
    weights = [scores[e] for e in order]
    if norm_topk_prob:
        total = sum(weights) + 1e-20
        weights = [w / total for w in weights]
    return order, [w * scale for w in weights]


def ce_moe_loop(hidden, router_logits, gate_up, down, ces, top_k: int, n_ce: int, norm_topk_prob: bool,
                routing: str = "softmax_topk", routing_scale: float = 1.0, jitter_eps: float = 0.0,
                score_bias=None, n_group: int = 1, topk_group: int = 1, gate_up_bias=None, down_bias=None,
                activation: str = "swiglu", swiglu_alpha: float = 1.0, swiglu_limit: float = 0.0,
                weights_on_input: bool = False):
    tokens, hidden_size = hidden.shape
    intermediate = down.shape[2]
    h = hidden.double()
    gate_w, up_w, down_w = gate_up[:, :intermediate].double(), gate_up[:, intermediate:].double(), down.double()
    bias = None if score_bias is None else [float(v) for v in score_bias.double()]
    out = torch.zeros(tokens, hidden_size, dtype=torch.float64)
    for t in range(tokens):
        logits = [float(v) for v in router_logits[t].double()]
        if routing == "sparsemixer":
            order, weights = sparsemixer_top2(logits, jitter_eps)
        elif routing == "sigmoid_topk":
            order, weights = sigmoid_topk(logits, top_k, norm_topk_prob, routing_scale, bias, n_group, topk_group)
        else:
            order, weights = softmax_topk(logits, top_k, norm_topk_prob, routing_scale)
        n_main = top_k - n_ce
        gate_scale = up_scale = torch.ones(hidden_size, dtype=torch.float64)
        act_scale = torch.ones(intermediate, dtype=torch.float64)
        if n_ce:
            aux_total = sum(weights[n_main:])
            theta = sum((weights[j] / aux_total) * ces[order[j]].double() for j in range(n_main, top_k))
            gate_scale, act_scale, up_scale = theta[0, :hidden_size], theta[1, :intermediate], theta[2, :hidden_size]
        for slot in range(n_main):
            e = order[slot]
            x = h[t] * weights[slot] if weights_on_input else h[t]
            gate = gate_w[e] @ (x * gate_scale)
            up = up_w[e] @ (x * up_scale)
            if gate_up_bias is not None:
                gate = gate + gate_up_bias[e, :intermediate].double()
                up = up + gate_up_bias[e, intermediate:].double()
            if activation == "clamped_swiglu":
                act = torch.tensor([min(g, swiglu_limit) * sigmoid(swiglu_alpha * min(g, swiglu_limit))
                                    * (max(min(u, swiglu_limit), -swiglu_limit) + 1.0)
                                    for g, u in zip(gate.tolist(), up.tolist())], dtype=torch.float64)
            else:
                act = torch.tensor([silu(float(g)) for g in gate], dtype=torch.float64) * up
            y = down_w[e] @ (act * act_scale)
            if down_bias is not None:
                y = y + down_bias[e].double()
            out[t] += y if weights_on_input else weights[slot] * y
    return out
