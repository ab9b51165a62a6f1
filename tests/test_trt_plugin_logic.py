"""The TensorRT plugin's own logic, built and run as a C++ unit-test executable: no TensorRT, no
CUDA, no GPU (plugins/trt/src/moe_plugin_logic.*; tests in plugins/trt/tests/logic_tests.cpp, over
the generated kernel sets in plugins/trt/tests/fixtures/).

The executable is configured and built with CMake (CE_TRT_LOGIC_ONLY=ON) into a temporary folder,
or with g++ directly when CMake is missing. Also here: plugins/trt/tools/embed_kernels.py, and, when
Triton is installed, the contract between today's `ce_kernels.aot` output and the plugin: its
generated C++ compiles into the logic tests, its cubins hold their entries and its plans build for
every dtype / E / tile entry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TRT_DIR = REPO_ROOT / "plugins" / "trt"
FIXTURES = TRT_DIR / "tests" / "fixtures"
LOGIC_SOURCES = ["src/moe_plugin_logic.cpp", "tests/logic_tests.cpp", "tests/alloc_counter.cpp"]
CASES = [
    "shape_arithmetic", "fields_roundtrip", "creator_field_names", "shape_rules", "type_rules",
    "format_combinations", "select_arch", "manifest_fixture_ce", "workspace_monotone", "manifest_fixture_sparsemixer",
    "manifest_fixture_scaled", "manifest_fixture_sigmoid", "manifest_fixture_clamped", "plan_errors", "plan_zero_tokens", "synthetic_manifest", "several_sets",
    "resolve_pointers", "no_allocation_in_plan", "fuzz_fields", "fuzz_shapes", "example_request_checks", "aot_contract",
]
JOBS = str(max(os.cpu_count() or 1, 1))
SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
# fixtureLibrary() leaks on purpose; LeakSanitizer also fails under ptrace-restricted containers.
SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "print_stacktrace=1"}


def run(command: list, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    env = {**kwargs.pop("env", os.environ), **SANITIZER_ENV}
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, command))}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def sanitizers_work(cxx: str, folder: Path) -> bool:
    """Whether this compiler builds and runs AddressSanitizer + UBSan programs here."""
    source = folder / "probe.cpp"
    source.write_text("int main() { return 0; }\n")
    try:
        built = subprocess.run([cxx, *SANITIZERS, source, "-o", folder / "probe"], capture_output=True, timeout=120)
        return built.returncode == 0 and subprocess.run([folder / "probe"], env={**os.environ, **SANITIZER_ENV},
                                                        capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def build_with_gxx(out: Path, aot_dirs: list[Path]) -> Path:
    """The logic tests compiled with g++ directly, with `aot_dirs`' kernel sets embedded; with
    AddressSanitizer and UBSan where the compiler has them."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("neither cmake nor a C++ compiler (g++) is installed")
    out.mkdir(parents=True, exist_ok=True)
    embedded = out / "test_kernel_sets.cpp"
    run([sys.executable, TRT_DIR / "tools" / "embed_kernels.py", "--out", embedded, *aot_dirs])
    exe = out / "ce_moe_logic_tests"
    sanitizers = SANITIZERS if sanitizers_work(cxx, out) else []
    run([cxx, "-std=c++17", "-O0", "-Wall", "-Wextra", "-Werror", *sanitizers, "-I", TRT_DIR / "src",
         "-I", TRT_DIR / "examples", *[TRT_DIR / s for s in LOGIC_SOURCES], embedded, "-o", exe], timeout=600)
    return exe


@pytest.fixture(scope="module")
def logic_tests(tmp_path_factory) -> tuple[Path, Path | None]:
    """(the test executable, its CMake build folder or None when built with g++ directly). Built with
    AddressSanitizer and UBSan where the compiler has them, so that the fuzz cases catch memory errors."""
    build = tmp_path_factory.mktemp("trt_logic")
    cxx = shutil.which("g++") or shutil.which("c++")
    sanitize = cxx is not None and sanitizers_work(cxx, build)
    cmake = shutil.which("cmake")
    if cmake:
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        # Debug (-O0) compiles fastest; check_compile.sh builds the same code with -O3 and -Werror.
        run([cmake, "-S", TRT_DIR, "-B", build, *generator, "-DCE_TRT_LOGIC_ONLY=ON", "-DCMAKE_BUILD_TYPE=Debug",
             f"-DPython3_EXECUTABLE={sys.executable}", f"-DCE_TRT_SANITIZE={'ON' if sanitize else 'OFF'}"])
        run([cmake, "--build", build, "-j", JOBS], timeout=600)
        return build / "ce_moe_logic_tests", build
    return build_with_gxx(build, []), None


