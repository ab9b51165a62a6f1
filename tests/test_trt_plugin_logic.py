"""The TensorRT plugin's own logic, built and run as a C++ unit-test executable: no TensorRT, no
CUDA, no GPU (plugins/trt/src/moe_plugin_logic.*, formula.*, mini_json.*; tests in
plugins/trt/tests/logic_tests.cpp).

The executable is configured and built with CMake (CE_TRT_LOGIC_ONLY=ON) into a temporary folder,
or with g++ directly when CMake is missing. Also here: the kernel embedding script
(plugins/trt/tools/embed_kernels.py) round trip, and, when Triton is installed, the contract
between the current `ce_kernels.aot` output and the plugin's launch planning (PTX entry names and
parameter counts, plans for every dtype / E / tile entry).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TRT_DIR = REPO_ROOT / "plugins" / "trt"
LOGIC_SOURCES = ["src/moe_plugin_logic.cpp", "src/formula.cpp", "src/mini_json.cpp",
                 "tests/logic_tests.cpp", "tests/alloc_counter.cpp"]
CASES = [
    "json_parse", "formula_eval", "fields_roundtrip", "creator_field_names", "shape_rules", "type_rules",
    "format_combinations", "select_arch", "manifest_fixture_ce", "workspace_monotone", "manifest_fixture_sparsemixer",
    "manifest_fixture_scaled", "plan_errors", "plan_zero_tokens", "synthetic_manifest", "manifest_errors", "resolve_pointers",
    "no_allocation_in_plan", "fuzz_fields", "fuzz_json_and_manifests", "fuzz_formulas", "fuzz_shapes", "fuzz_launch_plans",
    "example_request_checks", "aot_contract",
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
             f"-DCE_TRT_SANITIZE={'ON' if sanitize else 'OFF'}"])
        run([cmake, "--build", build, "-j", JOBS])
        return build / "ce_moe_logic_tests", build
    if cxx is None:
        pytest.skip("neither cmake nor a C++ compiler (g++) is installed")
    exe = build / "ce_moe_logic_tests"
    run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", *(SANITIZERS if sanitize else []),
         f'-DCE_TRT_FIXTURES_DIR="{TRT_DIR / "tests" / "fixtures"}"',
         "-I", TRT_DIR / "src", "-I", TRT_DIR / "examples", *[TRT_DIR / s for s in LOGIC_SOURCES], "-o", exe])
    return exe, None


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


def test_a_failing_check_fails_the_executable(logic_tests, tmp_path):
    """The harness is not vacuous: without the fixtures, the fixture cases fail and the exit code says so."""
    exe, _ = logic_tests
    result = subprocess.run([exe, "--fixtures", tmp_path, "manifest_fixture_ce"], capture_output=True, text=True,
                            env={**os.environ, **SANITIZER_ENV})
    assert result.returncode == 1
    assert "[FAIL] manifest_fixture_ce" in result.stdout


def _fake_aot_folder(folder: Path, manifest_name: str) -> dict[str, bytes]:
    """An AOT-shaped folder: a fixture manifest and made-up cubin bytes for every kernel it names."""
    manifest = json.loads((TRT_DIR / "tests" / "fixtures" / manifest_name).read_text())
    images = {}
    for index, kernel in enumerate(manifest["kernels"]):
        data = bytes((index * 31 + i * 7) % 256 for i in range(100 + index))
        images[kernel["cubin"]] = data
        (folder / kernel["cubin"]).parent.mkdir(parents=True, exist_ok=True)
        (folder / kernel["cubin"]).write_bytes(data)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return images


READER = r"""
#include "embedded_kernels.h"
#include <cstdio>
int main()
{
    size_t count = 0;
    ce_trt::embedded::KernelSet const* sets = ce_trt::embedded::kernelSets(&count);
    std::printf("sets %zu\n", count);
    for (size_t s = 0; s < count; ++s)
    {
        std::printf("manifest %zu\n", sets[s].manifestSize);
        for (size_t i = 0; i < sets[s].numImages; ++i)
        {
            unsigned long sum = 0;
            for (size_t b = 0; b < sets[s].images[i].size; ++b)
            {
                sum = (sum * 131 + sets[s].images[i].data[b]) % 1000000007UL;
            }
            std::printf("image %s %zu %lu %d\n", sets[s].images[i].path, sets[s].images[i].size, sum,
                int(reinterpret_cast<unsigned long>(sets[s].images[i].data) % 64 == 0));
        }
    }
}
"""


def _digest(data: bytes) -> int:
    total = 0
    for byte in data:
        total = (total * 131 + byte) % 1000000007
    return total


def test_embed_kernels_round_trip(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    folder = tmp_path / "aot"
    images = _fake_aot_folder(folder, "aot_manifest_sparsemixer_e8_e16.json")
    generated = tmp_path / "embedded.cpp"
    run([sys.executable, TRT_DIR / "tools" / "embed_kernels.py", "--out", generated, folder])
    (tmp_path / "reader.cpp").write_text(READER)
    exe = tmp_path / "reader"
    run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", TRT_DIR / "src", generated, tmp_path / "reader.cpp",
         "-o", exe])
    lines = run([exe]).stdout.splitlines()
    assert lines[0] == "sets 1"
    assert lines[1] == f"manifest {(folder / 'manifest.json').stat().st_size}"
    got = {line.split()[1]: line.split()[2:] for line in lines[2:]}
    assert got == {path: [str(len(data)), str(_digest(data)), "1"] for path, data in images.items()}

    # No folder: an empty table (the library then refuses to configure, and says so).
    run([sys.executable, TRT_DIR / "tools" / "embed_kernels.py", "--out", generated])
    run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", TRT_DIR / "src", generated, tmp_path / "reader.cpp",
         "-o", exe])
    assert run([exe]).stdout.splitlines() == ["sets 0"]

    # A manifest naming a missing cubin is refused with the folder and path.
    next(iter((folder / "sm90").glob("*.cubin"))).unlink()
    result = subprocess.run([sys.executable, TRT_DIR / "tools" / "embed_kernels.py", "--out", generated, folder],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "is missing" in result.stderr


@pytest.mark.slow
def test_current_aot_output_matches_the_plugin_contract(logic_tests, tmp_path):
    """Compile the kernels with today's ce_kernels.aot (one arch, one dtype: seconds) and check that the
    plugin's planner accepts the manifest and that it agrees with the PTX it describes."""
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    exe, _ = logic_tests
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "plugins"), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    out = tmp_path / "aot"
    run([sys.executable, "-m", "ce_kernels.aot", "--out", out, "--arch", "90", "--dtypes", "bf16",
         "--num-experts", "8", "--top-k", "4", "--n-ce", "2"], cwd=REPO_ROOT, env=env)
    result = run([exe, "--aot-dir", out, "aot_contract"]).stdout
    assert "[ OK ] aot_contract" in result and "kernels match their PTX" in result, result


