"""Stages 4 and 5, grouped GEMMs over the aligned (token, main slot) pairs.

Each program owns one BLOCK_M block of `sorted_pair_ids` (all rows of one expert) and one BLOCK_N
slice of the output columns. Activation rows are gathered by `pair // km` straight from `hidden`
(no permuted copy) and results are scattered to row `pair` of a [T * km, N] buffer. The grid is
the worst case `max_blocks * cdiv(N, BLOCK_N)`; programs whose block starts at or past
`num_padded` return at once, and sentinel rows (pair == T * km) are masked out.

gate_up_swiglu: act[p] = act(W_gate[e] @ (h * theta0) + b_gate[e], W_up[e] @ (h * theta2) + b_up[e]) * theta1[:I]
                (plain MoE: theta0 = theta2 = theta1 = 1), the thetas applied to the activation
                tile as it is loaded and in the epilogue. Same bytes and FLOPs as a plain MoE.
                act: SwiGLU silu(g) * u, or gpt-oss's clamped SwiGLU (CLAMPED: g = min(g, limit),
                u = clamp(u, -limit, limit), g * sigmoid(alpha * g) * (u + 1)); biases (HAS_BIAS,
                gpt-oss): the gate / up biases are the accumulators' starting values.
down_weighted:  out[p] = w[t, slot] * (W_down[e] @ act[p] + b_down[e]).

SWAP_AB computes the transposed product (weights x activations^T) so that the weight tile's
BLOCK_N rows, not the few token rows, form the MMA's M side: Hopper's warpgroup MMA (wgmma) needs
M = 64 per warpgroup, and decode-sized blocks hold 16 or 32 pairs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ce_export.moe_math import CLAMPED_SWIGLU, SWIGLU
from ce_kernels.align import ExpertAlignment
from ce_kernels.tile_configs import MoeTileConfig


@triton.jit
def _program_block_and_column_tile(num_columns, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Maps the 1-D program id to (row block, column tile), GROUP_M row blocks at a time so that
    neighbouring programs share weight tiles in L2."""
    pid = tl.program_id(0)
    num_column_tiles = tl.cdiv(num_columns, BLOCK_N)
    num_row_blocks = tl.num_programs(0) // num_column_tiles
    programs_per_group = GROUP_M * num_column_tiles
    first_row_block = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(num_row_blocks - first_row_block, GROUP_M)
    row_block = first_row_block + (pid % programs_per_group) % group_rows
    column_tile = (pid % programs_per_group) // group_rows
    return row_block, column_tile


