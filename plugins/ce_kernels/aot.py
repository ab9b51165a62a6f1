"""Ahead-of-time compilation of every ce_kernels kernel to PTX and cubin, with no GPU.

    python -m ce_kernels.aot --arch 80 90 --out DIR [--dtypes bf16 fp16] [--num-experts 64 ...]
                             [--top-k 8] [--n-ce 4] [--norm-topk-prob]
                             [--routing softmax_topk|sparsemixer|sigmoid_topk] [--routing-scale S]
                             [--jitter-eps J] [--n-group G --topk-group G]
                             [--activation swiglu|clamped_swiglu --swiglu-alpha A --swiglu-limit L]

writes DIR/sm{arch}/{stem}.ptx and .cubin, DIR/kernel_set.inc and DIR/manifest.json.

kernel_set.inc is the C++ the TensorRT plugin compiles in (see ce_kernels/aot_cpp.py): per kernel
its arguments and grid as C++ expressions of the shapes, its cubin per architecture; per kernel set
the layer attributes it was compiled for, the workspace and the launch plans. manifest.json records
the same for people and tests (expressions as text), plus the registers / spills ptxas reports.
Shapes (ce_kernels/shape_exprs.py): T tokens, H hidden, I intermediate, C = ces.shape[2], E experts,
K top_k, KM = K - n_ce main experts.

Kernels are compiled with the divisibility hints a JIT launch would derive for ordinary shapes:
every pointer and every H-, I- or C-derived integer is assumed a multiple of 16 (manifest
"assumptions"); the plugin checks them and refuses other shapes. Launch plans are per dtype, not
per architecture: each dtype's tile table is the one for the smallest shared memory among --arch
(so `--arch 80 86` plans sm_86's table for both); "tile_table" lists its entries with their dtype.

    python -m ce_kernels.aot --check-tables [--arch 80 86 89 90] [--dtypes bf16 fp16 fp32] [--json F]

compiles every GEMM variant the dispatcher can pick (each architecture's own table, every dtype,
gate/up with and without CE) and exits 1 if one needs more shared memory than the architecture
allows or spills.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction

from ce_export.moe_math import (ACTIVATIONS, CLAMPED_SWIGLU, RENORMALISE_EPS, ROUTINGS, SIGMOID_TOPK, SOFTMAX_TOPK,
                                SPARSEMIXER, SWIGLU)
from ce_kernels import align, aot_cpp, combine, grouped_gemm, routing, theta
from ce_kernels.shape_exprs import C, E, H, I, K, KM, T, Value, cdiv, largest, max_blocks, max_padded_pairs
from ce_kernels.tile_configs import (DTYPES, LAST, MAX_SHARED_BYTES, MoeTileConfig, arch_tile_table, tile_configs,
                                     tile_table)

TRITON_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "i32": "*i32"}
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclass(frozen=True)
class WorkspaceBuffer:
    name: str
    dtype: str                          # "fp32", "i32" or "model" (the activation type)
    shape: Callable[[int], tuple]       # block_m -> extents (shape expressions)
    written_by: str

    def elements(self, block_ms: list[int]) -> Value:
        """The element count with the worst of `block_ms`."""
        counts = []
        for block_m in block_ms:
            extents = self.shape(block_m)
            count = extents[0]
            for extent in extents[1:]:
                count = count * extent
            counts.append(count)
        return largest(counts)


WORKSPACE = [
    WorkspaceBuffer("routing_weights", "fp32", lambda bm: (T, K), "the routing kernel"),
    WorkspaceBuffer("expert_ids", "i32", lambda bm: (T, K), "the routing kernel"),
    WorkspaceBuffer("theta", "model", lambda bm: (T, 3, C), "mix_compressed_experts_kernel (CE only; C = 0 otherwise)"),
    WorkspaceBuffer("expert_counts", "i32", lambda bm: (E,), "count_pairs_per_expert_kernel"),
    WorkspaceBuffer("sorted_pair_ids", "i32", lambda bm: (max_padded_pairs(T * KM, E, bm),),
                    "scatter_pairs_by_expert_kernel"),
    WorkspaceBuffer("block_expert_ids", "i32", lambda bm: (max_blocks(T * KM, E, bm),), "scatter_pairs_by_expert_kernel"),
    WorkspaceBuffer("num_padded", "i32", lambda bm: (1,), "scatter_pairs_by_expert_kernel"),
    WorkspaceBuffer("act", "model", lambda bm: (T * KM, I), "gate_up_swiglu_kernel"),
    WorkspaceBuffer("pair_out", "model", lambda bm: (T * KM, H), "down_weighted_kernel"),
]


@dataclass(frozen=True)
class Pointer:
    """A pointer argument: a layer input / output or a workspace buffer, plus an offset in elements."""
    buffer: str
    offset: Value = 0

    def __repr__(self) -> str:
        return self.buffer if self.offset == 0 else f"{self.buffer} + {self.offset}"


@dataclass(frozen=True)
class AotModel:
    num_experts: tuple[int, ...] = (64,)
    top_k: int = 8
    n_ce: int = 4
    norm_topk_prob: bool = False
    routing: str = SOFTMAX_TOPK
    routing_scale: float = 1.0
    jitter_eps: float = 0.0
    n_group: int = 1       # sigmoid_topk: experts in n_group equal groups, the choice within the best topk_group
    topk_group: int = 1
    activation: str = SWIGLU   # clamped_swiglu: gpt-oss's experts, with their gate_up_bias / down_bias
    swiglu_alpha: float = 1.0
    swiglu_limit: float = 0.0

    @property
    def km(self) -> int:
        return self.top_k - self.n_ce

    @property
    def expert_biases(self) -> bool:
        """The plugin's op types have expert biases exactly when their SwiGLU is clamped (gpt-oss's
        ClampedSwiGLUMoE / CompressedClampedSwiGLUMoE)."""
        return self.activation == CLAMPED_SWIGLU


@dataclass
class KernelBuild:
    kernel: object                 # a triton JITFunction
    stem: str
    args: list[tuple[str, str, Pointer | Value]]   # (name, triton type, value), in kernel order
    constexprs: dict
    divisible_by_16: set[str]
    grid: tuple[Value, Value, Value]
    num_warps: int = 4
    num_stages: int = 3
    logits_dtype: str | None = None    # routing kernels: the router logits' type


def _i32(name: str, value: Value) -> tuple[str, str, Value]:
    return (name, "i32", value)


def _ptr(name: str, dtype: str, buffer: str, offset: Value = 0) -> tuple[str, str, Pointer]:
    return (name, TRITON_TYPES[dtype], Pointer(buffer, offset))


def routing_build(model: AotModel, dtype: str, num_experts: int, logits_dtype: str | None = None) -> KernelBuild:
    """The routing kernel for `dtype` activations; `logits_dtype` (default: dtype) is the router
    logits' type: fp32 for models whose router runs in fp32 (DeepSeek-V2) in fp16 / bf16 engines.
    sigmoid_topk reads the layer's score_bias [E] too: fp32 whatever the activations (the exporter
    keeps it fp32, capture.parameter_dtype); the plugin's op types always have one."""
    blocks = routing.routing_block_sizes(num_experts, model.top_k)
    logits_dtype = logits_dtype or dtype
    suffix = "" if logits_dtype == dtype else f"_logits_{logits_dtype}"
    bias, num_warps = [], 4
    if model.routing == SOFTMAX_TOPK:
        kernel, stem = routing.topk_softmax_kernel, f"topk_softmax_{dtype}_e{num_experts}{suffix}"
        constexprs = {"TOP_K": model.top_k, "NORM_TOPK_PROB": model.norm_topk_prob,
                      "ROUTING_SCALE": float(model.routing_scale), **blocks}
    elif model.routing == SIGMOID_TOPK:
        kernel, stem = routing.sigmoid_topk_kernel, f"sigmoid_topk_{dtype}_e{num_experts}{suffix}"
        blocks, num_warps = routing.sigmoid_routing_tiling(num_experts, model.top_k)
        constexprs = {"TOP_K": model.top_k, "NORM_TOPK_PROB": model.norm_topk_prob,
                      "ROUTING_SCALE": float(model.routing_scale), "HAS_SCORE_BIAS": True,
                      "N_GROUP": model.n_group, "TOPK_GROUP": model.topk_group, "RENORM_EPS": RENORMALISE_EPS,
                      **blocks}
        bias = [_ptr("score_bias_ptr", "fp32", "score_bias")]
    else:
        kernel, stem = routing.sparsemixer_top2_kernel, f"sparsemixer_top2_{dtype}_e{num_experts}{suffix}"
        constexprs = {"JITTER_EPS": float(model.jitter_eps), "BLOCK_T": blocks["BLOCK_T"], "BLOCK_E": blocks["BLOCK_E"]}
    return KernelBuild(
        kernel, stem,
        [_ptr("logits_ptr", logits_dtype, "router_logits"), *bias,
         _ptr("weights_ptr", "fp32", "routing_weights"),
         _ptr("expert_ids_ptr", "i32", "expert_ids"),
         _i32("num_tokens", T), _i32("num_experts", E), _i32("stride_logits_t", E)],
        constexprs, {"logits_ptr", "weights_ptr", "expert_ids_ptr"} | {name for name, _, _ in bias},
        (cdiv(T, blocks["BLOCK_T"]), 1, 1), num_warps=num_warps, logits_dtype=logits_dtype,
    )


