"""Stage 3, alignment: group the (token, main slot) pairs by expert, each expert's run padded to a
multiple of BLOCK_M, entirely on the device (no host sync, buffer sizes from shapes only).

A pair id is `token * km + slot` (km = main experts per token). Worked example, km = 2, E = 3,
BLOCK_M = 2, main expert ids [[2, 0], [0, 1], [2, 1]]:

    pairs by expert    e0: 1, 2     e1: 3, 5     e2: 0, 4
    counts             [2, 2, 2] -> padded [2, 2, 2]
    sorted_pair_ids    [1, 2, 3, 5, 0, 4]          (pad sentinel would be T * km = 6)
    block_expert_ids   [0, 1, 2]
    num_padded         6

With BLOCK_M = 4 the same input gives sorted_pair_ids [1, 2, 6, 6, 3, 5, 6, 6, 0, 4, 6, 6],
block_expert_ids [0, 1, 2], num_padded 12. Inside an expert the pairs keep ascending pair order,
so the result is deterministic. Entries past num_padded are never written and never read.

Two kernels, each one program per expert: count the expert's pairs; then (knowing every count)
compute the expert's padded offset and write its pair ids, sentinels and block -> expert entries.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ce_kernels.shape_exprs import max_blocks, max_padded_pairs

PAIRS_PER_CHUNK = 1024


class ExpertAlignment(NamedTuple):
    sorted_pair_ids: torch.Tensor   # int32 [max_padded_pairs]
    block_expert_ids: torch.Tensor  # int32 [max_blocks]
    num_padded: torch.Tensor        # int32 [1], the valid prefix of sorted_pair_ids
    block_m: int


@triton.jit
def count_pairs_per_expert_kernel(
    expert_ids_ptr, counts_ptr, num_tokens, stride_ids_t,
    KM: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """counts[e] = number of (token, slot < KM) pairs routed to expert e = program_id(0)."""
    expert = tl.program_id(0)
    num_pairs = num_tokens * KM
    count = tl.zeros((BLOCK_P,), dtype=tl.int32)
    for start in range(0, num_pairs, BLOCK_P):
        pairs = start + tl.arange(0, BLOCK_P)
        ids = tl.load(expert_ids_ptr + (pairs // KM) * stride_ids_t + pairs % KM, mask=pairs < num_pairs, other=-1)
        count += (ids == expert).to(tl.int32)
    tl.store(counts_ptr + expert, tl.sum(count, axis=0))


@triton.jit
def scatter_pairs_by_expert_kernel(
    expert_ids_ptr, counts_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_ptr,
    num_tokens, num_experts, stride_ids_t,
    KM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Writes expert program_id(0)'s padded run of sorted_pair_ids and its block_expert_ids."""
    expert = tl.program_id(0)
    num_pairs = num_tokens * KM
    all_experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + all_experts, mask=all_experts < num_experts, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    run_start = tl.sum(tl.where(all_experts < expert, padded, 0), axis=0)
    my_count = tl.sum(tl.where(all_experts == expert, counts, 0), axis=0)
    my_padded = tl.sum(tl.where(all_experts == expert, padded, 0), axis=0)
    if expert == 0:
        tl.store(num_padded_ptr, tl.sum(padded, axis=0))

    written = 0
    for start in range(0, num_pairs, BLOCK_P):
        pairs = start + tl.arange(0, BLOCK_P)
        ids = tl.load(expert_ids_ptr + (pairs // KM) * stride_ids_t + pairs % KM, mask=pairs < num_pairs, other=-1)
        hit = ids == expert
        position = run_start + written + tl.cumsum(hit.to(tl.int32), axis=0) - 1
        tl.store(sorted_pair_ids_ptr + position, pairs, mask=hit)
        written += tl.sum(hit.to(tl.int32), axis=0)

    pad = tl.arange(0, BLOCK_M)
    tl.store(sorted_pair_ids_ptr + run_start + my_count + pad, num_pairs, mask=pad < my_padded - my_count)
    first_block = run_start // BLOCK_M
    for block in range(0, my_padded // BLOCK_M, BLOCK_P):
        blocks = block + tl.arange(0, BLOCK_P)
        tl.store(block_expert_ids_ptr + first_block + blocks, expert + 0 * blocks, mask=blocks < my_padded // BLOCK_M)


def align_pairs_by_expert(main_expert_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """main_expert_ids int32 [T, km] (a row-strided view is fine) -> ExpertAlignment."""
    num_tokens, km = main_expert_ids.shape
    if main_expert_ids.stride(1) != 1:
        main_expert_ids = main_expert_ids.contiguous()
    num_pairs = num_tokens * km
    device = main_expert_ids.device
    sorted_pair_ids = torch.empty(max_padded_pairs(num_pairs, num_experts, block_m), dtype=torch.int32, device=device)
    block_expert_ids = torch.empty(max_blocks(num_pairs, num_experts, block_m), dtype=torch.int32, device=device)
    num_padded = torch.zeros(1, dtype=torch.int32, device=device)
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    common = dict(KM=km, BLOCK_P=PAIRS_PER_CHUNK)
    count_pairs_per_expert_kernel[(num_experts,)](
        main_expert_ids, counts, num_tokens, main_expert_ids.stride(0), **common
    )
    scatter_pairs_by_expert_kernel[(num_experts,)](
        main_expert_ids, counts, sorted_pair_ids, block_expert_ids, num_padded,
        num_tokens, num_experts, main_expert_ids.stride(0),
        BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts), **common,
    )
    return ExpertAlignment(sorted_pair_ids, block_expert_ids, num_padded, block_m)


def align_pairs_by_expert_torch(main_expert_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """Torch twin with the same layout; returns only the valid prefix (no worst-case padding)."""
    num_tokens, km = main_expert_ids.shape
    flat = main_expert_ids.reshape(-1).long()
    sentinel = num_tokens * km
    runs, block_experts = [], []
    for expert in range(num_experts):
        pairs = torch.nonzero(flat == expert).flatten()
        padded = -(-pairs.numel() // block_m) * block_m
        runs.append(torch.cat([pairs, pairs.new_full((padded - pairs.numel(),), sentinel)]))
        block_experts += [expert] * (padded // block_m)
    sorted_pair_ids = torch.cat(runs).to(torch.int32)
    return ExpertAlignment(
        sorted_pair_ids,
        torch.tensor(block_experts, dtype=torch.int32),
        torch.tensor([sorted_pair_ids.numel()], dtype=torch.int32),
        block_m,
    )
