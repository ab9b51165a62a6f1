"""Ahead-of-time compilation of every kernel for sm_80 and sm_90 on a machine with no GPU, and what
the machine code looks like: Hopper matrix instructions in the sm_90 GEMMs, no spills anywhere; and
every tile-table GEMM variant the dispatcher can pick, for sm_80 / 86 / 89 / 90 in bf16, fp16 and
fp32, within the architecture's shared memory and without spills.

The CLI runs in a subprocess without TRITON_INTERPRET (tests/test_kernels.py sets it in this
process when there is no GPU, and an interpreted kernel cannot be compiled).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

REPO_ROOT = Path(__file__).resolve().parents[1]
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
GEMM_PREFIXES = ("gate_up_swiglu", "down_weighted")
MODEL_BUFFERS = {"hidden", "router_logits", "gate_up", "down", "ces", "score_bias", "gate_up_bias", "down_bias", "out"}
SHAPES = {"T": 37, "H": 2048, "I": 1024, "C": 2048, "E": 64, "K": 8, "KM": 4}


def run_aot(*options: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "plugins"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "ce_kernels.aot", *options],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def compile_ahead_of_time(out: Path, *options: str, timeout: int = 300) -> dict:
    result = run_aot("--out", str(out), *options, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def aot_output(tmp_path_factory):
    """The default model (OLMoE-CE: E 64, top-8, 4 compressed), bf16, for sm_80 and sm_90."""
    out = tmp_path_factory.mktemp("aot")
    return out, compile_ahead_of_time(out, "--arch", "80", "90", "--dtypes", "bf16")


def sass(cubin: Path) -> str:
    return subprocess.run([str(NVIDIA_BIN / "cuobjdump"), "-sass", str(cubin)],
                          capture_output=True, text=True, check=True).stdout


def assert_entry_takes_its_listed_arguments(out: Path, kernel: dict) -> None:
    """The kernel's PTX entry has the manifest's arguments plus Triton's two scratch pointers."""
    ptx = (out / kernel["ptx"]).read_text()
    entry = re.search(rf"\.entry {kernel['entry']}\((.*?)\)", ptx, re.S)
    assert entry and entry.group(1).count(".param") == len(kernel["args"]) + 2, kernel["stem"]


def assert_no_spills(kernel: dict) -> None:
    resources = kernel["resources"]
    assert 0 < resources["registers"] <= 255, kernel["stem"]
    assert resources["spill_stores"] == resources["spill_loads"] == resources["stack_frame"] == 0, \
        (kernel["stem"], kernel["arch"], resources)


def pointer_argument(kernel: dict, name: str) -> tuple:
    """(type, the buffer it is bound to, whether it is 16-byte aligned) of the kernel's pointer `name`."""
    argument = next(a for a in kernel["args"] if a["name"] == name)
    return argument["type"], argument["value"], argument["divisible_by_16"]


def test_every_kernel_compiles_for_both_architectures(aot_output):
    out, manifest = aot_output
    stems = {arch: {k["stem"] for k in manifest["kernels"] if k["arch"] == arch} for arch in (80, 90)}
    assert stems[80] == stems[90]
    assert {k["entry"] for k in manifest["kernels"]} == {
        "topk_softmax_kernel", "mix_compressed_experts_kernel", "count_pairs_per_expert_kernel",
        "scatter_pairs_by_expert_kernel", "gate_up_swiglu_kernel", "down_weighted_kernel", "sum_main_slots_kernel",
    }
    for plan in manifest["launch_plans"]:
        assert set(plan["launch"]) <= stems[90]
    for kernel in manifest["kernels"]:
        ptx = (out / kernel["ptx"]).read_text()
        assert (out / kernel["cubin"]).stat().st_size > 0
        assert f".target sm_{kernel['arch']}{'a' if kernel['arch'] == 90 else ''}" in ptx
        assert_entry_takes_its_listed_arguments(out, kernel)


