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

Both experts functions scale the inputs (CE) and hand the main slots to SwiGLUExperts, whose body
is one of two exact forms, chosen per target at export (EXPERTS_FORMS):

    sparse (portable, ort)  computes only the routed (token, expert) pairs, at every token count.
                            ExpertTable lays the pairs out by expert (a counting sort: one-hot
                            counts, CumSum ranks, one ScatterElements without reduction); a Scan
                            over the experts runs each expert on exactly its own rows, reading its
                            weights in place (an empty expert costs one If; an expert with one
                            token takes a matrix-vector path); a Gather brings the rows back. Its [E, C, H]
                            intermediate is sized by the busiest expert's count C: at worst (every
                            token routed to the same experts) C = T, i.e. E x T x H elements, less
                            than the fixed-shape form's 3 x T x E x I. Shapes come from the routing,
                            so a GPU runtime reads a count on the host for each expert.
                            ONNX Runtime CPU measured it faster than gathering the experts' weights
                            even at one token (benchmarks/results/moe-layer-cpu-2core/).
    fixed-shape (trt)       shapes from input shapes only, since TensorRT cannot size a tensor from
                            values (TensorRT's sparse path is our plugin): gathered weights while
                            T x slots <= E, else every expert on every token as three large matmuls
                            masked by the routing weights (bounded by T x E x I).
"""

from __future__ import annotations

import onnx
import onnxscript
from onnxscript import FLOAT, INT64
from onnxscript import opset18 as op

from ce_export.moe_math import CLAMPED_SWIGLU, SIGMOID_TOPK, SOFTMAX_TOPK, SPARSEMIXER, SWIGLU

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
def SigmoidTopK(router_logits, score_bias, top_k: int, norm_topk_prob: int, routing_scale: float, n_group: int,
                topk_group: int):
    """DeepSeek-V3's routing: the experts with the best sigmoid(logits) + score_bias within the best
    topk_group of n_group groups (a group scores the sum of its two best), weighted by their
    unbiased sigmoid scores (renormalised with a 1e-20 guard when norm_topk_prob), times routing_scale."""
    scores = op.Sigmoid(op.Cast(router_logits, to=FLOAT.dtype))
    choice = op.Add(scores, op.Cast(score_bias, to=FLOAT.dtype))
    last = op.Constant(value_ints=[-1])
    tokens = op.Shape(choice, start=0, end=1)
    groups = op.Reshape(op.Constant(value_int=n_group), op.Constant(value_ints=[1]))
    grouped = op.Reshape(choice, op.Concat(tokens, groups, last, axis=0))  # [T, G, E/G]
    best_two, best_two_ids = op.TopK(grouped, op.Constant(value_ints=[2]), axis=-1, largest=1, sorted=1)
    group_scores = op.ReduceSum(best_two, last, keepdims=0)  # [T, G]
    best_group_scores, best_groups = op.TopK(group_scores, op.Reshape(op.Constant(value_int=topk_group), op.Constant(value_ints=[1])),
                             axis=-1, largest=1, sorted=1)  # [T, topk_group]
    hits = op.Cast(op.Equal(op.Unsqueeze(best_groups, last), op.Range(0, op.Squeeze(groups), 1)), to=FLOAT.dtype)
    kept = op.Greater(op.ReduceMax(hits, op.Constant(value_ints=[1]), keepdims=0), op.Constant(value_float=0.5))  # [T, G]
    kept = op.Reshape(op.Expand(op.Unsqueeze(kept, last), op.Shape(grouped)), op.Shape(choice))
    choice = op.Where(kept, choice, op.Constant(value_float=float("-inf")))
    k = op.Reshape(op.Constant(value_int=top_k), op.Constant(value_ints=[1]))
    best_choices, experts = op.TopK(choice, k, axis=-1, largest=1, sorted=1)
    weights = op.GatherElements(scores, experts, axis=-1)
    norm = op.Cast(op.Constant(value_int=norm_topk_prob), to=onnx.TensorProto.BOOL)
    total = op.Add(op.ReduceSum(weights, last, keepdims=1), op.Constant(value_float=1e-20))
    weights = op.Where(norm, op.Div(weights, total), weights)
    weights = op.Mul(weights, op.Constant(value_float=routing_scale))
    return weights, experts


# ---------------------------------------------------------------- experts
# Every experts function takes the inputs of the main experts' SwiGLU already scaled:
#     x_gate [T, H], x_up [T, H]  (hidden, or hidden * theta0 / theta2 for CE)
#     act_scale [T, I] or [T, 1]  (theta1 for CE, ones otherwise)
#     weights [T, S], experts [T, S]  (S routed slots: the main experts for CE, all K otherwise)
# and returns sum_s weights[t, s] * down[e] @ (silu(gate[e] @ x_gate[t]) * (up[e] @ x_up[t]) * act_scale[t]).
# gpt-oss's experts add biases on gate/up [E, 2I] (gate columns first, then up) and down [E, H], and
# use ClampedSwiGLU. Each form (sparse, gathered, dense) is built from the pieces below, so that the
# two variants differ only in those biases and the activation.


@onnxscript.script(ce_opset, default_opset=op)
def ClampedSwiGLU(gate, up, limit, alpha):
    """gpt-oss's activation: min(g, limit) * sigmoid(alpha * min(g, limit)) * (clamp(u, -limit, limit) + 1)."""
    gate = op.Min(gate, limit)
    up = op.Max(op.Min(up, limit), op.Neg(limit))
    return op.Mul(op.Mul(gate, op.Sigmoid(op.Mul(gate, alpha))), op.Add(up, op.CastLike(1.0, limit)))


@onnxscript.script(ce_opset, default_opset=op)
def WeightedSlots(y, weights):
    """y [T, S, H] -> sum_s weights[t, s] * y[t, s]  [T, H], as one batched [1, S] x [S, H] MatMul
    per token (ONNX Runtime's Mul then ReduceSum over the middle axis took 5x longer at T = 256)."""
    one = op.Constant(value_ints=[1])
    return op.Squeeze(op.MatMul(op.Unsqueeze(op.CastLike(weights, y), one), y), one)


@onnxscript.script(ce_opset, default_opset=op)
def GatheredProjections(x_gate, x_up, experts, gate_up, down):
    """Few tokens (decode): each (token, slot) pair's gate and up projections through its expert's
    gathered weights, batched matmuls: [T, S, 2, I]."""
    tokens = op.Shape(x_gate, start=0, end=1)
    hidden_size = op.Shape(x_gate, start=1, end=2)
    slots = op.Shape(experts, start=1, end=2)
    intermediate = op.Shape(down, start=2, end=3)
    # [T, S, 2, I, H]: the gate rows and the up rows of each pair's expert
    pair_gate_up = op.Reshape(op.Gather(gate_up, experts, axis=0),
                              op.Concat(tokens, slots, op.Constant(value_ints=[2]), intermediate, hidden_size, axis=0))
    # [T, 1, 2, H, 1]: x_gate against the gate rows, x_up against the up rows
    inputs = op.Unsqueeze(op.Concat(op.Unsqueeze(x_gate, op.Constant(value_ints=[1])),
                                    op.Unsqueeze(x_up, op.Constant(value_ints=[1])), axis=1),
                          op.Constant(value_ints=[1, 4]))
    return op.Squeeze(op.MatMul(pair_gate_up, inputs), op.Constant(value_ints=[-1]))


@onnxscript.script(ce_opset, default_opset=op)
def GatheredDown(act, act_scale, experts, down):
    """The pairs' activations [T, S, 1, I], times act_scale, through their experts' gathered down
    weights: [T, S, H]."""
    last = op.Constant(value_ints=[-1])
    scaled = op.Mul(op.Squeeze(act, op.Constant(value_ints=[2])), op.Unsqueeze(act_scale, op.Constant(value_ints=[1])))
    return op.Squeeze(op.MatMul(op.Gather(down, experts, axis=0), op.Unsqueeze(scaled, last)), last)


@onnxscript.script(ce_opset, default_opset=op)
def GatheredSwiGLU(x_gate, x_up, act_scale, weights, experts, gate_up, down):
    gate, up = op.Split(GatheredProjections(x_gate, x_up, experts, gate_up, down), axis=2, num_outputs=2)
    return WeightedSlots(GatheredDown(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), act_scale, experts, down), weights)