def theta_build(model: AotModel, dtype: str) -> KernelBuild:
    return KernelBuild(
        theta.mix_compressed_experts_kernel, f"mix_compressed_experts_{dtype}",
        [_ptr("aux_weights_ptr", "fp32", "routing_weights", KM),
         _ptr("aux_ids_ptr", "i32", "expert_ids", KM),
         _ptr("ces_ptr", dtype, "ces"), _ptr("theta_ptr", dtype, "theta"),
         _i32("num_tokens", T), _i32("num_columns", C), _i32("stride_aux_t", K),
         _i32("stride_ces_e", 3 * C), _i32("stride_ces_r", C),
         _i32("stride_theta_t", 3 * C), _i32("stride_theta_r", C)],
        {"N_CE": model.n_ce, "BLOCK_T": theta.THETA_TOKENS_PER_PROGRAM, "BLOCK_C": theta.THETA_COLUMNS_PER_PROGRAM},
        {"ces_ptr", "theta_ptr", "num_columns", "stride_ces_e", "stride_ces_r", "stride_theta_t", "stride_theta_r"},
        (cdiv(T, theta.THETA_TOKENS_PER_PROGRAM), cdiv(C, theta.THETA_COLUMNS_PER_PROGRAM), 1),
    )


def align_builds(model: AotModel, num_experts: int, block_m: int) -> list[KernelBuild]:
    ids = [_ptr("expert_ids_ptr", "i32", "expert_ids")]
    common = {"KM": model.km, "BLOCK_P": align.PAIRS_PER_CHUNK}
    count = KernelBuild(
        align.count_pairs_per_expert_kernel, f"count_pairs_per_expert_e{num_experts}",
        ids + [_ptr("counts_ptr", "i32", "expert_counts"), _i32("num_tokens", T), _i32("stride_ids_t", K)],
        dict(common), {"expert_ids_ptr", "counts_ptr"}, (E, 1, 1),
    )
    scatter = KernelBuild(
        align.scatter_pairs_by_expert_kernel, f"scatter_pairs_by_expert_bm{block_m}_e{num_experts}",
        ids + [_ptr("counts_ptr", "i32", "expert_counts"), *_alignment_args(),
               _i32("num_tokens", T), _i32("num_experts", E), _i32("stride_ids_t", K)],
        {**common, "BLOCK_M": block_m, "BLOCK_E": triton.next_power_of_2(num_experts)},
        {"expert_ids_ptr", "counts_ptr", "sorted_pair_ids_ptr", "block_expert_ids_ptr", "num_padded_ptr"},
        (E, 1, 1),
    )
    return [count, scatter]


