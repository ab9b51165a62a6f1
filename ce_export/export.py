"""Stage 3, export: captured model -> model.onnx (KV-cache decoder, one custom node per MoE layer).

torch.onnx.export(dynamo=True) traces the flat KV-cache interface; `ce_export::moe` is translated
to a bodyless `ce_export::MoE` / `ce_export::CompressedMoE` node (the exporter's version converter
would inline a function given at export time), and the function bodies are attached afterwards.
A target then specialises the nodes:
    portable  custom nodes + local functions (any ONNX runtime runs the bodies)
    ort       MoE layers com.microsoft::MoE computes exactly become it (plain softmax top-k, and
              gpt-oss's clamped SwiGLU with biases; CE and other routings stay portable), where the
              installed onnxruntime computes it correctly for the model's dtype (ort_support.py)
    trt       the nodes our plugin implements also carry plugin_namespace / plugin_version, so
              TensorRT binds our plugin when it is loaded and inlines the bodies when it is not

Weights: the model is traced with fake weights (capture.build_traced_model), so the checkpoint
is not read while tracing; each initializer is then bound to the stored tensor it comes from
(`WeightInitializer`: which parameter, in which layout) as an onnx_ir LazyTensor, and transposes
the exporter would fold, the interleaved expert rows of `--target ort` and quantized weights are
lazy tensors too. Saving streams them to the external-data file one at a time, so at most one
tensor (one layer's stacked experts at most) is in memory while the file is written.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir
import torch

from ce_export import onnx_functions, ort_support
from ce_export import quantize as quantize_stage
from ce_export.capture import KvCacheDecoder, empty_past, parameter_sources
from ce_export.dtypes import DTYPE_NAMES
from ce_export.engine import PLUGIN_VERSION
from ce_export.errors import CeExportError, ExportError
from ce_export.io_schema import io_names
from ce_export.manifest import TARGETS, MoeNode
from ce_export.progress import progress_bar
from ce_export.spec import LoadedModel, MoeLayerSpec

log = logging.getLogger(__name__)

# Logits per target unless --logits says otherwise: every position where clients evaluate whole
# sequences (Optimum, perplexity), the last one for TensorRT engines, which serve generation only
# and would otherwise hold max_batch x max_seq x vocab logits (26 GB in fp16 at OLMoE's 64 x 4096).
DEFAULT_LOGITS = {"portable": "all", "ort": "all", "trt": "last"}
OPSET = 20
# Weights beyond this go to model.onnx.data: well under protobuf's 2 GB limit, because an embedded
# model is held whole in memory (twice while it is serialized), while external data is written
# tensor by tensor and memory-mapped by ONNX Runtime.
EXTERNAL_DATA_THRESHOLD = 256 * 1024**2
EXTERNAL_DATA_ALIGNMENT = 65536  # large tensors start at multiples of this (memory mapping)
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    external_data: bool
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    moe_nodes: list[MoeNode]
    opset: int
    quantization: dict | None = None  # what quantize.store_quantized_weights stored, when quantized
    weight_bytes: int = 0  # bytes of every initializer as stored (int4 packed two per byte)
    experts_form: str = onnx_functions.SPARSE  # the experts functions' body (onnx_functions.EXPERTS_FORMS)
    logits: str = "all"  # logits of every position, or of the last one (capture.LOGITS)


def moe_translation(hidden, router_logits, gate_up, down, ces, top_k: int, n_ce: int, norm_topk_prob: bool,
                    routing: str = "softmax_topk", routing_scale: float = 1.0, jitter_eps: float = 0.0,
                    score_bias=None, n_group: int = 1, topk_group: int = 1, gate_up_bias=None, down_bias=None,
                    activation: str = "swiglu", swiglu_alpha: float = 1.0, swiglu_limit: float = 0.0,
                    weights_on_input: bool = False):
    """ce_export::moe -> the bodyless custom node of its routing and expert variant (onnx_functions.OPS)."""
    try:
        op_type = onnx_functions.op_type_for(routing, n_ce > 0, activation, weights_on_input, score_bias is not None)
    except ValueError as error:
        raise ExportError(str(error)) from None
    attributes = onnx_functions.node_attributes(
        op_type, top_k=top_k, n_ce=n_ce, norm_topk_prob=norm_topk_prob, routing_scale=routing_scale,
        jitter_eps=jitter_eps, n_group=n_group, topk_group=topk_group, swiglu_alpha=swiglu_alpha,
        swiglu_limit=swiglu_limit)
    tensors = dict(hidden=hidden, router_logits=router_logits, gate_up=gate_up, down=down, ces=ces,
                   score_bias=score_bias, gate_up_bias=gate_up_bias, down_bias=down_bias)
    inputs = [tensors[name] for name in onnx_functions.node_inputs(op_type)]
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
    logits: str = "all",
) -> ExportResult:
    """Trace `lm` (capture.build_traced_model: fake weights; FP8 activation quantizers from
    quantize.quantize_activations become QuantizeLinear -> DequantizeLinear) and write model.onnx
    with `model`'s weights. `quantize`: the weights quantize_weight quantizes are stored as q and
    scales + DequantizeLinear. `logits`: every position ("all") or the last one ("last"), capture.LOGITS."""
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    onnx_functions.register_schemas()
    dtype = lm.compute_dtype
    decoder = KvCacheDecoder(lm, logits).eval()
    num_layers = model.spec.num_layers
    # Trace with seq >= 2 and past > 0: a traced size of 1 would be specialised into the graph.
    batch, seq, past = 2, 3, 5
    with getattr(lm, "fake_mode", None) or contextlib.nullcontext():
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
    with torch.no_grad(), warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                decoder, sample, dynamo=True, opset_version=opset, optimize=False, verbose=False,
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
    del program
    weights = bind_weights(onnx_model, model, dtype)
    optimize(onnx_model, weights)
    fold_weight_transposes(onnx_model, weights)
    moe_layers = [layer.layer for layer in model.spec.moe_layers if isinstance(layer, MoeLayerSpec)]
    layer_of_node = name_moe_nodes(onnx_model, moe_layers)
    experts_form = experts_form_for(target)
    attach_functions(onnx_model, experts_form)
    if target == "ort":
        blocker = ort_support.moe_lowering_blocker(DTYPE_NAMES.get(dtype, str(dtype)))
        if blocker is None:
            lower_plain_moe_to_ort(onnx_model, weights)
        else:
            warnings.warn(f"--target ort: plain MoE layers keep their exact function bodies: {blocker}", stacklevel=2)
    elif target == "trt":
        mark_plugin_nodes(onnx_model)
    moe_nodes = [moe_node(onnx_model, name, layer) for name, layer in layer_of_node.items()]
    quantization = None
    if quantize:
        quantization = quantize_stage.store_quantized_weights(
            onnx_model, quantize, weights, quantize_stage.quantized_parameters(lm))

    onnx_model.ir_version = ort_support.ir_version_for_runtime(onnx_model.ir_version, dict(onnx_model.opset_imports))
    nbytes = sum(v.const_value.nbytes for v in onnx_model.graph.initializers.values() if v.const_value is not None)
    external = nbytes > EXTERNAL_DATA_THRESHOLD
    onnx_path = out_dir / "model.onnx"
    save_streaming(onnx_model, onnx_path, external, weights)
    dynamic_axes = {value.name: {i: str(d) for i, d in enumerate(value.shape) if not isinstance(d, int)}
                    for value in list(onnx_model.graph.inputs) + list(onnx_model.graph.outputs)}
    return ExportResult(onnx_path, external, input_names, output_names, dynamic_axes, moe_nodes, opset, quantization,
                        nbytes, experts_form, logits)


# ---------------------------------------------------------------- weights, bound lazily

TORCH_TO_IR = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16, torch.bfloat16: ir.DataType.BFLOAT16}
IR_TO_TORCH = {ir_dtype: torch_dtype for torch_dtype, ir_dtype in TORCH_TO_IR.items()}


@dataclass(frozen=True)
class WeightInitializer:
    """Where an initializer's values come from: a parameter of the captured model (its name there),
    in the artifact's dtype, laid out as `layout` says (see `arrange`)."""

    parameter: str
    stored: object  # load.StoredTensor
    dtype: torch.dtype
    layout: tuple = ()  # ("transpose", perm) and/or ("interleave",) steps, applied in order

    def then(self, *step) -> "WeightInitializer":
        return WeightInitializer(self.parameter, self.stored, self.dtype, self.layout + (step,))

    def read(self) -> np.ndarray:
        """The initializer's values (reads the checkpoint)."""
        return arrange(quantize_stage.to_numpy(self.stored.read().to(self.dtype)), self.layout)

    def lazy_tensor(self, name: str, shape) -> ir.LazyTensor:
        return ir.LazyTensor(lambda: ir.Tensor(self.read(), name=name), dtype=TORCH_TO_IR[self.dtype],
                             shape=ir.Shape(shape), name=name)


