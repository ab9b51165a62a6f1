"""The build folder in the field's own clients (onnxruntime-genai, Optimum, polygraphy) and `generate`."""

import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from ce_export import clients
from ce_export.cli import main
from ce_export.generate import generate
from ce_export.manifest import Manifest
from client_runs import genai_tokens, torch_tokens, until_genai_stops

PROMPT = [5, 17, 200, 3, 44, 9, 100, 250]  # ids the demo never saw: it runs on without a newline (its EOS)
NEW_TOKENS = 24
EOS = 10  # the demo's: the newline that ends an answer
PROBLEMS = {"347+085=": "0432", "rev spark=": "kraps", "([{<=": ">}])"}
OPTIMUM = "optimum-onnx[onnxruntime]==0.1.0"  # pins transformers < 4.58: its own virtual environment


def test_build_folder_holds_what_the_clients_read(demo_build):
    manifest = json.loads((demo_build / "manifest.json").read_text())
    assert (demo_build / "config.json").read_bytes() == (demo_build / "checkpoint" / "config.json").read_bytes()
    config = json.loads((demo_build / "genai_config.json").read_text())
    model, decoder = config["model"], config["model"]["decoder"]
    assert (model["type"], model["vocab_size"], model["context_length"], model["pad_token_id"]) == ("decoder", 512, 4096, 0)
    assert model["eos_token_id"] == EOS and "bos_token_id" not in model
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"],
            decoder["num_hidden_layers"], decoder["filename"]) == (4, 4, 32, 4, "model.onnx")
    assert config["search"]["past_present_share_buffer"] is False and config["search"]["do_sample"] is False
    assert "session.disable_quant_qdq" not in decoder["session_options"]
    genai = manifest["clients"]["onnxruntime_genai"]
    assert genai == {"supported": True, "provider": "cpu"}
    assert manifest["clients"]["optimum"] == {"supported": True}
    assert manifest["clients"]["files"] == ["config.json", "generation_config.json", "tokenizer.json",
                                            "tokenizer_config.json", "genai_config.json"]
    polygraphy = manifest["clients"]["polygraphy"]
    assert polygraphy["supported"] and polygraphy["onnxrt"] and polygraphy["tensorrt"]
    assert len(list((demo_build / polygraphy["inputs"]).iterdir())) == 8


def fake_manifest(**overrides) -> Manifest:
    model = {"architecture": "olmoe", "use_ce": False, "vocab_size": 100, "hidden_size": 64, "num_layers": 2,
             "num_attention_heads": 4, "kv_heads": 4, "key_dim": 16, "value_dim": 16}
    manifest = {"format": 1, "source": {"kind": "checkpoint", "path": "/ckpt"}, "model": model, "dtype": "fp32",
                "quantization": None, "target": "portable", "parameters": {"total": 1, "active_per_token": 1},
                "onnx": {"file": "model.onnx", "opset": 18, "inputs": ["input_ids", "attention_mask", "position_ids"],
                         "outputs": ["logits"], "limits": {"max_batch": 1, "max_sequence": 256, "max_context": 256}},
                "tools": {}}
    for key, value in overrides.items():
        (model if key in model else manifest)[key] = value
    return Manifest.model_validate(manifest)


def test_client_files_from_the_checkpoint(tmp_path):
    checkpoint, folder = tmp_path / "ckpt", tmp_path / "build"
    checkpoint.mkdir(), folder.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}))
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "do_sample": True, "top_p": 0.9}))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (checkpoint / name).write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"")

    written = clients.write_client_files(folder, checkpoint, fake_manifest(quantization={"mode": "int8"}))
    assert written["files"] == ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                                "special_tokens_map.json", "genai_config.json"]
    assert not (folder / "model.safetensors").exists()
    config = json.loads((folder / "genai_config.json").read_text())
    assert (config["model"]["bos_token_id"], config["model"]["eos_token_id"]) == (1, [2, 7])  # generation_config wins
    assert "pad_token_id" not in config["model"]
    assert config["search"]["do_sample"] is True and config["search"]["top_p"] == 0.9
    assert config["model"]["decoder"]["session_options"]["session.disable_quant_qdq"] == "1"
    assert "session.disable_quant_qdq=1" in written["optimum"]["notes"][0]
    assert "notes" not in written["onnxruntime_genai"]


