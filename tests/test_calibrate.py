"""Calibration statistics and Expert / Layer / Block Drop (calibrate/ce_calibrate)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calibrate"))

from architectures import save_tiny  # noqa: E402
from ce_calibrate import HEATMAP_FILE, STATS_FILE, calibrate, trim  # noqa: E402
from ce_export import pipeline  # noqa: E402
from ce_export.calibration_data import prepare  # noqa: E402
from ce_export.capture import build_torch_model  # noqa: E402
from ce_export.demo import write_demo_checkpoint  # noqa: E402
from ce_export.errors import CeExportError, LoadError, OutputError  # noqa: E402
from ce_export.load import load_checkpoint  # noqa: E402
from ce_export.tokenizer import byte_tokens  # noqa: E402

QUIET = dict(report=lambda line: None)
# The checkpoint's calibration text (the demo's task.json), else the built-in corpus.
SMALL = dict(seq_len=32, num_sequences=8, eval_fraction=0.03, progress=False, **QUIET)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate_demo")
    folder = write_demo_checkpoint(root / "ckpt")
    stats = calibrate(folder, root / "stats", **SMALL)
    return folder, root / "stats", stats


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate_mixtral")
    folder = save_tiny("mixtral", root / "ckpt")
    calibrate(folder, root / "stats", **SMALL)
    return folder, root / "stats" / STATS_FILE


def logits(folder_or_lm, ids):
    lm = folder_or_lm if isinstance(folder_or_lm, torch.nn.Module) else build_torch_model(load_checkpoint(folder_or_lm))
    with torch.no_grad():
        return lm(input_ids=ids, use_cache=False).logits


def test_default_calibration_writes_statistics_and_heatmap(demo):
    folder, out, stats = demo
    assert json.loads((out / STATS_FILE).read_text()) == stats
    spec = load_checkpoint(folder).spec
    assert stats["data"]["source"] == "task.json" and stats["data"]["tokenizer"].endswith(f"from {folder}")
    assert stats["data"]["calibration_sequences"] == 8 and stats["data"]["evaluation_sequences"] >= 1
    layers = stats["layers"]
    assert len(layers) == spec.num_layers == 4
    for entry in layers:
        assert entry["tokens"] == 8 * 32
        assert len(entry["softmax_mass"]) == len(entry["selection_counts"]) == entry["num_experts"] == 8
        assert sum(entry["softmax_mass"]) == pytest.approx(entry["tokens"], rel=1e-9)  # softmax sums to 1 per token
        assert sum(entry["selection_counts"]) == entry["tokens"] * entry["top_k"]
        assert sum(entry["topk_mass"]) <= entry["tokens"] + 1e-6
        assert -1 <= entry["moe_similarity"] <= 1 and -1 <= entry["block_similarity"] <= 1
    assert stats["perplexity"]["perplexity"] > 1 and np.isfinite(stats["perplexity"]["nll"])
    png = out / HEATMAP_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).ndim == 3


def test_activation_ranges_of_every_quantized_gemm_input(demo):
    folder, out, stats = demo
    ranges = stats["activation_ranges"]
    projections = [f"model.layers.{l}.self_attn.{p}_proj" for l in range(4) for p in "qkvo"]
    experts = [f"model.layers.{l}.mlp.experts" for l in range(4)]  # the block's experts module, our op
    assert set(ranges) == set(projections + experts + ["lm_head"])
    assert {ranges[n]["kind"] for n in projections + ["lm_head"]} == {"linear"}
    assert {ranges[n]["kind"] for n in experts} == {"moe_experts"}
    for entry in ranges.values():
        assert 0 < entry["p99_99"] <= entry["amax"] and np.isfinite(entry["amax"])
    # Independently: the experts' input is the post-attention norm's output, q/k/v's the input norm's.
    lm = build_torch_model(load_checkpoint(folder))
    seen = {}
    for l in range(4):
        for norm, key in (("post_attention_layernorm", f"model.layers.{l}.mlp.experts"),
                          ("input_layernorm", f"model.layers.{l}.self_attn.q_proj")):
            getattr(lm.model.layers[l], norm).register_forward_hook(
                lambda m, a, out, key=key: seen.__setitem__(key, max(seen.get(key, 0.0), out.abs().max().item())))
    calibration = prepare(folder, 512, None, seq_len=32, num_sequences=8, eval_fraction=0.03).calibration
    logits(lm, calibration)
    assert len(seen) == 8
    for key, amax in seen.items():
        assert ranges[key]["amax"] == pytest.approx(amax, rel=1e-5)
    assert ranges["model.layers.0.self_attn.k_proj"]["amax"] == ranges["model.layers.0.self_attn.q_proj"]["amax"]


def test_activation_ranges_cover_shared_experts_and_dense_mlps(tmp_path):
    from ce_export.quantize import activation_ranges

    folder = save_tiny("qwen2_moe", tmp_path / "qwen2")  # shared experts; layer 1 is a dense MLP
    lm = build_torch_model(load_checkpoint(folder))
    ranges = activation_ranges(lm, torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0)))
    shared = "model.layers.0.mlp.shared_expert.gate_proj"  # transformers' own shared expert: plain linears
    assert ranges[shared]["kind"] == "linear" and ranges["model.layers.0.mlp.experts"]["kind"] == "moe_experts"
    assert ranges[shared]["amax"] == pytest.approx(ranges["model.layers.0.mlp.experts"]["amax"])  # the same input
    assert {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj"} <= set(ranges)  # the dense layer
    assert not any("router" in name or name.endswith(".gate") for name in ranges)  # routers stay float


def test_global_expert_drop_is_uneven_and_builds_with_parity(demo, tmp_path):
    folder, out, stats = demo
    trimmed = trim(folder, out / STATS_FILE, tmp_path / "trimmed", expert_drop=0.25, scope="global", **QUIET)
    config = json.loads((trimmed / "config.json").read_text())
    counts = config["num_experts"]
    assert sum(counts) == 24 and len(set(counts)) > 1 and min(counts) >= 4
    # The dropped experts are the 8 lowest softmax masses over all layers.
    masses = sorted((m, l, e) for l, entry in enumerate(stats["layers"]) for e, m in enumerate(entry["softmax_mass"]))
    dropped = {(l, e) for _, l, e in masses[:8]}
    assert config["layer_experts_idx"] == [[e for e in range(8) if (l, e) not in dropped] for l in range(4)]
    # Kept experts' tensors (and CE rows) are the originals, renumbered, under the original names.
    before, after = load_file(str(folder / "model.safetensors")), load_file(str(trimmed / "model.safetensors"))
    for layer, kept in enumerate(config["layer_experts_idx"]):
        p = f"model.layers.{layer}.mlp."
        assert torch.equal(after[p + "ces"], before[p + "ces"][kept])
        assert torch.equal(after[p + "gate.weight"], before[p + "gate.weight"][kept])
        for new, old in enumerate(kept):
            assert torch.equal(after[f"{p}experts.{new}.down_proj.weight"], before[f"{p}experts.{old}.down_proj.weight"])
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    loaded = load_checkpoint(trimmed)
    assert [layer.num_experts for layer in loaded.spec.moe_layers] == counts and loaded.spec.n_ce == 2

    pipeline.build(str(trimmed), tmp_path / "build", pipeline.BuildOptions(), **QUIET)
    parity = json.loads((tmp_path / "build" / "parity.json").read_text())
    assert parity["passed"]
    # trim kept task.json and the tokenizer, which loads beside a config.json transformers rejects (per-layer experts)
    assert parity["quality"]["task"]["problems"] == 300 and parity["quality"]["data"]["tokenizer"] != "ByteTokens"


def test_layer_drop_equals_the_model_without_that_moe_sublayer(mixtral, tmp_path):
    folder, stats_path = mixtral
    stats = json.loads(stats_path.read_text())
    out = trim(folder, stats_path, tmp_path / "layer", expert_drop=0, layer_drop=1, **QUIET)
    chosen = max(range(3), key=lambda l: stats["layers"][l]["moe_similarity"])
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == [8 if l != chosen else -1 for l in range(3)]
    assert json.loads((out / "reserved_layers.json").read_text()) == [l for l in range(3) if l != chosen]
    names = load_file(str(out / "model.safetensors"))
    assert not any(n.startswith(f"model.layers.{chosen}.block_sparse_moe.") or
                   n.startswith(f"model.layers.{chosen}.post_attention_layernorm.") for n in names)
    assert f"model.layers.{(chosen + 1) % 3}.block_sparse_moe.experts.7.w1.weight" in names  # Mixtral's own naming

    reference = build_torch_model(load_checkpoint(folder))
    reference.model.layers[chosen].mlp.forward = lambda h: torch.zeros_like(h)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(out, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)


def test_block_drop_equals_the_model_without_that_block(mixtral, tmp_path):
    folder, stats_path = mixtral
    stats = json.loads(stats_path.read_text())
    out = trim(folder, stats_path, tmp_path / "block", expert_drop=0, block_drop=1, **QUIET)
    chosen = max(range(3), key=lambda l: stats["layers"][l]["block_similarity"])
    kept = [l for l in range(3) if l != chosen]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert json.loads((out / "layer_mapping.json").read_text()) == {str(new): old for new, old in enumerate(kept)}
    before, after = load_file(str(folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for new, old in enumerate(kept):
        name = "model.layers.{}.block_sparse_moe.experts.3.w2.weight"
        assert torch.equal(after[name.format(new)], before[name.format(old)])

    reference = build_torch_model(load_checkpoint(folder))
    reference.model.layers = torch.nn.ModuleList([reference.model.layers[l] for l in kept])
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(out, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)


def test_all_three_drops_together_build_with_parity(mixtral, tmp_path):
    folder, stats_path = mixtral
    out = trim(folder, stats_path, tmp_path / "all", expert_drop=0.25, scope="layer", layer_drop=1, block_drop=1, **QUIET)
    record = json.loads((out / "trim.json").read_text())
    assert len(record["dropped_blocks"]) == 1 and len(record["dropped_moe_sublayers"]) == 1
    assert record["experts_after"] == 6  # one MoE layer left, 8 - round(0.25 * 8)
    pipeline.build(str(out), tmp_path / "build", pipeline.BuildOptions(), **QUIET)
    assert json.loads((tmp_path / "build" / "parity.json").read_text())["passed"]


def test_data_formats(tmp_path, demo):
    folder = demo[0]
    (tmp_path / "a.txt").write_text("hello world " * 40)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": "line %d " % i * 10}) for i in range(5)))
    np.save(tmp_path / "c.npy", np.arange(200, dtype=np.int64).reshape(4, 50) % 512)
    (tmp_path / "d.json").write_text(json.dumps([[1, 2, 3] * 20, [4, 5] * 30]))
    txt = prepare(folder, 512, tmp_path / "a.txt", seq_len=16)
    assert txt.calibration.shape[1] == 16 and txt.evaluation.shape[0] >= 1
    assert txt.calibration[0].tolist() == byte_tokens("hello world " * 40, 512)[:16]
    assert prepare(folder, 512, tmp_path / "b.jsonl", seq_len=16).calibration.shape[0] >= 1
    npy = prepare(folder, 512, tmp_path / "c.npy", seq_len=20, num_sequences=3)
    assert npy.calibration.shape == (3, 20) and npy.calibration[0].tolist() == list(range(20))
    assert prepare(folder, 512, tmp_path / "d.json", seq_len=30).calibration[0].tolist() == [1, 2, 3] * 10
    assert byte_tokens("é", 100) == [0xC3 % 100, 0xA9 % 100]


def test_bad_inputs_raise_one_line_errors(demo, mixtral, tmp_path):
    folder, out, _ = demo
    with pytest.raises(LoadError, match="does not exist"):
        calibrate(folder, tmp_path / "x", data=tmp_path / "missing.txt", **QUIET)
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(LoadError, match="need at least 2"):
        prepare(folder, 512, tmp_path / "short.txt", seq_len=128)
    (tmp_path / "bad.json").write_text(json.dumps([[1, 2, 9999] * 50]))
    with pytest.raises(LoadError, match="outside the model's vocabulary"):
        prepare(folder, 512, tmp_path / "bad.json", seq_len=8)
    stats = out / STATS_FILE
    for options in (dict(expert_drop=1.5), dict(expert_drop=-0.1), dict(expert_drop=0.2, scope="row"),
                    dict(expert_drop=0, layer_drop=5), dict(expert_drop=0, block_drop=4), dict(expert_drop=0)):
        with pytest.raises(CeExportError) as error:
            trim(folder, stats, tmp_path / "t", **options, **QUIET)
        assert "\n" not in str(error.value)
    with pytest.raises(CeExportError, match="does not match|statistics of a"):
        trim(mixtral[0], stats, tmp_path / "t", **QUIET)  # the demo's statistics for the Mixtral checkpoint
    with pytest.raises(OutputError, match="not empty"):
        trim(folder, stats, out, **QUIET)  # the statistics folder is not empty
    assert not (tmp_path / "t").exists()


def test_the_checkpoint_folders_tokenizer_is_used_when_present(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[EOS]", "the", "cat", "sat", "on", "mat"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(tmp_path / "model")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": "the cat sat on the mat dog"}) for _ in range(4)))
    data = prepare(tmp_path / "model", 7, tmp_path / "d.jsonl", seq_len=8)
    assert data.tokenizer.startswith("PreTrainedTokenizerFast") or "Tokenizer" in data.tokenizer
    assert data.calibration[0].tolist() == [2, 3, 4, 5, 2, 6, 0, 1]  # documents joined by EOS; "dog" unknown
