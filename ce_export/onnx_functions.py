"""ONNX forms of `ce_export::moe`: the custom-domain node and its model-local function bodies.

Each MoE layer becomes one node in the `ce_export` domain, named by routing and by CE:

    op type                    inputs                                          attributes
    MoE                        hidden, router_logits, gate_up, down            top_k, norm_topk_prob, routing_scale
    CompressedMoE              hidden, router_logits, gate_up, down, ces       top_k, n_ce, norm_topk_prob, routing_scale
    SparseMixerMoE             hidden, router_logits, gate_up, down            jitter_eps
    CompressedSparseMixerMoE   hidden, router_logits, gate_up, down, ces       n_ce, jitter_eps

The model carries a FunctionProto for each, composed of smaller functions (a routing function,
then an experts function), all plain standard ONNX: no scatter with reduction (TensorRT rejects
it), no NonZero. So ONNX Runtime and TensorRT run the same file without our plugin. The bodies
restate moe_math.py:

    SoftmaxTopK:      w, sel = TopK(Softmax(logits), K)  (renormalised when norm_topk_prob) * routing_scale
    SparseMixerTop2:  two argmax rounds, each weighted by a softmax over a band around its maximum
    RoutedExperts:    y = sum_k w_k * down[e_k] @ (silu(gate[e_k] @ h) * (up[e_k] @ h))
    CompressedExperts: main = ranks [0, K - n_ce), aux = the rest;
                      theta = sum_aux (w_j / sum_aux w) * ces[sel_j];
                      y = sum_main w_i * down[e_i] @ (silu(gate[e_i] @ (h*theta0)) * (up[e_i] @ (h*theta2)) * theta1)

The experts functions have two exact forms, chosen by an If on the token count: few tokens
(T x slots <= E, i.e. decode) gather only the selected experts' weights; many tokens (prefill)
run every expert as three large matmuls masked by the dense routing weights, which bounds memory
by T x E x I instead of copying an expert's weights per (token, slot).
"""

from __future__ import annotations

import onnx
import onnxscript
from onnxscript import FLOAT
from onnxscript import opset18 as op

from ce_export.moe_math import SOFTMAX_TOPK, SPARSEMIXER

DOMAIN = "ce_export"
DOMAIN_VERSION = 1

ce_opset = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


@onnxscript.script(ce_opset, default_opset=op)
def SoftmaxTopK(router_logits, top_k: int, norm_topk_prob: int, routing_scale: float):
    k = op.Reshape(op.Constant(value_int=top_k), op.Constant(value_ints=[1]))
    probs = op.Softmax(op.Cast(router_logits, to=FLOAT.dtype), axis=-1)
    weights, experts = op.TopK(probs, k, axis=-1, largest=1, sorted=1)
    norm = op.Cast(op.Constant(value_int=norm_topk_prob), to=onnx.TensorProto.BOOL)
    weights = op.Where(norm, op.Div(weights, op.ReduceSum(weights, op.Constant(value_ints=[-1]), keepdims=1)), weights)
    weights = op.Mul(weights, op.Constant(value_float=routing_scale))
    return weights, experts


@onnxscript.script(ce_opset, default_opset=op)
def SparseMixerTop2(router_logits, jitter_eps: float):
    scores = op.Cast(router_logits, to=FLOAT.dtype)
    band = op.Mul(op.Constant(value_float=jitter_eps), op.Constant(value_float=2.0))
    minus_inf = op.Constant(value_float=float("-inf"))
    one = op.Constant(value_ints=[1])
    expert_ids = op.Range(0, op.Squeeze(op.Shape(scores, start=1, end=2)), 1)

    top1, first = op.TopK(scores, one, axis=-1, largest=1, sorted=1)
    outside1 = op.Greater(op.Div(op.Sub(top1, scores), op.Max(op.Abs(scores), top1)), band)
    weight1 = op.GatherElements(op.Softmax(op.Where(outside1, minus_inf, scores), axis=-1), first, axis=-1)

    remaining = op.Where(op.Equal(op.Unsqueeze(expert_ids, op.Constant(value_ints=[0])), first), minus_inf, scores)
    top2, second = op.TopK(remaining, one, axis=-1, largest=1, sorted=1)
    outside2 = op.Greater(op.Div(op.Sub(top2, scores), op.Max(op.Abs(scores), top2)), band)
    weight2 = op.GatherElements(op.Softmax(op.Where(outside2, minus_inf, remaining), axis=-1), second, axis=-1)
    return op.Concat(weight1, weight2, axis=-1), op.Concat(first, second, axis=-1)