def _alignment_args() -> list[tuple[str, str, Pointer]]:
    return [_ptr("sorted_pair_ids_ptr", "i32", "sorted_pair_ids"),
            _ptr("block_expert_ids_ptr", "i32", "block_expert_ids"),
            _ptr("num_padded_ptr", "i32", "num_padded")]


def expert_constexprs(model: AotModel) -> dict:
    """The gate/up kernel's activation constants: SwiGLU without biases, or gpt-oss's clamped SwiGLU
    with them (the constants compiled in as fp32)."""
    clamped = model.activation == CLAMPED_SWIGLU
    return {"HAS_BIAS": model.expert_biases, "CLAMPED": clamped,
            "SWIGLU_ALPHA": float(model.swiglu_alpha) if clamped else 1.0,
            "SWIGLU_LIMIT": float(model.swiglu_limit) if clamped else 0.0}


def gemm_builds(model: AotModel, dtype: str, config: MoeTileConfig) -> list[KernelBuild]:
    has_ce = model.n_ce > 0
    precision = "ieee" if dtype == "fp32" else "tf32"
    swap = "_swap" if config.swap_ab else ""
    alignment_ptrs = {"sorted_pair_ids_ptr", "block_expert_ids_ptr", "num_padded_ptr"}
    # Without biases the bias pointers get a weight buffer that HAS_BIAS=False never reads.
    biased = model.expert_biases
    gate = config.gate_up
    gate_up = KernelBuild(
        grouped_gemm.gate_up_swiglu_kernel,
        f"gate_up_swiglu_{dtype}_{'ce' if has_ce else 'plain'}{'_clamped' if biased else ''}_bm{config.block_m}"
        f"_bn{gate.block_n}_bk{gate.block_k}_w{gate.num_warps}_s{gate.num_stages}_g{config.group_m}{swap}",
        [_ptr("hidden_ptr", dtype, "hidden"), _ptr("theta_ptr", dtype, "theta" if has_ce else "hidden"),
         _ptr("gate_up_ptr", dtype, "gate_up"), _ptr("act_ptr", dtype, "act"),
         _ptr("gate_up_bias_ptr", dtype, "gate_up_bias" if biased else "gate_up"), *_alignment_args(),
         _i32("num_pairs", T * KM), _i32("hidden_size", H), _i32("intermediate", I),
         _i32("stride_hidden_t", H), _i32("stride_theta_t", 3 * C if has_ce else 0),
         _i32("stride_theta_r", C if has_ce else 0), _i32("stride_w_e", 2 * I * H), _i32("stride_w_n", H),
         _i32("stride_act_p", I)],
        {"KM": model.km, "HAS_CE": has_ce, "DOT_PRECISION": precision, "BLOCK_M": config.block_m,
         "BLOCK_N": gate.block_n, "BLOCK_K": gate.block_k, "GROUP_M": config.group_m, "SWAP_AB": config.swap_ab,
         **expert_constexprs(model)},
        {"hidden_ptr", "theta_ptr", "gate_up_ptr", "act_ptr", *alignment_ptrs, "hidden_size", "intermediate",
         "stride_hidden_t", "stride_w_e", "stride_w_n", "stride_act_p"}
        | ({"stride_theta_t", "stride_theta_r"} if has_ce else set()) | ({"gate_up_bias_ptr"} if biased else set()),
        (max_blocks(T * KM, E, config.block_m) * cdiv(I, gate.block_n), 1, 1), gate.num_warps, gate.num_stages,
    )
    tiles = config.down
    down = KernelBuild(
        grouped_gemm.down_weighted_kernel,
        f"down_weighted_{dtype}{'_bias' if biased else ''}_bm{config.block_m}_bn{tiles.block_n}_bk{tiles.block_k}"
        f"_w{tiles.num_warps}_s{tiles.num_stages}_g{config.group_m}{swap}",
        [_ptr("act_ptr", dtype, "act"), _ptr("down_ptr", dtype, "down"),
         _ptr("routing_weights_ptr", "fp32", "routing_weights"), _ptr("out_ptr", dtype, "pair_out"),
         _ptr("down_bias_ptr", dtype, "down_bias" if biased else "down"),
         *_alignment_args(),
         _i32("num_pairs", T * KM), _i32("hidden_size", H), _i32("intermediate", I),
         _i32("stride_act_p", I), _i32("stride_w_e", H * I), _i32("stride_w_n", I),
         _i32("stride_routing_t", K), _i32("stride_out_p", H)],
        {"KM": model.km, "DOT_PRECISION": precision, "BLOCK_M": config.block_m,
         "BLOCK_N": tiles.block_n, "BLOCK_K": tiles.block_k, "GROUP_M": config.group_m, "SWAP_AB": config.swap_ab,
         "HAS_BIAS": biased},
        {"act_ptr", "down_ptr", "routing_weights_ptr", "out_ptr", *alignment_ptrs, "hidden_size", "intermediate",
         "stride_act_p", "stride_w_e", "stride_w_n", "stride_out_p"} | ({"down_bias_ptr"} if biased else set()),
        (max_blocks(T * KM, E, config.block_m) * cdiv(H, tiles.block_n), 1, 1), tiles.num_warps, tiles.num_stages,
    )
    return [gate_up, down]


