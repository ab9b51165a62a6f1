"""The `ce_export::moe` custom op: one call per MoE block.

The op is what torch.export sees in place of a whole MoE block; its fake implementation gives
shapes, its CPU implementation is the reference math (moe_math.py) and its CUDA implementation
is our Triton kernels (plugins/ce_kernels) when they are installed.
"""

from __future__ import annotations

import torch

from ce_export import moe_math

OP_NAMESPACE = "ce_export"


@torch.library.custom_op(f"{OP_NAMESPACE}::moe", mutates_args=())
def moe(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    ces: torch.Tensor | None,
    top_k: int,
    n_ce: int,
    norm_topk_prob: bool,
) -> torch.Tensor:
    return moe_math.moe_reference(hidden, router_logits, gate_up, down, ces, top_k, n_ce, norm_topk_prob)


@moe.register_fake
def _moe_fake(hidden, router_logits, gate_up, down, ces, top_k, n_ce, norm_topk_prob):
    return torch.empty_like(hidden)
