"""manifest.json as verify and bench read it: validated before use, and the files it records checked.

`build` records the size and SHA-256 of the ONNX file and its external data (`onnx.files`); a
folder whose model.onnx or model.onnx.data was truncated or edited since then is refused with one
line before any runtime touches it. Manifests written before the record existed are read without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from ce_export.artifacts import MANIFEST, file_record, read_json
from ce_export.checkpoint_check import short
from ce_export.errors import OutputError


def plain_file_name(name: str) -> str:
    """A file inside the build folder, by name: no path, so the manifest cannot point elsewhere."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise PydanticCustomError("file_name", "a file name in the build folder (no path) is expected")
    return name


def relative_path_inside(path: str) -> str:
    parts = Path(path).parts
    if not parts or Path(path).is_absolute() or ".." in parts:
        raise PydanticCustomError("inside", "a path inside the build folder is expected")
    return path


FileName = Annotated[str, AfterValidator(plain_file_name)]
Count = Annotated[int, Field(ge=1, le=2**31 - 1)]
NonNegative = Annotated[int, Field(ge=0)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class Source(Strict):
    kind: Literal["demo", "checkpoint"]
    path: Annotated[str, Field(min_length=1)]

    @model_validator(mode="after")
    def demo_copy_inside(self):
        if self.kind == "demo":
            relative_path_inside(self.path)
        return self


class ModelFacts(Strict):
    architecture: str
    use_ce: bool
    vocab_size: Count
    hidden_size: Count
    num_layers: Count
    num_attention_heads: Count
    kv_heads: Count
    key_dim: Count
    value_dim: Count


class Limits(Strict):
    max_batch: Count
    max_sequence: Count
    max_context: Count


class FileRecord(Strict):
    bytes: NonNegative
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class OnnxSection(Strict):
    file: FileName
    external_data: FileName | None = None
    opset: Count
    inputs: Annotated[list[str], Field(min_length=3)]
    outputs: Annotated[list[str], Field(min_length=1)]
    limits: Limits
    logits: Literal["all", "last"] = "all"  # absent in manifests from before --logits (all positions)
    files: dict[FileName, FileRecord] | None = None  # absent in manifests from before it was recorded


class Activations(Strict):
    scales: dict[str, Annotated[float, Field(gt=0)]]


class Quantization(Strict):
    mode: str
    activations: Activations | None = None


class CalibrationData(Strict):
    source: Annotated[str, Field(min_length=1)]


class Parameters(Strict):
    total: NonNegative
    active_per_token: NonNegative
    weight_bytes: NonNegative | None = None


class GenaiClient(Strict):
    supported: bool = False
    provider: str | None = None
    reason: str | None = None


class Clients(Strict):
    onnxruntime_genai: GenaiClient = GenaiClient()


class Manifest(Strict):
    format: Literal[1]
    source: Source
    model: ModelFacts
    target: str
    dtype: Literal["fp32", "fp16", "bf16"]
    quantization: Quantization | None = None
    calibration_data: CalibrationData | None = None
    parameters: Parameters
    onnx: OnnxSection
    tools: dict[str, str]
    clients: Clients = Clients()  # absent in manifests from before the clients were written

    @model_validator(mode="after")
    def known_names(self):
        from ce_export.export import TARGETS
        from ce_export.load import ARCHITECTURES
        from ce_export.quantize import QUANTIZATIONS

        for key, value, known in (("model.architecture", self.model.architecture, ARCHITECTURES),
                                  ("target", self.target, TARGETS),
                                  ("quantization.mode", self.quantization and self.quantization.mode, QUANTIZATIONS)):
            if value is not None and value not in known:
                raise PydanticCustomError("known", f"{key}={value!r} is not one of {', '.join(known)}")
        return self


def read_manifest(folder: str | Path) -> dict:
    """manifest.json of a build folder, validated, with the files it records checked; one line on failure."""
    folder = Path(folder)
    path = folder / MANIFEST
    data = read_json(path, "manifest (is this a ce_export build folder?)")
    if not isinstance(data, dict):
        raise OutputError(f"{path}: expected a JSON object")
    try:
        Manifest.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "missing":
            message = f"{where} is missing"
        elif not where:  # a rule over several fields
            message = first["msg"]
        else:
            message = f"{where}={short(first.get('input'))} is invalid ({first['msg'][0].lower() + first['msg'][1:]})"
        raise OutputError(f"{path}: {message}") from None
    check_files(folder, data)
    return data


def onnx_files(onnx: dict) -> list[str]:
    """The ONNX file and its external data (when any), by name, from the manifest's `onnx` section."""
    return [onnx["file"]] + ([onnx["external_data"]] if onnx.get("external_data") else [])


def recorded_files(folder: Path, names: list[str]) -> dict:
    """The `onnx.files` record build writes: size and SHA-256 of each file."""
    return {name: file_record(folder / name) for name in names}


def check_files(folder: Path, manifest: dict) -> None:
    onnx = manifest["onnx"]
    for name in onnx_files(onnx):
        if not (folder / name).is_file():
            raise OutputError(f"{folder / name}: missing (manifest.json lists it)")
    if not onnx.get("files"):  # a manifest from before the record: at least the structure must hold
        check_onnx_structure(folder, onnx["file"])
    for name, record in (onnx.get("files") or {}).items():
        path = folder / name
        if not path.is_file():
            raise OutputError(f"{path}: missing (manifest.json records it)")
        size = path.stat().st_size
        if size != record["bytes"]:
            change = "truncated" if size < record["bytes"] else "grown"
            raise OutputError(f"{path}: {size} bytes, but the build wrote {record['bytes']} ({change} since; "
                              f"rebuild the folder)")
        if file_record(path)["sha256"] != record["sha256"]:
            raise OutputError(f"{path}: contents differ from what the build wrote (SHA-256 in manifest.json; "
                              f"edited since? rebuild the folder)")


def check_onnx_structure(folder: Path, name: str) -> None:
    """model.onnx parses, and every external-data reference lies inside an existing file of the
    folder (what a truncated model.onnx.data breaks); reads the graph, not the weights."""
    import onnx
    from google.protobuf.message import DecodeError

    path = folder / name
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as error:
        raise OutputError(f"{path}: not a readable ONNX file ({type(error).__name__}: {str(error)[:200]})") from None
    sizes: dict[str, int] = {}
    tensors = list(model.graph.initializer) + [
        attribute.t for function in model.functions for node in function.node for attribute in node.attribute
        if attribute.HasField("t")]
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        if Path(location).name != location or not (folder / location).is_file():
            raise OutputError(f"{path}: tensor {tensor.name!r} refers to external data {location!r}, "
                              f"not a file in {folder}")
        size = sizes.setdefault(location, (folder / location).stat().st_size)
        try:
            end = int(entries.get("offset", 0)) + int(entries.get("length", 0))
        except ValueError:
            raise OutputError(f"{path}: tensor {tensor.name!r} has an invalid external-data offset or length") from None
        if end > size:
            raise OutputError(f"{folder / location}: {size} bytes, but {name} expects at least {end} "
                              f"(truncated since the build? rebuild the folder)")