def arrange(array: np.ndarray, layout: tuple) -> np.ndarray:
    for step in layout:
        if step[0] == "transpose":
            array = np.ascontiguousarray(array.transpose(step[1]))
        elif step[0] == "interleave":
            array = interleave_gate_up(array)
        else:
            raise ValueError(f"unknown layout step {step!r}")
    return array


def interleave_gate_up(array: np.ndarray) -> np.ndarray:
    """[E, 2I, ...] gate rows then up rows -> (g0, u0, g1, u1, ...), com.microsoft::MoE's fc1 layout."""
    experts, two_i = array.shape[:2]
    rows = array.reshape(experts, 2, two_i // 2, *array.shape[2:])
    return np.ascontiguousarray(np.swapaxes(rows, 1, 2)).reshape(array.shape)


def is_fake(tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(getattr(tensor, "raw", None), FakeTensor)


def bind_weights(onnx_model: ir.Model, model: LoadedModel, dtype: torch.dtype) -> dict[str, WeightInitializer]:
    """Give every initializer traced from a fake weight its checkpoint tensor, as a lazy tensor."""
    sources = parameter_sources(model)
    weights = {}
    for name, value in onnx_model.graph.initializers.items():
        if not is_fake(value.const_value):
            continue
        parameter = name.removeprefix("lm.")
        if parameter not in sources:
            raise ExportError(f"exported initializer {name!r} has no tensor in the checkpoint")
        # the traced parameter's own dtype: fp32 routers and score biases stay fp32 in a bf16 model
        weight = WeightInitializer(parameter, sources[parameter], IR_TO_TORCH.get(value.const_value.dtype, dtype))
        value.const_value = weight.lazy_tensor(name, value.shape)
        weights[name] = weight
    return weights


def optimize(onnx_model: ir.Model, weights: dict[str, WeightInitializer]) -> None:
    """torch.onnx's optimization (onnxscript's optimizer), except that transposes of weights are left
    to fold_weight_transposes, which folds them without reading the weights, and that each FP8
    quantizer keeps its own scale (quantize.restore_activation_scales)."""
    import onnxscript.optimizer

    def should_fold(node: ir.Node):
        if node.op_type == "Transpose" and node.domain == "" and node.inputs[0] is not None \
                and node.inputs[0].name in weights:
            return False
        return None

    activation_scales = quantize_stage.activation_scale_inputs(onnx_model)
    onnxscript.optimizer.optimize_ir(onnx_model, should_fold=should_fold)
    quantize_stage.restore_activation_scales(onnx_model, activation_scales)


def fold_weight_transposes(onnx_model: ir.Model, weights: dict[str, WeightInitializer]) -> None:
    """Transpose(weight) -> one initializer holding the transposed weight, where the weight has no other
    use (the rule onnxscript's constant folding applies to large transposes: MatMul(x, W^T))."""
    graph = onnx_model.graph
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain != "":
            continue
        source = node.inputs[0]
        if source is None or source.name not in weights or len(source.uses()) != 1:
            continue
        rank = len(source.shape)
        perm = tuple(node.attributes["perm"].as_ints()) if "perm" in node.attributes else tuple(reversed(range(rank)))
        output = node.outputs[0]
        name = output.name
        shape = [source.shape[axis] for axis in perm]
        weight = weights[source.name].then("transpose", perm)
        folded = ir.Value(name=name, shape=ir.Shape(shape), type=source.type,
                          const_value=weight.lazy_tensor(name, shape))
        graph.remove(node, safe=False)
        output.name = None
        graph.register_initializer(folded)
        ir.convenience.replace_all_uses_with(output, folded)
        for index, graph_output in enumerate(graph.outputs):
            if graph_output is output:
                graph.outputs[index] = folded
        weights[name] = weight
        graph.initializers.pop(source.name)
        del weights[source.name]


def save_streaming(onnx_model: ir.Model, path: Path, external: bool, weights: dict[str, WeightInitializer]) -> None:
    """Write model.onnx; with external data, each weight is read, written and released in turn.
    The checkpoint is read here (lazy tensors): its errors (e.g. non-finite values) surface here."""
    total = sum(v.const_value.nbytes for v in onnx_model.graph.initializers.values() if v.const_value is not None)
    with progress_bar(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="  writing weights",
                      disable=not external) as bar:
        def written(tensor, info) -> None:
            weight = weights.get(tensor.name)
            layer = re.search(r"layers\.(\d+)\.", weight.parameter if weight else tensor.name or "")
            bar.set_postfix_str(f"layer {layer.group(1)}" if layer else "embeddings and head", refresh=False)
            bar.update(tensor.nbytes)

        try:
            if external:
                ir.save(onnx_model, path, external_data=path.name + ".data", alignment=EXTERNAL_DATA_ALIGNMENT,
                        callback=written)
            else:
                ir.save(onnx_model, path)
        except Exception as error:
            raise user_error_in(error) or error


def user_error_in(error: BaseException) -> CeExportError | None:
    """The CeExportError (e.g. a LoadError from reading the checkpoint) an exception wraps, if any:
    onnx_ir's serializer wraps what a lazy tensor raises."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, CeExportError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


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


def name_moe_nodes(model: ir.Model, moe_layers: list[int]) -> dict[str, int]:
    """Give each MoE node a readable name, /model/layers.{l}/mlp/{op_type}; nodes come in layer order.
    Returns each name's layer."""
    nodes = custom_moe_nodes(model)
    if len(nodes) != len(moe_layers):
        raise ExportError(f"exported graph has {len(nodes)} MoE nodes for {len(moe_layers)} MoE layers")
    layer_of_node = {}
    for layer, node in zip(moe_layers, nodes):
        node.name = f"/model/layers.{layer}/mlp/{node.op_type}"
        layer_of_node[node.name] = layer
    return layer_of_node


def moe_node(model: ir.Model, name: str, layer: int) -> MoeNode:
    """The node as the graph finally holds it (ORT lowering replaces some): op_type, domain, and
    whether it carries the plugin attributes TensorRT binds our plugin by."""
    node = next(node for node in model.graph if node.name == name)
    return MoeNode(name=name, op_type=node.op_type, domain=node.domain, plugin="plugin_namespace" in node.attributes,
                   layer=layer)


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
    """plugin_namespace / plugin_version on the nodes our TensorRT plugin implements; TensorRT runs
    the other op types' function bodies (they carry no plugin attributes to bind)."""
    for node in custom_moe_nodes(model):
        if node.op_type in onnx_functions.PLUGIN_OP_TYPES:
            node.attributes["plugin_namespace"] = ir.AttrString("plugin_namespace", onnx_functions.DOMAIN)
            node.attributes["plugin_version"] = ir.AttrString("plugin_version", PLUGIN_VERSION)


def lower_plain_moe_to_ort(model: ir.Model, weights: dict[str, WeightInitializer] | None = None) -> None:
    """Replace each node com.microsoft::MoE computes exactly (ort_moe_attributes) by it.

    ORT's CPU kernel only takes the interleaved layout (g0, u0, g1, u1, ...) of fc1 and its bias, so
    the concatenated [E, 2I, H] initializer (and [E, 2I] bias) is re-laid once here (lazily, when it
    is written, for the weights bound to the checkpoint).
    """
    weights = {} if weights is None else weights
    graph = model.graph
    lowered = 0
    for node in list(graph):
        attributes = ort_moe_attributes(node)
        if attributes is None:
            continue
        named = dict(zip(onnx_functions.node_inputs(node.op_type), node.inputs))
        fc1 = interleaved_initializer(graph, node, named["gate_up"], weights)
        fc1_bias = interleaved_initializer(graph, node, named["gate_up_bias"], weights) if "gate_up_bias" in named else None
        ms_node = ir.node(
            "MoE", [named["hidden"], named["router_logits"], fc1, fc1_bias, named["down"], named.get("down_bias")],
            domain=MS_DOMAIN, name=node.name, attributes={**attributes, "activation_type": "swiglu", "swiglu_fusion": 1},
        )
        graph.insert_after(node, ms_node)
        ir.convenience.replace_all_uses_with(node.outputs, ms_node.outputs, replace_graph_outputs=True)
        ms_node.outputs[0].name, ms_node.outputs[0].shape, ms_node.outputs[0].type = (
            node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type)
        graph.remove(node, safe=True)
        for name in ("gate_up", "gate_up_bias"):
            if name in named and not named[name].uses():
                graph.initializers.pop(named[name].name)
                weights.pop(named[name].name, None)
        lowered += 1
    if lowered:
        model.opset_imports[MS_DOMAIN] = 1
        prune_unused_functions(model)


def interleaved_initializer(graph: ir.Graph, node: ir.Node, value: ir.Value,
                            weights: dict[str, WeightInitializer]) -> ir.Value:
    """A new initializer with `value`'s gate rows then up rows ([E, 2I, ...]) interleaved: g0, u0, g1, u1, ...
    (a lazy tensor when `value` is bound to the checkpoint, in `weights`)."""
    if value.const_value is None:
        raise ExportError(f"{node.name}: {value.name} is not an initializer; cannot lower to com.microsoft::MoE")
    name = f"{value.name}.interleaved"
    if value.name in weights:
        weights[name] = weights[value.name].then("interleave")
        values = weights[name].lazy_tensor(name, value.shape)
    else:
        values = ir.tensor(interleave_gate_up(value.const_value.numpy()), name=name)
    result = ir.Value(name=name, shape=ir.Shape(value.shape), type=value.type, const_value=values)
    graph.register_initializer(result)
    return result


def ort_moe_attributes(node: ir.Node) -> dict | None:
    """com.microsoft::MoE attributes (beyond the fused SwiGLU layout) that reproduce `node` exactly, or
    None if none do."""
    if node.domain != onnx_functions.DOMAIN:
        return None
    attrs = node.attributes
    if node.op_type == "MoE" and attrs["routing_scale"].as_float() == 1.0:
        return {"k": attrs["top_k"].as_int(), "normalize_routing_weights": attrs["norm_topk_prob"].as_int(),
                "activation_alpha": 1.0, "activation_beta": 0.0}
    if (node.op_type == "ClampedSwiGLUMoE" and attrs["routing_scale"].as_float() == 1.0
            and attrs["norm_topk_prob"].as_int() == 1):
        # gpt-oss: softmax over the top-k logits = renormalised softmax top-k; ORT's swiglu with a
        # limit is min(g, limit) * sigmoid(alpha * min(g, limit)) * (clamp(u, -limit, limit) + beta).
        return {"k": attrs["top_k"].as_int(), "normalize_routing_weights": 1,
                "activation_alpha": attrs["swiglu_alpha"].as_float(), "activation_beta": 1.0,
                "swiglu_limit": attrs["swiglu_limit"].as_float()}
    # Not lowered: CE (no fused op runs it), DeepSeek-V2's routing scale (no such attribute), the
    # sigmoid routings (DeepSeek-V3's correction bias and groups, Llama 4's weight on the input:
    # com.microsoft::MoE routes by softmax only), and SparseMixer: ORT 1.32's CPU MoE with
    # use_sparse_mixer=1 disagreed with Phi-3.5-MoE's routing (max relative logits error 1.5 on a
    # tiny model), so those layers keep their exact function body.
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
