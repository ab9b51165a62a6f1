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

Experts are gathered per (token, main slot): exact, bounded by T * (K - n_ce) expert copies.
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
    weights_sum = op.ReduceSum(weights, op.Constant(value_ints=[-1]), keepdims=1)
    norm = op.Cast(op.Constant(value_int=norm_topk_prob), to=onnx.TensorProto.BOOL)
    weights = op.Where(norm, op.Div(weights, weights_sum), weights)

    gate_up_sel = op.Gather(gate_up, experts, axis=0)  # [T, K, 2I, H]
    down_sel = op.Gather(down, experts, axis=0)  # [T, K, H, I]
    x = op.Unsqueeze(op.Unsqueeze(hidden, op.Constant(value_ints=[1])), op.Constant(value_ints=[-1]))  # [T,1,H,1]
    gate_up_out = op.Squeeze(op.MatMul(gate_up_sel, x), op.Constant(value_ints=[-1]))  # [T, K, 2I]
    gate, up = op.Split(gate_up_out, axis=-1, num_outputs=2)
    act = op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)
    y = op.Squeeze(op.MatMul(down_sel, op.Unsqueeze(act, op.Constant(value_ints=[-1]))), op.Constant(value_ints=[-1]))
    y = op.Mul(y, op.Unsqueeze(op.CastLike(weights, hidden), op.Constant(value_ints=[-1])))
    return op.ReduceSum(y, op.Constant(value_ints=[1]), keepdims=0)


@onnxscript.script(ce_opset, default_opset=op)
def CompressedMoE(hidden, router_logits, gate_up, down, ces, top_k: int, n_ce: int, norm_topk_prob: int):
    k = op.Reshape(op.Constant(value_int=top_k), op.Constant(value_ints=[1]))
    n_main = op.Sub(k, op.Reshape(op.Constant(value_int=n_ce), op.Constant(value_ints=[1])))
    probs = op.Softmax(op.Cast(router_logits, to=FLOAT.dtype), axis=-1)
    weights, experts = op.TopK(probs, k, axis=-1, largest=1, sorted=1)
    weights_sum = op.ReduceSum(weights, op.Constant(value_ints=[-1]), keepdims=1)
    norm = op.Cast(op.Constant(value_int=norm_topk_prob), to=onnx.TensorProto.BOOL)
    weights = op.Where(norm, op.Div(weights, weights_sum), weights)

    zero = op.Constant(value_ints=[0])
    last_axis = op.Constant(value_ints=[-1])
    main_weights = op.Slice(weights, zero, n_main, last_axis)
    main_experts = op.Slice(experts, zero, n_main, last_axis)
    aux_weights = op.Slice(weights, n_main, k, last_axis)
    aux_experts = op.Slice(experts, n_main, k, last_axis)

    mix = op.Div(aux_weights, op.ReduceSum(aux_weights, last_axis, keepdims=1))  # [T, n_ce]
    aux_ces = op.Cast(op.Gather(ces, aux_experts, axis=0), to=FLOAT.dtype)  # [T, n_ce, 3, C]
    mix4 = op.Unsqueeze(mix, op.Constant(value_ints=[2, 3]))
    theta = op.CastLike(op.ReduceSum(op.Mul(aux_ces, mix4), op.Constant(value_ints=[1]), keepdims=0), hidden)  # [T,3,C]

    hidden_size = op.Shape(hidden, start=1, end=2)
    intermediate = op.Shape(down, start=2, end=3)
    one = op.Constant(value_ints=[1])
    two = op.Constant(value_ints=[2])
    three = op.Constant(value_ints=[3])
    axes_rc = op.Constant(value_ints=[1, 2])
    theta_gate = op.Squeeze(op.Slice(theta, op.Concat(zero, zero, axis=0), op.Concat(one, hidden_size, axis=0), axes_rc), one)
    theta_act = op.Squeeze(op.Slice(theta, op.Concat(one, zero, axis=0), op.Concat(two, intermediate, axis=0), axes_rc), one)
    theta_up = op.Squeeze(op.Slice(theta, op.Concat(two, zero, axis=0), op.Concat(three, hidden_size, axis=0), axes_rc), one)

    gate_up_sel = op.Gather(gate_up, main_experts, axis=0)  # [T, km, 2I, H]
    down_sel = op.Gather(down, main_experts, axis=0)  # [T, km, H, I]
    gate_w, up_w = op.Split(gate_up_sel, axis=2, num_outputs=2)  # [T, km, I, H] each
    x_gate = op.Unsqueeze(op.Mul(hidden, theta_gate), op.Constant(value_ints=[1, -1]))  # [T,1,H,1]
    x_up = op.Unsqueeze(op.Mul(hidden, theta_up), op.Constant(value_ints=[1, -1]))
    gate = op.Squeeze(op.MatMul(gate_w, x_gate), last_axis)  # [T, km, I]
    up = op.Squeeze(op.MatMul(up_w, x_up), last_axis)
    act = op.Mul(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), op.Unsqueeze(theta_act, one))
    y = op.Squeeze(op.MatMul(down_sel, op.Unsqueeze(act, last_axis)), last_axis)  # [T, km, H]
    y = op.Mul(y, op.Unsqueeze(op.CastLike(main_weights, hidden), last_axis))
    return op.ReduceSum(y, one, keepdims=0)


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
    for entry in proto.opset_import:
        if entry.domain == "":
            entry.version = model_opset
    return proto
