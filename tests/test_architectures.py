"""Every supported architecture through the same pipeline, against transformers' own classes."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from architectures import add_compressed_experts, configs, drop_blocks, drop_experts, save_tiny
from ce_export import ort_support, pipeline
from ce_export.capture import empty_past
from ce_export.load import load_checkpoint
from ce_export.runners import OrtRunner
from ce_export.spec import MoeLayerSpec
from ce_export.verify import generation_prompt
from ce_oracle import ce_moe_loop
from client_runs import genai_tokens, transformers_generate, until_genai_stops

QUIET = dict(report=lambda line: None)
ARCHITECTURES = sorted(configs())
# Which MoE layers `--target ort` hands to ONNX Runtime's fused com.microsoft::MoE (only where exact).
ORT_FUSED = {"olmoe": True, "mixtral": True, "qwen2_moe": True, "qwen3_moe": True,
             "deepseek_v2": False,  # routing scale: no such attribute in com.microsoft::MoE
             "phimoe": False}  # ORT's sparse mixer does not reproduce Phi-3.5-MoE's routing


def build(folder, out, target="ort"):
    """The build's manifest.json and parity.json, as written."""
    pipeline.build(str(folder), out, pipeline.BuildOptions(target=target), **QUIET)
    return json.loads((out / "manifest.json").read_text()), json.loads((out / "parity.json").read_text())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_onnx_matches_transformers(arch, tmp_path):
    folder = save_tiny(arch, tmp_path / "ckpt")
    manifest, parity = build(folder, tmp_path / "build")
    assert parity["passed"] and parity["logits"]["max_rel"] <= 1e-4
    spec = load_checkpoint(folder).spec
    domains = {node["domain"] for node in manifest["onnx"]["moe_nodes"]}
    fused = ORT_FUSED[arch] and ort_support.moe_lowering_blocker("fp32") is None
    assert domains == ({"com.microsoft"} if fused else {"ce_export"})

    stock = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", experts_implementation="eager").eval()
    ids = torch.randint(0, spec.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = stock(ids).logits
    runtime = OrtRunner(tmp_path / "build" / "model.onnx")
    got = runtime(ids, torch.ones_like(ids), torch.arange(13).expand(2, -1).contiguous(), empty_past(spec, 2, 0, torch.float32))[0]
    assert (got - want).abs().max() / want.abs().max() <= 1e-4

    prompt, mask = generation_prompt(spec.vocab_size)
    stock_tokens = transformers_generate(stock, prompt, mask, 32)
    assert parity["generation"]["onnx_tokens"] == stock_tokens.tolist()
    assert len(set(stock_tokens[1].tolist())) > 4

    # onnxruntime-genai on the folder as built (row 1 is unpadded); DeepSeek's latent cache it cannot hold.
    genai = manifest["clients"]["onnxruntime_genai"]
    assert genai["supported"] == (arch != "deepseek_v2")
    if genai["supported"]:
        assert genai_tokens(tmp_path / "build", prompt[1].tolist(), 32) == until_genai_stops(stock_tokens[1].tolist())
    else:
        assert not (tmp_path / "build" / "genai_config.json").exists() and "latent" in genai["reason"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compressed_experts_on_every_architecture(arch, tmp_path):
    """n_ce = K / 2: for the top-2 architectures (Mixtral, Phi-3.5-MoE) 1 main + 1 compressed."""
    folder = add_compressed_experts(save_tiny(arch, tmp_path / "ckpt"))
    model = load_checkpoint(folder)
    layer = next(layer for layer in model.spec.moe_layers if isinstance(layer, MoeLayerSpec))
    assert layer.n_ce == layer.top_k // 2 and layer.n_main == layer.top_k - layer.n_ce
    weights = model.moe_weights[layer.layer]
    hidden = torch.randn(17, model.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    logits = hidden @ weights.router.T
    args = (hidden, logits, weights.gate_up, weights.down, weights.ces, layer.top_k, layer.n_ce, layer.norm_topk_prob,
            layer.routing, layer.routing_scale, layer.jitter_eps)
    got = torch.ops.ce_export.moe(*args)
    torch.testing.assert_close(got.double(), ce_moe_loop(*args), rtol=1e-5, atol=1e-5)

    _, parity = build(folder, tmp_path / "build", target="portable")
    assert parity["passed"]


def test_intermediate_larger_than_hidden_needs_full_width_ces(tmp_path):
    """Phi-3.5-MoE has I > H: theta1 must be I long, which the released CE code could not store."""
    folder = save_tiny("phimoe", tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    assert config["intermediate_size"] < config["hidden_size"]  # the tiny model; widen it below
    import transformers

    cfg = configs(intermediate_size=96)["phimoe"]
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "wide")
    wide = add_compressed_experts(tmp_path / "wide", n_ce=1)
    model = load_checkpoint(wide)
    assert model.moe_weights[0].ces.shape == (8, 3, 96)
    _, parity = build(wide, tmp_path / "build", target="portable")
    assert parity["passed"]


def test_mixtral_with_a_quarter_of_experts_dropped_unevenly(tmp_path):
    folder = drop_experts(save_tiny("mixtral", tmp_path / "ckpt"), keep=[[0, 1, 3, 4, 6], [0, 1, 2, 3, 5, 6, 7], [1, 2, 4, 5, 6, 7]])
    manifest, parity = build(folder, tmp_path / "build")
    assert [layer["num_experts"] for layer in manifest["model"]["moe_layers"]] == [5, 7, 6]
    assert sum(layer["num_experts"] for layer in manifest["model"]["moe_layers"]) == 18  # 24 - 25%
    assert parity["passed"]


def test_deepseek_with_two_blocks_dropped(tmp_path):
    cfg = configs(num_hidden_layers=5)["deepseek_v2"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "ckpt")
    folder = drop_blocks(tmp_path / "ckpt", dropped=[2, 3])
    manifest, parity = build(folder, tmp_path / "build")
    assert manifest["model"]["num_layers"] == 3
    assert [layer["kind"] for layer in manifest["model"]["moe_layers"]] == ["dense", "moe", "moe"]
    assert parity["passed"]


def test_qwen2_moe_trimmed_with_layer_drop(tmp_path):
    """Expert counts with a dense layer (null) and a dropped MoE sub-layer (-1), and uneven experts."""
    cfg = configs(num_hidden_layers=4)["qwen2_moe"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "ckpt")
    folder = drop_experts(tmp_path / "ckpt", keep=[[0, 2, 3, 5, 6, 7], None, -1, [1, 2, 3, 4, 5]])
    manifest, parity = build(folder, tmp_path / "build")
    layers = manifest["model"]["moe_layers"]  # dense and removed layers have no MoE fields
    assert [(layer["kind"], layer.get("num_experts")) for layer in layers] == [
        ("moe", 6), ("dense", None), ("removed", None), ("moe", 5)]
    assert parity["passed"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_trt_target_parses_and_builds_without_the_plugin(arch, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (the installable builder) is not installed")

    folder = save_tiny(arch, tmp_path / "ckpt")
    out = tmp_path / "trt"
    manifest = pipeline.build(str(folder), out, pipeline.BuildOptions(target="trt", verify=False, max_seq=256,
                                                                       max_context=256, max_batch=4), **QUIET)
    assert all(node.domain == "ce_export" for node in manifest.onnx.moe_nodes)
    assert (out / "model.plan").stat().st_size > 0
    assert manifest.engine.plugin.bound is False