def test_sm90_gemms_use_hopper_matrix_instructions(aot_output):
    out, manifest = aot_output
    gemms = [k for k in manifest["kernels"] if k["stem"].startswith(GEMM_PREFIXES)]
    assert {k["arch"] for k in gemms} == {80, 90}
    for kernel in gemms:
        ptx, code = (out / kernel["ptx"]).read_text(), sass(out / kernel["cubin"])
        if kernel["arch"] == 90:
            assert "wgmma.mma_async" in ptx and "HGMMA" in code, kernel["stem"]
        else:
            assert "mma.sync" in ptx and "HMMA" in code, kernel["stem"]


def test_no_kernel_spills_to_local_memory(aot_output):
    out, manifest = aot_output
    for kernel in manifest["kernels"]:
        resources = kernel["resources"]
        assert 0 < resources["registers"] <= 255, kernel["stem"]
        assert resources["spill_stores"] == resources["spill_loads"] == 0, (kernel["stem"], resources)
    for kernel in manifest["kernels"]:
        if kernel["arch"] == 90 and kernel["stem"].startswith(GEMM_PREFIXES):
            usage = subprocess.run([str(NVIDIA_BIN / "cuobjdump"), "-res-usage", str(out / kernel["cubin"])],
                                   capture_output=True, text=True, check=True).stdout
            assert re.search(r"\bLOCAL:0\b", usage) and re.search(r"\bSTACK:0\b", usage), (kernel["stem"], usage)


def test_launch_expressions_are_complete(aot_output):
    """Every grid and argument the plugin's generated C++ computes evaluates on real shapes, every
    pointer names a layer tensor or a workspace buffer, and kernel_set.inc was written beside the manifest."""
    from ce_kernels.aot import WORKSPACE, AotModel, Pointer, plan_launches, tables_for

    out, manifest = aot_output
    assert "struct gate_up_swiglu_bf16_ce_" in (out / "kernel_set.inc").read_text()
    buffers = MODEL_BUFFERS | {w.name for w in WORKSPACE}
    model = AotModel(num_experts=(64,), top_k=8, n_ce=4)
    kernel_set = plan_launches(model, tables_for(["bf16"], [80, 90]))
    assert {b.stem for b in kernel_set.builds} == {k["stem"] for k in manifest["kernels"]}
    for build in kernel_set.builds:
        grid = [g(SHAPES) if not isinstance(g, int) else g for g in build.grid]
        assert all(g >= 1 for g in grid), (build.stem, grid)
        for name, _, value in build.args:
            if isinstance(value, Pointer):
                assert value.buffer in buffers, (build.stem, name)
            else:
                assert (value if isinstance(value, int) else value(SHAPES)) >= 0, (build.stem, name)


def test_shape_expressions_evaluate_and_render_alike():
    """align.py's buffer sizes and the plugin's C++ come from the same expressions."""
    from ce_kernels import align
    from ce_kernels.shape_exprs import E, KM, T, cdiv, cpp, max_blocks

    grid = max_blocks(T * KM, E, 64) * cdiv(T, 16)
    assert grid(SHAPES) == align.max_blocks(37 * 4, 64, 64) * 3 == 66 * 3
    assert cpp(grid) == "cdiv(d.T * d.KM + smaller(d.E, d.T * d.KM) * 63, 64) * cdiv(d.T, 16)"
    assert cpp((T - 1) * (KM + 2)) == "(d.T - 1) * (d.KM + 2)"
    assert align.max_padded_pairs(3, 8, 16) == 3 + 3 * 15


def test_plain_moe_with_sparsemixer_routing_compiles(tmp_path):
    manifest = compile_ahead_of_time(tmp_path, "--arch", "90", "--dtypes", "fp16", "--routing", "sparsemixer",
                                     "--top-k", "2", "--n-ce", "0", "--jitter-eps", "0.01", "--num-experts", "16")
    entries = {k["entry"] for k in manifest["kernels"]}
    assert "sparsemixer_top2_kernel" in entries and "topk_softmax_kernel" not in entries
    assert "mix_compressed_experts_kernel" not in entries  # no theta without compressed experts
    gate_up = [k for k in manifest["kernels"] if k["entry"] == "gate_up_swiglu_kernel"]
    assert gate_up and all(k["constexprs"]["HAS_CE"] is False for k in gate_up)
    assert all(k["resources"]["spill_stores"] == 0 for k in manifest["kernels"])


