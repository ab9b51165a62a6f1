"""Bad input: exit code 2, one line naming the problem, nothing half-written."""

import json
import subprocess
import sys
import time

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


def tamper_with_a_weight(demo_build, folder):
    import shutil

    import onnx
    from onnx import numpy_helper

    shutil.copytree(demo_build, folder)
    model = onnx.load(folder / "model.onnx")
    init = next(i for i in model.graph.initializer if i.name.endswith("gate_up"))
    array = numpy_helper.to_array(init).copy()
    array[0] *= 3.0
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, folder / "model.onnx")
    return folder


def test_verify_refuses_a_model_edited_after_the_build(demo_build, tmp_path, capsys):
    folder = tamper_with_a_weight(demo_build, tmp_path / "tampered")
    code, err = run_cli(capsys, "verify", str(folder))
    assert_one_line_error(code, err, "model.onnx", "differ from what the build wrote")


def test_verify_fails_on_a_tampered_model(demo_build, tmp_path, capsys):
    """A corrupted weight in the exported file makes the parity check itself fail, too (here with
    the manifest's file record rewritten to match, as an older manifest without one would be)."""
    from ce_export.artifacts import write_json
    from ce_export.manifest import recorded_files

    folder = tamper_with_a_weight(demo_build, tmp_path / "tampered")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["onnx"]["files"] = recorded_files(folder, ["model.onnx"])
    write_json(folder / "manifest.json", manifest)
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


# --- config.json: checked against the architecture before any tensor is read (issue 16) ---------


@pytest.mark.parametrize("key, value, fragments", [
    ("rope_theta", "abc", ["rope_theta='abc' is invalid", "valid number"]),
    ("model_type", ["olmoe"], ["unknown model_type ['olmoe']", "olmoe"]),
    ("use_ce", "yes", ["use_ce='yes' is invalid", "valid boolean"]),
    ("hidden_size", "128", ["hidden_size='128' is invalid", "valid integer"]),
    ("num_attention_heads", 3, ["num_attention_heads=3 is not a multiple of num_key_value_heads=4"]),
    ("head_dim", 0, ["head_dim=0 is invalid", "greater than or equal to 1"]),
    ("num_experts_per_tok", 9, ["num_experts_per_tok=9 is more than num_experts=8"]),
    ("hidden_act", "swishy", ["hidden_act='swishy'", "silu"]),
    ("pad_token_id", 512, ["pad_token_id=512 is outside the vocabulary"]),
    ("rms_norm_eps", float("nan"), ["rms_norm_eps=nan is invalid", "finite"]),
    ("rope_scaling", {"rope_type": "yarn"}, ["transformers cannot build", "factor"]),
    ("vocab_size", 10**12, ["vocab_size=1000000000000 is invalid"]),
    ("num_experts", [8, 8], ["num_experts lists 2 layers, num_hidden_layers=4"]),
    ("layer_experts_idx", [[0, 1]], ["layer_experts_idx has 1 entries"]),
])
def test_config_values_against_the_architecture(tmp_path, capsys, key, value, fragments):
    folder = broken_checkpoint(tmp_path, mutate_config=lambda c: c.update({key: value}))
    assert_one_line_error(*build_into(tmp_path, folder, capsys), "config.json", *fragments)


def test_missing_required_key(tmp_path, capsys):
    folder = broken_checkpoint(tmp_path, mutate_config=lambda c: c.pop("intermediate_size"))
    assert_one_line_error(*build_into(tmp_path, folder, capsys), "intermediate_size is missing (required for olmoe)")


def test_layer_count_claim_fails_at_once_from_the_headers(tmp_path, capsys):
    """The checkpoint has 4 layers: a config claiming a billion fails from the safetensors headers,
    before one module per claimed layer is built (this used to run for minutes)."""
    folder = broken_checkpoint(tmp_path, mutate_config=lambda c: c.update(num_hidden_layers=1_000_000_000))
    start = time.perf_counter()
    code, err = build_into(tmp_path, folder, capsys)
    assert time.perf_counter() - start < 10
    assert_one_line_error(code, err, "num_hidden_layers=1000000000", "layers 0..3")


def test_embedding_shape_claim_checked_against_the_headers(tmp_path, capsys):
    folder = broken_checkpoint(tmp_path, mutate_config=lambda c: c.update(vocab_size=1_000_000))
    assert_one_line_error(*build_into(tmp_path, folder, capsys), "vocab_size=1000000", "[512, 128]")


def test_unsupported_tensor_dtype_is_refused_from_the_header(tmp_path, capsys):
    """FP8 weights would pass the floating-point check and then crash torch.isfinite."""
    import torch

    def to_fp8(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.float8_e4m3fn)
    folder = broken_checkpoint(tmp_path, mutate_tensors=to_fp8)
    assert_one_line_error(*build_into(tmp_path, folder, capsys), "model.norm.weight", "F8_E4M3")


def test_sharded_index_cannot_point_outside_the_folder(tmp_path, capsys):
    folder = broken_checkpoint(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}))
    assert_one_line_error(*build_into(tmp_path, folder, capsys), "../elsewhere.safetensors", "not a file name")


