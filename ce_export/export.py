"""Stage 3, export: captured model -> model.onnx (KV-cache decoder, one custom node per MoE layer).

torch.onnx.export(dynamo=True) traces the flat KV-cache interface; `ce_export::moe` is translated
to a bodyless `ce_export::MoE` / `ce_export::CompressedMoE` node (the exporter's version converter
would inline a function given at export time), and the function bodies are attached afterwards.
A target then specialises the nodes:
    portable  custom nodes + local functions (any ONNX runtime runs the bodies)
    ort       plain MoE layers become com.microsoft::MoE (exact; CE layers stay portable), where the
              installed onnxruntime computes it correctly for the model's dtype (ort_support.py)
    trt       custom nodes also carry plugin_namespace / plugin_version, so TensorRT binds our
              plugin when it is loaded and inlines the bodies when it is not
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from ce_export import onnx_functions, ort_support
from ce_export import quantize as quantize_stage
from ce_export.capture import KvCacheDecoder, empty_past, io_names
from ce_export.errors import ExportError
from ce_export.spec import LAYER_MOE, LoadedModel

log = logging.getLogger(__name__)

TARGETS = ("portable", "ort", "trt")
# Logits per target unless --logits says otherwise: every position where clients evaluate whole
# sequences (Optimum, perplexity), the last one for TensorRT engines, which serve generation only
# and would otherwise hold max_batch x max_seq x vocab logits (26 GB in fp16 at OLMoE's 64 x 4096).
DEFAULT_LOGITS = {"portable": "all", "ort": "all", "trt": "last"}
OPSET = 20
PLUGIN_VERSION = "1"
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, with headroom
MS_DOMAIN = "com.microsoft"
ONNX_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    external_data: bool
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    moe_nodes: list[dict]  # one per MoE node: name, op_type, domain, layer
    opset: int
    quantization: dict | None = None  # what quantize.store_quantized_weights stored, when quantized
    weight_bytes: int = 0  # bytes of every initializer as stored (int4 packed two per byte)
    experts_form: str = onnx_functions.SPARSE  # the experts functions' body (onnx_functions.EXPERTS_FORMS)
    logits: str = "all"  # logits of every position, or of the last one (capture.LOGITS)


def moe_translation(hidden, router_logits, gate_up, down, ces, top_k: int, n_ce: int, norm_topk_prob: bool,
                    routing: str = "softmax_topk", routing_scale: float = 1.0, jitter_eps: float = 0.0):
    op_type = onnx_functions.op_type_for(routing, compressed=n_ce > 0)
    attributes = onnx_functions.node_attributes(op_type, top_k, n_ce, norm_topk_prob, routing_scale, jitter_eps)
    inputs = (hidden, router_logits, gate_up, down) + ((ces,) if n_ce > 0 else ())
    return getattr(onnx_functions.ce_opset, op_type)(*inputs, **attributes)


def dynamic_shapes_for(num_layers: int, max_batch: int, max_seq: int, max_context: int):
    from torch.export import Dim

    batch = Dim("batch", min=1, max=max_batch)
    seq = Dim("sequence", min=1, max=max_seq)
    past = Dim("past_sequence", min=0, max=max_context)
    total = Dim("total_sequence", min=1, max=max_context + max_seq)
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past_key_values": tuple({0: batch, 2: past} for _ in range(2 * num_layers)),
    }


def export_onnx(
    model: LoadedModel, lm: torch.nn.Module, out_dir: Path, target: str = "portable",
    max_batch: int = 64, max_seq: int = 4096, max_context: int = 4096, quantize: str | None = None,
    quantized: dict | None = None, logits: str = "all",
) -> ExportResult:
    """`quantize`: store the weights in `quantized` (what quantize.fake_quantize_model returned for
    `lm`) as their q and scales + DequantizeLinear; FP8 activation quantizers in `lm`
    (quantize.quantize_activations) become QuantizeLinear -> DequantizeLinear. `logits`: every
    position ("all") or the last one ("last"), capture.LOGITS."""
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    onnx_functions.register_schemas()
    dtype = next(lm.parameters()).dtype
    decoder = KvCacheDecoder(lm, logits).eval()
    num_layers = model.spec.num_layers
    # Trace with seq >= 2 and past > 0: a traced size of 1 would be specialised into the graph.
    batch, seq, past = 2, 3, 5
    sample = (
        torch.randint(0, model.spec.vocab_size, (batch, seq)),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq).expand(batch, seq).contiguous(),
        empty_past(model.spec, batch, past, dtype),
    )
    input_names, output_names = io_names(num_layers)
    opset = OPSET
    if quantize:
        opset = max(opset, quantize_stage.check_mode(quantize).opset)
        if quantized is None:
            raise ExportError(f"--quantize {quantize}: the model was not fake-quantized")
    with torch.no_grad(), warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                decoder, sample, dynamo=True, opset_version=opset, optimize=True, verbose=False,
                input_names=input_names, output_names=output_names,
                dynamic_shapes=dynamic_shapes_for(num_layers, max_batch, max_seq, max_context),
                custom_translation_table={
                    torch.ops.ce_export.moe.default: moe_translation,
                    torch.ops.ce_export.fake_quantize_fp8.default: quantize_stage.fake_quantize_fp8_translation,
                },
            )
        except Exception as error:
            raise ExportError(f"torch.onnx.export failed: {root_cause(error)}") from error

    onnx_model = program.model
    moe_nodes = name_moe_nodes(onnx_model, [layer.layer for layer in model.spec.moe_layers if layer.kind == LAYER_MOE])
    experts_form = experts_form_for(target)
    attach_functions(onnx_model, experts_form)
    if target == "ort":
        blocker = ort_support.moe_lowering_blocker(ONNX_DTYPE_NAMES.get(dtype, str(dtype)))
        if blocker is None:
            lower_plain_moe_to_ort(onnx_model)
        else:
            warnings.warn(f"--target ort: plain MoE layers keep their exact function bodies: {blocker}", stacklevel=2)
    elif target == "trt":
        mark_plugin_nodes(onnx_model)
    moe_nodes = [dict(entry, **node_facts(onnx_model, entry["name"])) for entry in moe_nodes]
    quantization = None
    if quantize:
        quantization = quantize_stage.store_quantized_weights(onnx_model, quantize, quantized)

    onnx_model.ir_version = ort_support.ir_version_for_runtime(onnx_model.ir_version, dict(onnx_model.opset_imports))
    nbytes = sum(v.const_value.nbytes for v in onnx_model.graph.initializers.values() if v.const_value is not None)
    external = nbytes > EXTERNAL_DATA_THRESHOLD
    onnx_path = out_dir / "model.onnx"
    ir.save(onnx_model, onnx_path, external_data="model.onnx.data" if external else None)
    dynamic_axes = {value.name: {i: str(d) for i, d in enumerate(value.shape) if not isinstance(d, int)}
                    for value in list(onnx_model.graph.inputs) + list(onnx_model.graph.outputs)}
    return ExportResult(onnx_path, external, input_names, output_names, dynamic_axes, moe_nodes, opset, quantization,
                        nbytes, experts_form, logits)


def custom_moe_nodes(model: ir.Model) -> list[ir.Node]:
    return [node for node in model.graph if node.domain == onnx_functions.DOMAIN]


ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def root_cause(error: BaseException) -> str:
    """The innermost cause's first line, without terminal colour codes (torch.onnx wraps errors in
    several layers whose outer messages only say which export step failed)."""
    while error.__cause__ is not None:
        error = error.__cause__
    first_line = ANSI_COLOUR.sub("", (str(error).strip().splitlines() or [""])[0])
    return f"{type(error).__name__}: {first_line}"


def name_moe_nodes(model: ir.Model, moe_layers: list[int]) -> list[dict]:
    """Give each MoE node a readable name, /model/layers.{l}/mlp/{op_type}; nodes come in layer order."""
    nodes = custom_moe_nodes(model)
    if len(nodes) != len(moe_layers):
        raise ExportError(f"exported graph has {len(nodes)} MoE nodes for {len(moe_layers)} MoE layers")
    entries = []
    for layer, node in zip(moe_layers, nodes):
        node.name = f"/model/layers.{layer}/mlp/{node.op_type}"
        entries.append({"name": node.name, "layer": layer})
    return entries


def node_facts(model: ir.Model, name: str) -> dict:
    node = next(node for node in model.graph if node.name == name)
    return {"op_type": node.op_type, "domain": node.domain}


def experts_form_for(target: str) -> str:
    """The experts functions' body per target (onnx_functions.EXPERTS_FORMS): TensorRT cannot size
    tensors from values, so its file carries the fixed-shape form (its sparse path is our plugin)."""
    return onnx_functions.FIXED_SHAPE if target == "trt" else onnx_functions.SPARSE


def attach_functions(model: ir.Model, experts_form: str) -> None:
    used = {node.op_type for node in custom_moe_nodes(model)}
    model.opset_imports[onnx_functions.DOMAIN] = onnx_functions.DOMAIN_VERSION
    for op_type in sorted(used):
        for proto in onnx_functions.function_protos(op_type, model.opset_imports[""], experts_form):
            function = ir.serde.deserialize_function(proto)
            model.functions[function.identifier()] = function


def mark_plugin_nodes(model: ir.Model) -> None:
    for node in custom_moe_nodes(model):
        node.attributes["plugin_namespace"] = ir.AttrString("plugin_namespace", onnx_functions.DOMAIN)
        node.attributes["plugin_version"] = ir.AttrString("plugin_version", PLUGIN_VERSION)


def lower_plain_moe_to_ort(model: ir.Model) -> None:
    """Replace each plain MoE node by com.microsoft::MoE (SwiGLU, interleaved gate/up weights).

    ORT's CPU kernel only takes the interleaved layout (g0, u0, g1, u1, ...) of fc1, so the
    concatenated [E, 2I, H] initializer is re-laid once here.
    """
    graph = model.graph
    lowered = 0
    for node in list(graph):
        routing = ort_routing_attributes(node)
        if routing is None:
            continue
        hidden, logits, gate_up, down = node.inputs
        if gate_up.const_value is None:
            raise ExportError(f"{node.name}: gate_up is not an initializer; cannot lower to com.microsoft::MoE")
        weights = gate_up.const_value.numpy()
        experts, two_i, h = weights.shape
        interleaved = weights.reshape(experts, 2, two_i // 2, h).transpose(0, 2, 1, 3).reshape(experts, two_i, h)
        fc1 = ir.Value(name=f"{gate_up.name}.interleaved", shape=ir.Shape(weights.shape), type=gate_up.type,
                       const_value=ir.tensor(np.ascontiguousarray(interleaved), name=f"{gate_up.name}.interleaved"))
        graph.register_initializer(fc1)
        ms_node = ir.node(
            "MoE", [hidden, logits, fc1, None, down], domain=MS_DOMAIN, name=node.name,
            attributes={**routing, "activation_type": "swiglu", "swiglu_fusion": 1,
                        "activation_alpha": 1.0, "activation_beta": 0.0},
        )
        graph.insert_after(node, ms_node)
        ir.convenience.replace_all_uses_with(node.outputs, ms_node.outputs, replace_graph_outputs=True)
        ms_node.outputs[0].name, ms_node.outputs[0].shape, ms_node.outputs[0].type = (
            node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type)
        graph.remove(node, safe=True)
        if not gate_up.uses():
            graph.initializers.pop(gate_up.name)
        lowered += 1
    if lowered:
        model.opset_imports[MS_DOMAIN] = 1
        prune_unused_functions(model)


def ort_routing_attributes(node: ir.Node) -> dict | None:
    """com.microsoft::MoE routing attributes that reproduce `node` exactly, or None if none do."""
    if node.domain != onnx_functions.DOMAIN:
        return None
    attrs = node.attributes
    if node.op_type == "MoE" and attrs["routing_scale"].as_float() == 1.0:
        return {"k": attrs["top_k"].as_int(), "normalize_routing_weights": attrs["norm_topk_prob"].as_int()}
    # Not lowered: CE (no fused op runs it), DeepSeek's routing scale (no such attribute), and
    # SparseMixer: ORT 1.32's CPU MoE with use_sparse_mixer=1 disagreed with Phi-3.5-MoE's routing
    # (max relative logits error 1.5 on a tiny model), so those layers keep their exact function body.
    return None


def prune_unused_functions(model: ir.Model) -> None:
    used = {node.op_type for node in custom_moe_nodes(model)}
    needed = set().union(*(onnx_functions.function_names(op_type) for op_type in used))
    for key in [key for key in model.functions if key[1] not in needed]:
        model.functions.pop(key)
    if not used:
        model.opset_imports.pop(onnx_functions.DOMAIN, None)


class _quiet_exporter:
    """torch.onnx logs a few lines per export at INFO/WARNING; keep the CLI output readable."""

    names = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "torch.fx.experimental.symbolic_shapes")

    def __enter__(self):
        self.levels = {name: logging.getLogger(name).level for name in self.names}
        for name in self.names:
            logging.getLogger(name).setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
