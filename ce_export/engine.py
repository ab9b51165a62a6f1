"""Stage "build" for --target trt: DIR/model.onnx -> DIR/model.plan with the TensorRT builder.

Runtime: full TensorRT (`import tensorrt`) when installed, else TensorRT-RTX (`import tensorrt_rtx`,
on PyPI; it parses ONNX and builds engines on a machine with no GPU, but has no plugin layers).

The network is strongly typed (the dtypes come from the ONNX file; TensorRT 11 knows no other mode)
and gets two optimization profiles from the build limits:

    0 prefill  batch 1..max_batch, sequence 1..max_seq, past 0            (attention_mask = sequence)
    1 decode   batch 1..max_batch, sequence 1,          past 0..max_context (attention_mask = past + 1)

Every MoE node of an op type our plugin implements (`ce_export::MoE`, `CompressedMoE`, the SparseMixer,
sigmoid and clamped SwiGLU pairs: onnx_functions.PLUGIN_OP_TYPES) carries plugin_namespace/plugin_version
(see export.mark_plugin_nodes); the other op type's (Llama 4's SigmoidTop1MoE) body always runs.
With full TensorRT and our plugin library loaded, the parser binds each node to the plugin
(ENABLE_PLUGIN_OVERRIDE when the flag exists), and we check from the network that every MoE node
became an IPluginV3 layer. Without a plugin (TensorRT-RTX, or no library) the
parser inlines each node's local-function body (standard ONNX): a plugin-less baseline engine from
the same file. Which of the two was built is recorded in the returned dict.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import threading
import time
from pathlib import Path
from typing import Callable

from ce_export.errors import BuildError
from ce_export.io_schema import TensorSpec, onnx_io, resolve_dims
from ce_export.manifest import EngineMoeNodes, EngineRecord, Manifest, MoeNode, NotInPlugin

PLAN = "model.plan"
PLUGIN_NAMESPACE = "ce_export"
PLUGIN_VERSION = "1"
PLUGIN_LIBRARY_ENV = "CE_EXPORT_PLUGIN_LIB"
# Where plugins/trt builds the library, relative to the repository root.
PLUGIN_LIBRARY_IN_REPO = Path("plugins") / "trt" / "build" / "libce_export_trt.so"
REPO_ROOT = Path(__file__).resolve().parent.parent

PREFILL, DECODE = "prefill", "decode"
OPT_SEQUENCE = 512  # prefill opt sequence, capped at max_seq
OPT_PAST = 512  # decode opt past length, capped at max_context
OPT_DECODE_BATCH = 8  # decode opt batch, capped at max_batch (prefill opt batch is 1)


def limits_of(manifest: Manifest, max_batch: int | None = None, max_seq: int | None = None,
              max_context: int | None = None) -> dict[str, int]:
    """Build limits: the given values, else the export limits in the manifest; never above the latter."""
    exported = manifest.onnx.limits.model_dump()
    chosen = {"max_batch": max_batch, "max_sequence": max_seq, "max_context": max_context}
    limits = {}
    for key, value in chosen.items():
        ceiling = int(exported[key])
        value = ceiling if value is None else int(value)
        if value < 1:
            raise BuildError(f"{key} must be at least 1 (got {value})")
        if value > ceiling:
            raise BuildError(f"{key} {value} exceeds the export limit {ceiling} recorded in manifest.json "
                             "(re-export with a larger limit)")
        limits[key] = value
    return limits


def profile_axes(max_batch: int, max_seq: int, max_context: int) -> dict[str, dict[str, tuple[int, int, int]]]:
    """(min, opt, max) of every dynamic axis for the two profiles, in profile order."""
    batch = (1, 1, max_batch)
    prefill_seq = (1, min(OPT_SEQUENCE, max_seq), max_seq)
    decode_past = (0, min(OPT_PAST, max_context), max_context)
    return {
        PREFILL: {"batch": batch, "sequence": prefill_seq, "past_sequence": (0, 0, 0),
                  "total_sequence": prefill_seq},
        DECODE: {"batch": (1, min(OPT_DECODE_BATCH, max_batch), max_batch), "sequence": (1, 1, 1),
                 "past_sequence": decode_past, "total_sequence": tuple(p + 1 for p in decode_past)},
    }


def profile_shapes(inputs: list[TensorSpec], axes: dict[str, tuple[int, int, int]]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """{input: (min dims, opt dims, max dims)} for one profile."""
    return {spec.name: tuple(resolve_dims(spec, {a: v[i] for a, v in axes.items()}) for i in range(3))
            for spec in inputs}


def load_tensorrt():
    """(module, "tensorrt" | "tensorrt_rtx"): full TensorRT when installed, else TensorRT-RTX."""
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "Builder"):  # the `tensorrt` meta package without its libs has no Builder
            return module, name
    raise BuildError("no TensorRT Python package: pip install tensorrt-rtx (or install TensorRT with its Python bindings)")


def runtime_label(trt, flavour: str) -> str:
    major_minor = ".".join(trt.__version__.split(".")[:2])
    return f"{flavour} {major_minor}"


def default_plugin_library() -> Path | None:
    """$CE_EXPORT_PLUGIN_LIB, else plugins/trt/build/libce_export_trt.so in this checkout, if it exists."""
    env = os.environ.get(PLUGIN_LIBRARY_ENV)
    if env:
        return Path(env)
    candidate = REPO_ROOT / PLUGIN_LIBRARY_IN_REPO
    return candidate if candidate.is_file() else None


class _Logger:
    """Collects TensorRT's log; errors are kept for the one-line BuildError."""

    NOISE = ("already exists, the output tensors of this new instance will not be queryable",)

    def __init__(self, trt):
        outer = self
        self.errors: list[str] = []
        self.warnings: list[str] = []

        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                if severity <= trt.ILogger.Severity.ERROR:
                    outer.errors.append(msg)
                elif severity == trt.ILogger.Severity.WARNING and not any(n in msg for n in outer.NOISE):
                    outer.warnings.append(msg)

        self.trt_logger = Logger()