@pytest.mark.slow
def test_deepseek_v3_sigmoid_routing_set_compiles_without_spills(tmp_path):
    """SigmoidMoE / CompressedSigmoidMoE's set (DeepSeek-V3's routing: 256 experts in 8 groups, the
    best 4 kept, top-8, renormalised, scaled; here with CE) for sm_80 and sm_90: the sigmoid routing
    kernel reads the layer's fp32 score_bias, its group constants are compiled in, nothing spills
    (with 4 warps its routing kernel did at E = 256: routing.sigmoid_routing_tiling). About 3.5 min on
    2 cores, most of it ptxas reading back the GEMMs."""
    out = tmp_path / "aot"
    manifest = compile_ahead_of_time(
        out, "--arch", "80", "90", "--dtypes", "bf16", "--routing", "sigmoid_topk", "--num-experts", "256",
        "--top-k", "8", "--n-ce", "4", "--norm-topk-prob", "--routing-scale", "2.5", "--n-group", "8",
        "--topk-group", "4", timeout=900)
    assert manifest["model"]["routing"] == "sigmoid_topk"
    assert (manifest["model"]["n_group"], manifest["model"]["topk_group"]) == (8, 4)
    entries = {k["entry"] for k in manifest["kernels"]}
    assert "sigmoid_topk_kernel" in entries and "topk_softmax_kernel" not in entries
    assert "mix_compressed_experts_kernel" in entries
    for arch in (80, 90):
        routing = {k["stem"]: k for k in manifest["kernels"] if k["arch"] == arch and k["entry"] == "sigmoid_topk_kernel"}
        assert set(routing) == {"sigmoid_topk_bf16_e256", "sigmoid_topk_bf16_e256_logits_fp32"}
        for kernel in routing.values():
            assert {k: kernel["constexprs"][k] for k in ("TOP_K", "N_GROUP", "TOPK_GROUP", "HAS_SCORE_BIAS",
                                                        "NORM_TOPK_PROB", "ROUTING_SCALE")} == \
                {"TOP_K": 8, "N_GROUP": 8, "TOPK_GROUP": 4, "HAS_SCORE_BIAS": True, "NORM_TOPK_PROB": True,
                 "ROUTING_SCALE": 2.5}
            assert pointer_argument(kernel, "score_bias_ptr") == ("*fp32", "score_bias", True)
            assert_entry_takes_its_listed_arguments(out, kernel)
    for plan in manifest["launch_plans"]:
        assert plan["launch"][0] == "sigmoid_topk_bf16_e256"
    for kernel in manifest["kernels"]:
        assert_no_spills(kernel)
    source = (out / "kernel_set.inc").read_text()
    assert 'pointer("score_bias_ptr", kBufScoreBias, 0, true)' in source
    assert "a.routing = Routing::kSigmoidTopK;" in source
    assert "a.nGroup = 8;" in source and "a.topkGroup = 4;" in source