@triton.jit
def gate_up_swiglu_kernel(
    hidden_ptr, theta_ptr, gate_up_ptr, act_ptr, gate_up_bias_ptr,
    sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_ptr,
    num_pairs, hidden_size, intermediate,
    stride_hidden_t, stride_theta_t, stride_theta_r, stride_w_e, stride_w_n, stride_act_p,
    KM: tl.constexpr, HAS_CE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr, HAS_BIAS: tl.constexpr = False, CLAMPED: tl.constexpr = False,
    SWIGLU_ALPHA: tl.constexpr = 1.0, SWIGLU_LIMIT: tl.constexpr = 0.0,
):
    row_block, column_tile = _program_block_and_column_tile(intermediate, BLOCK_N, GROUP_M)
    if row_block * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ids_ptr + row_block).to(tl.int64)
    pairs = tl.load(sorted_pair_ids_ptr + row_block * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    tokens = (pairs // KM).to(tl.int64)
    cols = column_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < intermediate
    ks = tl.arange(0, BLOCK_K)

    # Weights are [N, K] row-major; tiles are read as [BLOCK_K, BLOCK_N] (K-major) for the dot.
    gate_tile_ptrs = gate_up_ptr + expert * stride_w_e + cols[None, :] * stride_w_n + ks[:, None]
    up_tile_ptrs = gate_tile_ptrs + intermediate * stride_w_n
    hidden_ptrs = hidden_ptr + tokens[:, None] * stride_hidden_t + ks[None, :]
    theta_ptrs = theta_ptr + tokens[:, None] * stride_theta_t + ks[None, :]

    if SWAP_AB:
        acc_gate = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BIAS:
        # [E, 2I]: gate columns, then up columns. The accumulators start from them: added after the
        # loop, ptxas spilled (sm_80, CE, BLOCK_M 32).
        bias_ptrs = gate_up_bias_ptr + expert * 2 * intermediate + cols
        gate_bias = tl.load(bias_ptrs, mask=col_ok, other=0.0).to(tl.float32)
        up_bias = tl.load(bias_ptrs + intermediate, mask=col_ok, other=0.0).to(tl.float32)
        if SWAP_AB:
            acc_gate += gate_bias[:, None]
            acc_up += up_bias[:, None]
        else:
            acc_gate += gate_bias[None, :]
            acc_up += up_bias[None, :]
    for k_start in range(0, hidden_size, BLOCK_K):
        k_ok = ks < hidden_size - k_start
        x = tl.load(hidden_ptrs + k_start, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_gate = tl.load(gate_tile_ptrs + k_start, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        w_up = tl.load(up_tile_ptrs + k_start, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_CE:
            # Rounded to the input dtype like the reference's `hidden * theta`.
            x_mask = row_ok[:, None] & k_ok[None, :]
            theta_gate = tl.load(theta_ptrs + k_start, mask=x_mask, other=0.0).to(tl.float32)
            theta_up = tl.load(theta_ptrs + 2 * stride_theta_r + k_start, mask=x_mask, other=0.0).to(tl.float32)
            x_gate = (x.to(tl.float32) * theta_gate).to(x.dtype)
            x_up = (x.to(tl.float32) * theta_up).to(x.dtype)
        else:
            x_gate = x
            x_up = x
        if SWAP_AB:
            acc_gate = tl.dot(tl.trans(w_gate), tl.trans(x_gate), acc_gate, input_precision=DOT_PRECISION)
            acc_up = tl.dot(tl.trans(w_up), tl.trans(x_up), acc_up, input_precision=DOT_PRECISION)
        else:
            acc_gate = tl.dot(x_gate, w_gate, acc_gate, input_precision=DOT_PRECISION)
            acc_up = tl.dot(x_up, w_up, acc_up, input_precision=DOT_PRECISION)

    if SWAP_AB:
        acc_gate = tl.trans(acc_gate)
        acc_up = tl.trans(acc_up)
    if CLAMPED:
        acc_gate = tl.minimum(acc_gate, SWIGLU_LIMIT)
        acc_up = tl.minimum(tl.maximum(acc_up, -SWIGLU_LIMIT), SWIGLU_LIMIT)
        act = acc_gate * tl.sigmoid(acc_gate * SWIGLU_ALPHA) * (acc_up + 1.0)
    else:
        act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out_mask = row_ok[:, None] & col_ok[None, :]
    if HAS_CE:
        theta_act = tl.load(
            theta_ptr + tokens[:, None] * stride_theta_t + stride_theta_r + cols[None, :], mask=out_mask, other=0.0
        )
        act = act * theta_act.to(tl.float32)
    act_ptrs = act_ptr + pairs[:, None].to(tl.int64) * stride_act_p + cols[None, :]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def down_weighted_kernel(
    act_ptr, down_ptr, routing_weights_ptr, out_ptr, down_bias_ptr,
    sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_ptr,
    num_pairs, hidden_size, intermediate,
    stride_act_p, stride_w_e, stride_w_n, stride_routing_t, stride_out_p,
    KM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr, HAS_BIAS: tl.constexpr = False,
):
    row_block, column_tile = _program_block_and_column_tile(hidden_size, BLOCK_N, GROUP_M)
    if row_block * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ids_ptr + row_block).to(tl.int64)
    pairs = tl.load(sorted_pair_ids_ptr + row_block * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    pairs = pairs.to(tl.int64)
    cols = column_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden_size
    ks = tl.arange(0, BLOCK_K)

    act_ptrs = act_ptr + pairs[:, None] * stride_act_p + ks[None, :]
    down_tile_ptrs = down_ptr + expert * stride_w_e + cols[None, :] * stride_w_n + ks[:, None]
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, intermediate, BLOCK_K):
        k_ok = ks < intermediate - k_start
        a = tl.load(act_ptrs + k_start, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(down_tile_ptrs + k_start, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if SWAP_AB:
            acc = tl.dot(tl.trans(w), tl.trans(a), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    if SWAP_AB:
        acc = tl.trans(acc)

    if HAS_BIAS:  # [E, H]
        acc += tl.load(down_bias_ptr + expert * hidden_size + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    routing_weight = tl.load(
        routing_weights_ptr + (pairs // KM) * stride_routing_t + pairs % KM, mask=row_ok, other=0.0
    )
    out = acc * routing_weight.to(tl.float32)[:, None]
    out_ptrs = out_ptr + pairs[:, None] * stride_out_p + cols[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands multiply in full precision (the interpreter tests); 16-bit ones are exact anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def gemm_grid(alignment: ExpertAlignment, num_columns: int, block_n: int) -> tuple[int]:
    return (alignment.block_expert_ids.numel() * triton.cdiv(num_columns, block_n),)


def _check_block_m(alignment: ExpertAlignment, config: MoeTileConfig) -> None:
    if alignment.block_m != config.block_m:
        raise ValueError(f"alignment was made for BLOCK_M={alignment.block_m}, config has {config.block_m}")


def gate_up_swiglu(
    hidden: torch.Tensor, theta: torch.Tensor | None, gate_up: torch.Tensor,
    alignment: ExpertAlignment, km: int, config: MoeTileConfig, gate_up_bias: torch.Tensor | None = None,
    activation: str = SWIGLU, swiglu_alpha: float = 1.0, swiglu_limit: float = 0.0,
) -> torch.Tensor:
    """hidden [T, H], theta [T, 3, C] or None, gate_up [E, 2I, H], gate_up_bias [E, 2I] or None
    -> act [T * km, I] (hidden's dtype)."""
    _check_block_m(alignment, config)
    tiles = config.gate_up
    num_tokens, hidden_size = hidden.shape
    intermediate = gate_up.shape[1] // 2
    act = torch.empty(num_tokens * km, intermediate, dtype=hidden.dtype, device=hidden.device)
    has_ce = theta is not None
    theta_arg = theta if has_ce else hidden  # never read when HAS_CE is False
    has_bias = gate_up_bias is not None
    bias_arg = gate_up_bias.contiguous() if has_bias else gate_up  # never read when HAS_BIAS is False
    gate_up_swiglu_kernel[gemm_grid(alignment, intermediate, tiles.block_n)](
        hidden, theta_arg, gate_up, act, bias_arg,
        alignment.sorted_pair_ids, alignment.block_expert_ids, alignment.num_padded,
        num_tokens * km, hidden_size, intermediate,
        hidden.stride(0), theta.stride(0) if has_ce else 0, theta.stride(1) if has_ce else 0,
        gate_up.stride(0), gate_up.stride(1), act.stride(0),
        KM=km, HAS_CE=has_ce, DOT_PRECISION=dot_precision(hidden.dtype),
        BLOCK_M=config.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=config.group_m,
        SWAP_AB=config.swap_ab, HAS_BIAS=has_bias, CLAMPED=activation == CLAMPED_SWIGLU,
        SWIGLU_ALPHA=float(swiglu_alpha), SWIGLU_LIMIT=float(swiglu_limit),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return act


def down_weighted(
    act: torch.Tensor, down: torch.Tensor, routing_weights: torch.Tensor,
    alignment: ExpertAlignment, km: int, config: MoeTileConfig, down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """act [T * km, I], down [E, H, I], routing_weights fp32 [T, >= km], down_bias [E, H] or None
    -> out [T * km, H] (act's dtype)."""
    _check_block_m(alignment, config)
    tiles = config.down
    num_pairs, intermediate = act.shape
    hidden_size = down.shape[1]
    out = torch.empty(num_pairs, hidden_size, dtype=act.dtype, device=act.device)
    has_bias = down_bias is not None
    bias_arg = down_bias.contiguous() if has_bias else down  # never read when HAS_BIAS is False
    down_weighted_kernel[gemm_grid(alignment, hidden_size, tiles.block_n)](
        act, down, routing_weights, out, bias_arg,
        alignment.sorted_pair_ids, alignment.block_expert_ids, alignment.num_padded,
        num_pairs, hidden_size, intermediate,
        act.stride(0), down.stride(0), down.stride(1), routing_weights.stride(0), out.stride(0),
        KM=km, DOT_PRECISION=dot_precision(act.dtype),
        BLOCK_M=config.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=config.group_m,
        SWAP_AB=config.swap_ab, HAS_BIAS=has_bias, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out


def gate_up_swiglu_torch(
    hidden: torch.Tensor, theta: torch.Tensor | None, gate_up: torch.Tensor, main_expert_ids: torch.Tensor
) -> torch.Tensor:
    """Torch twin of gate_up_swiglu: act [T * km, I] in fp32, row = token * km + slot."""
    intermediate = gate_up.shape[1] // 2
    hidden_size = hidden.shape[1]
    x = hidden.float()
    x_gate = x_up = x
    if theta is not None:
        x_gate, x_up = x * theta[:, 0, :hidden_size].float(), x * theta[:, 2, :hidden_size].float()
    w = gate_up.float()[main_expert_ids.long()]                                # [T, km, 2I, H]
    gate = torch.einsum("th,tkih->tki", x_gate, w[:, :, :intermediate])
    up = torch.einsum("th,tkih->tki", x_up, w[:, :, intermediate:])
    act = torch.nn.functional.silu(gate) * up
    if theta is not None:
        act = act * theta[:, None, 1, :intermediate].float()
    return act.reshape(-1, intermediate)


def down_weighted_torch(
    act: torch.Tensor, down: torch.Tensor, routing_weights: torch.Tensor, main_expert_ids: torch.Tensor
) -> torch.Tensor:
    """Torch twin of down_weighted: out [T * km, H] in fp32."""
    num_tokens, km = main_expert_ids.shape
    w = down.float()[main_expert_ids.long()]                                    # [T, km, H, I]
    out = torch.einsum("tki,tkhi->tkh", act.float().reshape(num_tokens, km, -1), w)
    return (out * routing_weights[:, :km, None].float()).reshape(num_tokens * km, -1)
