"""One MoE layer from the stages: route -> theta (CE only) -> align -> gate/up GEMM -> down GEMM
-> combine. Every launch is asynchronous with a shape-derived grid: no host sync, so the whole
layer can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch

from ce_export.moe_math import SOFTMAX_TOPK, check_moe_arguments
from ce_kernels.align import align_pairs_by_expert
from ce_kernels.combine import sum_main_slots
from ce_kernels.grouped_gemm import down_weighted, gate_up_swiglu
from ce_kernels.routing import route
from ce_kernels.theta import mix_compressed_experts_theta
from ce_kernels.tile_configs import MAX_SHARED_BYTES, MoeTileConfig, select_tile_config


def fused_moe(
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
    """Same signature and semantics as `ce_export.moe_math.moe_reference`. Returns [T, H]."""
    config = select_tile_config(hidden.shape[0], hidden.dtype, max_shared_bytes(hidden.device))
    return fused_moe_with_config(
        hidden, router_logits, gate_up, down, ces, top_k, n_ce, norm_topk_prob,
        config, routing, routing_scale, jitter_eps,
    )


def max_shared_bytes(device: torch.device) -> int | None:
    """Shared memory one block may opt into on `device`; None off CUDA (Triton's interpreter)."""
    if device.type != "cuda":
        return None
    return _cuda_max_shared_bytes(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_max_shared_bytes(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    return int(optin) if optin else MAX_SHARED_BYTES[props.major * 10 + props.minor]


def fused_moe_with_config(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    ces: torch.Tensor | None,
    top_k: int,
    n_ce: int,
    norm_topk_prob: bool,
    config: MoeTileConfig,
    routing: str = SOFTMAX_TOPK,
    routing_scale: float = 1.0,
    jitter_eps: float = 0.0,
) -> torch.Tensor:
    check_moe_arguments(hidden, router_logits, gate_up, down, ces, top_k, n_ce)
    if not (hidden.dtype == gate_up.dtype == down.dtype):
        raise ValueError(f"hidden, gate_up and down dtypes differ: {hidden.dtype}, {gate_up.dtype}, {down.dtype}")
    num_tokens, num_experts = router_logits.shape
    if num_tokens == 0:
        return torch.empty_like(hidden)
    hidden, gate_up, down = (t if t.stride(-1) == 1 else t.contiguous() for t in (hidden, gate_up, down))
    km = top_k - n_ce

    weights, expert_ids = route(router_logits, top_k, norm_topk_prob, routing, routing_scale, jitter_eps)  # [T, K]
    theta = None
    if n_ce > 0:
        theta = mix_compressed_experts_theta(weights[:, km:], expert_ids[:, km:], ces, out_dtype=hidden.dtype)
    alignment = align_pairs_by_expert(expert_ids[:, :km], num_experts, config.block_m)
    act = gate_up_swiglu(hidden, theta, gate_up, alignment, km, config)   # [T*km, I]
    pair_out = down_weighted(act, down, weights, alignment, km, config)   # [T*km, H]
    return sum_main_slots(pair_out, num_tokens, km)