def _progress_monitor(trt, report: Callable[[str], None]):
    """An IProgressMonitor that reports the two outer levels of build phases with their times."""
    if not hasattr(trt, "IProgressMonitor"):
        return None
    lock = threading.Lock()
    parents: dict[str, str | None] = {}
    started: dict[str, float] = {}

    def depth(name: str) -> int:
        level, parent = 0, parents.get(name)
        while parent is not None and level < 16:
            level, parent = level + 1, parents.get(parent)
        return level

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            try:
                with lock:
                    parents[phase_name] = parent_phase
                    started[phase_name] = time.perf_counter()
                    if depth(phase_name) <= 1:
                        report(f"  {'  ' * depth(phase_name)}{phase_name} ({num_steps} steps) ...")
            except Exception:  # noqa: BLE001 - progress must never break the build
                pass

        def step_complete(self, phase_name, step):
            return True

        def phase_finish(self, phase_name):
            try:
                with lock:
                    if depth(phase_name) <= 1:
                        elapsed = time.perf_counter() - started.get(phase_name, time.perf_counter())
                        report(f"  {'  ' * depth(phase_name)}{phase_name} done in {elapsed:.1f} s")
                    parents.pop(phase_name, None)
                    started.pop(phase_name, None)
            except Exception:  # noqa: BLE001
                pass

    return Monitor()


def _creators_missing(trt, registry, op_types: list[str]) -> list[str]:
    missing = []
    for op_type in op_types:
        creator = None
        if hasattr(registry, "get_creator"):
            creator = registry.get_creator(op_type, PLUGIN_VERSION, PLUGIN_NAMESPACE)
        elif hasattr(registry, "get_plugin_creator"):
            creator = registry.get_plugin_creator(op_type, PLUGIN_VERSION, PLUGIN_NAMESPACE)
        if creator is None:
            missing.append(op_type)
    return missing