def test_logic_unit_tests_pass(logic_tests):
    exe, _ = logic_tests
    out = run([exe]).stdout
    for case in CASES:
        assert f"[ OK ] {case}" in out, out
    assert f"{len(CASES)} passed, 0 failed" in out, out


def test_logic_tests_are_registered_with_ctest(logic_tests):
    _, build = logic_tests
    if build is None or shutil.which("ctest") is None:
        pytest.skip("built without CMake")
    out = run(["ctest", "--test-dir", build, "--output-on-failure"]).stdout
    assert "100% tests passed" in out, out


def test_a_failing_check_fails_the_executable(logic_tests):
    """The harness is not vacuous: without the fixtures, the fixture cases fail and the exit code says so."""
    exe, _ = logic_tests
    result = subprocess.run([exe, "--no-fixtures", "manifest_fixture_ce"], capture_output=True, text=True,
                            env={**os.environ, **SANITIZER_ENV})
    assert result.returncode == 1
    assert "[FAIL] manifest_fixture_ce" in result.stdout


def _fake_aot_folder(folder: Path, fixture: str) -> Path:
    """An AOT-shaped folder: a fixture kernel set (stand-in cubins) as its kernel_set.inc."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / f"{fixture}.inc", folder / "kernel_set.inc")
    return folder


READER = r"""
#include "embedded_kernels.h"
#include <cstdio>
int main()
{
    size_t count = 0;
    ce_trt::KernelSetDesc const* const* sets = ce_trt::embedded::kernelSets(&count);
    std::printf("sets %zu\n", count);
    for (size_t s = 0; s < count; ++s)
    {
        ce_trt::MoeAttrs const layer = sets[s]->layer();
        std::printf("set top_k=%d n_ce=%d kernels=%d plans=%d images of %s: %d\n", layer.topK, layer.nCe,
            sets[s]->numKernels, sets[s]->numPlans, sets[s]->kernels[0].stem, sets[s]->kernels[0].numImages);
    }
}
"""


def test_embed_kernels_lists_every_set(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    folders = [_fake_aot_folder(tmp_path / "a", "ce_k4_nce2_e8"), _fake_aot_folder(tmp_path / "b", "sparsemixer_e8_e16")]
    generated = tmp_path / "embedded.cpp"
    run([sys.executable, TRT_DIR / "tools" / "embed_kernels.py", "--out", generated, *folders])
    (tmp_path / "reader.cpp").write_text(READER)
    exe = tmp_path / "reader"
    compile_reader = [cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", TRT_DIR / "src", generated,
                      tmp_path / "reader.cpp", TRT_DIR / "src" / "moe_plugin_logic.cpp", "-o", exe]
    run(compile_reader)
    assert run([exe]).stdout.splitlines() == [
        "sets 2",
        "set top_k=4 n_ce=2 kernels=28 plans=8 images of topk_softmax_bf16_e8: 2",
        "set top_k=2 n_ce=0 kernels=21 plans=8 images of sparsemixer_top2_fp16_e8: 1",
    ]

    # No folder: an empty list (the library then refuses to configure, and says so).
    run([sys.executable, TRT_DIR / "tools" / "embed_kernels.py", "--out", generated])
    run(compile_reader)
    assert run([exe]).stdout.splitlines() == ["sets 0"]

    # A folder without generated C++ is refused, naming it.
    (folders[0] / "kernel_set.inc").unlink()
    result = subprocess.run([sys.executable, TRT_DIR / "tools" / "embed_kernels.py", "--out", generated, folders[0]],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "no kernel_set.inc" in result.stderr


def test_a_mismatch_between_compiler_and_plugin_is_a_compile_error(tmp_path):
    """Generated code naming a buffer or layer attribute the plugin lacks does not compile."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    text = (FIXTURES / "ce_k4_nce2_e8.inc").read_text()
    for old, new in [("kBufRouterLogits", "kBufRouterScores"), ("a.normTopkProb", "a.scoreBias")]:
        folder = tmp_path / new
        folder.mkdir()
        (folder / "kernel_set.inc").write_text(text.replace(old, new))
        generated = folder / "embedded.cpp"
        run([sys.executable, TRT_DIR / "tools" / "embed_kernels.py", "--out", generated, folder])
        result = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-I", TRT_DIR / "src", generated],
                                capture_output=True, text=True)
        assert result.returncode != 0 and new in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_current_aot_output_matches_the_plugin_contract(tmp_path):
    """Compile the kernels with today's ce_kernels.aot (one arch, one dtype), compile its C++ into the
    logic tests and check that its cubins hold their entries and its plans build."""
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "plugins"), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    out = tmp_path / "aot"
    run([sys.executable, "-m", "ce_kernels.aot", "--out", out, "--arch", "90", "--dtypes", "bf16",
         "--num-experts", "8", "--top-k", "4", "--n-ce", "2"], cwd=REPO_ROOT, env=env, timeout=600)
    exe = build_with_gxx(tmp_path / "build", [out])
    result = run([exe, "aot_contract"]).stdout
    assert "[ OK ] aot_contract" in result and "cubins hold their entries" in result, result