@onnxscript.script(ce_opset, default_opset=op)
def GatheredClampedSwiGLU(x_gate, x_up, act_scale, weights, experts, gate_up, down, gate_up_bias, down_bias,
                          swiglu_alpha: float, swiglu_limit: float):
    projected = GatheredProjections(x_gate, x_up, experts, gate_up, down)
    projected = op.Add(projected, op.Reshape(op.CastLike(op.Gather(gate_up_bias, experts, axis=0), x_gate),
                                             op.Shape(projected)))
    gate, up = op.Split(projected, axis=2, num_outputs=2)
    act = ClampedSwiGLU(gate, up, op.CastLike(op.Constant(value_float=swiglu_limit), x_gate),
                        op.CastLike(op.Constant(value_float=swiglu_alpha), x_gate))
    y = op.Add(GatheredDown(act, act_scale, experts, down), op.CastLike(op.Gather(down_bias, experts, axis=0), x_gate))
    return WeightedSlots(y, weights)


@onnxscript.script(ce_opset, default_opset=op)
def ExpertTable(experts, num_experts):
    """A counting sort of the (token, slot) pairs by expert, with no sort, NonZero or scatter-add.

    experts [T, S], num_experts [1] -> (counts [E, 1], table [E, C] of token ids, each expert's
    tokens first and in token order, padded with token 0; slot [T*S]: each pair's row in the
    flattened table); C = the largest count, a size that comes from the routing.
    """
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    pair_experts = op.Reshape(experts, op.Constant(value_ints=[-1]))  # [N]
    one_hot = op.Cast(op.Equal(op.Unsqueeze(pair_experts, one), op.Range(0, op.Squeeze(num_experts), 1)),
                      to=onnx.TensorProto.INT32)  # [N, E]
    counts = op.Cast(op.ReduceSum(one_hot, zero, keepdims=0), to=INT64.dtype)  # [E]
    earlier = op.CumSum(one_hot, op.Constant(value_int=0), exclusive=1)  # pairs before, per expert
    rank = op.Cast(op.GatherElements(earlier, op.Unsqueeze(pair_experts, one), axis=1), to=INT64.dtype)  # [N, 1]
    capacity = op.ReduceMax(counts, keepdims=1)  # [1]
    slot = op.Add(op.Mul(pair_experts, capacity), op.Squeeze(rank, one))  # [N]
    slots_per_token = op.Shape(experts, start=1, end=2)
    token_of_pair = op.Div(op.Range(0, op.Squeeze(op.Shape(pair_experts)), 1), slots_per_token)
    table = op.ScatterElements(op.Expand(op.Constant(value_int=0), op.Mul(num_experts, capacity)), slot, token_of_pair)
    return op.Unsqueeze(counts, one), op.Reshape(table, op.Concat(num_experts, capacity, axis=0)), slot