def combine_build(model: AotModel, dtype: str) -> KernelBuild:
    return KernelBuild(
        combine.sum_main_slots_kernel, f"sum_main_slots_{dtype}",
        [_ptr("pair_out_ptr", dtype, "pair_out"), _ptr("out_ptr", dtype, "out"), _i32("num_tokens", T),
         _i32("hidden_size", H), _i32("stride_pair_p", H), _i32("stride_out_t", H)],
        {"KM": model.km, "BLOCK_T": combine.COMBINE_TOKENS_PER_PROGRAM, "BLOCK_H": combine.COMBINE_COLUMNS_PER_PROGRAM},
        {"pair_out_ptr", "out_ptr", "hidden_size", "stride_pair_p", "stride_out_t"},
        (cdiv(T, combine.COMBINE_TOKENS_PER_PROGRAM), cdiv(H, combine.COMBINE_COLUMNS_PER_PROGRAM), 1),
    )


def tables_for(dtypes: list[str], archs: list[int]) -> dict[str, list[dict]]:
    """Per dtype, the tile table every one of `archs` can run: the one for the smallest shared
    memory among them (launch plans are per dtype, not per architecture)."""
    unknown = [arch for arch in archs if arch not in MAX_SHARED_BYTES]
    if unknown:
        raise ValueError(f"unknown shared memory size for sm_{unknown[0]} (known: {sorted(MAX_SHARED_BYTES)})")
    smallest = min(MAX_SHARED_BYTES[arch] for arch in archs)
    return {dtype: tile_table(dtype, smallest) for dtype in dtypes}


