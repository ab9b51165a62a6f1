"""An independent, deliberately plain implementation of ce-math.md: loops over tokens and slots,
float64, no shared code with ce_export.moe_math. Tests use it as the oracle for the reference op."""

from __future__ import annotations

import math

import torch


def silu(x: float) -> float:
    return x / (1.0 + math.exp(-x))


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


def ce_moe_loop(hidden, router_logits, gate_up, down, ces, top_k: int, n_ce: int, norm_topk_prob: bool,
                routing: str = "softmax_topk", routing_scale: float = 1.0, jitter_eps: float = 0.0):
    tokens, hidden_size = hidden.shape
    intermediate = down.shape[2]
    h = hidden.double()
    gate_w, up_w, down_w = gate_up[:, :intermediate].double(), gate_up[:, intermediate:].double(), down.double()
    out = torch.zeros(tokens, hidden_size, dtype=torch.float64)
    for t in range(tokens):
        logits = [float(v) for v in router_logits[t].double()]
        if routing == "sparsemixer":
            order, weights = sparsemixer_top2(logits, jitter_eps)
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
            gate = gate_w[e] @ (h[t] * gate_scale)
            up = up_w[e] @ (h[t] * up_scale)
            act = torch.tensor([silu(float(g)) for g in gate], dtype=torch.float64) * up * act_scale
            out[t] += weights[slot] * (down_w[e] @ act)
    return out