@onnxscript.script(ce_opset, default_opset=op)
def SparseLayout(x_gate, x_up, act_scale, experts, gate_up, down):
    """What the sparse form's Scan over the experts takes: (counts [E, 1], table [E, C], slot [T*S])
    from ExpertTable; pads [E, 6], each expert's rows padded to C; x_both [T, 2, H], the gate and up
    inputs side by side; scale_rows [T, 1, I or 1]; halves [E, 2, I, H], the gate and up weights;
    empty [1, C, H], an idle expert's output."""
    one = op.Constant(value_ints=[1])
    hidden_size = op.Shape(x_gate, start=1, end=2)
    num_experts = op.Shape(gate_up, start=0, end=1)
    counts, table, slot = ExpertTable(experts, num_experts)
    capacity = op.Shape(table, start=1, end=2)
    # Pad's [begin x 3, end x 3] for a [1, c, H] output: C - c rows at the end of axis 1
    pads = op.Mul(op.Sub(capacity, counts), op.Constant(value_ints=[0, 0, 0, 0, 1, 0]))
    x_both = op.Concat(op.Unsqueeze(x_gate, one), op.Unsqueeze(x_up, one), axis=1)
    halves = op.Reshape(gate_up, op.Concat(num_experts, op.Constant(value_ints=[2]), op.Shape(down, start=2, end=3),
                                           hidden_size, axis=0))
    empty = op.Expand(op.CastLike(op.Constant(value_float=0.0), x_gate), op.Concat(one, capacity, hidden_size, axis=0))
    return counts, table, slot, pads, x_both, op.Unsqueeze(act_scale, one), halves, empty


@onnxscript.script(ce_opset, default_opset=op)
def OneTokenColumns(rows, tokens):
    """An expert's one token of rows [T, A, B] as the column [A, B, 1] its rows function takes, by
    Reshape: a plain matrix-vector product (ONNX Runtime's fused transposed form reads the weights
    at about half that bandwidth)."""
    first = op.Gather(tokens, op.Constant(value_int=0), axis=0)  # a scalar index: Gather drops the axis
    return op.Unsqueeze(op.Gather(rows, first, axis=0), op.Constant(value_ints=[-1]))


@onnxscript.script(ce_opset, default_opset=op)
def TokenColumns(rows, tokens, count):
    """An expert's c > 1 tokens of rows [T, A, B] as the columns [A, B, c] its rows function takes, by
    Transpose, which ONNX Runtime fuses into the MatMul (its fastest form there)."""
    return op.Transpose(op.Gather(rows, op.Slice(tokens, op.Constant(value_ints=[0]), count), axis=0), perm=[1, 2, 0])


@onnxscript.script(ce_opset, default_opset=op)
def ExpertRows(expert_halves, expert_down, columns, scale_columns, expert_pads):
    """One expert of the sparse form on its c tokens, its weights read in place as the left operand:
    columns [2, H, c] (the gate and up inputs), scale_columns [1, I or 1, c]; the [1, c, H] result
    padded to the busiest expert's [1, C, H]."""
    gate, up = op.Split(op.MatMul(expert_halves, columns), axis=0, num_outputs=2)  # [1, I, c] each
    act = op.Mul(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), scale_columns)
    return op.Pad(op.Transpose(op.MatMul(expert_down, act), perm=[0, 2, 1]), expert_pads)


@onnxscript.script(ce_opset, default_opset=op)
def ClampedExpertRows(expert_halves, expert_down, expert_half_bias, expert_down_bias, columns, scale_columns,
                      expert_pads, limit, alpha):
    """ExpertRows with the biases and gpt-oss's clamped activation (limit and alpha as tensors)."""
    gate, up = op.Split(op.Add(op.MatMul(expert_halves, columns), expert_half_bias), axis=0, num_outputs=2)
    act = op.Mul(ClampedSwiGLU(gate, up, limit, alpha), scale_columns)
    y = op.Add(op.Transpose(op.MatMul(expert_down, act), perm=[0, 2, 1]), expert_down_bias)  # [1, c, H]
    return op.Pad(y, expert_pads)


@onnxscript.script(ce_opset, default_opset=op)
def PairRows(per_expert, slot, x_gate, experts):
    """The Scan's [E, 1, C, H] output back in (token, slot) order: [T, S, H]."""
    hidden_size = op.Shape(x_gate, start=1, end=2)
    y = op.Gather(op.Reshape(per_expert, op.Concat(op.Constant(value_ints=[-1]), hidden_size, axis=0)), slot, axis=0)
    return op.Reshape(y, op.Concat(op.Shape(x_gate, start=0, end=1), op.Shape(experts, start=1, end=2), hidden_size,
                                   axis=0))


