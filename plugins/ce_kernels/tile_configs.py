"""Tile sizes for the grouped GEMMs, as data: one table per (dtype family, shared memory class),
each keyed by the number of tokens T.

BLOCK_M is shared by alignment and both GEMMs; the rest is per GEMM. The tables are chosen by
reasoning and checked by compiling (tests/test_tile_tables.py compiles every entry the dispatcher
can pick for sm_80, sm_86, sm_89 and sm_90 in every dtype and asserts that it fits the
architecture's shared memory and does not spill); they are not tuned by a timed sweep yet:

- 16-bit, large shared memory (sm_80 / sm_87: 163 KiB, sm_90: 227 KiB per block): decode sizes (a
  few pairs per expert) are weight-bandwidth bound and want small BLOCK_M with swap_ab (the weight
  tile's 64 rows drive Hopper's wgmma, whose M is 64 per warpgroup); prefill sizes are matmul bound
  and want BLOCK_M = 64 with wide tiles.
- 16-bit, small shared memory (sm_86 / sm_89 / sm_120: 99 KiB per block): the same, except the
  prefill gate/up tile, whose two 64x128 weight tiles get a shorter K step and one more stage.
- fp32: `tl.dot` multiplies fp32 in full precision (ieee) on CUDA cores, with operands staged
  through shared memory and accumulators in registers: narrower tiles, 8 warps, BLOCK_K 32. Every
  entry fits 99 KiB, so one table serves every architecture.

Retune with a timed sweep on the GPU (benchmarks/moe_layer.py times the chosen config) and
replace the numbers, not the code.
"""

from __future__ import annotations

from dataclasses import dataclass

# Largest dynamic shared memory one block may opt into, per compute capability (the CUDA
# programming guide's table); the dispatcher reads the device's own value when it has a device.
MAX_SHARED_BYTES = {75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
                    100: 232448, 120: 101376}
LARGE_SHARED_BYTES = 166912   # at least this much: the large-shared-memory 16-bit table
SMALL_SHARED_BYTES = 101376   # at least this much: the small one (and fp32); below it, no table fits
DTYPES = ("bf16", "fp16", "fp32")


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


def _tiles(block_n: int, block_k: int, num_warps: int, num_stages: int) -> dict:
    return {"block_n": block_n, "block_k": block_k, "num_warps": num_warps, "num_stages": num_stages}


LAST = 1 << 62  # max_tokens of each table's last entry

H100_TILE_TABLE: list[dict] = [  # 16-bit, large shared memory (sm_80, sm_87, sm_90)
    {"max_tokens": 32, "block_m": 16, "group_m": 1, "swap_ab": True,
     "gate_up": _tiles(64, 128, 4, 3), "down": _tiles(64, 128, 4, 4)},
    {"max_tokens": 256, "block_m": 16, "group_m": 4, "swap_ab": True,
     "gate_up": _tiles(64, 128, 4, 3), "down": _tiles(128, 64, 4, 4)},
    {"max_tokens": 1024, "block_m": 32, "group_m": 8, "swap_ab": True,
     "gate_up": _tiles(64, 64, 4, 4), "down": _tiles(128, 64, 4, 4)},
    {"max_tokens": LAST, "block_m": 64, "group_m": 8, "swap_ab": False,
     "gate_up": _tiles(128, 64, 8, 3), "down": _tiles(128, 64, 4, 4)},
]

SMALL_SHARED_TILE_TABLE: list[dict] = H100_TILE_TABLE[:3] + [  # 16-bit, 99 KiB (sm_86, sm_89)
    {"max_tokens": LAST, "block_m": 64, "group_m": 8, "swap_ab": False,
     "gate_up": _tiles(128, 32, 8, 4), "down": _tiles(128, 64, 4, 4)},
]

FP32_TILE_TABLE: list[dict] = [  # every architecture
    {"max_tokens": 32, "block_m": 16, "group_m": 1, "swap_ab": False,
     "gate_up": _tiles(64, 32, 8, 3), "down": _tiles(64, 32, 8, 3)},
    {"max_tokens": 256, "block_m": 16, "group_m": 4, "swap_ab": False,
     "gate_up": _tiles(64, 32, 8, 3), "down": _tiles(128, 32, 8, 3)},
    {"max_tokens": 1024, "block_m": 32, "group_m": 8, "swap_ab": False,
     "gate_up": _tiles(64, 32, 8, 3), "down": _tiles(64, 32, 8, 3)},
    {"max_tokens": LAST, "block_m": 64, "group_m": 8, "swap_ab": False,
     "gate_up": _tiles(64, 16, 8, 3), "down": _tiles(64, 32, 8, 3)},
]


def dtype_name(dtype) -> str:
    """'bf16', 'fp16' or 'fp32' for a torch dtype or one of those names."""
    name = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}.get(str(dtype), str(dtype))
    if name not in DTYPES:
        raise ValueError(f"no tile table for dtype {dtype} (kernels take {', '.join(DTYPES)})")
    return name


def tile_table(dtype="bf16", max_shared_bytes: int | None = None) -> list[dict]:
    """The table for activations of `dtype` on a device allowing `max_shared_bytes` of shared memory
    per block (None: no device, as under Triton's interpreter: the large table)."""
    name = dtype_name(dtype)
    if max_shared_bytes is not None and max_shared_bytes < SMALL_SHARED_BYTES:
        raise ValueError(f"no tile table fits {max_shared_bytes} B of shared memory per block "
                         f"(the smallest needs {SMALL_SHARED_BYTES} B)")
    if name == "fp32":
        return FP32_TILE_TABLE
    if max_shared_bytes is None or max_shared_bytes >= LARGE_SHARED_BYTES:
        return H100_TILE_TABLE
    return SMALL_SHARED_TILE_TABLE


def arch_tile_table(dtype, arch: int) -> list[dict]:
    """The table the dispatcher picks on compute capability `arch` (80, 86, 90, ...)."""
    if arch not in MAX_SHARED_BYTES:
        raise ValueError(f"unknown shared memory size for sm_{arch} (known: {sorted(MAX_SHARED_BYTES)})")
    return tile_table(dtype, MAX_SHARED_BYTES[arch])


def tile_configs(table: list[dict] = H100_TILE_TABLE) -> list[MoeTileConfig]:
    return [MoeTileConfig.from_dict(entry) for entry in table]


def select_tile_config(num_tokens: int, dtype="bf16", max_shared_bytes: int | None = None,
                       table: list[dict] | None = None) -> MoeTileConfig:
    """The first entry whose max_tokens >= num_tokens, else the last entry, of `table` (default:
    the table for `dtype` and `max_shared_bytes`)."""
    configs = tile_configs(table if table is not None else tile_table(dtype, max_shared_bytes))
    for config in configs:
        if num_tokens <= config.max_tokens:
            return config
    return configs[-1]