@pytest.mark.parametrize("overrides, genai, optimum", [
    ({"architecture": "deepseek_v2", "kv_heads": 1, "key_dim": 32, "value_dim": 8}, "latent", "latent"),
    ({"kv_heads": 2}, None, "[batch, 4, 0, 16]"),  # grouped-query olmoe: Optimum guesses num_attention_heads
    ({"architecture": "qwen3_moe", "kv_heads": 2}, None, None),  # a type Optimum knows as grouped-query
    ({"dtype": "bf16"}, None, "no bf16 kernels"),
])
def test_what_each_client_cannot_serve_is_said_and_not_written(tmp_path, overrides, genai, optimum):
    (tmp_path / "ckpt").mkdir(), (tmp_path / "build").mkdir()
    written = clients.write_client_files(tmp_path / "build", tmp_path / "ckpt", fake_manifest(**overrides))
    assert written["onnxruntime_genai"]["supported"] == (genai is None)
    assert (tmp_path / "build" / "genai_config.json").exists() == (genai is None)
    if genai:
        assert genai in written["onnxruntime_genai"]["reason"]
    assert written["optimum"]["supported"] == (optimum is None)
    if optimum:
        assert optimum in written["optimum"]["reason"]
    if overrides.get("dtype") == "bf16":  # GenAI on CPU cannot run bf16: the config names the CUDA provider
        config = json.loads((tmp_path / "build" / "genai_config.json").read_text())
        assert config["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]


@pytest.mark.parametrize("build", ["demo_build", "demo_plain_build"])
def test_genai_generates_pytorch_tokens_from_the_demos(build, request):
    folder = request.getfixturevalue(build)
    checkpoint = folder / "checkpoint" if build == "demo_build" else request.getfixturevalue("demo_plain")
    for ids in [PROMPT] + [list(prompt.encode()) for prompt in PROBLEMS]:
        expected = until_genai_stops(torch_tokens(checkpoint, ids, NEW_TOKENS), eos=EOS)
        assert expected[-1] == EOS and 0 not in expected  # the trained demo ends its line
        assert genai_tokens(folder, ids, NEW_TOKENS) == expected


def test_genai_answers_the_demo_task_through_its_tokenizer(demo_build):
    """onnxruntime-genai's tokenizer is the byte identity too; its answers are PyTorch's and end at the EOS."""
    og = pytest.importorskip("onnxruntime_genai")
    tokenizer = og.Tokenizer(og.Model(str(demo_build)))
    for prompt, answer in PROBLEMS.items():
        ids = list(prompt.encode())
        assert [int(t) for t in tokenizer.encode(prompt)] == ids
        tokens = genai_tokens(demo_build, ids, NEW_TOKENS)
        assert tokens == until_genai_stops(torch_tokens(demo_build / "checkpoint", ids, NEW_TOKENS), eos=EOS)
        assert tokenizer.decode(tokens) == answer + "\n"


@pytest.fixture(scope="session")
def optimum_python(tmp_path_factory) -> Path:
    """A virtual environment with Optimum (which pins transformers < 4.58, unlike ce_export). Only
    transformers, tokenizers, huggingface_hub and optimum itself are installed into it; torch,
    onnxruntime and numpy come from this environment (a .pth file after its own site-packages)."""
    venv = tmp_path_factory.mktemp("optimum") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "zz_ce_export_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    result = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", OPTIMUM],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot build Optimum's environment (pip install {OPTIMUM}): "
                    f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}")
    return python


OPTIMUM_SCRIPT = """
import json, sys, torch, transformers
from optimum.onnxruntime import ORTModelForCausalLM
results = {"transformers": transformers.__version__}
for folder in sys.argv[2:]:
    try:
        model = ORTModelForCausalLM.from_pretrained(folder)
        ids = torch.tensor([json.loads(sys.argv[1])])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=%d,
                             min_new_tokens=%d, do_sample=False, pad_token_id=0, eos_token_id=None)
        results[folder] = out[0, ids.shape[1]:].tolist()
    except Exception as error:
        results[folder] = f"{type(error).__name__}: {error}"
print(json.dumps(results))
""" % (NEW_TOKENS, NEW_TOKENS)