@dataclass
class KernelSetPlan:
    builds: list[KernelBuild]          # every distinct variant, each compiled once per arch
    plans: list[dict]                  # {"dtype", "num_experts", "max_tokens", "launch": [stem, ...]}
    logits_variants: dict[str, str]    # planned routing stem -> its fp32-router-logits twin
    block_ms: list[int]                # every BLOCK_M of the tables (workspace sizes take the worst)


def plan_launches(model: AotModel, tables: dict[str, list[dict]]) -> KernelSetPlan:
    """The distinct kernel variants the model needs, and for every (dtype, E, entry of the dtype's
    tile table) the variants to launch, in order: routing, theta (CE only), align (2), GEMMs (2), combine."""
    builds: dict[str, KernelBuild] = {}
    plans, variants = [], {}
    for dtype, table in tables.items():
        for num_experts in model.num_experts:
            for config in tile_configs(table):
                sequence = [routing_build(model, dtype, num_experts)]
                if model.n_ce > 0:
                    sequence.append(theta_build(model, dtype))
                sequence += align_builds(model, num_experts, config.block_m)
                sequence += gemm_builds(model, dtype, config)
                sequence.append(combine_build(model, dtype))
                for build in sequence:
                    builds.setdefault(build.stem, build)
                if dtype != "fp32":
                    # Not launched as planned: the plugin swaps it in when the engine's router logits
                    # are fp32 while the activations are not (same entry, constexprs and other args).
                    fp32_logits = routing_build(model, dtype, num_experts, logits_dtype="fp32")
                    builds.setdefault(fp32_logits.stem, fp32_logits)
                    variants[sequence[0].stem] = fp32_logits.stem
                plans.append({"dtype": dtype, "num_experts": num_experts, "max_tokens": config.max_tokens,
                              "launch": [build.stem for build in sequence]})
    block_ms = sorted({entry["block_m"] for table in tables.values() for entry in table})
    return KernelSetPlan(list(builds.values()), plans, variants, block_ms)


def triton_compile(build: KernelBuild, arch: int):
    """One variant compiled for sm_{arch} (Triton's own on-disk cache makes a repeat cheap)."""
    names = build.kernel.arg_names
    signature = {name: ttype for name, ttype, _ in build.args}
    signature.update({name: "constexpr" for name in build.constexprs})
    missing = set(names) - set(signature)
    if missing:
        raise ValueError(f"{build.stem}: no type for arguments {sorted(missing)}")
    # In argument order: Triton's cache key hashes this dict, and a set's order changes per process.
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in sorted(build.divisible_by_16, key=names.index)}
    target = GPUTarget("cuda", arch, 32)
    options = triton.compiler.make_backend(target).parse_options(
        {"num_warps": build.num_warps, "num_stages": build.num_stages, "enable_fp_fusion": True}
    )
    return triton.compile(
        ASTSource(build.kernel, signature, build.constexprs, attrs), target=target, options=options.__dict__
    )


