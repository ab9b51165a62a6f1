"""The exported decoder's inputs and outputs: their names, and their dtypes and dims as model.onnx has them.

Optimum / ONNX Runtime GenAI naming, in graph order:

    inputs   input_ids [batch, sequence], attention_mask [batch, total_sequence],
             position_ids [batch, sequence], then for each layer i
             past_key_values.i.key, past_key_values.i.value [batch, kv_heads, past_sequence, head dim]
    outputs  logits, then for each layer i present.i.key, present.i.value

Export names the graph's inputs and outputs with `io_names`; the engine build, trtexec, the Triton
repository and the client files read them back with `onnx_io` or name them from here. No TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ce_export.errors import BuildError

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
# Per-layer names, "%d" the layer index (the form onnxruntime-genai's genai_config.json takes).
PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"

AXES = ("batch", "sequence", "past_sequence", "total_sequence")

ONNX_DTYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 5: "INT16", 6: "INT32", 7: "INT64", 9: "BOOL",
               10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64", 16: "BF16"}


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The graph's input and output names, in order."""
    inputs = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS]
    outputs = [LOGITS]
    for i in range(num_layers):
        inputs += [PAST_KEY % i, PAST_VALUE % i]
        outputs += [PRESENT_KEY % i, PRESENT_VALUE % i]
    return inputs, outputs


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype ("FP32", "INT64", ... see ONNX_DTYPES) and dims.

    A dim is an int (static) or the name of a dynamic axis ("batch", "past_sequence + sequence", ...).
    """

    name: str
    dtype: str
    dims: tuple[int | str, ...]


def onnx_io(path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX file (read without its external data), in graph order."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - OSError, protobuf DecodeError, ...
        raise BuildError(f"{path}: cannot read ONNX file ({type(error).__name__}: {error})") from None

    def spec(value) -> TensorSpec:
        tensor_type = value.type.tensor_type
        dims = tuple(d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in tensor_type.shape.dim)
        dtype = ONNX_DTYPES.get(tensor_type.elem_type)
        if dtype is None:
            raise BuildError(f"{path}: {value.name} has an unsupported element type {tensor_type.elem_type}")
        return TensorSpec(value.name, dtype, dims)

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def resolve_dims(spec: TensorSpec, axis_values: dict[str, int]) -> tuple[int, ...]:
    """Concrete dims of an input for one value per axis name."""
    dims = []
    for dim in spec.dims:
        if isinstance(dim, int):
            dims.append(dim)
        elif dim in axis_values:
            dims.append(int(axis_values[dim]))
        else:
            raise BuildError(f"input {spec.name}: unknown dynamic axis {dim!r} (expected one of {', '.join(AXES)})")
    return tuple(dims)