@pytest.mark.slow
def test_gpt_oss_clamped_swiglu_set_compiles_without_spills(tmp_path):
    """ClampedSwiGLUMoE / CompressedClampedSwiGLUMoE's set (gpt-oss-20b: 32 experts, top-4,
    renormalised, alpha 1.702, limit 7; here with CE) for sm_80 only, to stay cheap (about 20 s; sm_90
    and the set without CE were compiled by hand, plugins/trt/README.md): the GEMMs read the layer's
    gate_up_bias / down_bias, the clamped SwiGLU's constants are compiled in, nothing spills (with the
    gate/up biases added after the loop, the BLOCK_M 32 gate/up GEMM spilled on sm_80)."""
    out = tmp_path / "aot"
    manifest = compile_ahead_of_time(
        out, "--arch", "80", "--dtypes", "bf16", "--num-experts", "32", "--top-k", "4", "--n-ce", "2",
        "--norm-topk-prob", "--activation", "clamped_swiglu", "--swiglu-alpha", "1.702", "--swiglu-limit", "7.0")
    assert (manifest["model"]["activation"], manifest["model"]["swiglu_alpha"], manifest["model"]["swiglu_limit"]) \
        == ("clamped_swiglu", 1.702, 7.0)
    gemms = {entry: [k for k in manifest["kernels"] if k["entry"] == entry]
             for entry in ("gate_up_swiglu_kernel", "down_weighted_kernel")}
    assert gemms["gate_up_swiglu_kernel"] and gemms["down_weighted_kernel"]
    for kernel in gemms["gate_up_swiglu_kernel"]:
        assert "_clamped_" in kernel["stem"]
        assert {k: kernel["constexprs"][k] for k in ("HAS_BIAS", "CLAMPED", "SWIGLU_ALPHA", "SWIGLU_LIMIT", "HAS_CE")} \
            == {"HAS_BIAS": True, "CLAMPED": True, "SWIGLU_ALPHA": 1.702, "SWIGLU_LIMIT": 7.0, "HAS_CE": True}
        assert pointer_argument(kernel, "gate_up_bias_ptr") == ("*bf16", "gate_up_bias", True)
    for kernel in gemms["down_weighted_kernel"]:
        assert kernel["constexprs"]["HAS_BIAS"] is True and "_bias_" in kernel["stem"]
        assert pointer_argument(kernel, "down_bias_ptr") == ("*bf16", "down_bias", True)
    for kernel in manifest["kernels"]:
        assert_entry_takes_its_listed_arguments(out, kernel)
        assert_no_spills(kernel)
    source = (out / "kernel_set.inc").read_text()
    assert 'pointer("gate_up_bias_ptr", kBufGateUpBias, 0, true)' in source
    assert 'pointer("down_bias_ptr", kBufDownBias, 0, true)' in source
    assert "a.activation = Activation::kClampedSwiGLU;" in source
    assert "a.swigluAlpha = 1.702f;" in source and "a.swigluLimit = 7.0f;" in source


def test_swiglu_sets_read_no_expert_biases():
    """Without --activation the GEMMs are compiled as before: HAS_BIAS / CLAMPED off, the bias
    pointers given a weight buffer they never read, and kernel_set.inc sets no activation (MoeAttrs'
    default, SwiGLU)."""
    from ce_kernels import aot, aot_cpp
    from ce_kernels.tile_configs import tile_configs

    model = aot.AotModel(num_experts=(8,), top_k=4, n_ce=2)
    config = tile_configs(aot.tables_for(["bf16"], [90])["bf16"])[0]
    gate_up, down = aot.gemm_builds(model, "bf16", config)
    assert {k: gate_up.constexprs[k] for k in ("HAS_BIAS", "CLAMPED")} == {"HAS_BIAS": False, "CLAMPED": False}
    assert down.constexprs["HAS_BIAS"] is False
    assert {str(v) for n, _, v in gate_up.args + down.args if n.endswith("bias_ptr")} == {"gate_up", "down"}
    assert not {"gate_up_bias_ptr", "down_bias_ptr"} & (gate_up.divisible_by_16 | down.divisible_by_16)
    assert "clamped" not in gate_up.stem and "bias" not in down.stem
    clamped = aot.AotModel(num_experts=(8,), top_k=4, n_ce=2, activation="clamped_swiglu", swiglu_alpha=1.702,
                           swiglu_limit=7.0)
    gate_up, down = aot.gemm_builds(clamped, "bf16", config)
    assert {str(v) for n, _, v in gate_up.args + down.args if n.endswith("bias_ptr")} == {"gate_up_bias", "down_bias"}
    assert aot_cpp.ACTIVATION_IDS[clamped.activation] == "Activation::kClampedSwiGLU"


