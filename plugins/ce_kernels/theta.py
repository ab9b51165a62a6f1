"""Stage 2 (CE only), theta mixing: theta[t] = sum_j a_j * ces[aux_expert_j(t)], a = renormalised
aux routing weights. Computed once per token; the grouped GEMMs read it as per-token scales.

Torch twin: `ce_export.moe_math.mix_compressed_experts`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

THETA_TOKENS_PER_PROGRAM = 8
THETA_COLUMNS_PER_PROGRAM = 256


@triton.jit
def mix_compressed_experts_kernel(
    aux_weights_ptr, aux_ids_ptr, ces_ptr, theta_ptr,
    num_tokens, num_columns,
    stride_aux_t, stride_ces_e, stride_ces_r, stride_theta_t, stride_theta_r,
    N_CE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """theta [T, 3, C] for BLOCK_T tokens x BLOCK_C columns; aux_* are [T, N_CE] with row stride."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < num_tokens
    mask = row_ok[:, None] & (cols < num_columns)[None, :]

    weight_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    mix_gate_in = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    mix_act = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    mix_up_in = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in range(N_CE):
        weight = tl.load(aux_weights_ptr + rows * stride_aux_t + j, mask=row_ok, other=0.0).to(tl.float32)
        expert = tl.load(aux_ids_ptr + rows * stride_aux_t + j, mask=row_ok, other=0)
        ces_row = ces_ptr + expert[:, None].to(tl.int64) * stride_ces_e + cols[None, :]
        weight_sum += weight
        mix_gate_in += weight[:, None] * tl.load(ces_row, mask=mask, other=0.0).to(tl.float32)
        mix_act += weight[:, None] * tl.load(ces_row + stride_ces_r, mask=mask, other=0.0).to(tl.float32)
        mix_up_in += weight[:, None] * tl.load(ces_row + 2 * stride_ces_r, mask=mask, other=0.0).to(tl.float32)

    scale = 1.0 / tl.where(row_ok, weight_sum, 1.0)
    out = theta_ptr + rows[:, None].to(tl.int64) * stride_theta_t + cols[None, :]
    out_dtype = theta_ptr.dtype.element_ty
    tl.store(out, (mix_gate_in * scale[:, None]).to(out_dtype), mask=mask)
    tl.store(out + stride_theta_r, (mix_act * scale[:, None]).to(out_dtype), mask=mask)
    tl.store(out + 2 * stride_theta_r, (mix_up_in * scale[:, None]).to(out_dtype), mask=mask)


def mix_compressed_experts_theta(
    aux_weights: torch.Tensor, aux_expert_ids: torch.Tensor, ces: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """aux_weights fp32 [T, n_ce], aux_expert_ids int [T, n_ce] (row-strided views are fine),
    ces [E, 3, C] -> theta [T, 3, C] in out_dtype."""
    num_tokens, n_ce = aux_weights.shape
    if aux_weights.stride() != aux_expert_ids.stride() or aux_weights.stride(1) != 1:
        aux_weights, aux_expert_ids = aux_weights.contiguous(), aux_expert_ids.contiguous()
    if ces.stride(2) != 1:
        ces = ces.contiguous()
    num_columns = ces.shape[2]
    theta = torch.empty(num_tokens, 3, num_columns, dtype=out_dtype, device=ces.device)
    if num_tokens == 0:
        return theta
    grid = (triton.cdiv(num_tokens, THETA_TOKENS_PER_PROGRAM), triton.cdiv(num_columns, THETA_COLUMNS_PER_PROGRAM))
    mix_compressed_experts_kernel[grid](
        aux_weights, aux_expert_ids, ces, theta,
        num_tokens, num_columns,
        aux_weights.stride(0), ces.stride(0), ces.stride(1), theta.stride(0), theta.stride(1),
        N_CE=n_ce, BLOCK_T=THETA_TOKENS_PER_PROGRAM, BLOCK_C=THETA_COLUMNS_PER_PROGRAM,
    )
    return theta
