"""ONNX forms of `ce_export::moe`: the custom-domain node and its model-local function bodies.

Each MoE layer becomes one node in the `ce_export` domain:
    MoE(hidden, router_logits, gate_up, down)                 top_k, n_ce=0, norm_topk_prob
    CompressedMoE(hidden, router_logits, gate_up, down, ces)  top_k, n_ce, norm_topk_prob
The model carries one FunctionProto per op type whose body is plain standard ONNX (no scatter
with reduction, which TensorRT rejects; no NonZero), so ONNX Runtime and TensorRT run the same
file without our plugin. The bodies restate moe_math.py:

    logits --Softmax--TopK(K)--> w, sel           (w renormalised over K when norm_topk_prob)
    main = ranks [0, K - n_ce), aux = ranks [K - n_ce, K)
    theta = sum_aux (w_j / sum_aux w) * ces[sel_j]                   (CompressedMoE only)
    x_gate = h * theta0[:H], x_up = h * theta2[:H]
    y = sum_main w_i * down[e_i] @ (silu(gate[e_i] @ x_gate) * (up[e_i] @ x_up) * theta1[:I])

The expert part has two exact forms, chosen by an If on the token count: few tokens (T x main
slots <= E, i.e. decode) gather only the selected experts' weights; many tokens (prefill) run every
expert as three large matmuls masked by the dense routing weights, which bounds memory by T x E x I
instead of copying an expert's weights per (token, slot).
"""

from __future__ import annotations

import onnx
import onnxscript
from onnxscript import FLOAT, INT64
from onnxscript import opset18 as op

DOMAIN = "ce_export"
DOMAIN_VERSION = 1
PLAIN_OP = "MoE"
COMPRESSED_OP = "CompressedMoE"

ce_opset = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


@onnxscript.script(ce_opset, default_opset=op)
def MoE(hidden, router_logits, gate_up, down, top_k: int, norm_topk_prob: int):
    k = op.Reshape(op.Constant(value_int=top_k), op.Constant(value_ints=[1]))
    probs = op.Softmax(op.Cast(router_logits, to=FLOAT.dtype), axis=-1)
    weights, experts = op.TopK(probs, k, axis=-1, largest=1, sorted=1)
    norm = op.Cast(op.Constant(value_int=norm_topk_prob), to=onnx.TensorProto.BOOL)
    weights = op.Where(norm, op.Div(weights, op.ReduceSum(weights, op.Constant(value_ints=[-1]), keepdims=1)), weights)
    weights = op.CastLike(weights, hidden)

    last = op.Constant(value_ints=[-1])
    tokens = op.Shape(hidden, start=0, end=1)
    num_experts = op.Shape(gate_up, start=0, end=1)
    if op.Greater(op.Mul(tokens, k), num_experts):
        # Many tokens: every expert on every token as three large matmuls, masked by the routing
        # weights. Bounded memory (T x E x I), E/K times the active FLOPs.
        dense_weights = op.ReduceSum(
            op.Mul(op.CastLike(op.Equal(op.Unsqueeze(experts, last), op.Range(0, op.Squeeze(num_experts), 1)), hidden),
                   op.Unsqueeze(weights, last)),
            op.Constant(value_ints=[1]), keepdims=0)  # [T, E]
        gate_all, up_all = op.Split(gate_up, axis=1, num_outputs=2)  # [E, I, H] each
        gate = op.MatMul(hidden, op.Transpose(op.Reshape(gate_all, op.Concat(last, op.Shape(hidden, start=1, end=2), axis=0)), perm=[1, 0]))
        up = op.MatMul(hidden, op.Transpose(op.Reshape(up_all, op.Concat(last, op.Shape(hidden, start=1, end=2), axis=0)), perm=[1, 0]))
        act = op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)  # [T, E*I]
        act = op.Reshape(op.Mul(op.Reshape(act, op.Concat(tokens, num_experts, last, axis=0)), op.Unsqueeze(dense_weights, last)),
                         op.Concat(tokens, last, axis=0))
        down_all = op.Reshape(op.Transpose(down, perm=[0, 2, 1]), op.Concat(last, op.Shape(down, start=1, end=2), axis=0))
        out = op.MatMul(act, down_all)
    else:
        # Few tokens (decode): gather only the selected experts' weights.
        x = op.Unsqueeze(hidden, op.Constant(value_ints=[1, -1]))  # [T, 1, H, 1]
        gate_up_out = op.Squeeze(op.MatMul(op.Gather(gate_up, experts, axis=0), x), last)  # [T, K, 2I]
        gate, up = op.Split(gate_up_out, axis=-1, num_outputs=2)
        act = op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)
        y = op.Squeeze(op.MatMul(op.Gather(down, experts, axis=0), op.Unsqueeze(act, last)), last)  # [T, K, H]
        out = op.ReduceSum(op.Mul(y, op.Unsqueeze(weights, last)), op.Constant(value_ints=[1]), keepdims=0)
    return out


