"""What the installed onnxruntime can load and computes correctly, for the export to respect.

- IR version: onnx 1.23 writes IR 14 by default; onnxruntime 1.30 loads at most IR 13 ("Unsupported
  model IR version: 14, max supported IR version: 13"). `max_ir_version()` asks the runtime itself
  (it loads a one-node model at each IR version from onnx's newest down) instead of keeping a table.
- com.microsoft::MoE: onnxruntime 1.30's CPU kernel computes fp32 plain MoE wrongly (max relative
  logits error 1.58; fp16 is right), 1.32 computes both right; 1.31 was not checked, so it counts
  as wrong. `moe_lowering_blocker` says when the `ort` target must keep our function bodies instead.
"""

from __future__ import annotations

import functools
import re

# Oldest onnxruntime whose com.microsoft::MoE matches moe_math.py, for the dtypes where an older
# one was seen computing it wrongly.
MS_MOE_MIN_VERSION = {"fp32": (1, 32)}


def installed_version() -> tuple[int, int] | None:
    """(major, minor) of the installed onnxruntime, None when it cannot be imported."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return parse_version(onnxruntime.__version__)


def parse_version(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    if not match:
        raise ValueError(f"not a version: {text!r}")
    return int(match.group(1)), int(match.group(2))


def moe_lowering_blocker(dtype: str, version: tuple[int, int] | None = None) -> str | None:
    """Why plain MoE layers of a `dtype` model must not become com.microsoft::MoE for the installed
    onnxruntime (or `version`); None when they may (also when onnxruntime is not installed here:
    the file is then for a runtime elsewhere)."""
    version = version if version is not None else installed_version()
    if version is None:
        return None
    needed = MS_MOE_MIN_VERSION.get(dtype)
    if needed is not None and version < needed:
        return (f"onnxruntime {version[0]}.{version[1]} computes com.microsoft::MoE wrongly in {dtype} "
                f"(needs >= {needed[0]}.{needed[1]})")
    return None


@functools.lru_cache(maxsize=1)
def max_ir_version() -> int | None:
    """The highest ONNX IR version the installed onnxruntime loads; None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    options = ort.SessionOptions()
    options.log_severity_level = 4
    for version in range(onnx.IR_VERSION, 3, -1):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=version)
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception:  # onnxruntime raises its own Fail / InvalidGraph types
            continue
        return version
    return None


def ir_version_for_runtime(ir_version: int, opsets: dict[str, int]) -> int:
    """`ir_version`, lowered to what the installed onnxruntime loads when that still covers the
    model's opsets (onnx's own table of which IR version each opset needs)."""
    from onnx import helper

    supported = max_ir_version()
    if supported is None or ir_version <= supported:
        return ir_version
    needed = helper.find_min_ir_version_for([helper.make_opsetid(domain, version) for domain, version in opsets.items()],
                                            ignore_unknown=True)
    return max(supported, needed)