def compile_build(build: KernelBuild, arch: int, out_dir: Path) -> dict:
    """Compiles one variant for sm_{arch}; writes .ptx and .cubin; returns its manifest entry."""
    compiled = triton_compile(build, arch)
    if compiled.metadata.global_scratch_size or compiled.metadata.profile_scratch_size:
        raise RuntimeError(f"{build.stem}: needs global/profile scratch memory, which the plugin does not provide")
    limit = MAX_SHARED_BYTES.get(arch)
    if limit is not None and compiled.metadata.shared > limit:
        raise RuntimeError(f"{build.stem}: {compiled.metadata.shared} B shared memory > {limit} B allowed on sm_{arch}")
    arch_dir = out_dir / f"sm{arch}"
    arch_dir.mkdir(parents=True, exist_ok=True)
    ptx_path, cubin_path = arch_dir / f"{build.stem}.ptx", arch_dir / f"{build.stem}.cubin"
    ptx_path.write_text(compiled.asm["ptx"])
    cubin_path.write_bytes(compiled.asm["cubin"])
    return {
        "stem": build.stem,
        "arch": arch,
        "entry": compiled.metadata.name,
        "ptx": str(ptx_path.relative_to(out_dir)),
        "cubin": str(cubin_path.relative_to(out_dir)),
        "args": [{"name": n, "type": t, "value": str(v), "divisible_by_16": n in build.divisible_by_16}
                 for n, t, v in build.args],
        "constexprs": build.constexprs,
        "grid": [str(g) for g in build.grid],
        "num_warps": build.num_warps,
        "num_stages": build.num_stages,
        "shared": compiled.metadata.shared,
        "resources": ptxas_resources(ptx_path, arch),
    }


def ptxas_resources(ptx_path: Path, arch: int) -> dict:
    """Registers and spills from the wheel's ptxas (the system one is too old for Triton's PTX)."""
    arch_flag = "sm_90a" if arch == 90 else f"sm_{arch}"
    ptxas = NVIDIA_BIN / "ptxas-blackwell"
    if not ptxas.exists():
        ptxas = NVIDIA_BIN / "ptxas"
    result = subprocess.run(
        [str(ptxas), f"-arch={arch_flag}", "-v", str(ptx_path), "-o", "/dev/null"],
        capture_output=True, text=True, check=True,
    )
    report = result.stderr + result.stdout

    def number(pattern: str) -> int:
        match = re.search(pattern, report)
        return int(match.group(1)) if match else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack_frame": number(r"(\d+) bytes stack frame"),
    }


def compile_all(model: AotModel, archs: list[int], dtypes: list[str], out_dir: Path) -> dict:
    """Compiles the kernel set; writes manifest.json and kernel_set.inc (the plugin's C++)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = tables_for(dtypes, archs)
    kernel_set = plan_launches(model, tables)
    manifest = {
        "triton_version": triton.__version__,
        "model": {"num_experts": list(model.num_experts), "top_k": model.top_k, "n_ce": model.n_ce,
                  "km": model.km, "norm_topk_prob": model.norm_topk_prob, "routing": model.routing,
                  "routing_scale": model.routing_scale, "jitter_eps": model.jitter_eps,
                  "n_group": model.n_group, "topk_group": model.topk_group, "activation": model.activation,
                  "swiglu_alpha": model.swiglu_alpha, "swiglu_limit": model.swiglu_limit},
        "assumptions": ["H % 16 == 0", "I % 16 == 0", "C % 16 == 0", "every buffer 16-byte aligned",
                        "hidden, gate_up, down, ces, gate_up_bias, down_bias and out contiguous"],
        "workspace": [{"name": w.name, "dtype": w.dtype, "elements": str(w.elements(kernel_set.block_ms)),
                       "written_by": w.written_by} for w in WORKSPACE],
        "tile_table": [{"dtype": dtype, **entry} for dtype, table in tables.items() for entry in table],
        "launch_plans": kernel_set.plans,
        "logits_variants": kernel_set.logits_variants,
        "kernels": [compile_build(build, arch, out_dir) for arch in archs for build in kernel_set.builds],
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    images = {(k["stem"], k["arch"]): (out_dir / k["cubin"]).read_bytes() for k in manifest["kernels"]}
    (out_dir / "kernel_set.inc").write_text(
        aot_cpp.kernel_set_source(model, kernel_set, WORKSPACE, manifest["kernels"], images))
    return manifest


TABLE_CHECK_ARCHS = (80, 86, 89, 90)  # both shared memory classes, Ampere / Ada / Hopper code generation
TABLE_CHECK_MODELS = (AotModel(n_ce=4), AotModel(n_ce=0))  # gate/up differs with and without CE


def reachable_gemm_builds(archs: list[int], dtypes: list[str]) -> list[tuple[int, str, int, KernelBuild]]:
    """(arch, dtype, max_tokens, build) for every GEMM variant the dispatcher can pick on each arch:
    every entry of the arch's table for each dtype, gate/up with and without CE; each variant once."""
    seen, builds = set(), []
    for arch in archs:
        for dtype in dtypes:
            for config in tile_configs(arch_tile_table(dtype, arch)):
                for model in TABLE_CHECK_MODELS:
                    for build in gemm_builds(model, dtype, config):
                        if (arch, build.stem) not in seen:
                            seen.add((arch, build.stem))
                            builds.append((arch, dtype, config.max_tokens, build))
    return builds