@onnxscript.script(ce_opset, default_opset=op)
def CompressedMoE(hidden, router_logits, gate_up, down, ces, top_k: int, n_ce: int, norm_topk_prob: int):
    k = op.Reshape(op.Constant(value_int=top_k), op.Constant(value_ints=[1]))
    n_main = op.Sub(k, op.Reshape(op.Constant(value_int=n_ce), op.Constant(value_ints=[1])))
    probs = op.Softmax(op.Cast(router_logits, to=FLOAT.dtype), axis=-1)
    weights, experts = op.TopK(probs, k, axis=-1, largest=1, sorted=1)
    norm = op.Cast(op.Constant(value_int=norm_topk_prob), to=onnx.TensorProto.BOOL)
    weights = op.Where(norm, op.Div(weights, op.ReduceSum(weights, op.Constant(value_ints=[-1]), keepdims=1)), weights)

    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    last = op.Constant(value_ints=[-1])
    main_weights = op.CastLike(op.Slice(weights, zero, n_main, last), hidden)
    main_experts = op.Slice(experts, zero, n_main, last)
    aux_weights = op.Slice(weights, n_main, k, last)
    aux_experts = op.Slice(experts, n_main, k, last)

    # theta = sum_aux a_j * ces[e_j], a = aux weights renormalised: [T, 3, C]
    mix = op.Div(aux_weights, op.ReduceSum(aux_weights, last, keepdims=1))
    aux_ces = op.Cast(op.Gather(ces, aux_experts, axis=0), to=FLOAT.dtype)  # [T, n_ce, 3, C]
    theta = op.CastLike(op.ReduceSum(op.Mul(aux_ces, op.Unsqueeze(mix, op.Constant(value_ints=[2, 3]))), one, keepdims=0), hidden)
    hidden_size = op.Shape(hidden, start=1, end=2)
    intermediate = op.Shape(down, start=2, end=3)
    two = op.Constant(value_ints=[2])
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
        # Many tokens: all experts as three large matmuls, masked by the main routing weights.
        dense_weights = op.ReduceSum(
            op.Mul(op.CastLike(op.Equal(op.Unsqueeze(main_experts, last), op.Range(0, op.Squeeze(num_experts), 1)), hidden),
                   op.Unsqueeze(main_weights, last)),
            one, keepdims=0)  # [T, E]
        by_row = op.Concat(last, hidden_size, axis=0)
        gate = op.MatMul(x_gate, op.Transpose(op.Reshape(gate_all, by_row), perm=[1, 0]))  # [T, E*I]
        up = op.MatMul(x_up, op.Transpose(op.Reshape(up_all, by_row), perm=[1, 0]))
        per_expert = op.Concat(tokens, num_experts, last, axis=0)
        act = op.Mul(op.Reshape(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), per_expert),
                     op.Mul(op.Unsqueeze(theta_act, one), op.Unsqueeze(dense_weights, last)))  # [T, E, I]
        down_all = op.Reshape(op.Transpose(down, perm=[0, 2, 1]), op.Concat(last, hidden_size, axis=0))  # [E*I, H]
        out = op.MatMul(op.Reshape(act, op.Concat(tokens, last, axis=0)), down_all)
    else:
        # Few tokens (decode): gather only the main experts' weights.
        gate = op.Squeeze(op.MatMul(op.Gather(gate_all, main_experts, axis=0), op.Unsqueeze(x_gate, op.Constant(value_ints=[1, -1]))), last)
        up = op.Squeeze(op.MatMul(op.Gather(up_all, main_experts, axis=0), op.Unsqueeze(x_up, op.Constant(value_ints=[1, -1]))), last)
        act = op.Mul(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), op.Unsqueeze(theta_act, one))  # [T, km, I]
        y = op.Squeeze(op.MatMul(op.Gather(down, main_experts, axis=0), op.Unsqueeze(act, last)), last)  # [T, km, H]
        out = op.ReduceSum(op.Mul(y, op.Unsqueeze(main_weights, last)), one, keepdims=0)
    return out