def _load_plugin(trt, builder, library: Path, op_types: list[str]) -> str:
    """Register our plugin creators from `library`; returns how. Raises BuildError if they are not there.

    IPluginRegistry.load_library needs the getCreators/setLoggerFinder entry points; a library that
    registers statically (REGISTER_TENSORRT_PLUGIN) only needs to be dlopen'ed. load_library dlopens
    too, so static creators are registered even when it then refuses ("already registered").
    """
    if not library.is_file():
        raise BuildError(f"{library}: plugin library not found")
    registry = builder.get_plugin_registry() if hasattr(builder, "get_plugin_registry") else trt.get_plugin_registry()
    if not _creators_missing(trt, registry, op_types):
        return "already registered in this process"
    how = None
    if hasattr(registry, "load_library"):
        try:
            if registry.load_library(str(library)) is not None:
                how = "IPluginRegistry.load_library"
        except Exception:  # noqa: BLE001 - fall back to dlopen below
            pass
    if _creators_missing(trt, registry, op_types):
        try:
            ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
        except OSError as error:
            raise BuildError(f"{library}: cannot load plugin library ({error})") from None
        how = "dlopen (static registration)"
    elif how is None:
        how = "dlopen by IPluginRegistry.load_library (static registration)"
    missing = _creators_missing(trt, registry, op_types)
    if missing:
        raise BuildError(f"{library}: registers no TensorRT plugin creator for "
                         f"{', '.join(f'{PLUGIN_NAMESPACE}::{m} v{PLUGIN_VERSION}' for m in missing)}")
    return how


def _moe_layers(trt, network, node_names: list[str]) -> dict[str, dict[str, int]]:
    """Per MoE node: how many IPluginV3 layers and how many inlined function-body layers it became.

    The parser names a plugin layer after its node; layers from an inlined local function carry the
    calling node in their metadata ("[ONNX Layer: n9 | /model/layers.0/mlp/CompressedMoE (CompressedMoE)]").
    """
    plugin_type = getattr(trt.LayerType, "PLUGIN_V3", None)
    counts = {name: {"plugin": 0, "inlined": 0} for name in node_names}
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        metadata = getattr(layer, "metadata", "") or ""
        for name in node_names:
            if plugin_type is not None and layer.type == plugin_type and (layer.name == name or name in metadata):
                counts[name]["plugin"] += 1
            elif f"| {name} (" in metadata:
                counts[name]["inlined"] += 1
    return counts


def _parse_error(trt, parser, path: Path, flavour: str) -> BuildError:
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    if not errors:
        return BuildError(f"{path}: {flavour} could not parse the ONNX file (no parser error reported)")
    first = errors[0]

    def call(name: str) -> str:
        attribute = getattr(first, name, None)
        try:
            return str(attribute()) if callable(attribute) else ""
        except Exception:  # noqa: BLE001
            return ""

    node, op = call("node_name"), call("node_operator")
    stack = ""
    if hasattr(first, "local_function_stack"):
        try:
            stack = " <- ".join(first.local_function_stack())
        except Exception:  # noqa: BLE001
            stack = ""
    where = f"node {node or '?'} ({op or '?'})" + (f" in {stack}" if stack else "")
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    desc = " ".join(call("desc").split())
    return BuildError(f"{path}: {flavour} cannot parse {where}: {desc}{more}")


def _set_compute_capability(trt, config, compute_capability: str | None) -> str:
    """Apply e.g. "SM89" / "8.9" when the builder supports targeting (TensorRT-RTX); describe the result."""
    if not compute_capability:
        if hasattr(config, "num_compute_capabilities") and config.num_compute_capabilities:
            return ", ".join(str(config.get_compute_capability(i)) for i in range(config.num_compute_capabilities))
        return "builder default (unset)"
    if not (hasattr(config, "set_compute_capability") and hasattr(trt, "ComputeCapability")):
        raise BuildError(f"compute capability {compute_capability}: this TensorRT builds for the GPU it runs on; "
                         "targeting a capability needs TensorRT-RTX")
    name = compute_capability.upper().replace(".", "")
    name = name if name.startswith("SM") or name == "CURRENT" else f"SM{name}"
    value = getattr(trt.ComputeCapability, name, None)
    if value is None:
        known = [n for n in dir(trt.ComputeCapability) if n.startswith("SM")]
        raise BuildError(f"compute capability {compute_capability}: not supported by this builder "
                         f"(choose from {', '.join(known)})")
    config.num_compute_capabilities = 1
    if not config.set_compute_capability(value, 0):
        raise BuildError(f"compute capability {compute_capability}: rejected by the builder")
    return name