@onnxscript.script(ce_opset, default_opset=op)
def SwiGLUExperts(x_gate, x_up, act_scale, weights, experts, gate_up, down):
    """The sparse form: only the routed pairs, one expert at a time, at every token count.

    A Scan over the experts hands each iteration its expert's weights in place (Scan slices its
    inputs without copying them) and that expert's rows of the table; it computes exactly those
    rows and pads its [c, H] output to [C, H]. PairRows then brings each pair's row back. The body
    runs once per expert, busy or not, so an empty expert takes an If straight to zeros, and an
    expert with one token its own matrix-vector path (most experts in decode). Each branch calls the
    rows function itself, so that ONNX Runtime sees the Transpose and the MatMul together. (The trt
    target's file carries SwiGLUExpertsFixedShape under this name instead.)
    """
    counts, table, slot, pads, x_both, scale_rows, halves, empty = SparseLayout(
        x_gate, x_up, act_scale, experts, gate_up, down)

    @onnxscript.graph()
    def one_expert(expert_halves, expert_down, count, expert_pads, tokens):
        if op.Equal(count, op.Constant(value_ints=[0])):
            out = op.Identity(empty)
        else:
            if op.Equal(count, op.Constant(value_ints=[1])):
                out = ExpertRows(expert_halves, expert_down, OneTokenColumns(x_both, tokens),
                                 OneTokenColumns(scale_rows, tokens), expert_pads)
            else:
                out = ExpertRows(expert_halves, expert_down, TokenColumns(x_both, tokens, count),
                                 TokenColumns(scale_rows, tokens, count), expert_pads)
        return out

    per_expert = op.Scan(halves, down, counts, pads, table, body=one_expert, num_scan_inputs=5)  # [E, 1, C, H]
    return WeightedSlots(PairRows(per_expert, slot, x_gate, experts), weights)


@onnxscript.script(ce_opset, default_opset=op)
def ClampedSwiGLUExperts(x_gate, x_up, act_scale, weights, experts, gate_up, down, gate_up_bias, down_bias,
                         swiglu_alpha: float, swiglu_limit: float):
    """The sparse form (SwiGLUExperts's), with the biases and gpt-oss's clamped activation."""
    one = op.Constant(value_ints=[1])
    counts, table, slot, pads, x_both, scale_rows, halves, empty = SparseLayout(
        x_gate, x_up, act_scale, experts, gate_up, down)
    per_expert_shape = op.Concat(op.Shape(gate_up, start=0, end=1), op.Constant(value_ints=[2]), op.Shape(down, start=2, end=3),
                                 one, axis=0)
    half_biases = op.Reshape(op.CastLike(gate_up_bias, x_gate), per_expert_shape)  # [E, 2, I, 1]
    down_biases = op.Reshape(op.CastLike(down_bias, x_gate), op.Concat(op.Shape(down, start=0, end=1), one, one,
                                                                       op.Shape(x_gate, start=1, end=2), axis=0))
    limit = op.CastLike(op.Constant(value_float=swiglu_limit), x_gate)
    alpha = op.CastLike(op.Constant(value_float=swiglu_alpha), x_gate)

    @onnxscript.graph()
    def one_expert(expert_halves, expert_down, expert_half_bias, expert_down_bias, count, expert_pads, tokens):
        if op.Equal(count, op.Constant(value_ints=[0])):
            out = op.Identity(empty)
        else:
            if op.Equal(count, op.Constant(value_ints=[1])):
                out = ClampedExpertRows(expert_halves, expert_down, expert_half_bias, expert_down_bias,
                                        OneTokenColumns(x_both, tokens), OneTokenColumns(scale_rows, tokens),
                                        expert_pads, limit, alpha)
            else:
                out = ClampedExpertRows(expert_halves, expert_down, expert_half_bias, expert_down_bias,
                                        TokenColumns(x_both, tokens, count), TokenColumns(scale_rows, tokens, count),
                                        expert_pads, limit, alpha)
        return out

    per_expert = op.Scan(halves, down, half_biases, down_biases, counts, pads, table, body=one_expert,
                         num_scan_inputs=7)  # [E, 1, C, H]
    return WeightedSlots(PairRows(per_expert, slot, x_gate, experts), weights)


@onnxscript.script(ce_opset, default_opset=op)
def DenseProjections(x_gate, x_up, weights, experts, gate_up):
    """Many tokens, fixed shapes only (TensorRT cannot size a tensor from values): every expert's gate
    and up projections of every token as two large matmuls, [T, E*I] each, and the routing weights
    spread over the experts, [T, E] (zero where a token is not routed)."""
    last = op.Constant(value_ints=[-1])
    num_experts = op.Shape(gate_up, start=0, end=1)
    dense_weights = op.ReduceSum(
        op.Mul(op.CastLike(op.Equal(op.Unsqueeze(experts, last), op.Range(0, op.Squeeze(num_experts), 1)), x_gate),
               op.Unsqueeze(op.CastLike(weights, x_gate), last)),
        op.Constant(value_ints=[1]), keepdims=0)
    gate_all, up_all = op.Split(gate_up, axis=1, num_outputs=2)  # [E, I, H] each
    by_row = op.Concat(last, op.Shape(x_gate, start=1, end=2), axis=0)
    gate = op.MatMul(x_gate, op.Transpose(op.Reshape(gate_all, by_row), perm=[1, 0]))
    up = op.MatMul(x_up, op.Transpose(op.Reshape(up_all, by_row), perm=[1, 0]))
    return gate, up, dense_weights


@onnxscript.script(ce_opset, default_opset=op)
def DenseDown(act, act_scale, dense_weights, down):
    """Every expert's activations [T, E*I], times act_scale and masked by the routing weights, through
    the down weights of all experts as one matmul: [T, H]."""
    last = op.Constant(value_ints=[-1])
    one = op.Constant(value_ints=[1])
    tokens = op.Shape(act, start=0, end=1)
    per_expert = op.Reshape(act, op.Concat(tokens, op.Shape(down, start=0, end=1), last, axis=0))  # [T, E, I]
    masked = op.Mul(per_expert, op.Mul(op.Unsqueeze(act_scale, one), op.Unsqueeze(dense_weights, last)))
    down_all = op.Reshape(op.Transpose(down, perm=[0, 2, 1]), op.Concat(last, op.Shape(down, start=1, end=2), axis=0))
    return op.MatMul(op.Reshape(masked, op.Concat(tokens, last, axis=0)), down_all)  # down_all: [E*I, H]


