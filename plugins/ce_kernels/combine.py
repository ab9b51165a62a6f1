"""Stage 6, combine: y[t] = sum over main slots of out[t * km + slot]; fp32 sum, no atomics."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

COMBINE_TOKENS_PER_PROGRAM = 4
COMBINE_COLUMNS_PER_PROGRAM = 256


@triton.jit
def sum_main_slots_kernel(
    pair_out_ptr, out_ptr, num_tokens, hidden_size, stride_pair_p, stride_out_t,
    KM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (tokens < num_tokens)[:, None] & (cols < hidden_size)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for slot in range(KM):
        rows = pair_out_ptr + (tokens * KM + slot)[:, None] * stride_pair_p + cols[None, :]
        acc += tl.load(rows, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + tokens[:, None] * stride_out_t + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_main_slots(pair_out: torch.Tensor, num_tokens: int, km: int) -> torch.Tensor:
    """pair_out [T * km, H] -> [T, H] in pair_out's dtype."""
    hidden_size = pair_out.shape[1]
    out = torch.empty(num_tokens, hidden_size, dtype=pair_out.dtype, device=pair_out.device)
    grid = (triton.cdiv(num_tokens, COMBINE_TOKENS_PER_PROGRAM), triton.cdiv(hidden_size, COMBINE_COLUMNS_PER_PROGRAM))
    sum_main_slots_kernel[grid](
        pair_out, out, num_tokens, hidden_size, pair_out.stride(0), out.stride(0),
        KM=km, BLOCK_T=COMBINE_TOKENS_PER_PROGRAM, BLOCK_H=COMBINE_COLUMNS_PER_PROGRAM,
    )
    return out


def sum_main_slots_torch(pair_out: torch.Tensor, num_tokens: int, km: int) -> torch.Tensor:
    return pair_out.float().reshape(num_tokens, km, -1).sum(dim=1).to(pair_out.dtype)