def test_the_exporters_plugin_op_types_are_the_plugins_creators():
    """onnx_functions.PLUGIN_OP_TYPES (the nodes export marks with plugin_namespace) are exactly the
    op types the plugin has creators for (pluginName in moe_plugin_logic.cpp); every other op type
    says in NOT_IN_PLUGIN why it is not one."""
    from ce_export import onnx_functions

    source = (TRT_DIR / "src" / "moe_plugin_logic.cpp").read_text()
    body = source[source.index("char const* pluginName(Variant v)"):]
    body = body[:body.index("\n}\n")]
    creators = re.findall(r'case Variant::\w+: return "(\w+)";', body)
    assert sorted(creators) == sorted(onnx_functions.PLUGIN_OP_TYPES)
    assert {"SigmoidMoE", "CompressedSigmoidMoE", "ClampedSwiGLUMoE", "CompressedClampedSwiGLUMoE"} <= set(creators)
    assert set(onnx_functions.NOT_IN_PLUGIN) == set(onnx_functions.OPS) - set(creators) == {"SigmoidTop1MoE"}
    # The plugin reads each op type's inputs in the exporter's order (numInputs / inputName).
    for op_type in creators:
        names = onnx_functions.node_inputs(op_type)
        assert names[:4] == ["hidden", "router_logits", "gate_up", "down"], op_type
    assert onnx_functions.node_inputs("CompressedClampedSwiGLUMoE")[4:] == ["ces", "gate_up_bias", "down_bias"]
    assert onnx_functions.node_inputs("ClampedSwiGLUMoE")[4:] == ["gate_up_bias", "down_bias"]