@onnxscript.script(ce_opset, default_opset=op)
def RoutedExperts(hidden, weights, experts, gate_up, down):
    weights = op.CastLike(weights, hidden)
    last = op.Constant(value_ints=[-1])
    one = op.Constant(value_ints=[1])
    tokens = op.Shape(hidden, start=0, end=1)
    hidden_size = op.Shape(hidden, start=1, end=2)
    slots = op.Shape(experts, start=1, end=2)
    num_experts = op.Shape(gate_up, start=0, end=1)
    if op.Greater(op.Mul(tokens, slots), num_experts):
        # Many tokens: every expert on every token as large matmuls, masked by the routing weights.
        dense_weights = op.ReduceSum(
            op.Mul(op.CastLike(op.Equal(op.Unsqueeze(experts, last), op.Range(0, op.Squeeze(num_experts), 1)), hidden),
                   op.Unsqueeze(weights, last)),
            one, keepdims=0)  # [T, E]
        gate_all, up_all = op.Split(gate_up, axis=1, num_outputs=2)  # [E, I, H] each
        by_row = op.Concat(last, hidden_size, axis=0)
        gate = op.MatMul(hidden, op.Transpose(op.Reshape(gate_all, by_row), perm=[1, 0]))  # [T, E*I]
        up = op.MatMul(hidden, op.Transpose(op.Reshape(up_all, by_row), perm=[1, 0]))
        act = op.Mul(op.Reshape(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), op.Concat(tokens, num_experts, last, axis=0)),
                     op.Unsqueeze(dense_weights, last))  # [T, E, I]
        down_all = op.Reshape(op.Transpose(down, perm=[0, 2, 1]), by_row)  # [E*I, H]
        out = op.MatMul(op.Reshape(act, op.Concat(tokens, last, axis=0)), down_all)
    else:
        # Few tokens (decode): gather only the selected experts' weights.
        x = op.Unsqueeze(hidden, op.Constant(value_ints=[1, -1]))  # [T, 1, H, 1]
        gate_up_out = op.Squeeze(op.MatMul(op.Gather(gate_up, experts, axis=0), x), last)  # [T, K, 2I]
        gate, up = op.Split(gate_up_out, axis=-1, num_outputs=2)
        act = op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)
        y = op.Squeeze(op.MatMul(op.Gather(down, experts, axis=0), op.Unsqueeze(act, last)), last)  # [T, K, H]
        out = op.ReduceSum(op.Mul(y, op.Unsqueeze(weights, last)), one, keepdims=0)
    return out