def test_tensor_in_two_shards_is_refused(tmp_path, capsys):
    import shutil

    folder = broken_checkpoint(tmp_path)
    shutil.copy(folder / "model.safetensors", folder / "model-copy.safetensors")
    assert_one_line_error(*build_into(tmp_path, folder, capsys), "is also in")


# --- verify and bench on build folders damaged after the build -----------------------------------


def with_external_data(demo_build, folder):
    """A copy of the demo build whose weights live in model.onnx.data, as a model over 2 GB has them."""
    import shutil

    import onnx

    from ce_export.artifacts import write_json
    from ce_export.manifest import recorded_files

    shutil.copytree(demo_build, folder)
    onnx.save(onnx.load(folder / "model.onnx"), folder / "model.onnx", save_as_external_data=True,
              location="model.onnx.data", size_threshold=1024)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["onnx"]["external_data"] = "model.onnx.data"
    manifest["onnx"]["files"] = recorded_files(folder, ["model.onnx", "model.onnx.data"])
    write_json(folder / "manifest.json", manifest)
    return folder


def drop_file_record(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["onnx"]["files"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


COMMAND_ARGUMENTS = {"verify": [], "bench": ["--budget", "0", "--in-turn", "0"],
                     "generate": ["--ids", "1,2", "--max-new-tokens", "2", "--runtime", "ort"]}


@pytest.mark.parametrize("command", ["verify", "bench", "generate"])
@pytest.mark.parametrize("name, recorded, fragments", [
    ("model.onnx", True, ["model.onnx", "but the build wrote", "truncated"]),
    ("model.onnx.data", True, ["model.onnx.data", "but the build wrote", "truncated"]),
    # manifests written before the file record: the ONNX structure is still checked
    ("model.onnx", False, ["model.onnx: not a readable ONNX file"]),
    ("model.onnx.data", False, ["model.onnx.data", "expects at least"]),
])
def test_truncated_files_are_refused_before_any_runtime(demo_build, tmp_path, capsys, command, name, recorded, fragments):
    folder = with_external_data(demo_build, tmp_path / "build")
    if not recorded:
        drop_file_record(folder)
    truncate(folder / name)
    code, err = run_cli(capsys, command, str(folder), *COMMAND_ARGUMENTS[command])
    assert_one_line_error(code, err, *fragments)


def test_a_graph_onnx_runtime_cannot_load_is_one_line(demo_build, tmp_path, capsys):
    import shutil

    import onnx

    folder = tmp_path / "build"
    shutil.copytree(demo_build, folder)
    drop_file_record(folder)
    model = onnx.load(folder / "model.onnx")
    next(node for node in model.graph.node if node.op_type == "MatMul").op_type = "NoSuchOperator"
    onnx.save(model, folder / "model.onnx")
    code, err = run_cli(capsys, "verify", str(folder))
    assert_one_line_error(code, err, "model.onnx: ONNX Runtime cannot load it", "NoSuchOperator")


def test_verify_and_bench_with_a_manifest_that_disagrees_with_the_file(demo_build, tmp_path, capsys):
    import shutil

    folder = tmp_path / "build"
    shutil.copytree(demo_build, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["onnx"]["outputs"] = manifest["onnx"]["outputs"][:-1]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code, err = run_cli(capsys, "verify", str(folder))
    assert_one_line_error(code, err, "manifest.json: onnx.outputs", "disagree with model.onnx's")
    manifest["dtype"] = "fp64"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for command in ("verify", "bench", "generate"):
        code, err = run_cli(capsys, command, str(folder), *COMMAND_ARGUMENTS[command])
        assert_one_line_error(code, err, "manifest.json: dtype='fp64' is invalid")


@pytest.mark.parametrize("edit, fragment", [
    (lambda parity: parity["logits"]["cases"][0].pop("outputs"), "logits.cases.0.outputs is missing"),
    (lambda parity: parity["logits"]["cases"][1]["outputs"]["logits"].update(max_rel="small"),
     "logits.cases.1.outputs.logits.max_rel='small' is invalid"),
    (lambda parity: parity["quality"]["task"].update(problems=-1), "quality.task.problems=-1 is invalid"),
    (lambda parity: parity.update(free_running={"logits": {}}), "free_running.logits.statistic is missing"),
])
def test_a_malformed_parity_report_is_refused_in_one_line(demo_build, tmp_path, edit, fragment):
    from ce_export.errors import OutputError
    from ce_export.manifest import Parity

    parity = json.loads((demo_build / "parity.json").read_text())
    edit(parity)
    (tmp_path / "parity.json").write_text(json.dumps(parity))
    with pytest.raises(OutputError) as refused:
        Parity.read(tmp_path)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'parity.json'}: ") and fragment in message, message


@pytest.mark.parametrize("value", ["two", "0", "-1"])
def test_a_bad_thread_count_in_the_environment_is_one_line(demo_build, monkeypatch, capsys, value):
    monkeypatch.setenv("CE_EXPORT_ORT_THREADS", value)
    code, err = run_cli(capsys, "generate", str(demo_build), "--ids", "1,2,3", "--max-new-tokens", "1",
                        "--runtime", "ort")
    assert_one_line_error(code, err, f"CE_EXPORT_ORT_THREADS={value!r}: expected a positive number of threads")
