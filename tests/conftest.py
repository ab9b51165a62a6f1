import os

import torch

# No GPU here: Triton kernels run in its interpreter. Set before anything imports triton
# (transformers and torch.export do), since Triton reads it once.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# Parallel workers (pytest-xdist, `-n` in pyproject's addopts) share the cores: each runs torch and
# ONNX Runtime on one thread, here and in the subprocesses it starts, instead of one per core each.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    os.environ["CE_EXPORT_ORT_THREADS"] = "1"
    torch.set_num_threads(1)

from ce_export.demo import write_demo_checkpoint


@pytest.fixture(scope="session")
def demo_ce(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo_ce", compressed=True)


@pytest.fixture(scope="session")
def demo_plain(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo_plain", compressed=False)


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory):
    """`build demo` (portable, fp32), once per test session."""
    from ce_export import pipeline

    out = tmp_path_factory.mktemp("builds") / "demo"
    pipeline.build("demo", out, pipeline.BuildOptions(), report=lambda line: None)
    return out


@pytest.fixture(scope="session")
def demo_plain_build(tmp_path_factory, demo_plain):
    """The plain demo through `build --target ort` (its MoE layers as com.microsoft::MoE), once per session."""
    from ce_export import pipeline

    out = tmp_path_factory.mktemp("builds") / "demo_plain_ort"
    pipeline.build(str(demo_plain), out, pipeline.BuildOptions(target="ort"), report=lambda line: None)
    return out
