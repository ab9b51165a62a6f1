"""The `python -m ce_kernels.aot` runs a model needs, from a ce_export build folder's manifest.json.

    python3 aot_args_for_model.py DIR/manifest.json [--arch 80 90] [--dtypes bf16 ...]

prints one line per distinct routed-experts configuration of the model's MoE layers (top_k, n_ce,
norm_topk_prob, routing, routing_scale, jitter_eps, n_group, topk_group, activation, swiglu_alpha,
swiglu_limit), each the AOT arguments (without --out) with every expert count those layers use;
layers of op types the plugin does not implement (onnx_functions.NOT_IN_PLUGIN: Llama 4's weight on
the input) need no kernels and are left out. The routing and activation constants and K are compiled
into the kernels, so a model whose layers differ needs one kernel set per configuration; the plugin embeds them all and
picks per layer. Activation dtype: the manifest's "dtype" unless --dtypes is given. Standard
library only (CMake runs it at configure time: -DCE_MODEL_MANIFEST=...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def in_plugin(layer: dict) -> bool:
    """Whether the layer's op type (onnx_functions.op_type_for) is one the plugin implements
    (onnx_functions.PLUGIN_OP_TYPES): the weight on the output, and for sigmoid routing a score bias
    (SigmoidMoE / CompressedSigmoidMoE). SwiGLU experts have no biases; gpt-oss's clamped SwiGLU
    experts have them (ClampedSwiGLUMoE / CompressedClampedSwiGLUMoE, softmax routing)."""
    if layer.get("weights_on_input", False):
        return False
    return layer.get("routing", "softmax_topk") != "sigmoid_topk" or bool(layer.get("score_bias", False))


def configurations(manifest: dict) -> list[tuple[tuple, list[int]]]:
    """[(config key, sorted expert counts)] in first-layer order."""
    model = manifest.get("model") or {}
    found: dict[tuple, set[int]] = {}
    for layer in model.get("moe_layers", []):
        if layer.get("kind", "moe") != "moe" or not in_plugin(layer):
            continue
        key = (
            int(layer["top_k"]), int(layer.get("n_ce", 0)), bool(layer.get("norm_topk_prob", False)),
            layer.get("routing", "softmax_topk"), float(layer.get("routing_scale", 1.0)),
            float(layer.get("jitter_eps", 0.0)), int(layer.get("n_group", 1)), int(layer.get("topk_group", 1)),
            layer.get("activation", "swiglu"), float(layer.get("swiglu_alpha", 1.0)), float(layer.get("swiglu_limit", 0.0)),
        )
        found.setdefault(key, set()).add(int(layer["num_experts"]))
    return [(key, sorted(experts)) for key, experts in found.items()]


def aot_arguments(key: tuple, experts: list[int], archs: list[int], dtypes: list[str]) -> list[str]:
    top_k, n_ce, norm, routing, scale, jitter, n_group, topk_group, activation, alpha, limit = key
    args = ["--arch", *map(str, archs), "--dtypes", *dtypes, "--num-experts", *map(str, experts),
            "--top-k", str(top_k), "--n-ce", str(n_ce)]
    if norm:
        args.append("--norm-topk-prob")
    if routing != "softmax_topk":
        args += ["--routing", routing]
    if scale != 1.0:
        args += ["--routing-scale", repr(scale)]
    if jitter != 0.0:
        args += ["--jitter-eps", repr(jitter)]
    if (n_group, topk_group) != (1, 1):
        args += ["--n-group", str(n_group), "--topk-group", str(topk_group)]
    if activation != "swiglu":
        args += ["--activation", activation, "--swiglu-alpha", repr(alpha), "--swiglu-limit", repr(limit)]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path, help="a ce_export build folder's manifest.json")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtypes", nargs="+", help="activation dtypes (default: the manifest's dtype)")
    args = parser.parse_args(argv)
    try:
        manifest = json.loads(args.manifest.read_text())
    except (OSError, json.JSONDecodeError) as error:
        print(f"{args.manifest}: cannot read a manifest ({error})", file=sys.stderr)
        return 2
    dtypes = args.dtypes or [manifest.get("dtype", "bf16")]
    configs = configurations(manifest)
    if not configs:
        print(f"{args.manifest}: the model has no MoE layers of the plugin's op types", file=sys.stderr)
        return 2
    for key, experts in configs:
        print(" ".join(aot_arguments(key, experts, args.arch, dtypes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
