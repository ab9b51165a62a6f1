"""An independent, deliberately plain implementation of ce-math.md: loops over tokens and slots,
float64, no shared code with ce_export.moe_math. Tests use it as the oracle for the reference op."""

from __future__ import annotations

import math

import torch


def silu(x: float) -> float:
    return x / (1.0 + math.exp(-x))


def ce_moe_loop(hidden, router_logits, gate_up, down, ces, top_k: int, n_ce: int, norm_topk_prob: bool):
    tokens, hidden_size = hidden.shape
    num_experts, intermediate = down.shape[0], down.shape[2]
    h = hidden.double()
    gate_w, up_w, down_w = gate_up[:, :intermediate].double(), gate_up[:, intermediate:].double(), down.double()
    out = torch.zeros(tokens, hidden_size, dtype=torch.float64)
    for t in range(tokens):
        logits = [float(v) for v in router_logits[t].double()]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        probs = [v / sum(exps) for v in exps]
        order = sorted(range(num_experts), key=lambda e: -probs[e])[:top_k]
        weights = [probs[e] for e in order]
        if norm_topk_prob:
            total = sum(weights)
            weights = [w / total for w in weights]
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