def not_in_plugin(nodes: list[MoeNode]) -> NotInPlugin:
    """What our plugin cannot take among `nodes` (manifest moe_nodes without plugin attributes)."""
    from ce_export.onnx_functions import NOT_IN_PLUGIN

    op_types = sorted({node.op_type for node in nodes})
    lacks = sorted({NOT_IN_PLUGIN.get(op_type, f"the op type {op_type}") for op_type in op_types})
    return NotInPlugin(op_types=op_types, nodes=len(nodes),
                       message=f"the TensorRT plugin does not implement {', '.join(op_types)} ({'; '.join(lacks)}): "
                               f"those {len(nodes)} MoE node(s) run their ONNX function bodies in TensorRT")


def build_engine(
    build_dir: str | Path,
    *,
    max_batch: int | None = None,
    max_seq: int | None = None,
    max_context: int | None = None,
    plugin_library: str | Path | None = None,
    compute_capability: str | None = None,
    optimization_level: int | None = None,
    workspace_mib: int | None = None,
    report: Callable[[str], None] = print,
) -> EngineRecord:
    """Build DIR/model.plan from DIR/model.onnx + DIR/manifest.json; returns what the manifest records.

    Limits default to the export limits in the manifest (and may not exceed them). `plugin_library`:
    our TensorRT plugin (.so); with full TensorRT every MoE node must then bind to it, else BuildError.
    With TensorRT-RTX (no plugin layers) or no library, the plugin-less engine is built and the result
    says so. `compute_capability` ("SM89", "8.9", ...) is honoured by TensorRT-RTX only.
    """
    build_dir = Path(build_dir)
    manifest = Manifest.read(build_dir)
    onnx_path = build_dir / manifest.onnx.file
    if not onnx_path.is_file():
        raise BuildError(f"{onnx_path}: missing ONNX file")
    limits = limits_of(manifest, max_batch, max_seq, max_context)
    inputs, _ = onnx_io(onnx_path)
    # The MoE nodes our plugin implements (the others carry no plugin attributes: their bodies run).
    plugin_nodes = [node for node in manifest.onnx.moe_nodes if node.plugin and node.domain == PLUGIN_NAMESPACE]
    moe_nodes = [node.name for node in plugin_nodes]
    op_types = sorted({node.op_type for node in plugin_nodes})
    body_only = [node for node in manifest.onnx.moe_nodes if node not in plugin_nodes]

    trt, flavour = load_tensorrt()
    runtime = runtime_label(trt, flavour)
    logger = _Logger(trt)
    builder = trt.Builder(logger.trt_logger)

    plugin = {"bound": False, "library": str(plugin_library) if plugin_library else None,
              "namespace": PLUGIN_NAMESPACE, "version": PLUGIN_VERSION}
    if body_only:
        plugin["not_in_plugin"] = lacking = not_in_plugin(body_only)
        report(f"  {lacking.message}")
    use_plugin = False
    if plugin_library is None:
        plugin["reason"] = "no plugin library given: MoE nodes inlined from their ONNX function bodies"
    elif flavour == "tensorrt_rtx" or not hasattr(trt.INetworkDefinition, "add_plugin_v3"):
        plugin["reason"] = f"{runtime} has no plugin layers: MoE nodes inlined from their ONNX function bodies"
    elif not op_types:
        plugin["reason"] = "the model has no MoE nodes of the op types our plugin implements: function bodies inlined"
    else:
        plugin["mechanism"] = _load_plugin(trt, builder, Path(plugin_library), op_types)
        use_plugin = True

    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger.trt_logger)
    if use_plugin and hasattr(trt, "OnnxParserFlag") and hasattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE"):
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
        plugin["parser_flag"] = "ENABLE_PLUGIN_OVERRIDE"

    report(f"  {runtime}: parsing {onnx_path.name} (strongly typed)")
    start = time.perf_counter()
    try:
        parsed = parser.parse_from_file(str(onnx_path))
    except Exception as error:  # noqa: BLE001 - the binding raises on some malformed files
        raise BuildError(f"{onnx_path}: {runtime} parser failed ({type(error).__name__}: {error})") from None
    if not parsed:
        raise _parse_error(trt, parser, onnx_path, runtime)
    parse_seconds = time.perf_counter() - start

    counts = _moe_layers(trt, network, moe_nodes)
    bound = [name for name, c in counts.items() if c["plugin"] > 0 and c["inlined"] == 0]
    if use_plugin:
        unbound = [name for name in moe_nodes if name not in bound]
        if unbound:
            c = counts[unbound[0]]
            raise BuildError(f"{onnx_path}: MoE node {unbound[0]} did not become a {PLUGIN_NAMESPACE} plugin layer "
                             f"({c['plugin']} plugin layers, {c['inlined']} inlined body layers; "
                             f"{len(unbound)} of {len(moe_nodes)} MoE nodes unbound) with {plugin['library']}")
        plugin["bound"] = True
    elif moe_nodes and len(bound) == len(moe_nodes):  # creators registered earlier in this process
        plugin.update(bound=True, mechanism="already registered in this process")
        plugin.pop("reason", None)
        use_plugin = True
    else:
        not_inlined = [name for name, c in counts.items() if c["inlined"] == 0]
        if not_inlined:
            raise BuildError(f"{onnx_path}: MoE node {not_inlined[0]} was neither inlined nor bound to a plugin")

    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    axes = profile_axes(limits["max_batch"], limits["max_sequence"], limits["max_context"])
    config = builder.create_builder_config()
    profiles = []
    for index, (name, profile_ranges) in enumerate(axes.items()):
        profile = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in profile_shapes(inputs, profile_ranges).items():
            if tensor in network_inputs:
                profile.set_shape(tensor, lo, opt, hi)
        config.add_optimization_profile(profile)
        profiles.append({"index": index, "name": name, "axes": {a: list(v) for a, v in profile_ranges.items()}})
    capability = _set_compute_capability(trt, config, compute_capability)
    if optimization_level is not None:
        config.builder_optimization_level = int(optimization_level)
    if workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    monitor = _progress_monitor(trt, report)
    if monitor is not None and hasattr(config, "progress_monitor"):
        config.progress_monitor = monitor

    report(f"  building the engine: {network.num_layers} layers, 2 profiles (prefill, decode), "
           f"{'plugin' if use_plugin else 'plugin-less'}, compute capability {capability}")
    start = time.perf_counter()
    try:
        serialized = builder.build_serialized_network(network, config)
    except Exception as error:  # noqa: BLE001
        raise BuildError(f"{onnx_path}: {runtime} engine build failed ({type(error).__name__}: {error})") from None
    build_seconds = time.perf_counter() - start
    if serialized is None:
        last = " ".join(logger.errors[-1].split()) if logger.errors else "no error logged"
        raise BuildError(f"{onnx_path}: {runtime} engine build failed: {last}")

    plan = build_dir / PLAN
    partial = plan.with_name(f".{PLAN}.partial")
    try:
        with open(partial, "wb") as handle:
            handle.write(serialized)
        os.replace(partial, plan)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise BuildError(f"{plan}: cannot write ({error.strerror or error})") from None
    size = plan.stat().st_size
    report(f"  {plan.name}: {size / 2**20:.1f} MiB, built in {build_seconds:.1f} s")
    return EngineRecord.model_validate({
        "plan": PLAN,
        "plan_bytes": size,
        "runtime": runtime,
        "runtime_version": trt.__version__,
        "strongly_typed": bool(flags),
        "plugin": plugin,
        "moe_nodes": EngineMoeNodes(count=len(moe_nodes), plugin_layers=sum(c["plugin"] for c in counts.values()),
                                    bound=len(bound) if use_plugin else 0,
                                    inlined=sum(1 for c in counts.values() if c["inlined"] > 0)),
        "limits": limits,
        "profiles": profiles,
        "num_optimization_profiles": int(config.num_optimization_profiles),
        "compute_capability": capability,
        "builder_optimization_level": int(config.builder_optimization_level),
        "network_layers": int(network.num_layers),
        "parse_seconds": round(parse_seconds, 3),
        "build_seconds": round(build_seconds, 3),
        "log_warnings": len(logger.warnings),
    })