@onnxscript.script(ce_opset, default_opset=op)
def DenseSwiGLU(x_gate, x_up, act_scale, weights, experts, gate_up, down):
    gate, up, dense_weights = DenseProjections(x_gate, x_up, weights, experts, gate_up)
    return DenseDown(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), act_scale, dense_weights, down)


@onnxscript.script(ce_opset, default_opset=op)
def DenseClampedSwiGLU(x_gate, x_up, act_scale, weights, experts, gate_up, down, gate_up_bias, down_bias,
                       swiglu_alpha: float, swiglu_limit: float):
    last = op.Constant(value_ints=[-1])
    gate, up, dense_weights = DenseProjections(x_gate, x_up, weights, experts, gate_up)
    gate_bias, up_bias = op.Split(op.CastLike(gate_up_bias, x_gate), axis=1, num_outputs=2)  # [E, I] each
    act = ClampedSwiGLU(op.Add(gate, op.Reshape(gate_bias, last)), op.Add(up, op.Reshape(up_bias, last)),
                        op.CastLike(op.Constant(value_float=swiglu_limit), x_gate),
                        op.CastLike(op.Constant(value_float=swiglu_alpha), x_gate))
    return op.Add(DenseDown(act, act_scale, dense_weights, down), op.MatMul(dense_weights, op.CastLike(down_bias, x_gate)))


@onnxscript.script(ce_opset, default_opset=op)
def SwiGLUExpertsFixedShape(x_gate, x_up, act_scale, weights, experts, gate_up, down):
    """The fixed-shape form (trt target; TensorRT's sparse path is our plugin): gathered weights
    while T x S <= E, else dense masked matmuls over every expert."""
    pairs = op.Mul(op.Shape(x_gate, start=0, end=1), op.Shape(experts, start=1, end=2))
    if op.Greater(pairs, op.Shape(gate_up, start=0, end=1)):
        out = DenseSwiGLU(x_gate, x_up, act_scale, weights, experts, gate_up, down)
    else:
        out = GatheredSwiGLU(x_gate, x_up, act_scale, weights, experts, gate_up, down)
    return out


