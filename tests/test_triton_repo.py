"""Triton model repository from a build folder (ce_export/triton_repo.py).

Each config.pbtxt is parsed with Triton's own schema, inference.ModelConfig from the `tritonclient`
wheel (tritonclient/grpc/model_config_pb2.py, loaded without grpcio), through
google.protobuf.text_format.Parse, then checked field by field against the ONNX graph.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ce_export.artifacts import MANIFEST, read_json, write_json
from ce_export.engine import PLAN, build_engine, load_tensorrt
from ce_export.errors import BuildError, OutputError
from ce_export.io_schema import TensorSpec, onnx_io
from ce_export.manifest import EngineRecord, Manifest
from ce_export.triton_repo import (ONNX_PLATFORM, TRT_PLATFORM, load_model_config_pb2, model_config_text,
                                   validate_model_config, write_triton_repo)
from checkpoints import trt_demo



@pytest.fixture
def engine_build(tmp_path_factory) -> Path:
    """trt_demo with its plugin-less engine recorded in manifest["engine"] (built once per session)."""
    try:
        load_tensorrt()
    except BuildError as error:
        pytest.skip(f"no TensorRT builder: {error}")
    folder = trt_demo(tmp_path_factory)
    manifest = Manifest.read(folder)
    if manifest.engine is None or not (folder / PLAN).is_file():
        manifest.with_engine(build_engine(folder, report=lambda line: None)).write(folder)
    return folder


@pytest.fixture(scope="module")
def pb2():
    module = load_model_config_pb2()
    if module is None:
        pytest.skip("tritonclient is not installed (test extra): Triton's ModelConfig schema is unavailable")
    return module


def _check_tensors(entries, specs, pb2):
    assert [e.name for e in entries] == [s.name for s in specs]
    for entry, spec in zip(entries, specs):
        assert pb2.DataType.Name(entry.data_type) == f"TYPE_{spec.dtype}"
        assert list(entry.dims) == [d if isinstance(d, int) else -1 for d in spec.dims]


def test_repository_configs_match_triton_schema(engine_build, tmp_path, pb2):
    repo = tmp_path / "repo"
    written = write_triton_repo(engine_build, repo, report=lambda line: None)
    assert set(written["models"]) == {"demo_trt", "demo_onnx"}
    assert all(m["schema_checked"] for m in written["models"].values())
    inputs, outputs = onnx_io(engine_build / "model.onnx")
    from google.protobuf import text_format

    trt = text_format.Parse((repo / "demo_trt" / "config.pbtxt").read_text(), pb2.ModelConfig())
    assert trt.name == "demo_trt" and trt.platform == TRT_PLATFORM and trt.max_batch_size == 0
    assert trt.default_model_filename == PLAN
    _check_tensors(trt.input, inputs, pb2)
    _check_tensors(trt.output, outputs, pb2)
    assert pb2.DataType.Name(trt.input[0].data_type) == "TYPE_INT64"  # input_ids
    assert list(trt.input[3].dims)[0] == -1 and list(trt.input[3].dims)[2] == -1  # past K/V: batch, past
    (group,) = trt.instance_group
    assert pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_GPU" and list(group.profile) == ["0", "1"]
    assert (repo / "demo_trt" / "1" / PLAN).read_bytes() == (engine_build / PLAN).read_bytes()

    onnx_config = text_format.Parse((repo / "demo_onnx" / "config.pbtxt").read_text(), pb2.ModelConfig())
    assert onnx_config.name == "demo_onnx" and onnx_config.platform == ONNX_PLATFORM
    assert onnx_config.max_batch_size == 0 and onnx_config.default_model_filename == "model.onnx"
    _check_tensors(onnx_config.input, inputs, pb2)
    _check_tensors(onnx_config.output, outputs, pb2)
    assert list(onnx_config.instance_group[0].profile) == []
    assert (repo / "demo_onnx" / "1" / "model.onnx").is_file()
    assert not list(repo.glob(".*partial*"))


def test_rtx_engine_and_plugin_notes(engine_build, tmp_path, pb2):
    engine = read_json(engine_build / MANIFEST)["engine"]
    written = write_triton_repo(engine_build, tmp_path / "a", models=["trt"], report=lambda line: None)
    text = (tmp_path / "a" / "demo_trt" / "config.pbtxt").read_text()
    assert "plugin-less" in text and "LD_PRELOAD" not in text
    if engine["runtime"].startswith("tensorrt_rtx"):
        assert written["models"]["demo_trt"]["notes"] and "TensorRT-RTX" in text
    bound = EngineRecord.model_validate(dict(
        engine, runtime="tensorrt 10.16",
        plugin={"bound": True, "library": "/opt/ce/libce_export_trt.so", "namespace": "ce_export"}))
    written = write_triton_repo(engine_build, tmp_path / "b", models=["trt"], engine=bound, link="symlink",
                                report=lambda line: None)
    text = (tmp_path / "b" / "demo_trt" / "config.pbtxt").read_text()
    assert "LD_PRELOAD=/opt/ce/libce_export_trt.so" in text
    assert '--backend-config=tensorrt,plugins="/opt/ce/libce_export_trt.so"' in text
    assert validate_model_config(text) is not None  # the comments keep it valid
    assert written["plugin_library"] == "/opt/ce/libce_export_trt.so" and len(written["tritonserver"]) == 2
    assert (tmp_path / "b" / "demo_trt" / "1" / PLAN).is_symlink()


def test_external_data_travels_with_the_onnx_model(tmp_path_factory, tmp_path, pb2):
    source = trt_demo(tmp_path_factory)
    build = tmp_path / "build"
    build.mkdir()
    shutil.copy(source / "model.onnx", build / "model.onnx")
    (build / "model.onnx.data").write_bytes(b"\0" * 16)  # stands in for weights over 2 GB
    manifest = read_json(source / MANIFEST)
    manifest.pop("engine", None)
    manifest["onnx"]["external_data"] = "model.onnx.data"
    write_json(build / MANIFEST, manifest)
    written = write_triton_repo(build, tmp_path / "repo", name="my model/v2", link="hardlink",
                                report=lambda line: None)
    assert list(written["models"]) == ["my_model_v2_onnx"]  # no plan: ONNX only; name sanitised
    version = tmp_path / "repo" / "my_model_v2_onnx" / "1"
    assert (version / "model.onnx.data").read_bytes() == b"\0" * 16
    assert written["models"]["my_model_v2_onnx"]["files"] == ["1/model.onnx", "1/model.onnx.data"]
    with pytest.raises(BuildError, match="missing engine"):
        write_triton_repo(build, tmp_path / "repo2", models=["trt"], report=lambda line: None)


def test_existing_model_folder_needs_force(engine_build, tmp_path, pb2):
    repo = tmp_path / "repo"
    write_triton_repo(engine_build, repo, models=["onnx"], report=lambda line: None)
    with pytest.raises(OutputError, match="not empty"):
        write_triton_repo(engine_build, repo, models=["onnx"], report=lambda line: None)
    write_triton_repo(engine_build, repo, models=["onnx"], force=True, report=lambda line: None)
    assert (repo / "demo_onnx" / "config.pbtxt").is_file()


def test_invalid_config_is_rejected(pb2):
    with pytest.raises(BuildError, match="not a valid Triton model configuration"):
        validate_model_config('name: "x"\nplatform: "tensorrt_plan"\nmax_batch_size: "zero"\n')

    text = model_config_text("m", TRT_PLATFORM, [TensorSpec("x", "BF16", ("batch", 8))],
                             [TensorSpec("y", "FP16", (3,))], default_model_filename=PLAN, profiles=[0, 1])
    config = validate_model_config(text)
    assert pb2.DataType.Name(config.input[0].data_type) == "TYPE_BF16" and list(config.input[0].dims) == [-1, 8]
    with pytest.raises(BuildError, match="no Triton equivalent"):
        model_config_text("m", TRT_PLATFORM, [TensorSpec("x", "COMPLEX", (1,))], [], default_model_filename=PLAN)