@pytest.mark.parametrize("options, message", [
    (("--swiglu-limit", "7"), "--swiglu-alpha / --swiglu-limit need --activation clamped_swiglu"),
    (("--activation", "clamped_swiglu", "--routing", "sparsemixer", "--top-k", "2"),
     "--activation clamped_swiglu needs --routing softmax_topk"),
    (("--activation", "clamped_swiglu", "--swiglu-limit", "inf"), "must be finite"),
])
def test_aot_refuses_activation_options_that_do_not_fit(tmp_path, options, message):
    result = run_aot("--out", str(tmp_path), "--top-k", "4", "--n-ce", "0", "--num-experts", "8", *options)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("options, message", [
    (("--routing", "sigmoid_topk", "--num-experts", "16", "--n-group", "3"), "16 experts do not split into 3"),
    (("--routing", "sigmoid_topk", "--num-experts", "16", "--n-group", "4", "--topk-group", "5"),
     "--topk-group 5 outside 1..4"),
    (("--routing", "sigmoid_topk", "--num-experts", "16", "--n-group", "8", "--topk-group", "2"),
     "--top-k 8 exceeds the 4 experts of the kept groups"),
    (("--num-experts", "16", "--n-group", "2"), "--n-group / --topk-group need --routing sigmoid_topk"),
])
def test_aot_refuses_expert_groups_that_do_not_fit(tmp_path, options, message):
    result = run_aot("--out", str(tmp_path), "--top-k", "8", "--n-ce", "0", *options)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def test_fp16_and_bf16_sets_embed_a_routing_variant_for_fp32_router_logits(aot_output):
    """What the TensorRT plugin swaps in when an engine's router logits are fp32 and its activations
    are not (DeepSeek-V2 routes in fp32): the same entry, constexprs and other arguments."""
    _, manifest = aot_output
    for arch in (80, 90):
        routing = {k["stem"]: k for k in manifest["kernels"] if k["arch"] == arch and k["entry"] == "topk_softmax_kernel"}
        planned, variant = routing["topk_softmax_bf16_e64"], routing["topk_softmax_bf16_e64_logits_fp32"]
        assert variant["constexprs"] == planned["constexprs"] and variant["grid"] == planned["grid"]
        assert variant["num_warps"] == planned["num_warps"]
        types = {a["name"]: a["type"] for a in variant["args"]}
        assert types["logits_ptr"] == "*fp32"
        assert {n: t for n, t in types.items() if n != "logits_ptr"} == \
            {a["name"]: a["type"] for a in planned["args"] if a["name"] != "logits_ptr"}
        assert all(variant["stem"] not in plan["launch"] for plan in manifest["launch_plans"])


def test_every_tile_table_variant_fits_shared_memory_and_does_not_spill(tmp_path):
    """`ce_kernels.aot --check-tables`: each architecture's own table (16-bit: large or small shared
    memory; fp32), every entry, gate/up with and without CE, compiled once each (Triton's cache
    makes a rerun take seconds) and read back with the wheel's ptxas."""
    from ce_kernels.tile_configs import DTYPES, MAX_SHARED_BYTES, arch_tile_table, select_tile_config

    report = tmp_path / "tables.json"
    result = run_aot("--check-tables", "--json", str(report), timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    records = json.loads(report.read_text())["records"]
    archs = (80, 86, 89, 90)
    for arch in archs:
        for dtype in DTYPES:
            table = arch_tile_table(dtype, arch)
            got = [r for r in records if r["arch"] == arch and r["dtype"] == dtype]
            assert {r["max_tokens"] for r in got} == {entry["max_tokens"] for entry in table}, (arch, dtype)
            # Whatever T is, the dispatcher picks one of the entries compiled above.
            for tokens in (1, 32, 33, 256, 257, 1024, 1025, 1 << 20):
                assert select_tile_config(tokens, dtype, MAX_SHARED_BYTES[arch]).max_tokens in \
                    {r["max_tokens"] for r in got}
    for r in records:
        assert r["shared"] <= MAX_SHARED_BYTES[r["arch"]], r
        assert r["spill_stores"] == r["spill_loads"] == r["stack_frame"] == 0, r
        assert 0 < r["registers"] <= 255, r
    assert {r["stem"].split("_")[0] for r in records} == {"gate", "down"}
    assert any("_plain_" in r["stem"] for r in records) and any("_ce_" in r["stem"] for r in records)


def test_check_tables_fails_on_a_config_over_the_shared_memory_limit():
    from ce_kernels.aot import table_problems

    record = {"arch": 86, "stem": "gate_up_swiglu_bf16_ce_bm64_bn128_bk64_w8_s3_g8", "shared": 114688,
              "shared_limit": 101376, "spill_stores": 16, "spill_loads": 8, "stack_frame": 16}
    problems = table_problems([record])
    assert len(problems) == 2 and "114688 B shared > 101376 B" in problems[0] and "spills 16 B" in problems[1]