def test_optimum_generates_pytorch_tokens_from_the_demo_folder(demo_build, optimum_python, tmp_path):
    """And where the manifest says Optimum cannot serve a build (a grouped-query OLMoE), it indeed cannot."""
    from architectures import save_tiny
    from ce_export import pipeline

    gqa = tmp_path / "gqa"
    pipeline.build(str(save_tiny("olmoe", tmp_path / "ckpt")), gqa, pipeline.BuildOptions(verify=False),
                   report=lambda line: None)
    assert not json.loads((gqa / "manifest.json").read_text())["clients"]["optimum"]["supported"]
    result = subprocess.run([optimum_python, "-c", OPTIMUM_SCRIPT, json.dumps(PROMPT), str(demo_build), str(gqa)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert results["transformers"].startswith("4.")
    assert results[str(demo_build)] == torch_tokens(demo_build / "checkpoint", PROMPT, NEW_TOKENS)
    assert "Got invalid dimensions for input: past_key_values" in results[str(gqa)]
    assert "Got: 4 Expected: 2" in results[str(gqa)]  # num_attention_heads where the cache has num_key_value_heads


def polygraphy_compare(folder, *args):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", str(folder / "polygraphy" / "compare.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_polygraphy_onnxrt_command_passes_and_fails_on_a_corrupted_model(demo_build, tmp_path):
    result = polygraphy_compare(demo_build, "onnxrt")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Passed: 8/8 iterations" in result.stdout and "PASSED | Runtime" in result.stdout

    import onnx
    from onnx import numpy_helper

    corrupted = tmp_path / "corrupted"
    shutil.copytree(demo_build, corrupted)
    model = onnx.load(corrupted / "model.onnx")
    init = next(i for i in model.graph.initializer if i.name.endswith("gate_up"))
    array = numpy_helper.to_array(init).copy()
    array[0] *= 1.01  # one expert's weights 1% off
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, corrupted / "model.onnx")
    result = polygraphy_compare(corrupted, "onnxrt")
    assert result.returncode != 0 and "FAILED | Runtime" in result.stdout


def test_polygraphy_tensorrt_command_is_well_formed(demo_build, tmp_path):
    """No TensorRT here: polygraphy writes the command's Python equivalent (--gen-script) instead of running it."""
    script = tmp_path / "trt_compare.py"
    result = polygraphy_compare(demo_build, "trt", "--plugins", "/opt/libce_export_trt.so", "--gen-script", str(script))
    assert result.returncode == 0, result.stderr[-2000:]
    code = script.read_text()
    assert "LoadPlugins(plugins=['/opt/libce_export_trt.so']" in code and "strongly_typed=True" in code
    assert ".add('past_key_values.3.value', min=[1, 4, 0, 32], opt=[4, 4, 64, 32], max=[4, 4, 64, 32])" in code
    assert "check_error_stat={'': 'max'}" in code and "'logits': " in code


def run_generate(capsys, *args):
    code = main(["generate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_streams_the_same_tokens_through_every_runtime(demo_build, capsys):
    from transformers import AutoTokenizer

    tokens = genai_tokens(demo_build, PROMPT, NEW_TOKENS)
    assert tokens[-1] == EOS
    expected = AutoTokenizer.from_pretrained(demo_build).decode(tokens[:-1])
    for runtime in ("genai", "ort", "torch"):
        code, out, err = run_generate(capsys, demo_build, "--ids", ",".join(map(str, PROMPT)),
                                      "--max-new-tokens", NEW_TOKENS, "--runtime", runtime)
        assert code == 0 and out == expected + "\n", (runtime, err)  # through the folder's tokenizer, to the EOS
        assert f"{len(tokens)} tokens in" in err.splitlines()[-1]
    code, out, err = run_generate(capsys, demo_build, "--ids", "5,17", "--max-new-tokens", 3)
    assert code == 0 and "onnxruntime-genai" in err  # the default when it is installed


def test_generate_prints_the_demos_answers(demo_build, capsys):
    for runtime in ("genai", "ort", "torch"):
        for prompt, answer in PROBLEMS.items():
            code, out, err = run_generate(capsys, demo_build, "--prompt", prompt, "--runtime", runtime)
            assert code == 0 and out == answer + "\n", (runtime, prompt, err)  # then the EOS ends it
            assert f"{len(answer) + 1} tokens in" in err.splitlines()[-1]


def test_generate_streams_tokens_as_they_come(demo_build):
    """Each token is written (and flushed) before the next one is computed."""
    class Recorder(io.StringIO):
        def __init__(self):
            super().__init__()
            self.flushed = []

        def flush(self):
            self.flushed.append(self.getvalue())

    out = Recorder()
    tokens = generate(no_tokenizer(demo_build), ids=PROMPT, max_new_tokens=5, runtime="ort", out=out)
    assert out.flushed[:5] == [" ".join(map(str, tokens[:n])) + " " for n in range(1, 6)]


def no_tokenizer(demo_build) -> Path:
    """A copy of the demo build without its tokenizer files (ids in, ids out), once per session."""
    folder = demo_build.parent / "demo_without_tokenizer"
    if not folder.exists():
        shutil.copytree(demo_build, folder)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    return folder


@pytest.fixture(scope="module")
def folder_with_tokenizer(demo_build, tmp_path_factory):
    """The demo build with its tokenizer replaced by a byte-level BPE with merges over the demo's 512 ids
    (trained on the built-in corpus), the kind of tokenizer real checkpoints have."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ce_export.calibration_data import CORPUS

    folder = tmp_path_factory.mktemp("tokenized") / "demo"
    shutil.copytree(demo_build, folder)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([CORPUS.read_text()], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def test_generate_text_through_the_folders_tokenizer(folder_with_tokenizer, capsys):
    from transformers import AutoTokenizer

    og = pytest.importorskip("onnxruntime_genai")
    text = "The experts route every token."
    hf = AutoTokenizer.from_pretrained(folder_with_tokenizer)
    assert list(og.Tokenizer(og.Model(str(folder_with_tokenizer))).encode(text)) == hf.encode(text)

    outputs = set()
    for runtime in ("genai", "ort"):
        code, out, err = run_generate(capsys, folder_with_tokenizer, "--prompt", text, "--max-new-tokens", 16,
                                      "--runtime", runtime)
        assert code == 0, err
        outputs.add(out)
    tokens = genai_tokens(folder_with_tokenizer, hf.encode(text), 16)
    if tokens[-1] == EOS:  # the checkpoint's EOS id ends the text unprinted, whatever this tokenizer calls it
        tokens = tokens[:-1]
    assert outputs == {hf.decode(tokens, skip_special_tokens=True) + "\n"}


@pytest.mark.parametrize("args, message", [
    (["--prompt", "hello"], "no tokenizer in the build folder"),
    (["--ids", "5,x"], "--ids: '5,x' is not a comma-separated list of token ids"),
    (["--ids", "5,512"], "token id 512 is outside the model's vocabulary (vocab_size=512)"),
    (["--ids", "5", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--ids", "5", "--max-new-tokens", "4096"], "1 prompt + 4096 new tokens exceed the build's context of 4096"),
])
def test_generate_bad_input_is_one_line(demo_build, capsys, args, message):
    code, out, err = run_generate(capsys, no_tokenizer(demo_build), *args)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err


def test_generate_genai_where_it_cannot_serve(demo_build, tmp_path, capsys):
    folder = tmp_path / "no_genai"
    shutil.copytree(demo_build, folder)
    (folder / "genai_config.json").unlink()
    code, _, err = run_generate(capsys, folder, "--ids", "5", "--runtime", "genai")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no genai_config.json" in err
    code, out, err = run_generate(capsys, folder, "--ids", "5", "--max-new-tokens", 2)  # falls back to ONNX Runtime
    assert code == 0 and "tokens in" in err and "ONNX Runtime" in err