@onnxscript.script(ce_opset, default_opset=op)
def CompressedExperts(hidden, weights, experts, gate_up, down, ces, n_ce: int):
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    two = op.Constant(value_ints=[2])
    last = op.Constant(value_ints=[-1])
    k = op.Shape(experts, start=1, end=2)
    n_main = op.Sub(k, op.Reshape(op.Constant(value_int=n_ce), one))
    main_weights = op.CastLike(op.Slice(weights, zero, n_main, last), hidden)
    main_experts = op.Slice(experts, zero, n_main, last)
    aux_weights = op.Slice(weights, n_main, k, last)
    aux_experts = op.Slice(experts, n_main, k, last)

    # theta = sum_aux a_j * ces[e_j], a = the aux weights renormalised: [T, 3, C]
    mix = op.Div(aux_weights, op.ReduceSum(aux_weights, last, keepdims=1))
    aux_ces = op.Cast(op.Gather(ces, aux_experts, axis=0), to=FLOAT.dtype)  # [T, n_ce, 3, C]
    theta = op.CastLike(op.ReduceSum(op.Mul(aux_ces, op.Unsqueeze(mix, op.Constant(value_ints=[2, 3]))), one, keepdims=0), hidden)
    hidden_size = op.Shape(hidden, start=1, end=2)
    intermediate = op.Shape(down, start=2, end=3)
    rows_and_width = op.Constant(value_ints=[1, 2])
    theta_gate = op.Squeeze(op.Slice(theta, op.Concat(zero, zero, axis=0), op.Concat(one, hidden_size, axis=0), rows_and_width), one)
    theta_act = op.Squeeze(op.Slice(theta, op.Concat(one, zero, axis=0), op.Concat(two, intermediate, axis=0), rows_and_width), one)
    theta_up = op.Squeeze(op.Slice(theta, op.Concat(two, zero, axis=0), op.Concat(op.Constant(value_ints=[3]), hidden_size, axis=0), rows_and_width), one)
    x_gate = op.Mul(hidden, theta_gate)  # [T, H]
    x_up = op.Mul(hidden, theta_up)

    tokens = op.Shape(hidden, start=0, end=1)
    num_experts = op.Shape(gate_up, start=0, end=1)
    gate_all, up_all = op.Split(gate_up, axis=1, num_outputs=2)  # [E, I, H] each
    if op.Greater(op.Mul(tokens, n_main), num_experts):
        # Many tokens: all experts as large matmuls, masked by the main routing weights.
        dense_weights = op.ReduceSum(
            op.Mul(op.CastLike(op.Equal(op.Unsqueeze(main_experts, last), op.Range(0, op.Squeeze(num_experts), 1)), hidden),
                   op.Unsqueeze(main_weights, last)),
            one, keepdims=0)  # [T, E]
        by_row = op.Concat(last, hidden_size, axis=0)
        gate = op.MatMul(x_gate, op.Transpose(op.Reshape(gate_all, by_row), perm=[1, 0]))  # [T, E*I]
        up = op.MatMul(x_up, op.Transpose(op.Reshape(up_all, by_row), perm=[1, 0]))
        act = op.Mul(op.Reshape(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), op.Concat(tokens, num_experts, last, axis=0)),
                     op.Mul(op.Unsqueeze(theta_act, one), op.Unsqueeze(dense_weights, last)))  # [T, E, I]
        down_all = op.Reshape(op.Transpose(down, perm=[0, 2, 1]), by_row)  # [E*I, H]
        out = op.MatMul(op.Reshape(act, op.Concat(tokens, last, axis=0)), down_all)
    else:
        # Few tokens (decode): gather only the main experts' weights.
        column = op.Constant(value_ints=[1, -1])
        gate = op.Squeeze(op.MatMul(op.Gather(gate_all, main_experts, axis=0), op.Unsqueeze(x_gate, column)), last)
        up = op.Squeeze(op.MatMul(op.Gather(up_all, main_experts, axis=0), op.Unsqueeze(x_up, column)), last)
        act = op.Mul(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), op.Unsqueeze(theta_act, one))  # [T, km, I]
        y = op.Squeeze(op.MatMul(op.Gather(down, main_experts, axis=0), op.Unsqueeze(act, last)), last)  # [T, km, H]
        out = op.ReduceSum(op.Mul(y, op.Unsqueeze(main_weights, last)), one, keepdims=0)
    return out


@onnxscript.script(ce_opset, default_opset=op)
def MoE(hidden, router_logits, gate_up, down, top_k: int, norm_topk_prob: int, routing_scale: float):
    weights, experts = SoftmaxTopK(router_logits, top_k=top_k, norm_topk_prob=norm_topk_prob, routing_scale=routing_scale)
    return RoutedExperts(hidden, weights, experts, gate_up, down)


@onnxscript.script(ce_opset, default_opset=op)
def CompressedMoE(hidden, router_logits, gate_up, down, ces, top_k: int, n_ce: int, norm_topk_prob: int, routing_scale: float):
    weights, experts = SoftmaxTopK(router_logits, top_k=top_k, norm_topk_prob=norm_topk_prob, routing_scale=routing_scale)
    return CompressedExperts(hidden, weights, experts, gate_up, down, ces, n_ce=n_ce)


@onnxscript.script(ce_opset, default_opset=op)
def SparseMixerMoE(hidden, router_logits, gate_up, down, jitter_eps: float):
    weights, experts = SparseMixerTop2(router_logits, jitter_eps=jitter_eps)
    return RoutedExperts(hidden, weights, experts, gate_up, down)


