"""Tile sizes for the grouped GEMMs, as data keyed by the number of tokens T.

BLOCK_M is shared by alignment and both GEMMs; the rest is per GEMM. The H100 table is chosen by
reasoning, not by a timed sweep: decode sizes (a few pairs per expert) are weight-bandwidth bound
and want small BLOCK_M with swap_ab (the weight tile's 64 rows drive Hopper's wgmma, whose M is 64
per warpgroup); prefill sizes are matmul bound and want BLOCK_M = 64 with wide tiles. Shared memory
stays under A100's 163 KiB so the same table compiles for sm_80. Retune with a timed sweep on the
GPU (benchmarks/moe_layer.py times the chosen config) and replace the numbers, not the code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GemmTiles:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MoeTileConfig:
    max_tokens: int  # this entry serves T <= max_tokens (the last entry serves every larger T too)
    block_m: int
    group_m: int
    swap_ab: bool
    gate_up: GemmTiles
    down: GemmTiles

    @staticmethod
    def from_dict(entry: dict) -> "MoeTileConfig":
        return MoeTileConfig(
            entry["max_tokens"], entry["block_m"], entry["group_m"], entry["swap_ab"],
            GemmTiles(**entry["gate_up"]), GemmTiles(**entry["down"]),
        )


H100_TILE_TABLE: list[dict] = [
    {"max_tokens": 32, "block_m": 16, "group_m": 1, "swap_ab": True,
     "gate_up": {"block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3},
     "down": {"block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4}},
    {"max_tokens": 256, "block_m": 16, "group_m": 4, "swap_ab": True,
     "gate_up": {"block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3},
     "down": {"block_n": 128, "block_k": 64, "num_warps": 4, "num_stages": 4}},
    {"max_tokens": 1024, "block_m": 32, "group_m": 8, "swap_ab": True,
     "gate_up": {"block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 4},
     "down": {"block_n": 128, "block_k": 64, "num_warps": 4, "num_stages": 4}},
    {"max_tokens": 1 << 62, "block_m": 64, "group_m": 8, "swap_ab": False,
     "gate_up": {"block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 3},
     "down": {"block_n": 128, "block_k": 64, "num_warps": 4, "num_stages": 4}},
]


def tile_configs(table: list[dict] = H100_TILE_TABLE) -> list[MoeTileConfig]:
    return [MoeTileConfig.from_dict(entry) for entry in table]


def select_tile_config(num_tokens: int, table: list[dict] = H100_TILE_TABLE) -> MoeTileConfig:
    """The first entry whose max_tokens >= num_tokens, else the last entry."""
    configs = tile_configs(table)
    for config in configs:
        if num_tokens <= config.max_tokens:
            return config
    return configs[-1]