def _check_one(job: tuple[tuple[int, ...], tuple[str, ...], int]) -> dict:
    """Compiles the job's variant (named by its index: Triton kernels do not pickle across processes)."""
    archs, dtypes, index = job
    arch, dtype, max_tokens, build = reachable_gemm_builds(list(archs), list(dtypes))[index]
    compiled = triton_compile(build, arch)
    with tempfile.TemporaryDirectory() as scratch:
        ptx_path = Path(scratch) / f"{build.stem}.ptx"
        ptx_path.write_text(compiled.asm["ptx"])
        resources = ptxas_resources(ptx_path, arch)
    return {"arch": arch, "dtype": dtype, "max_tokens": max_tokens, "stem": build.stem,
            "shared": compiled.metadata.shared, "shared_limit": MAX_SHARED_BYTES[arch], **resources}


def check_tile_tables(archs: list[int], dtypes: list[str], jobs: int | None = None) -> list[dict]:
    """Compile every reachable GEMM variant (in `jobs` processes) and report its shared memory,
    registers and spills (`table_problems` names the ones over the shared limit or spilling)."""
    work = [(tuple(archs), tuple(dtypes), index) for index in range(len(reachable_gemm_builds(archs, dtypes)))]
    jobs = jobs or os.cpu_count() or 1
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            return list(pool.map(_check_one, work))
    return [_check_one(job) for job in work]


def table_problems(records: list[dict]) -> list[str]:
    problems = []
    for r in records:
        if r["shared"] > r["shared_limit"]:
            problems.append(f"sm{r['arch']} {r['stem']}: {r['shared']} B shared > {r['shared_limit']} B")
        if r["spill_stores"] or r["spill_loads"] or r["stack_frame"]:
            problems.append(f"sm{r['arch']} {r['stem']}: spills {r['spill_stores']} B stores, "
                            f"{r['spill_loads']} B loads, {r['stack_frame']} B stack frame")
    return problems


