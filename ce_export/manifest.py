"""The typed artifacts of a build folder: manifest.json (with the engine record build adds) and
parity.json, read and written through frozen models.

Each model names the fields a stage reads; every other key of the file is kept as it was read
(`extra="allow"`), so a manifest read and written again keeps its keys, and older folders still load.
`build` records the size and SHA-256 of the ONNX file and its external data (`onnx.files`); a
folder whose model.onnx or model.onnx.data was truncated or edited since then is refused with one
line before any runtime touches it. Manifests written before the record existed are read without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator,
                      ValidationError, model_validator)
from pydantic_core import PydanticCustomError

from ce_export.artifacts import MANIFEST, PARITY, file_record, read_json, write_json
from ce_export.checkpoint_check import short
from ce_export.errors import OutputError
from ce_export.spec import LayerSpec, layer_from_json, layer_json


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


def moe_layers_from_json(value) -> tuple[LayerSpec, ...]:
    if not isinstance(value, list) or not all(isinstance(layer, dict) for layer in value):
        raise PydanticCustomError("layers", "a list of layer objects is expected")
    try:
        return tuple(layer_from_json(layer) for layer in value)
    except (TypeError, ValueError) as error:
        raise PydanticCustomError("layers", str(error)) from None


TARGETS = ("portable", "ort", "trt")  # what export writes the file for (export.export_onnx)

FileName = Annotated[str, AfterValidator(plain_file_name)]
Count = Annotated[int, Field(ge=1, le=2**31 - 1)]
NonNegative = Annotated[int, Field(ge=0)]
Layers = Annotated[tuple[LayerSpec, ...], PlainValidator(moe_layers_from_json),
                   PlainSerializer(lambda layers: [layer_json(layer) for layer in layers])]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False, frozen=True)


class Source(Strict):
    kind: Literal["demo", "checkpoint"]
    path: Annotated[str, Field(min_length=1)]

    @model_validator(mode="after")
    def demo_copy_inside(self):
        if self.kind == "demo":
            relative_path_inside(self.path)
        return self

    def checkpoint(self, folder: str | Path) -> Path:
        """The checkpoint the build folder was made from (the demo's copy lives inside the folder)."""
        return Path(folder) / self.path if self.kind == "demo" else Path(self.path)


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
    moe_layers: Layers = ()  # one per decoder layer, whatever its kind


class Limits(Strict):
    max_batch: Count
    max_sequence: Count
    max_context: Count


class FileRecord(Strict):
    bytes: NonNegative
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class MoeNode(Strict):
    """An MoE node of the exported graph; `plugin` false where the TensorRT plugin cannot take it."""
    name: str
    op_type: str
    domain: str
    plugin: bool = True
    layer: NonNegative  # the decoder layer it computes


class OnnxSection(Strict):
    file: FileName
    external_data: FileName | None = None
    opset: Count
    inputs: Annotated[list[str], Field(min_length=3)]
    outputs: Annotated[list[str], Field(min_length=1)]
    limits: Limits
    logits: Literal["all", "last"] = "all"  # absent in manifests from before --logits (all positions)
    files: dict[FileName, FileRecord] | None = None  # absent in manifests from before it was recorded
    moe_nodes: list[MoeNode] = []

    def file_names(self) -> list[str]:
        """The ONNX file and its external data (when any), by name."""
        return [self.file] + ([self.external_data] if self.external_data else [])


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


class NotInPlugin(Strict):
    """The engine's MoE nodes the plugin cannot take: TensorRT runs their ONNX function bodies."""
    op_types: list[str]
    nodes: NonNegative
    message: str


class EnginePlugin(Strict):
    """Whether the engine's MoE nodes became plugin layers, and with which library."""
    bound: bool
    library: str | None = None
    namespace: str | None = None
    version: str | None = None
    reason: str | None = None  # why not bound
    mechanism: str | None = None  # how the plugin creators were registered
    not_in_plugin: NotInPlugin | None = None


class Profile(Strict):
    index: NonNegative
    name: str
    axes: dict[str, list[int]]  # per axis name: min, opt, max


class EngineMoeNodes(Strict):
    """The MoE nodes of the network TensorRT parsed, and the layers they became."""
    count: NonNegative  # those our plugin implements
    plugin_layers: NonNegative
    bound: NonNegative  # nodes that became plugin layers, no layer of their bodies left
    inlined: NonNegative  # nodes whose function bodies became TensorRT layers


class EngineRecord(Strict):
    """What build_engine built: manifest.json's `engine`."""
    plan: FileName
    plan_bytes: NonNegative | None = None  # the optional fields: records of older builds may lack them
    runtime: str
    runtime_version: str | None = None
    strongly_typed: bool | None = None
    plugin: EnginePlugin
    moe_nodes: EngineMoeNodes | None = None
    limits: Limits
    profiles: list[Profile] = []
    num_optimization_profiles: NonNegative | None = None
    compute_capability: str | None = None
    builder_optimization_level: int | None = None
    network_layers: NonNegative | None = None
    parse_seconds: float | None = None
    build_seconds: float | None = None
    log_warnings: NonNegative | None = None


class Manifest(Strict):
    """manifest.json: the contract on disk between export, build, verify, bench and the clients."""
    format: Literal[1]
    created: str | None = None
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
    engine: EngineRecord | None = None  # after a TensorRT build (--target trt)

    @model_validator(mode="after")
    def known_names(self):
        from ce_export.load import ARCHITECTURES
        from ce_export.quantize import QUANTIZATIONS

        for key, value, known in (("model.architecture", self.model.architecture, ARCHITECTURES),
                                  ("target", self.target, TARGETS),
                                  ("quantization.mode", self.quantization and self.quantization.mode, QUANTIZATIONS)):
            if value is not None and value not in known:
                raise PydanticCustomError("known", f"{key}={value!r} is not one of {', '.join(known)}")
        return self

    @property
    def quantized(self) -> bool:
        return bool(self.quantization and self.quantization.mode)

    @property
    def engine_limits(self) -> Limits:
        """Limits the engine was built for, else the export limits."""
        return self.engine.limits if self.engine is not None else self.onnx.limits

    @classmethod
    def from_json(cls, data, path: Path) -> "Manifest":
        """Validated; one line naming `path` and the first invalid field on failure."""
        return parse(cls, data, path)

    @classmethod
    def read(cls, folder: str | Path) -> "Manifest":
        """manifest.json of a build folder, validated (the files it records are not checked: read_manifest)."""
        path = Path(folder) / MANIFEST
        return cls.from_json(read_json(path, "manifest (is this a ce_export build folder?)"), path)

    def write(self, folder: str | Path) -> None:
        """The keys as read or given (defaults not added), each value as json.dumps writes it."""
        write_json(Path(folder) / MANIFEST, self.model_dump(exclude_unset=True))

    def with_engine(self, engine: EngineRecord) -> "Manifest":
        return self.model_copy(update={"engine": engine})


class Report(BaseModel):
    """parity.json's models: values as verify measured them (an unreadable output's error is inf)."""
    model_config = ConfigDict(extra="allow", frozen=True)


class OutputErrors(Report):
    """One output's error against the reference (verify.compare); relative: to the reference's largest magnitude."""
    max_abs: float
    max_rel: float
    mean_abs: float
    mean_rel: float


class LogitsCase(Report):
    """One parity shape: the worst of its outputs' errors, and each output's."""
    case: str
    batch: int
    sequence: int
    past: int
    max_rel: float
    mean_rel: float
    logits_top1_agreement: float
    outputs: dict[str, OutputErrors]


class LogitsCheck(Report):
    passed: bool
    statistic: str  # the verdict's statistic (verify.TOLERANCES) and its threshold
    threshold: float
    worst: float
    max_rel: float
    cases: list[LogitsCase]


class GenerationRow(Report):
    passed: bool
    identical: bool
    first_difference: int | None = None
    near_tie_margin: float | None = None
    router_margin: float | None = None
    identical_to_fp32_reference: bool = False


class GenerationCheck(Report):
    passed: bool
    new_tokens: int
    rows: list[GenerationRow]


class FreeRunningLogits(Report):
    statistic: str
    worst: float
    max_rel: float
    min_top1_agreement: float


class FreeRunningGeneration(Report):
    identical_rows: NonNegative
    rows: list[GenerationRow]


class FreeRunning(Report):
    """With FP8 activations: the logits and generation checks against the reference left free-running
    (reported; the verdict is the same checks synchronized at each FP8 quantizer)."""
    logits: FreeRunningLogits
    generation: FreeRunningGeneration


class TaskQuality(Report):
    """Exact match on the task's held-out problems, PyTorch fp32 vs the artifact in ONNX Runtime."""
    source: str
    name: str
    problems: NonNegative
    metric: str
    tokenizer: str
    accuracy_torch_fp32: float
    accuracy_onnx: float
    accuracy_delta: float
    per_task_torch_fp32: dict[str, float]
    per_task_onnx: dict[str, float]
    problems_scored_differently: NonNegative


class EvaluationData(Report):
    source: str
    kind: str
    tokenizer: str


class Quality(Report):
    """The quality cost of the artifact: unquantized PyTorch fp32 vs the file in ONNX Runtime."""
    task: TaskQuality | None = None  # for a checkpoint with a task (task.json)
    evaluation: str
    data: EvaluationData
    perplexity_torch_fp32: float
    perplexity_onnx: float
    perplexity_delta: float
    parameters: Parameters
    weight_bytes: NonNegative | None = None
    onnx_bytes: NonNegative


class Parity(Report):
    """parity.json: verify's report."""
    runtime: str
    dtype: str
    quantization: str | None = None
    passed: bool
    logits: LogitsCheck
    generation: GenerationCheck
    free_running: FreeRunning | None = None  # with FP8 activations
    quality: Quality | None = None

    @classmethod
    def read(cls, folder: str | Path) -> "Parity":
        path = Path(folder) / PARITY
        return parse(cls, read_json(path, "parity report"), path)

    def write(self, folder: str | Path) -> None:
        write_json(Path(folder) / PARITY, self.model_dump(exclude_unset=True))


def parse(model: type[BaseModel], data, path: Path):
    if not isinstance(data, dict):
        raise OutputError(f"{path}: expected a JSON object")
    try:
        return model.model_validate(data)
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


def read_manifest(folder: str | Path) -> Manifest:
    """manifest.json of a build folder, validated, with the files it records checked; one line on failure."""
    manifest = Manifest.read(folder)
    check_files(Path(folder), manifest.onnx)
    return manifest


def recorded_files(folder: Path, names: list[str]) -> dict:
    """The `onnx.files` record build writes: size and SHA-256 of each file."""
    return {name: file_record(folder / name) for name in names}


def check_files(folder: Path, onnx: OnnxSection) -> None:
    for name in onnx.file_names():
        if not (folder / name).is_file():
            raise OutputError(f"{folder / name}: missing (manifest.json lists it)")
    if not onnx.files:  # a manifest from before the record: at least the structure must hold
        check_onnx_structure(folder, onnx.file)
    for name, record in (onnx.files or {}).items():
        path = folder / name
        if not path.is_file():
            raise OutputError(f"{path}: missing (manifest.json records it)")
        size = path.stat().st_size
        if size != record.bytes:
            change = "truncated" if size < record.bytes else "grown"
            raise OutputError(f"{path}: {size} bytes, but the build wrote {record.bytes} ({change} since; "
                              f"rebuild the folder)")
        if file_record(path)["sha256"] != record.sha256:
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
