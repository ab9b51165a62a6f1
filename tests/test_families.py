"""The second wave of families (issue 14), each from a tiny model made and saved by transformers'
own class: ONNX Runtime logits and greedy tokens against transformers, CE with the family's own
routing against the loop oracle, and `--target trt` parsed and built by TensorRT-RTX.

One build per family keeps CI time down: `build --target trt --logits all` writes the ONNX whose
experts bodies TensorRT takes (the fixed-shape form; tests/test_onnx_experts.py runs both forms of
every op type against moe_math.py) and builds the plugin-less engine; ONNX Runtime runs the same
file against transformers. CE on DeepSeek-V3 and gpt-oss, and the ONNX Runtime fused operator for
gpt-oss, go through the whole pipeline separately.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from architectures import add_compressed_experts, save_tiny, second_wave_configs
from ce_export import families, ort_support, pipeline
from ce_export.capture import empty_past
from ce_export.errors import LoadError
from ce_export.load import load_checkpoint
from ce_export.verify import OrtDecoder, generation_prompt, greedy_onnx, greedy_torch
from ce_oracle import ce_moe_loop

QUIET = dict(report=lambda line: None)
FAMILIES = sorted(second_wave_configs())
# The ONNX op type each family's MoE layers become (onnx_functions.OPS), plain and with CE.
OP_TYPES = {
    "deepseek_v3": ("SigmoidMoE", "CompressedSigmoidMoE"), "glm4_moe": ("SigmoidMoE", "CompressedSigmoidMoE"),
    "dots1": ("SigmoidMoE", "CompressedSigmoidMoE"), "minimax_m2": ("SigmoidMoE", "CompressedSigmoidMoE"),
    "gpt_oss": ("ClampedSwiGLUMoE", "CompressedClampedSwiGLUMoE"), "granitemoe": ("MoE", "CompressedMoE"),
    "flex_olmo": ("MoE", "CompressedMoE"), "hunyuan_v1_moe": ("MoE", "CompressedMoE"),
    "llama4_text": ("SigmoidTop1MoE", None),  # top-1: no auxiliary expert for CE
}
GREEDY_TOKENS = 16


def stock_model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                experts_implementation="eager").eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_onnx_runtime_and_tensorrt(family, tmp_path):
    folder = save_tiny(family, tmp_path / "ckpt")
    out = tmp_path / "trt"
    manifest = pipeline.build(str(folder), out, pipeline.BuildOptions(
        target="trt", logits="all", verify=False, max_batch=4, max_seq=64, max_context=128), **QUIET)
    assert {node["op_type"] for node in manifest["onnx"]["moe_nodes"]} == {OP_TYPES[family][0]}
    assert (out / "model.plan").stat().st_size > 0 and manifest["engine"]["plugin"]["bound"] is False

    spec = load_checkpoint(folder).spec
    stock = stock_model(folder)
    runtime = OrtDecoder(out / "model.onnx")
    ids = torch.randint(0, spec.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = stock(ids).logits
    got = runtime(ids, torch.ones_like(ids), torch.arange(13).expand(2, -1).contiguous(),
                  empty_past(spec, 2, 0, torch.float32))[0]
    assert (got - want).abs().max() / want.abs().max() <= 1e-4

    prompt, mask = generation_prompt(spec.vocab_size)
    stock_tokens, _ = greedy_torch(stock, prompt, mask, GREEDY_TOKENS)
    assert greedy_onnx(runtime, prompt, mask, GREEDY_TOKENS, spec, torch.float32).tolist() == stock_tokens.tolist()
    assert len(set(stock_tokens[1].tolist())) > 4  # not collapsed into a repeated token

    # CE with the family's routing: one layer of the op against the loop oracle.
    ce_op_type = OP_TYPES[family][1]
    if ce_op_type is None:
        with pytest.raises(LoadError, match="n_ce="):
            load_checkpoint(add_compressed_experts(folder, n_ce=1))
        return
    model = load_checkpoint(add_compressed_experts(folder))
    layer = next(layer for layer in model.spec.moe_layers if layer.kind == "moe")
    assert layer.n_ce == layer.top_k // 2
    weights = model.moe_weights[layer.layer]
    hidden = torch.randn(17, model.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    logits = torch.nn.functional.linear(hidden, weights.router, weights.router_bias)
    args = (hidden, logits, weights.gate_up, weights.down, weights.ces, layer.top_k, layer.n_ce, layer.norm_topk_prob,
            layer.routing, layer.routing_scale, layer.jitter_eps, weights.score_bias, layer.n_group, layer.topk_group,
            weights.gate_up_bias, weights.down_bias, layer.activation, layer.swiglu_alpha, layer.swiglu_limit)
    torch.testing.assert_close(torch.ops.ce_export.moe(*args).double(), ce_moe_loop(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_compressed_experts_through_the_pipeline(family, tmp_path):
    """CE checkpoints of the two required CE families: the portable file (sparse experts bodies)
    matches the captured model (whose op the test above checks against the oracle) in ONNX Runtime."""
    folder = add_compressed_experts(save_tiny(family, tmp_path / "ckpt"))
    manifest = pipeline.build(str(folder), tmp_path / "build", pipeline.BuildOptions(target="portable"), **QUIET)
    parity = json.loads((tmp_path / "build" / "parity.json").read_text())
    assert {node["op_type"] for node in manifest["onnx"]["moe_nodes"]} == {OP_TYPES[family][1]}
    assert parity["passed"] and parity["logits"]["max_rel"] <= 1e-4
    assert parity["generation"]["torch_tokens"] == parity["generation"]["onnx_tokens"]


def test_gpt_oss_runs_on_onnx_runtimes_fused_moe(tmp_path):
    """--target ort: gpt-oss's layers become com.microsoft::MoE with its clamped SwiGLU (swiglu_limit,
    activation_alpha, beta 1) and expert biases; logits against transformers."""
    if ort_support.moe_lowering_blocker("fp32") is not None:
        pytest.skip(ort_support.moe_lowering_blocker("fp32"))
    folder = save_tiny("gpt_oss", tmp_path / "ckpt")
    manifest = pipeline.build(str(folder), tmp_path / "build", pipeline.BuildOptions(target="ort", verify=False), **QUIET)
    assert {(node["domain"], node["op_type"]) for node in manifest["onnx"]["moe_nodes"]} == {("com.microsoft", "MoE")}
    spec = load_checkpoint(folder).spec
    ids = torch.randint(0, spec.vocab_size, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = stock_model(folder)(ids).logits
    got = OrtDecoder(tmp_path / "build" / "model.onnx")(ids, torch.ones_like(ids), torch.arange(13).expand(2, -1).contiguous(),
                                                       empty_past(spec, 2, 0, torch.float32))[0]
    assert (got - want).abs().max() / want.abs().max() <= 1e-4


@pytest.mark.parametrize("model_type", ["qwen3_5_moe", "jamba", "llama4"])
def test_families_that_cannot_work_are_refused_in_one_line(model_type, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(LoadError, match=f"model_type '{model_type}' is not supported: ") as error:
        load_checkpoint(folder)
    assert "\n" not in str(error.value) and families.REFUSED[model_type] in str(error.value)


def test_every_family_is_found_by_module_types():
    """Each served family's MoE blocks, router and experts layout come from transformers' module
    tree; the tiny configs cover every second-wave family."""
    assert set(FAMILIES) <= set(families.ARCHITECTURES)
    for family, config in second_wave_configs().items():
        blocks = families.find_moe_blocks(families.meta_model(config.to_dict()))
        assert blocks, family
        layout = next(iter(blocks.values()))
        assert layout.num_experts == 8 and layout.intermediate_size > 0
        assert (layout.score_bias is not None) == (OP_TYPES[family][0] == "SigmoidMoE"), family
        assert (layout.gate_up_bias is not None) == (family == "gpt_oss"), family