def check_tables_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ce_kernels.aot --check-tables",
                                     description="Compile every tile-table GEMM variant; fail on shared memory "
                                                 "over the limit or spills.")
    parser.add_argument("--check-tables", action="store_true", required=True)
    parser.add_argument("--arch", type=int, nargs="+", default=list(TABLE_CHECK_ARCHS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--jobs", type=int, help="compile processes (default: one per core)")
    parser.add_argument("--json", type=Path, help="also write the records here")
    args = parser.parse_args(argv)
    if isinstance(routing.topk_softmax_kernel, InterpretedFunction):
        parser.error("TRITON_INTERPRET=1 is set: unset it to compile ahead of time")
    started = time.perf_counter()
    records = check_tile_tables(args.arch, args.dtypes, args.jobs)
    for r in records:
        bucket = f"T<={r['max_tokens']}" if r["max_tokens"] < LAST else "larger T"
        print(f"sm{r['arch']} {bucket:<9} {r['stem']}: {r['shared']:>6} B shared "
              f"(limit {r['shared_limit']}), {r['registers']} registers, {r['spill_stores']} B spill stores")
    if args.json:
        args.json.write_text(json.dumps({"triton_version": triton.__version__, "records": records}, indent=1))
    problems = table_problems(records)
    print(f"{len(records)} variants compiled in {time.perf_counter() - started:.0f} s; "
          f"{len(problems)} problem(s)" + "".join(f"\n  {p}" for p in problems))
    return 1 if problems else 0


def group_problem(routing_name: str, num_experts: list[int], top_k: int, n_group: int, topk_group: int) -> str | None:
    """Why --n-group / --topk-group do not fit, or None (moe_math.check_moe_arguments' rules)."""
    if (n_group, topk_group) == (1, 1):
        return None
    if routing_name != SIGMOID_TOPK:
        return "--n-group / --topk-group need --routing sigmoid_topk"
    if not 1 <= topk_group <= n_group:
        return f"--topk-group {topk_group} outside 1..{n_group} (--n-group)"
    for experts in num_experts:
        if experts % n_group or experts // n_group < 2:
            return f"{experts} experts do not split into {n_group} equal groups of at least 2"
        if top_k > topk_group * (experts // n_group):
            return f"--top-k {top_k} exceeds the {topk_group * (experts // n_group)} experts of the kept groups"
    return None


def activation_problem(routing_name: str, activation: str, swiglu_alpha: float, swiglu_limit: float) -> str | None:
    """Why --activation / --swiglu-alpha / --swiglu-limit do not fit, or None: the clamped SwiGLU (with
    expert biases) is an op type only with softmax_topk routing (onnx_functions.op_type_for)."""
    if activation == SWIGLU:
        if (swiglu_alpha, swiglu_limit) != (1.0, 0.0):
            return "--swiglu-alpha / --swiglu-limit need --activation clamped_swiglu"
        return None
    if routing_name != SOFTMAX_TOPK:
        return "--activation clamped_swiglu needs --routing softmax_topk (gpt-oss's op types)"
    if not (math.isfinite(swiglu_alpha) and math.isfinite(swiglu_limit)):
        return "--swiglu-alpha and --swiglu-limit must be finite"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ce_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=list(DTYPES))
    parser.add_argument("--num-experts", type=int, nargs="+", default=[64], help="every expert count in the model")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--n-ce", type=int, default=4)
    parser.add_argument("--norm-topk-prob", action="store_true")
    parser.add_argument("--routing", choices=ROUTINGS, default=SOFTMAX_TOPK)
    parser.add_argument("--routing-scale", type=float, default=1.0,
                        help="softmax_topk / sigmoid_topk weights are multiplied by it")
    parser.add_argument("--jitter-eps", type=float, default=0.0, help="sparsemixer's band")
    parser.add_argument("--n-group", type=int, default=1, help="sigmoid_topk: the experts' groups")
    parser.add_argument("--topk-group", type=int, default=1, help="sigmoid_topk: the groups the choice is within")
    parser.add_argument("--activation", choices=ACTIVATIONS, default=SWIGLU,
                        help="clamped_swiglu: gpt-oss's experts, which read gate_up_bias and down_bias")
    parser.add_argument("--swiglu-alpha", type=float, default=1.0, help="clamped_swiglu's sigmoid slope")
    parser.add_argument("--swiglu-limit", type=float, default=0.0, help="clamped_swiglu's clamp")
    argv = sys.argv[1:] if argv is None else argv
    if "--check-tables" in argv:
        return check_tables_main(argv)
    args = parser.parse_args(argv)
    if not 0 <= args.n_ce < args.top_k:
        parser.error(f"--n-ce must be in 0..{args.top_k - 1}")
    if args.routing == SPARSEMIXER and args.top_k != 2:
        parser.error("--routing sparsemixer needs --top-k 2")
    problem = (group_problem(args.routing, args.num_experts, args.top_k, args.n_group, args.topk_group)
               or activation_problem(args.routing, args.activation, args.swiglu_alpha, args.swiglu_limit))
    if problem:
        parser.error(problem)
    if isinstance(routing.topk_softmax_kernel, InterpretedFunction):
        parser.error("TRITON_INTERPRET=1 is set: unset it to compile ahead of time")
    model = AotModel(tuple(args.num_experts), args.top_k, args.n_ce, args.norm_topk_prob,
                     args.routing, args.routing_scale, args.jitter_eps, args.n_group, args.topk_group,
                     args.activation, args.swiglu_alpha, args.swiglu_limit)
    manifest = compile_all(model, args.arch, args.dtypes, args.out)
    for entry in manifest["kernels"]:
        res = entry["resources"]
        print(f"sm{entry['arch']} {entry['stem']}: {res['registers']} registers, "
              f"{res['spill_stores']} B spill stores, {entry['shared']} B shared")
    print(f"wrote {len(manifest['kernels'])} kernels and {args.out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
