"""Bad input: exit code 2, one line naming the problem, nothing half-written."""

import subprocess
import sys

import pytest
from ce_export.cli import main
from ce_export.demo import demo_config, demo_tensors
from checkpoints import write


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert len(err) == 1 and err[0].startswith("ce_export: error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]


def build_into(tmp_path, checkpoint, capsys, *extra):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "build", str(checkpoint), "--out", str(out), *extra)
    assert not out.exists(), "a failed build must leave nothing behind"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]
    return code, err


def broken_checkpoint(tmp_path, mutate_config=None, mutate_tensors=None):
    config, tensors = demo_config(True), demo_tensors(demo_config(True))
    if mutate_config:
        mutate_config(config)
    if mutate_tensors:
        mutate_tensors(tensors)
    return write(tmp_path / "ckpt", config, tensors)


def test_missing_folder(tmp_path, capsys):
    assert_one_line_error(*build_into(tmp_path, tmp_path / "nope", capsys), "not a checkpoint folder")


def test_missing_config(tmp_path, capsys):
    folder = broken_checkpoint(tmp_path)
    (folder / "config.json").unlink()
    assert_one_line_error(*build_into(tmp_path, folder, capsys), "config.json: missing")


def test_corrupt_config(tmp_path, capsys):
    folder = broken_checkpoint(tmp_path)
    (folder / "config.json").write_text("{not json")
    assert_one_line_error(*build_into(tmp_path, folder, capsys), "not valid JSON")


def test_missing_weights_file(tmp_path, capsys):
    folder = broken_checkpoint(tmp_path)
    (folder / "model.safetensors").unlink()
    assert_one_line_error(*build_into(tmp_path, folder, capsys), "no *.safetensors")


def test_corrupt_safetensors(tmp_path, capsys):
    folder = broken_checkpoint(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(*build_into(tmp_path, folder, capsys), "model.safetensors", "unreadable")


def test_unknown_model_type(tmp_path, capsys):
    folder = broken_checkpoint(tmp_path, mutate_config=lambda c: c.update(model_type="mamba"))
    assert_one_line_error(*build_into(tmp_path, folder, capsys), "unknown model_type 'mamba'", "olmoe")


def test_config_tensor_shape_mismatch(tmp_path, capsys):
    folder = broken_checkpoint(tmp_path, mutate_config=lambda c: c.update(intermediate_size=48))
    assert_one_line_error(*build_into(tmp_path, folder, capsys), "gate_proj.weight", "shape")


def test_missing_tensor(tmp_path, capsys):
    folder = broken_checkpoint(tmp_path, mutate_tensors=lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    assert_one_line_error(*build_into(tmp_path, folder, capsys), "missing tensor", "experts.5.up_proj")


def test_non_finite_weights(tmp_path, capsys):
    def poison(tensors):
        tensors["model.layers.1.self_attn.q_proj.weight"][3, 4] = float("nan")
    folder = broken_checkpoint(tmp_path, mutate_tensors=poison)
    assert_one_line_error(*build_into(tmp_path, folder, capsys), "q_proj.weight", "non-finite")


def test_non_finite_ces(tmp_path, capsys):
    """The CE reference code can save uninitialised ces (meta-device loading): refuse them."""
    def poison(tensors):
        tensors["model.layers.0.mlp.ces"][1, 0, 0] = float("inf")
    folder = broken_checkpoint(tmp_path, mutate_tensors=poison)
    assert_one_line_error(*build_into(tmp_path, folder, capsys), "mlp.ces", "non-finite")


@pytest.mark.parametrize("n_ce", [0, 4, 7, "2"])
def test_invalid_n_ce(tmp_path, capsys, n_ce):
    folder = broken_checkpoint(tmp_path, mutate_config=lambda c: c.update(n_ce=n_ce))
    assert_one_line_error(*build_into(tmp_path, folder, capsys), "n_ce=", "invalid")


def test_ces_present_but_ce_disabled(tmp_path, capsys):
    folder = broken_checkpoint(tmp_path, mutate_config=lambda c: c.update(use_ce=False))
    assert_one_line_error(*build_into(tmp_path, folder, capsys), "mlp.ces", "use_ce")


def test_non_empty_output_without_force(tmp_path, capsys, demo_ce):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run_cli(capsys, "build", str(demo_ce), "--out", str(out))
    assert_one_line_error(code, err, "not empty", "--force")
    assert (out / "keep.txt").read_text() == "precious"


def test_unwritable_output_location(tmp_path, capsys, demo_ce):
    code, err = run_cli(capsys, "build", str(demo_ce), "--out", "/proc/ce_export_cannot_write_here")
    assert_one_line_error(code, err, "cannot write")


def test_unwritable_output(tmp_path, capsys, demo_ce):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    code, err = run_cli(capsys, "build", str(demo_ce), "--out", str(blocker / "out"))
    assert_one_line_error(code, err, "cannot write")


def test_verify_of_a_folder_without_manifest(tmp_path, capsys):
    code, err = run_cli(capsys, "verify", str(tmp_path))
    assert_one_line_error(code, err, "manifest.json", "missing")


def test_verify_fails_on_a_tampered_model(demo_build, tmp_path, capsys):
    """A corrupted weight in the exported file must make `verify` fail with a non-zero exit."""
    import shutil

    import onnx
    from onnx import numpy_helper

    folder = tmp_path / "tampered"
    shutil.copytree(demo_build, folder)
    model = onnx.load(folder / "model.onnx")
    init = next(i for i in model.graph.initializer if i.name.endswith("gate_up"))
    array = numpy_helper.to_array(init).copy()
    array[0] *= 3.0
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, folder / "model.onnx")
    code = main(["verify", str(folder)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "parity FAILED" in err[0]


def test_exit_code_from_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ce_export", "build", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"ce_export: error: {tmp_path / 'missing'}: not a checkpoint folder (does not exist or is not a directory)"]


def test_missing_plugin_library(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "build", "demo", "--target", "trt", "--out", str(out), "--plugin-lib", str(tmp_path / "no.so"))
    assert_one_line_error(code, err, "no.so", "plugin library not found")
    assert not out.exists()