FUNCTIONS = {PLAIN_OP: MoE, COMPRESSED_OP: CompressedMoE}


def register_schemas() -> None:
    """Make the custom-domain ops known to onnx, so the exporter can emit bodyless call nodes."""
    tensor = "T"
    constraints = [(tensor, ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations and weights")]
    attrs = {
        "top_k": onnx.defs.OpSchema.Attribute("top_k", onnx.defs.OpSchema.AttrType.INT, "routed experts per token"),
        "n_ce": onnx.defs.OpSchema.Attribute("n_ce", onnx.defs.OpSchema.AttrType.INT, "compressed experts"),
        "norm_topk_prob": onnx.defs.OpSchema.Attribute("norm_topk_prob", onnx.defs.OpSchema.AttrType.INT, "renormalise top-k"),
    }
    # TensorRT reads these to bind our plugin; optional, so the portable form stays valid.
    plugin_attrs = [
        onnx.defs.OpSchema.Attribute(name, onnx.defs.OpSchema.AttrType.STRING, "TensorRT plugin lookup", required=False)
        for name in ("plugin_namespace", "plugin_version")
    ]
    inputs = [("hidden", "[T, H]"), ("router_logits", "[T, E]"), ("gate_up", "[E, 2I, H]"), ("down", "[E, H, I]")]
    for name, extra_inputs, attr_names in (
        (PLAIN_OP, [], ("top_k", "norm_topk_prob")),
        (COMPRESSED_OP, [("ces", "[E, 3, C]")], ("top_k", "n_ce", "norm_topk_prob")),
    ):
        if onnx.defs.has(name, DOMAIN):
            continue
        schema = onnx.defs.OpSchema(
            name, DOMAIN, DOMAIN_VERSION,
            inputs=[onnx.defs.OpSchema.FormalParameter(n, tensor, d) for n, d in inputs + extra_inputs],
            outputs=[onnx.defs.OpSchema.FormalParameter("output", tensor, "[T, H]")],
            type_constraints=constraints,
            attributes=[attrs[a] for a in attr_names] + plugin_attrs,
        )
        onnx.defs.register_schema(schema)


def function_proto(op_type: str, model_opset: int) -> onnx.FunctionProto:
    """The body of `op_type`, importing the model's default-domain opset (onnx.checker needs them equal)."""
    proto = FUNCTIONS[op_type].to_function_proto()
    # onnxscript names body nodes n0, n1, ...; every call site would repeat them (TensorRT warns
    # about each duplicate), so leave them unnamed and let runtimes scope them per call.
    for node in proto.node:
        node.name = ""
    for entry in proto.opset_import:
        if entry.domain == "":
            entry.version = model_opset
    return proto