@onnxscript.script(ce_opset, default_opset=op)
def ClampedSwiGLUExpertsFixedShape(x_gate, x_up, act_scale, weights, experts, gate_up, down, gate_up_bias, down_bias,
                                   swiglu_alpha: float, swiglu_limit: float):
    """SwiGLUExpertsFixedShape's switch, for the clamped experts."""
    pairs = op.Mul(op.Shape(x_gate, start=0, end=1), op.Shape(experts, start=1, end=2))
    if op.Greater(pairs, op.Shape(gate_up, start=0, end=1)):
        out = DenseClampedSwiGLU(x_gate, x_up, act_scale, weights, experts, gate_up, down, gate_up_bias, down_bias,
                                 swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
    else:
        out = GatheredClampedSwiGLU(x_gate, x_up, act_scale, weights, experts, gate_up, down, gate_up_bias, down_bias,
                                    swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
    return out


@onnxscript.script(ce_opset, default_opset=op)
def RoutedExperts(hidden, weights, experts, gate_up, down):
    ones = op.CastLike(op.Expand(op.Constant(value_float=1.0), op.Concat(op.Shape(hidden, start=0, end=1),
                                                                           op.Constant(value_ints=[1]), axis=0)), hidden)
    return SwiGLUExperts(hidden, hidden, ones, weights, experts, gate_up, down)


@onnxscript.script(ce_opset, default_opset=op)
def CompressedInputs(hidden, weights, experts, down, ces, n_ce: int):
    """CE: the main experts' scaled inputs. main = ranks [0, K - n_ce), aux = the rest;
    theta = sum_aux (w_j / sum_aux w) * ces[e_j]  [T, 3, C];
    returns (hidden * theta0, hidden * theta2, theta1, the main slots' weights and experts)."""
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    two = op.Constant(value_ints=[2])
    last = op.Constant(value_ints=[-1])
    k = op.Shape(experts, start=1, end=2)
    n_main = op.Sub(k, op.Reshape(op.Constant(value_int=n_ce), one))
    main_weights = op.Slice(weights, zero, n_main, last)
    main_experts = op.Slice(experts, zero, n_main, last)
    aux_weights = op.Slice(weights, n_main, k, last)
    aux_experts = op.Slice(experts, n_main, k, last)

    mix = op.Div(aux_weights, op.ReduceSum(aux_weights, last, keepdims=1))
    aux_ces = op.Cast(op.Gather(ces, aux_experts, axis=0), to=FLOAT.dtype)  # [T, n_ce, 3, C]
    flat_ces = op.Reshape(aux_ces, op.Concat(op.Shape(aux_ces, start=0, end=2), last, axis=0))  # [T, n_ce, 3C]
    theta_shape = op.Concat(last, op.Shape(ces, start=1, end=3), axis=0)  # [T, 3, C]
    theta = op.CastLike(op.Reshape(WeightedSlots(flat_ces, mix), theta_shape), hidden)
    hidden_size = op.Shape(hidden, start=1, end=2)
    intermediate = op.Shape(down, start=2, end=3)
    rows_and_width = op.Constant(value_ints=[1, 2])
    theta_gate = op.Squeeze(op.Slice(theta, op.Concat(zero, zero, axis=0), op.Concat(one, hidden_size, axis=0), rows_and_width), one)
    theta_act = op.Squeeze(op.Slice(theta, op.Concat(one, zero, axis=0), op.Concat(two, intermediate, axis=0), rows_and_width), one)
    theta_up = op.Squeeze(op.Slice(theta, op.Concat(two, zero, axis=0), op.Concat(op.Constant(value_ints=[3]), hidden_size, axis=0), rows_and_width), one)
    return op.Mul(hidden, theta_gate), op.Mul(hidden, theta_up), theta_act, main_weights, main_experts


@onnxscript.script(ce_opset, default_opset=op)
def CompressedExperts(hidden, weights, experts, gate_up, down, ces, n_ce: int):
    x_gate, x_up, act_scale, main_weights, main_experts = CompressedInputs(hidden, weights, experts, down, ces, n_ce=n_ce)
    return SwiGLUExperts(x_gate, x_up, act_scale, main_weights, main_experts, gate_up, down)


@onnxscript.script(ce_opset, default_opset=op)
def RoutedClampedExperts(hidden, weights, experts, gate_up, down, gate_up_bias, down_bias, swiglu_alpha: float,
                         swiglu_limit: float):
    ones = op.CastLike(op.Expand(op.Constant(value_float=1.0), op.Concat(op.Shape(hidden, start=0, end=1),
                                                                           op.Constant(value_ints=[1]), axis=0)), hidden)
    return ClampedSwiGLUExperts(hidden, hidden, ones, weights, experts, gate_up, down, gate_up_bias, down_bias,
                                swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)


@onnxscript.script(ce_opset, default_opset=op)
def CompressedClampedExperts(hidden, weights, experts, gate_up, down, ces, gate_up_bias, down_bias, n_ce: int,
                             swiglu_alpha: float, swiglu_limit: float):
    x_gate, x_up, act_scale, main_weights, main_experts = CompressedInputs(hidden, weights, experts, down, ces, n_ce=n_ce)
    return ClampedSwiGLUExperts(x_gate, x_up, act_scale, main_weights, main_experts, gate_up, down, gate_up_bias,
                                down_bias, swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)


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


@onnxscript.script(ce_opset, default_opset=op)
def SigmoidMoE(hidden, router_logits, gate_up, down, score_bias, top_k: int, norm_topk_prob: int, routing_scale: float,
               n_group: int, topk_group: int):
    weights, experts = SigmoidTopK(router_logits, score_bias, top_k=top_k, norm_topk_prob=norm_topk_prob,
                                   routing_scale=routing_scale, n_group=n_group, topk_group=topk_group)
    return RoutedExperts(hidden, weights, experts, gate_up, down)


@onnxscript.script(ce_opset, default_opset=op)
def CompressedSigmoidMoE(hidden, router_logits, gate_up, down, ces, score_bias, top_k: int, n_ce: int,
                         norm_topk_prob: int, routing_scale: float, n_group: int, topk_group: int):
    weights, experts = SigmoidTopK(router_logits, score_bias, top_k=top_k, norm_topk_prob=norm_topk_prob,
                                   routing_scale=routing_scale, n_group=n_group, topk_group=topk_group)
    return CompressedExperts(hidden, weights, experts, gate_up, down, ces, n_ce=n_ce)


@onnxscript.script(ce_opset, default_opset=op)
def SigmoidTop1MoE(hidden, router_logits, gate_up, down):
    """Llama 4: the best expert by logit, its sigmoid scaling the expert's input (not its output)."""
    top, experts = op.TopK(op.Cast(router_logits, to=FLOAT.dtype), op.Constant(value_ints=[1]), axis=-1, largest=1,
                           sorted=1)
    scaled = op.Mul(hidden, op.CastLike(op.Sigmoid(top), hidden))
    return RoutedExperts(scaled, op.Expand(op.Constant(value_float=1.0), op.Shape(top)), experts, gate_up, down)


@onnxscript.script(ce_opset, default_opset=op)
def ClampedSwiGLUMoE(hidden, router_logits, gate_up, down, gate_up_bias, down_bias, top_k: int, norm_topk_prob: int,
                     routing_scale: float, swiglu_alpha: float, swiglu_limit: float):
    weights, experts = SoftmaxTopK(router_logits, top_k=top_k, norm_topk_prob=norm_topk_prob, routing_scale=routing_scale)
    return RoutedClampedExperts(hidden, weights, experts, gate_up, down, gate_up_bias, down_bias,
                                swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)


@onnxscript.script(ce_opset, default_opset=op)
def CompressedClampedSwiGLUMoE(hidden, router_logits, gate_up, down, ces, gate_up_bias, down_bias, top_k: int,
                               n_ce: int, norm_topk_prob: int, routing_scale: float, swiglu_alpha: float,
                               swiglu_limit: float):
    weights, experts = SoftmaxTopK(router_logits, top_k=top_k, norm_topk_prob=norm_topk_prob, routing_scale=routing_scale)
    return CompressedClampedExperts(hidden, weights, experts, gate_up, down, ces, gate_up_bias, down_bias, n_ce=n_ce,
                                    swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)


# op type -> (function, the functions its body calls; an experts function among them gets its form's body)
OPS = {
    "MoE": (MoE, (SoftmaxTopK, RoutedExperts, SwiGLUExperts)),
    "CompressedMoE": (CompressedMoE, (SoftmaxTopK, CompressedExperts, CompressedInputs, SwiGLUExperts)),
    "SparseMixerMoE": (SparseMixerMoE, (SparseMixerTop2, RoutedExperts, SwiGLUExperts)),
    "CompressedSparseMixerMoE": (CompressedSparseMixerMoE, (SparseMixerTop2, CompressedExperts, CompressedInputs,
                                                            SwiGLUExperts)),
    "SigmoidMoE": (SigmoidMoE, (SigmoidTopK, RoutedExperts, SwiGLUExperts)),
    "CompressedSigmoidMoE": (CompressedSigmoidMoE, (SigmoidTopK, CompressedExperts, CompressedInputs, SwiGLUExperts)),
    "SigmoidTop1MoE": (SigmoidTop1MoE, (RoutedExperts, SwiGLUExperts)),
    "ClampedSwiGLUMoE": (ClampedSwiGLUMoE, (SoftmaxTopK, RoutedClampedExperts, ClampedSwiGLUExperts)),
    "CompressedClampedSwiGLUMoE": (CompressedClampedSwiGLUMoE, (SoftmaxTopK, CompressedClampedExperts, CompressedInputs,
                                                                ClampedSwiGLUExperts)),
}

SPARSE, FIXED_SHAPE = "sparse", "fixed-shape"
_SPARSE_PIECES = (SparseLayout, ExpertTable, OneTokenColumns, TokenColumns, PairRows, WeightedSlots)
_FIXED_SHAPE_PIECES = (GatheredProjections, GatheredDown, WeightedSlots, DenseProjections, DenseDown)
# form -> {experts function: (the body it gets, the functions that body calls)}
EXPERTS_FORMS = {
    SPARSE: {SwiGLUExperts: (SwiGLUExperts, (*_SPARSE_PIECES, ExpertRows)),
             ClampedSwiGLUExperts: (ClampedSwiGLUExperts, (*_SPARSE_PIECES, ClampedExpertRows, ClampedSwiGLU))},
    FIXED_SHAPE: {SwiGLUExperts: (SwiGLUExpertsFixedShape, (GatheredSwiGLU, DenseSwiGLU, *_FIXED_SHAPE_PIECES)),
                  ClampedSwiGLUExperts: (ClampedSwiGLUExpertsFixedShape, (GatheredClampedSwiGLU, DenseClampedSwiGLU,
                                                                          *_FIXED_SHAPE_PIECES, ClampedSwiGLU))},
}

# The op types our TensorRT plugin (plugins/trt) implements; the others carry no plugin attributes,
# so TensorRT always runs their function bodies.
PLUGIN_OP_TYPES = ("MoE", "CompressedMoE", "SparseMixerMoE", "CompressedSparseMixerMoE", "SigmoidMoE",
                   "CompressedSigmoidMoE", "ClampedSwiGLUMoE", "CompressedClampedSwiGLUMoE")
# What the plugin lacks for each other op type (the Triton kernels lack it too).
NOT_IN_PLUGIN = {
    "SigmoidTop1MoE": "the routing weight on the expert input",
}


def op_type_for(routing: str, compressed: bool, activation: str = SWIGLU, weights_on_input: bool = False,
                score_bias: bool = False) -> str:
    """The node's op type for a layer's routing and expert variant; ValueError when none has that math."""
    if weights_on_input:
        if routing == SIGMOID_TOPK and not compressed and not score_bias and activation == SWIGLU:
            return "SigmoidTop1MoE"
    elif activation == CLAMPED_SWIGLU:
        if routing == SOFTMAX_TOPK:
            return "CompressedClampedSwiGLUMoE" if compressed else "ClampedSwiGLUMoE"
    elif routing == SIGMOID_TOPK:
        if score_bias:
            return "CompressedSigmoidMoE" if compressed else "SigmoidMoE"
    else:
        base = {SOFTMAX_TOPK: "MoE", SPARSEMIXER: "SparseMixerMoE"}[routing]
        return ("Compressed" + base) if compressed else base
    raise ValueError(f"no ONNX form for routing {routing!r} with activation {activation!r}"
                     f"{', a score bias' if score_bias else ''}{', the weight on the input' if weights_on_input else ''}"
                     f"{' and CE' if compressed else ''}")


def node_attributes(op_type: str, **values) -> dict:
    """The attributes `op_type`'s schema takes, picked from the op's arguments (ints for flags)."""
    function = OPS[op_type][0]
    names = function.to_function_proto().attribute
    casts = {"norm_topk_prob": int, "routing_scale": float, "jitter_eps": float, "swiglu_alpha": float,
             "swiglu_limit": float}
    return {name: casts.get(name, lambda v: v)(values[name]) for name in names}


def node_inputs(op_type: str) -> list[str]:
    """The op type's input names, in order."""
    return list(OPS[op_type][0].to_function_proto().input)


def register_schemas() -> None:
    """Make the custom-domain ops known to onnx, so the exporter can emit bodyless call nodes."""
    Attr = onnx.defs.OpSchema.Attribute
    INT, FLOAT_ATTR = onnx.defs.OpSchema.AttrType.INT, onnx.defs.OpSchema.AttrType.FLOAT
    kinds = {"top_k": INT, "n_ce": INT, "norm_topk_prob": INT, "n_group": INT, "topk_group": INT,
             "routing_scale": FLOAT_ATTR, "jitter_eps": FLOAT_ATTR, "swiglu_alpha": FLOAT_ATTR, "swiglu_limit": FLOAT_ATTR}
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    constraints = [("T", floats, "activations and weights"), ("L", floats, "router logits"),
                   ("B", floats, "the routing's score bias")]
    input_types = {"router_logits": "L", "score_bias": "B"}
    # TensorRT reads these to bind our plugin; optional, so the portable form stays valid.
    plugin_attrs = [Attr(name, onnx.defs.OpSchema.AttrType.STRING, "TensorRT plugin lookup", required=False)
                    for name in ("plugin_namespace", "plugin_version")]
    for op_type, (function, _) in OPS.items():
        if onnx.defs.has(op_type, DOMAIN):
            continue
        proto = function.to_function_proto()
        inputs = [onnx.defs.OpSchema.FormalParameter(name, input_types.get(name, "T")) for name in proto.input]
        schema = onnx.defs.OpSchema(
            op_type, DOMAIN, DOMAIN_VERSION, inputs=inputs,
            outputs=[onnx.defs.OpSchema.FormalParameter("output", "T", "[T, H]")],
            type_constraints=constraints,
            attributes=[Attr(name, kinds[name], name) for name in proto.attribute] + plugin_attrs,
        )
        onnx.defs.register_schema(schema)


def _functions(op_type: str, form: str) -> list[tuple[str, object]]:
    """(name, function whose body it gets) for `op_type` and everything its body calls, the experts
    functions in `form` (EXPERTS_FORMS)."""
    function, helpers = OPS[op_type]
    bodies = [(function.name, function)]
    for helper in helpers:
        if helper in EXPERTS_FORMS[form]:
            body, callees = EXPERTS_FORMS[form][helper]
            bodies.append((helper.name, body))
            bodies += [(callee.name, callee) for callee in callees]
        else:
            bodies.append((helper.name, helper))
    return list(dict(bodies).items())


def function_protos(op_type: str, model_opset: int, form: str = SPARSE) -> list[onnx.FunctionProto]:
    """The body of `op_type` and of the functions it calls, with the experts functions in the given
    form (EXPERTS_FORMS), importing the model's default opset (onnx.checker needs them equal).

    The fixed-shape form (TensorRT's) is one flat function: TensorRT's ONNX parser (checked with
    TensorRT-RTX 1.7) resolves a function's attribute only one call deep; in a nested call it reads
    0 (top_k 0, routing_scale 0: an engine that silently computes nothing). So the callees are
    inlined into the op type's own function, whose nodes then refer to its attributes directly.
    """
    protos = composed_function_protos(op_type, model_opset, form)
    if form == FIXED_SHAPE:
        protos = [flattened(protos, model_opset)]
    return protos


def flattened(protos: list[onnx.FunctionProto], model_opset: int) -> onnx.FunctionProto:
    """protos[0] with every call of the other functions inlined (recursively, If branches too)."""
    import onnx.inliner

    top = protos[0]
    node = onnx.helper.make_node(top.name, list(top.input), list(top.output), domain=top.domain)
    graph = onnx.helper.make_graph([node], "flatten", [], [])
    opsets = [onnx.helper.make_opsetid("", model_opset), onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
    model = onnx.helper.make_model(graph, functions=protos, opset_imports=opsets)
    kept = [(top.domain, top.name)]
    flat = onnx.inliner.inline_selected_functions(model, kept, exclude=True)
    (function,) = [f for f in flat.functions if f.name == top.name]
    clear_node_names(function.node)
    del function.opset_import[:]
    function.opset_import.extend(opsets)
    return function


def composed_function_protos(op_type: str, model_opset: int, form: str = SPARSE) -> list[onnx.FunctionProto]:
    """function_protos before flattening: one FunctionProto per function, calls between them."""
    protos = []
    for name, fn in _functions(op_type, form):
        proto = fn.to_function_proto()
        proto.name = name
        # onnxscript names body nodes n0, n1, ...; every call site would repeat them (TensorRT warns
        # about each duplicate), so leave them unnamed and let runtimes scope them per call.
        clear_node_names(proto.node)
        for entry in proto.opset_import:
            if entry.domain == "":
                entry.version = model_opset
        if DOMAIN not in {entry.domain for entry in proto.opset_import}:  # calls inside an If branch
            proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
        protos.append(proto)
    return protos


def layer_model(op_type: str, attributes: dict, gate_up, down, ces=None, form: str = SPARSE,
                opset: int = 20, **weights) -> onnx.ModelProto:
    """A standalone model of one MoE layer (tests, benchmarks): inputs hidden [T, H] and fp32
    router_logits [T, E], output [T, H], the weights (numpy arrays: gate_up, down, ces and the op
    type's other inputs, e.g. score_bias) as initializers."""
    from onnx import helper, numpy_helper

    dtype = helper.np_dtype_to_tensor_dtype(gate_up.dtype)
    num_experts, _, hidden = gate_up.shape
    weights = {"gate_up": gate_up, "down": down, "ces": ces, **weights}
    names = node_inputs(op_type)[2:]
    node = helper.make_node(op_type, ["hidden", "router_logits", *names], ["out"], domain=DOMAIN, **attributes)
    graph = helper.make_graph(
        [node], "moe_layer",
        [helper.make_tensor_value_info("hidden", dtype, ["T", hidden]),
         helper.make_tensor_value_info("router_logits", onnx.TensorProto.FLOAT, ["T", num_experts])],
        [helper.make_tensor_value_info("out", dtype, ["T", hidden])],
        initializer=[numpy_helper.from_array(weights[name], name) for name in names])
    model = helper.make_model(graph, functions=function_protos(op_type, opset, form), opset_imports=[
        helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    model.ir_version = 10
    return model


def function_names(op_type: str, form: str = SPARSE) -> set[str]:
    """The names of the FunctionProtos function_protos gives for `op_type`."""
    return {op_type} if form == FIXED_SHAPE else {name for name, _ in _functions(op_type, form)}


def clear_node_names(nodes) -> None:
    for node in nodes:
        node.name = ""
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                clear_node_names(attribute.g.node)
