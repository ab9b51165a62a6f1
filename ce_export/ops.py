"""The `ce_export::moe` custom op: one call per MoE block.

The op is what torch.export sees in place of a whole MoE block; its fake implementation gives
shapes, its CPU implementation is the reference math (moe_math.py) and its CUDA implementation
is our Triton kernels (plugins/ce_kernels) when Triton is installed and the inputs suit them.
"""

from __future__ import annotations

import contextlib

import torch

from ce_export import moe_math

OP_NAMESPACE = "ce_export"
_reference_on_cuda = False


@contextlib.contextmanager
def reference_math():
    """Run the op through moe_math.py on CUDA too (the reference a benchmark compares against)."""
    global _reference_on_cuda
    previous, _reference_on_cuda = _reference_on_cuda, True
    try:
        yield
    finally:
        _reference_on_cuda = previous


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
    routing: str = moe_math.SOFTMAX_TOPK,
    routing_scale: float = 1.0,
    jitter_eps: float = 0.0,
) -> torch.Tensor:
    return moe_math.moe_reference(hidden, router_logits, gate_up, down, ces, top_k, n_ce, norm_topk_prob,
                                  routing, routing_scale, jitter_eps)


@moe.register_fake
def _moe_fake(hidden, router_logits, gate_up, down, ces, top_k, n_ce, norm_topk_prob,
              routing=moe_math.SOFTMAX_TOPK, routing_scale=1.0, jitter_eps=0.0):
    return torch.empty_like(hidden)


@moe.register_kernel("cuda")
def _moe_cuda(hidden, router_logits, gate_up, down, ces, top_k, n_ce, norm_topk_prob,
              routing=moe_math.SOFTMAX_TOPK, routing_scale=1.0, jitter_eps=0.0):
    args = (hidden, router_logits, gate_up, down, ces, top_k, n_ce, norm_topk_prob, routing, routing_scale, jitter_eps)
    if _reference_on_cuda:
        return moe_math.moe_reference(*args)
    try:
        # Imported here: Triton fixes interpreted-or-compiled mode at its first import.
        from ce_kernels import fused_moe
    except ImportError:  # no triton: the reference still runs on CUDA tensors
        return moe_math.moe_reference(*args)
    same_dtype = hidden.dtype == gate_up.dtype == down.dtype
    bf16_capable = hidden.dtype != torch.bfloat16 or torch.cuda.get_device_capability(hidden.device) >= (8, 0)
    if not (same_dtype and bf16_capable):
        return moe_math.moe_reference(*args)
    return fused_moe(*args)