@onnxscript.script(ce_opset, default_opset=op)
def CompressedSparseMixerMoE(hidden, router_logits, gate_up, down, ces, n_ce: int, jitter_eps: float):
    weights, experts = SparseMixerTop2(router_logits, jitter_eps=jitter_eps)
    return CompressedExperts(hidden, weights, experts, gate_up, down, ces, n_ce=n_ce)


# op type -> (function, the functions its body calls)
OPS = {
    "MoE": (MoE, (SoftmaxTopK, RoutedExperts)),
    "CompressedMoE": (CompressedMoE, (SoftmaxTopK, CompressedExperts)),
    "SparseMixerMoE": (SparseMixerMoE, (SparseMixerTop2, RoutedExperts)),
    "CompressedSparseMixerMoE": (CompressedSparseMixerMoE, (SparseMixerTop2, CompressedExperts)),
}


def op_type_for(routing: str, compressed: bool) -> str:
    base = {SOFTMAX_TOPK: "MoE", SPARSEMIXER: "SparseMixerMoE"}[routing]
    return ("Compressed" + base) if compressed else base


def node_attributes(op_type: str, top_k: int, n_ce: int, norm_topk_prob: bool, routing_scale: float, jitter_eps: float) -> dict:
    """The attributes each op type's schema takes, from the op's arguments."""
    candidates = {"top_k": top_k, "n_ce": n_ce, "norm_topk_prob": int(norm_topk_prob),
                  "routing_scale": float(routing_scale), "jitter_eps": float(jitter_eps)}
    function = OPS[op_type][0]
    return {name: candidates[name] for name in function.to_function_proto().attribute}


def register_schemas() -> None:
    """Make the custom-domain ops known to onnx, so the exporter can emit bodyless call nodes."""
    Attr = onnx.defs.OpSchema.Attribute
    kinds = {"top_k": onnx.defs.OpSchema.AttrType.INT, "n_ce": onnx.defs.OpSchema.AttrType.INT,
             "norm_topk_prob": onnx.defs.OpSchema.AttrType.INT, "routing_scale": onnx.defs.OpSchema.AttrType.FLOAT,
             "jitter_eps": onnx.defs.OpSchema.AttrType.FLOAT}
    constraints = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations and weights"),
                   ("L", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "router logits")]
    # TensorRT reads these to bind our plugin; optional, so the portable form stays valid.
    plugin_attrs = [Attr(name, onnx.defs.OpSchema.AttrType.STRING, "TensorRT plugin lookup", required=False)
                    for name in ("plugin_namespace", "plugin_version")]
    for op_type, (function, _) in OPS.items():
        if onnx.defs.has(op_type, DOMAIN):
            continue
        proto = function.to_function_proto()
        inputs = [onnx.defs.OpSchema.FormalParameter(name, "L" if name == "router_logits" else "T") for name in proto.input]
        schema = onnx.defs.OpSchema(
            op_type, DOMAIN, DOMAIN_VERSION, inputs=inputs,
            outputs=[onnx.defs.OpSchema.FormalParameter("output", "T", "[T, H]")],
            type_constraints=constraints,
            attributes=[Attr(name, kinds[name], name) for name in proto.attribute] + plugin_attrs,
        )
        onnx.defs.register_schema(schema)


def function_protos(op_type: str, model_opset: int) -> list[onnx.FunctionProto]:
    """The body of `op_type` and of the functions it calls, importing the model's default opset
    (onnx.checker needs them equal)."""
    function, helpers = OPS[op_type]
    protos = []
    for fn in (function, *helpers):
        proto = fn.to_function_proto()
        # onnxscript names body nodes n0, n1, ...; every call site would repeat them (TensorRT warns
        # about each duplicate), so leave them unnamed and let runtimes scope them per call.
        clear_node_names(proto.node)
        for entry in proto.opset_import:
            if entry.domain == "":
                entry.version = model_opset
        protos.append(proto)
    return protos


def clear_node_names(nodes) -> None:
    for node in nodes:
        node.name = ""
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                clear_node_names(attribute.g.node)