def test_aot_arguments_for_a_model_manifest(tmp_path):
    """One ce_kernels.aot run per distinct layer configuration, with every expert count it uses."""
    layer = {"kind": "moe", "num_experts": 64, "top_k": 8, "n_ce": 4, "norm_topk_prob": False,
             "routing": "softmax_topk", "routing_scale": 1.0, "jitter_eps": 0.0}
    manifest = {"dtype": "bf16", "model": {"moe_layers": [
        layer, dict(layer, num_experts=32), dict(layer, kind="removed", num_experts=0),
        dict(layer, n_ce=0, norm_topk_prob=True, routing_scale=2.5),
        dict(layer, top_k=2, n_ce=1, routing="sparsemixer", jitter_eps=0.01),
        # DeepSeek-V3's routing: its groups are in the key; MiniMax-M2's (no groups) is another set.
        deepseek_v3 := dict(layer, num_experts=256, n_ce=2, norm_topk_prob=True, routing="sigmoid_topk",
                            routing_scale=2.5, score_bias=True, n_group=8, topk_group=4),
        dict(deepseek_v3, num_experts=128), dict(deepseek_v3, topk_group=2),
        dict(deepseek_v3, routing_scale=1.0, n_group=1, topk_group=1),
        # gpt-oss's experts: the clamped SwiGLU's constants are in the key.
        gpt_oss := dict(layer, num_experts=32, top_k=4, n_ce=0, norm_topk_prob=True, activation="clamped_swiglu",
                        swiglu_alpha=1.702, swiglu_limit=7.0, expert_bias=True, router_bias=True),
        dict(gpt_oss, num_experts=128), dict(gpt_oss, swiglu_limit=5.0),
        # The op type the plugin does not implement needs no kernels: Llama 4's.
        dict(layer, top_k=1, n_ce=0, routing="sigmoid_topk", weights_on_input=True),
    ]}}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    out = run([sys.executable, TRT_DIR / "tools" / "aot_args_for_model.py", path, "--arch", "90"]).stdout.splitlines()
    sigmoid = "--arch 90 --dtypes bf16 --num-experts {} --top-k 8 --n-ce 2 --norm-topk-prob --routing sigmoid_topk"
    assert out == [
        "--arch 90 --dtypes bf16 --num-experts 32 64 --top-k 8 --n-ce 4",
        "--arch 90 --dtypes bf16 --num-experts 64 --top-k 8 --n-ce 0 --norm-topk-prob --routing-scale 2.5",
        "--arch 90 --dtypes bf16 --num-experts 64 --top-k 2 --n-ce 1 --routing sparsemixer --jitter-eps 0.01",
        sigmoid.format("128 256") + " --routing-scale 2.5 --n-group 8 --topk-group 4",
        sigmoid.format("256") + " --routing-scale 2.5 --n-group 8 --topk-group 2",
        sigmoid.format("256"),
        "--arch 90 --dtypes bf16 --num-experts 32 128 --top-k 4 --n-ce 0 --norm-topk-prob"
        " --activation clamped_swiglu --swiglu-alpha 1.702 --swiglu-limit 7.0",
        "--arch 90 --dtypes bf16 --num-experts 32 --top-k 4 --n-ce 0 --norm-topk-prob"
        " --activation clamped_swiglu --swiglu-alpha 1.702 --swiglu-limit 5.0",
    ]
    path.write_text(json.dumps({"model": {"moe_layers": []}}))
    result = subprocess.run([sys.executable, TRT_DIR / "tools" / "aot_args_for_model.py", path],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "no MoE layers of the plugin's op types" in result.stderr


GPT_OSS_20B = {"model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880, "num_local_experts": 32,
               "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8,
               "head_dim": 64, "swiglu_limit": 7.0, "vocab_size": 201088}


def test_aot_arguments_for_gpt_oss_20b(tmp_path):
    """gpt-oss-20b's MoE layers as the exporter records them (the gpt_oss family's routing fields on
    transformers' own model, on the meta device, laid out like load.py's) need one kernel set: the
    one plugins/trt/README.md records compiling for sm_80 / sm_90."""
    pytest.importorskip("transformers")
    from ce_export import families
    from ce_export.spec import MoeLayerSpec, layer_json

    lm = families.meta_model(GPT_OSS_20B)
    layers = []
    for index, layout in sorted(families.find_moe_blocks(lm).items()):
        fields = families.routing_fields(families.ARCHITECTURES["gpt_oss"], lm, layout)
        layers.append(layer_json(MoeLayerSpec(layer=index, num_experts=layout.num_experts, hidden_size=2880,
                                              intermediate_size=layout.intermediate_size, top_k=layout.top_k, **fields)))
    assert len(layers) == 24 and all(layer["expert_bias"] and layer["activation"] == "clamped_swiglu" for layer in layers)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"dtype": "bf16", "model": {"moe_layers": layers}}))
    out = run([sys.executable, TRT_DIR / "tools" / "aot_args_for_model.py", path]).stdout.splitlines()
    assert out == ["--arch 80 90 --dtypes bf16 --num-experts 32 --top-k 4 --n-ce 0 --norm-topk-prob"
                   " --activation clamped_swiglu --swiglu-alpha 1.702 --swiglu-limit 7.0"]
