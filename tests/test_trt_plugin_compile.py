"""Compile check of the C++ TensorRT plugin (plugins/trt) against TensorRT headers, with no GPU and
no TensorRT runtime: plugins/trt/check_compile.sh builds both plugin libraries, the host smoke test
and the C++ example with -Wall -Wextra -Werror (and an nvcc front-end pass), then runs the tests that
need no GPU.

TensorRT's C++ headers are on no package registry. They are taken from $TensorRT_ROOT/include, or
/tmp/trt_headers/include (the public NVIDIA/TensorRT repository's include/ folder, e.g.
`git archive HEAD include | tar x -C /tmp/trt_headers`); without them the test is skipped with the
script's own message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TRT_DIR = REPO_ROOT / "plugins" / "trt"
SCRIPT = TRT_DIR / "check_compile.sh"
SKIP_MESSAGE = "TensorRT headers not found: skipping the plugin compile check"


def headers_root() -> Path | None:
    for candidate in (os.environ.get("TensorRT_ROOT"), "/tmp/trt_headers"):
        if candidate and (Path(candidate) / "include" / "NvInferRuntime.h").is_file():
            return Path(candidate)
    return None


def test_script_says_so_when_headers_are_missing(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    env = dict(os.environ, TensorRT_ROOT=str(tmp_path / "nowhere"))
    result = subprocess.run(["bash", SCRIPT, tmp_path / "build"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == SKIP_MESSAGE


def _fake_aot_folder(folder: Path) -> None:
    """The CE fixture kernel set (stand-in cubins: configurePlugin never loads them) as an AOT folder."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(TRT_DIR / "tests" / "fixtures" / "ce_k4_nce2_e8.inc", folder / "kernel_set.inc")


@pytest.mark.slow
def test_plugin_and_example_compile_against_tensorrt_headers(tmp_path):
    root = headers_root()
    if root is None:
        pytest.skip(SKIP_MESSAGE)
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake and a C++ compiler are needed")
    aot = tmp_path / "aot"
    _fake_aot_folder(aot)
    env = dict(os.environ, TensorRT_ROOT=str(root), CE_KERNELS_AOT_DIR=str(aot), CE_TRT_HOST_TEST_KERNELS="fixture")
    result = subprocess.run(["bash", SCRIPT, tmp_path / "build"], env=env, capture_output=True, text=True,
                            timeout=900)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    assert "TensorRT headers:" in out
    assert "libce_export_trt_dynamic.so: getCreators setLoggerFinder" in out
    assert "libce_export_trt.so: none" in out
    assert "[ OK ] static_library_registers_on_load" in out
    assert "[ OK ] dynamic_library_entry_points" in out
    for flavour in ("static", "dynamic"):
        for group in ("creators", "create_and_capabilities", "supports_format_combination", "configure_and_workspace",
                      "serialization_round_trip", "clone_attach_and_runtime", "plain_and_bad_fields"):
            assert f"[ OK ] {flavour}: {group}" in out, out[-6000:]
    assert "plugin host test passed" in out
    if shutil.which("nvcc"):
        assert "nvcc ok: src/moe_plugin.cpp" in out and "nvcc ok: examples/run_engine.cpp" in out
    assert "plugin compile check passed" in out
