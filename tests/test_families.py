"""The second wave of families (issue 14), each from a tiny model made and saved by transformers'
own class: ONNX Runtime logits and greedy tokens against transformers, CE with the family's own
routing against the loop oracle, and `--target trt` parsed and built by TensorRT-RTX, with the
plugin node where our plugin implements the op type and the build saying so where it does not.

One build per family keeps CI time down: `build --target trt --logits all` writes the ONNX whose
experts bodies TensorRT takes (the fixed-shape form; tests/test_onnx_experts.py runs both forms of
every op type against moe_math.py) and builds the plugin-less engine; ONNX Runtime runs the same
file against transformers. CE on DeepSeek-V3 and gpt-oss (trimmed too) goes through the whole
pipeline in the portable form (the sparse experts bodies); trimming is checked against transformers
running the kept experts; `--target ort`'s fused operator per family on one layer, and for gpt-oss
end to end.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from architectures import add_compressed_experts, save_tiny, second_wave_configs, trim_experts
from ce_export import families, onnx_functions, ort_support, pipeline
from ce_export.capture import build_torch_model, empty_past
from ce_export.errors import LoadError
from ce_export.load import load_checkpoint
from ce_export.runners import OrtRunner, greedy_tokens
from ce_export.spec import MoeLayerSpec
from ce_export.verify import generation_prompt
from ce_oracle import ce_moe_loop
from client_runs import transformers_generate

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
    assert {node.op_type for node in manifest.onnx.moe_nodes} == {OP_TYPES[family][0]}
    assert (out / "model.plan").stat().st_size > 0 and manifest.engine.plugin.bound is False
    # The TensorRT plugin node: our plugin's op types carry its attributes; for the others the build says so.
    in_plugin = OP_TYPES[family][0] in onnx_functions.PLUGIN_OP_TYPES
    assert {node.plugin for node in manifest.onnx.moe_nodes} == {in_plugin}
    lacking = manifest.engine.plugin.not_in_plugin
    assert (lacking is None) if in_plugin else (lacking.op_types == [OP_TYPES[family][0]]
                                                 and "does not implement" in lacking.message)

    spec = load_checkpoint(folder).spec
    stock = stock_model(folder)
    runtime = OrtRunner(out / "model.onnx")
    ids = torch.randint(0, spec.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = stock(ids).logits
    got = runtime(ids, torch.ones_like(ids), torch.arange(13).expand(2, -1).contiguous(),
                  empty_past(spec, 2, 0, torch.float32))[0]
    assert (got - want).abs().max() / want.abs().max() <= 1e-4

    prompt, mask = generation_prompt(spec.vocab_size)
    stock_tokens = transformers_generate(stock, prompt, mask, GREEDY_TOKENS)
    onnx_tokens, _ = greedy_tokens(runtime, prompt, mask, empty_past(spec, 2, 0, torch.float32), GREEDY_TOKENS)
    assert onnx_tokens.tolist() == stock_tokens.tolist()
    assert len(set(stock_tokens[1].tolist())) > 4  # not collapsed into a repeated token

    # CE with the family's routing: one layer of the op against the loop oracle.
    ce_op_type = OP_TYPES[family][1]
    if ce_op_type is None:
        with pytest.raises(LoadError, match="n_ce="):
            load_checkpoint(add_compressed_experts(folder, n_ce=1))
        return
    model = load_checkpoint(add_compressed_experts(folder))
    layer = next(layer for layer in model.spec.moe_layers if isinstance(layer, MoeLayerSpec))
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
    matches the captured model (whose op the test above checks against the oracle) in ONNX Runtime.
    gpt-oss's is also trimmed unevenly (6 and 5 experts kept; DeepSeek-V3's groups forbid it)."""
    folder = save_tiny(family, tmp_path / "ckpt")
    if family == "gpt_oss":
        trim_experts(folder, UNEVEN_TRIM)
    folder = add_compressed_experts(folder)
    manifest = pipeline.build(str(folder), tmp_path / "build", pipeline.BuildOptions(target="portable", verify=False),
                              **QUIET)
    assert {node.op_type for node in manifest.onnx.moe_nodes} == {OP_TYPES[family][1]}
    if family == "gpt_oss":
        assert [layer.num_experts for layer in manifest.model.moe_layers] == [6, 5]
    model = load_checkpoint(folder)
    captured = build_torch_model(model)
    runtime = OrtRunner(tmp_path / "build" / "model.onnx")
    ids = torch.randint(0, model.spec.vocab_size, (2, 13), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = captured(ids).logits
    got = runtime(ids, torch.ones_like(ids), torch.arange(13).expand(2, -1).contiguous(),
                  empty_past(model.spec, 2, 0, torch.float32))[0]
    assert (got - want).abs().max() / want.abs().max() <= 1e-4
    prompt, mask = generation_prompt(model.spec.vocab_size)
    captured_tokens = transformers_generate(captured, prompt, mask, GREEDY_TOKENS)
    onnx_tokens, _ = greedy_tokens(runtime, prompt, mask, empty_past(model.spec, 2, 0, torch.float32), GREEDY_TOKENS)
    assert onnx_tokens.tolist() == captured_tokens.tolist()


def test_bf16_build_of_an_fp32_router_family_checks_the_weights_it_stores(tmp_path):
    """DeepSeek-V3 keeps its router and score bias in fp32 in a bf16 model: the artifact stores them
    in fp32, so verify's reference must not round them to bf16 (a rounded router flips near-tied
    expert choices: max_rel 0.59 where the same weights give 4e-4), and the fp32 view widens the
    bf16 fill values of the attention's ConstantOfShape as well."""
    folder = add_compressed_experts(save_tiny("deepseek_v3", tmp_path / "ckpt"))
    pipeline.build(str(folder), tmp_path / "build", pipeline.BuildOptions(target="portable", dtype="bf16"), **QUIET)
    parity = json.loads((tmp_path / "build" / "parity.json").read_text())
    assert parity["passed"] and parity["logits"]["max_rel"] <= 1e-2


UNEVEN_TRIM = {0: [1, 2, 4, 5, 6, 7], 1: [0, 2, 3, 5, 6]}
TRIMMABLE = ("gpt_oss", "minimax_m2", "granitemoe", "flex_olmo")  # the required families without expert groups


@pytest.mark.parametrize("family", TRIMMABLE)
def test_trimmed_checkpoint_runs_as_transformers_runs_the_kept_experts(family, tmp_path):
    """Expert drop in the compression study's format (per-layer counts, layer_experts_idx): every
    routed tensor sliced (router rows and bias, score bias, experts and their biases). Six experts
    kept in each layer, so that transformers itself can run the trimmed weights as a 6-expert model
    for the comparison; uneven counts go through ONNX in the CE test above."""
    folder = trim_experts(save_tiny(family, tmp_path / "ckpt"), {0: [1, 2, 4, 5, 6, 7], 1: [0, 2, 3, 5, 6, 7]})
    model = load_checkpoint(folder)
    assert [layer.expert_ids for layer in model.spec.moe_layers] == [(1, 2, 4, 5, 6, 7), (0, 2, 3, 5, 6, 7)]
    stock_folder = tmp_path / "stock"
    stock_folder.mkdir()
    (stock_folder / "model.safetensors").symlink_to(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config = {key: 6 if isinstance(value, list) and key in families.EXPERT_COUNT_KEYS else value
              for key, value in config.items() if key != "layer_experts_idx"}
    (stock_folder / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, model.spec.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = stock_model(stock_folder)(ids).logits
        got = build_torch_model(model)(ids).logits
    assert (got - want).abs().max() / want.abs().max() <= 1e-5


def test_trimming_under_group_limited_routing_is_refused_in_one_line(tmp_path):
    folder = trim_experts(save_tiny("deepseek_v3", tmp_path / "ckpt"), {1: [0, 1, 2, 3, 4, 5]})
    with pytest.raises(LoadError, match="group-limited routing") as error:
        load_checkpoint(folder)
    assert "\n" not in str(error.value)


# Families whose layers `--target ort` hands to com.microsoft::MoE (exact: softmax top-k, scale 1,
# SwiGLU, or gpt-oss's clamped SwiGLU with biases); the sigmoid routings keep their function body.
ORT_FUSED = {"granitemoe", "flex_olmo", "hunyuan_v1_moe", "gpt_oss"}


@pytest.mark.parametrize("family", FAMILIES)
def test_ort_target_fuses_exactly_where_com_microsoft_moe_computes_the_family(family):
    """One layer with the family's own routing attributes: lowered for --target ort only where
    ORT's fused operator is exact, and then equal to the reference math in ONNX Runtime."""
    if ort_support.moe_lowering_blocker("fp32") is not None:
        pytest.skip(ort_support.moe_lowering_blocker("fp32"))
    import onnx_ir as ir
    import onnxruntime as ort

    from ce_export import export

    lm = families.meta_model(second_wave_configs()[family].to_dict())
    layout = next(iter(families.find_moe_blocks(lm).values()))
    fields = families.routing_fields(families.ARCHITECTURES[family], lm, layout)
    op_type = OP_TYPES[family][0]
    experts, hidden, inter = layout.num_experts, lm.config.hidden_size, layout.intermediate_size
    gen = torch.Generator().manual_seed(2)
    weights = {"gate_up": 0.2 * torch.randn(experts, 2 * inter, hidden, generator=gen),
               "down": 0.2 * torch.randn(experts, hidden, inter, generator=gen),
               "score_bias": 0.1 * torch.randn(experts, generator=gen),
               "gate_up_bias": 0.2 * torch.randn(experts, 2 * inter, generator=gen),
               "down_bias": 0.2 * torch.randn(experts, hidden, generator=gen)}
    names = onnx_functions.node_inputs(op_type)[2:]
    attributes = onnx_functions.node_attributes(
        op_type, top_k=layout.top_k, n_ce=0, norm_topk_prob=fields["norm_topk_prob"],
        routing_scale=fields.get("routing_scale", 1.0), jitter_eps=0.0, n_group=fields.get("n_group", 1),
        topk_group=fields.get("topk_group", 1), swiglu_alpha=fields.get("swiglu_alpha", 1.0),
        swiglu_limit=fields.get("swiglu_limit", 0.0))
    model = ir.from_proto(onnx_functions.layer_model(op_type, attributes, weights["gate_up"].numpy(),
                                                     weights["down"].numpy(), form=onnx_functions.SPARSE,
                                                     **{n: weights[n].numpy() for n in names if n not in ("gate_up", "down")}))
    export.lower_plain_moe_to_ort(model)
    domains = {node.domain for node in model.graph}
    assert domains == ({"com.microsoft"} if family in ORT_FUSED else {"ce_export"})

    tokens = torch.randn(9, hidden, generator=gen)
    logits = torch.randn(9, experts, generator=gen)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"hidden": tokens.numpy(), "router_logits": logits.numpy()})[0])
    extras = {n: weights[n] for n in names if n not in ("gate_up", "down")}
    want = torch.ops.ce_export.moe(tokens, logits, weights["gate_up"], weights["down"], None, layout.top_k, 0,
                                   fields["norm_topk_prob"], fields["routing"], fields.get("routing_scale", 1.0), 0.0,
                                   extras.get("score_bias"), fields.get("n_group", 1), fields.get("topk_group", 1),
                                   extras.get("gate_up_bias"), extras.get("down_bias"),
                                   fields.get("activation", "swiglu"), fields.get("swiglu_alpha", 1.0),
                                   fields.get("swiglu_limit", 0.0), fields.get("weights_on_input", False))
    assert (got - want).abs().max() / want.abs().max() <= 1e-5


def test_gpt_oss_runs_on_onnx_runtimes_fused_moe(tmp_path):
    """--target ort: gpt-oss's layers become com.microsoft::MoE with its clamped SwiGLU (swiglu_limit,
    activation_alpha, beta 1) and expert biases; logits against transformers."""
    if ort_support.moe_lowering_blocker("fp32") is not None:
        pytest.skip(ort_support.moe_lowering_blocker("fp32"))
    folder = save_tiny("gpt_oss", tmp_path / "ckpt")
    manifest = pipeline.build(str(folder), tmp_path / "build", pipeline.BuildOptions(target="ort", verify=False), **QUIET)
    assert {(node.domain, node.op_type) for node in manifest.onnx.moe_nodes} == {("com.microsoft", "MoE")}
    spec = load_checkpoint(folder).spec
    ids = torch.randint(0, spec.vocab_size, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = stock_model(folder)(ids).logits
    got = OrtRunner(tmp_path / "build" / "model.onnx")(ids, torch.ones_like(ids), torch.arange(13).expand(2, -1).contiguous(),
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