def test_aot_arguments_for_a_model_manifest(tmp_path):
    """One ce_kernels.aot run per distinct layer configuration, with every expert count it uses."""
    layer = {"kind": "moe", "num_experts": 64, "top_k": 8, "n_ce": 4, "norm_topk_prob": False,
             "routing": "softmax_topk", "routing_scale": 1.0, "jitter_eps": 0.0}
    manifest = {"dtype": "bf16", "model": {"moe_layers": [
        layer, dict(layer, num_experts=32), dict(layer, kind="removed", num_experts=0),
        dict(layer, n_ce=0, norm_topk_prob=True, routing_scale=2.5),
        dict(layer, top_k=2, n_ce=1, routing="sparsemixer", jitter_eps=0.01),
    ]}}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    out = run([sys.executable, TRT_DIR / "tools" / "aot_args_for_model.py", path, "--arch", "90"]).stdout.splitlines()
    assert out == [
        "--arch 90 --dtypes bf16 --num-experts 32 64 --top-k 8 --n-ce 4",
        "--arch 90 --dtypes bf16 --num-experts 64 --top-k 8 --n-ce 0 --norm-topk-prob --routing-scale 2.5",
        "--arch 90 --dtypes bf16 --num-experts 64 --top-k 2 --n-ce 1 --routing sparsemixer --jitter-eps 0.01",
    ]
    path.write_text(json.dumps({"model": {"moe_layers": []}}))
    result = subprocess.run([sys.executable, TRT_DIR / "tools" / "aot_args_for_model.py", path],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "no MoE layers" in result.stderr
