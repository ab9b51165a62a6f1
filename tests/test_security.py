"""No pickle, no remote code, no code from checkpoint folders.

Statically: no module of ours imports pickle or its relatives, calls torch.load or numpy.load
unsafely, evaluates strings, or lets transformers run a folder's own Python. Behaviourally: a
checkpoint folder carrying Python (auto_map) and pickles, and a pickled calibration file, are
built from or refused without any of that code running.
"""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from ce_export.cli import main
from checkpoints import TINY_LIMITS, tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("ce_export", "calibrate", "plugins", "benchmarks") for p in (REPO / folder).rglob("*.py"))
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "_pickle"}
# eval of a string this module itself builds (ce_kernels.aot's launch formulas), at AOT-compile time only.
ALLOWED_EVAL = {("plugins/ce_kernels/aot.py", 'eval(formula, {"__builtins__": {}}, names)')}


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_constant(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def findings(path: Path, root: Path = REPO) -> list[str]:
    relative = path.relative_to(root).as_posix()
    source = path.read_text()
    tree = ast.parse(source, filename=relative)
    problems = []
    for node in ast.walk(tree):
        where = f"{relative}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            problems += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            problems.append(f"{where}: from {node.module} import")
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            owner = node.func.value.id if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) else ""
            if name == "load" and owner == "torch" and not is_constant(keyword(node, "weights_only"), True):
                problems.append(f"{where}: torch.load without weights_only=True")
            if name == "load" and owner in ("np", "numpy") and not is_constant(keyword(node, "allow_pickle"), False):
                problems.append(f"{where}: numpy.load without allow_pickle=False")
            if name in ("eval", "exec") and isinstance(node.func, ast.Name) \
                    and (relative, ast.get_source_segment(source, node)) not in ALLOWED_EVAL:
                problems.append(f"{where}: {name}()")
            if name == "from_pretrained" and not is_constant(keyword(node, "trust_remote_code"), False):
                problems.append(f"{where}: from_pretrained without trust_remote_code=False")
            if is_constant(keyword(node, "trust_remote_code"), True):
                problems.append(f"{where}: trust_remote_code=True")
    return problems


def test_sources_use_no_pickle_and_run_no_foreign_code():
    assert len(SOURCES) > 30
    problems = [problem for path in SOURCES for problem in findings(path)]
    assert problems == []


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The scan is not vacuous: each pattern it forbids, in a file of its own, is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch, numpy as np\nfrom joblib import load\ntorch.load('x')\n"
                   "np.load('y')\nnp.load('y', allow_pickle=True)\neval('1')\n"
                   "AutoModel.from_pretrained('z')\nAutoTokenizer.from_pretrained('z', trust_remote_code=True)\n")
    found = findings(bad, root=tmp_path)
    for pattern in ("import pickle", "from joblib", "torch.load", "numpy.load", "numpy.load", "eval()",
                    "from_pretrained without", "trust_remote_code=True"):
        assert any(pattern in line for line in found), (pattern, found)
    assert len([f for f in found if "numpy.load" in f]) == 2


MARKER_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


class Boobytrap:
    """Unpickling this writes the marker file: a pickle that runs code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


@pytest.fixture
def trapped_checkpoint(tmp_path) -> tuple[Path, Path]:
    """The tiny checkpoint plus everything transformers could be tricked into running: auto_map
    entries for config, model and tokenizer pointing at Python files in the folder, a pickled
    pytorch_model.bin and training_args.bin."""
    marker = tmp_path / "code_ran"
    folder = tiny_checkpoint(tmp_path / "ckpt")
    for name in ("configuration_trap.py", "modeling_trap.py", "tokenization_trap.py"):
        (folder / name).write_text(MARKER_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_trap.TrapConfig",
                          "AutoModelForCausalLM": "modeling_trap.TrapForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_trap.TrapTokenizer", None]}, "tokenizer_class": "TrapTokenizer"}))
    for name in ("pytorch_model.bin", "training_args.bin"):
        (folder / name).write_bytes(pickle.dumps(Boobytrap(marker)))
    return folder, marker


def test_a_checkpoint_folder_cannot_run_its_own_code(trapped_checkpoint, tmp_path, capsys):
    folder, marker = trapped_checkpoint
    code = main(["build", str(folder), "--out", str(tmp_path / "out"), *TINY_LIMITS])
    err = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists(), "code from the checkpoint folder ran"
    # The tokenizer needs the folder's Python: refused, with one line (the build needs it for verify).
    assert code == 2 and len(err) == 1 and "tokenizer files but they cannot be loaded" in err[0], err
    assert not (tmp_path / "out").exists()


def test_weights_are_never_unpickled(trapped_checkpoint, tmp_path, capsys):
    folder, marker = trapped_checkpoint
    (folder / "tokenizer_config.json").unlink()
    (folder / "model.safetensors").unlink()  # only the pickled weights are left
    code = main(["build", str(folder), "--out", str(tmp_path / "out"), *TINY_LIMITS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no *.safetensors" in err[0], err
    assert not marker.exists()


def test_pickled_calibration_data_is_refused_unread(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    data = tmp_path / "calib.npy"
    np.save(data, np.array([Boobytrap(marker)] * 200, dtype=object), allow_pickle=True)
    folder = tiny_checkpoint(tmp_path / "ckpt")
    code = main(["build", str(folder), "--out", str(tmp_path / "out"), "--calib", str(data), *TINY_LIMITS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "integer array of token ids" in err[0], err
    assert not marker.exists()


def test_a_manifest_cannot_point_verify_outside_the_build_folder(demo_build, tmp_path, capsys):
    import shutil

    folder = tmp_path / "build"
    shutil.copytree(demo_build, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for key, value, fragment in ((("onnx", "file"), "../model.onnx", "onnx.file='../model.onnx' is invalid"),
                                 (("source", "path"), "/etc", "a path inside the build folder")):
        edited = json.loads(json.dumps(manifest))
        edited[key[0]][key[1]] = value
        (folder / "manifest.json").write_text(json.dumps(edited))
        code = main(["verify", str(folder)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and fragment in err[0], err
