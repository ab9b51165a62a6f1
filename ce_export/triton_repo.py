"""A Triton Inference Server model repository from a build folder.

    REPO/<name>_trt/config.pbtxt + 1/model.plan                    platform "tensorrt_plan"
    REPO/<name>_onnx/config.pbtxt + 1/model.onnx (+ model.onnx.data) platform "onnxruntime_onnx"

Layout: <repo>/<model>/config.pbtxt and numeric version folders (server docs/user_guide/model_repository.md).
Inputs/outputs, data types and dims come from model.onnx (the TensorRT engine has the same I/O);
dynamic dims are -1 and max_batch_size is 0, since batch is an explicit dimension of every tensor.
The TensorRT model lists both optimization profiles in its instance group: without `profile`,
Triton uses only the first one (model_config.proto, ModelInstanceGroup.profile), i.e. prefill only.

The plugin library cannot be named in config.pbtxt. Triton loads TensorRT plugins for the whole
server, either with LD_PRELOAD (server docs/user_guide/custom_operations.md, "TensorRT") or with
`--backend-config=tensorrt,plugins="/a.so;/b.so"` (tensorrt_backend README, "Command-line Options").
The generated config says both, with the library's path, in its header comment.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable

from ce_export.artifacts import staged_folder
from ce_export.engine import PLAN
from ce_export.errors import BuildError
from ce_export.io_schema import TensorSpec, onnx_io
from ce_export.manifest import EngineRecord, Manifest

TRT_PLATFORM = "tensorrt_plan"
ONNX_PLATFORM = "onnxruntime_onnx"
VERSION = "1"
TRITON_DTYPES = {"BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16",
                 "INT32": "TYPE_INT32", "INT64": "TYPE_INT64", "UINT32": "TYPE_UINT32", "UINT64": "TYPE_UINT64",
                 "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64", "BF16": "TYPE_BF16"}
LINK_MODES = ("copy", "hardlink", "symlink")


def model_name(manifest: Manifest, name: str | None = None) -> str:
    """Base name of the Triton models: `name`, else "demo" or the checkpoint folder's name, sanitised."""
    if name is None:
        name = "demo" if manifest.source.kind == "demo" else Path(manifest.source.path).name
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"
    return clean


def triton_dims(spec: TensorSpec) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in spec.dims]


def _tensor_block(kind: str, specs: list[TensorSpec]) -> list[str]:
    lines = [f"{kind} ["]
    for index, spec in enumerate(specs):
        dtype = TRITON_DTYPES.get(spec.dtype)
        if dtype is None:
            raise BuildError(f"{spec.name}: data type {spec.dtype} has no Triton equivalent")
        lines += [
            "  {",
            f'    name: "{spec.name}"',
            f"    data_type: {dtype}",
            f"    dims: [ {', '.join(str(d) for d in triton_dims(spec))} ]",
            "  }" + ("," if index < len(specs) - 1 else ""),
        ]
    return lines + ["]"]


def model_config_text(
    name: str,
    platform: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    *,
    default_model_filename: str,
    instance_kind: str = "KIND_GPU",
    instance_count: int = 1,
    profiles: Iterable[int] = (),
    comments: Iterable[str] = (),
) -> str:
    """config.pbtxt text (protobuf text format of inference.ModelConfig)."""
    lines = [f"# {line}" if line else "#" for line in comments]
    lines += [
        f'name: "{name}"',
        f'platform: "{platform}"',
        "max_batch_size: 0",
        *_tensor_block("input", inputs),
        *_tensor_block("output", outputs),
        "instance_group [",
        "  {",
        f"    kind: {instance_kind}",
        f"    count: {int(instance_count)}",
    ]
    profiles = [str(p) for p in profiles]
    if profiles:
        lines.append(f"    profile: [ {', '.join(f'{chr(34)}{p}{chr(34)}' for p in profiles)} ]")
    lines += ["  }", "]", f'default_model_filename: "{default_model_filename}"', ""]
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def load_model_config_pb2():
    """Triton's ModelConfig protobuf module from the `tritonclient` wheel, or None when not installed.

    `tritonclient.grpc.model_config_pb2` sits in a package whose __init__ needs grpcio; the file itself
    needs only protobuf, so when the package import fails it is loaded from its path.
    """
    try:
        from tritonclient.grpc import model_config_pb2  # type: ignore[import-not-found]

        return model_config_pb2
    except Exception:  # noqa: BLE001 - ImportError, or RuntimeError raised by tritonclient without grpc
        pass
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("ce_export_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def validate_model_config(text: str, where: str = "config.pbtxt"):
    """Parse `text` as Triton's inference.ModelConfig; returns the message, or None without tritonclient."""
    pb2 = load_model_config_pb2()
    if pb2 is None:
        return None
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, pb2.ModelConfig())
    except text_format.ParseError as error:
        raise BuildError(f"{where}: not a valid Triton model configuration ({error})") from None


def _place(source: Path, target: Path, link: str) -> None:
    if link == "symlink":
        target.symlink_to(source.absolute())
        return
    if link == "hardlink":
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # another file system: copy instead
    shutil.copyfile(source, target)


def _plugin_comments(plugin_library: str | None, bound: bool | None) -> list[str]:
    if bound is False:
        return ["The engine has no plugin layers (MoE nodes inlined from their ONNX function bodies): no plugin",
                "library is needed."]
    lib = plugin_library or "/path/to/libce_export_trt.so"
    first = ("This engine contains ce_export::MoE / CompressedMoE plugin layers (IPluginV3). Triton cannot name a"
             if bound else "manifest.json has no engine record; if the engine has ce_export plugin layers: Triton cannot name a")
    return [
        first,
        "plugin library here; load it into the server, built against Triton's TensorRT version, either with",
        f"  LD_PRELOAD={lib}:${{LD_PRELOAD}} tritonserver --model-repository=REPO",
        "(Triton docs, user_guide/custom_operations.md, \"TensorRT\") or with",
        f"  tritonserver --model-repository=REPO --backend-config=tensorrt,plugins=\"{lib}\"",
        "(triton-inference-server/tensorrt_backend README, \"Command-line Options\"; ';' separates libraries).",
    ]


def write_triton_repo(
    build_dir: str | Path,
    repo: str | Path,
    *,
    name: str | None = None,
    models: Iterable[str] | None = None,
    plugin_library: str | Path | None = None,
    instance_count: int = 1,
    link: str = "copy",
    force: bool = False,
    engine: EngineRecord | None = None,
    report: Callable[[str], None] = print,
) -> dict:
    """Write REPO/<name>_trt and/or REPO/<name>_onnx from build folder DIR; returns what was written.

    `models`: any of "trt", "onnx" (default: "onnx", plus "trt" when DIR/model.plan exists). Each
    model folder is written under a temporary name and renamed into place; an existing one needs
    `force`. `link`: how model files get there ("copy", "hardlink" falling back to copy, "symlink").
    `engine`: an engine record (default: manifest.json's), for the runtime, plugin and profiles.
    Each config is checked against Triton's ModelConfig schema when `tritonclient` is installed.
    """
    build_dir, repo = Path(build_dir), Path(repo)
    if link not in LINK_MODES:
        raise BuildError(f"link mode {link!r}: choose from {', '.join(LINK_MODES)}")
    manifest = Manifest.read(build_dir)
    plan = build_dir / PLAN
    models = list(models) if models is not None else (["trt"] if plan.is_file() else []) + ["onnx"]
    unknown = [m for m in models if m not in ("trt", "onnx")]
    if unknown:
        raise BuildError(f"unknown Triton model kind {unknown[0]!r} (choose trt and/or onnx)")
    if "trt" in models and not plan.is_file():
        raise BuildError(f"{plan}: missing engine (build with --target trt first)")
    inputs, outputs = onnx_io(build_dir / manifest.onnx.file)
    base = model_name(manifest, name)
    engine = engine if engine is not None else manifest.engine
    bound = engine.plugin.bound if engine is not None else None
    library = str(plugin_library) if plugin_library else engine.plugin.library if engine is not None else None
    written: dict = {"repository": str(repo.absolute()), "models": {}}

    for kind in models:
        model = f"{base}_{kind}"
        if kind == "trt":
            runtime = engine.runtime if engine is not None else "unknown TensorRT"
            comments = [f"Generated by ce_export from {build_dir.absolute() / PLAN} ({runtime}, "
                        f"{'plugin' if bound else 'plugin-less' if bound is False else 'plugin use unknown'} engine).",
                        "Two optimization profiles: 0 prefill (past 0), 1 decode (sequence 1); Triton picks by shape.",
                        *_plugin_comments(library, bound)]
            notes = []
            if runtime.startswith("tensorrt_rtx"):
                notes.append("built with TensorRT-RTX: Triton's TensorRT backend needs a plan from full TensorRT "
                             "of its own version (rebuild on the serving machine, e.g. `bash trtexec.sh --build`, "
                             f"and replace {VERSION}/{PLAN})")
                comments += [f"NOTE: {notes[-1]}."]
            files = [(plan, PLAN)]
            text = model_config_text(model, TRT_PLATFORM, inputs, outputs, default_model_filename=PLAN,
                                     instance_kind="KIND_GPU", instance_count=instance_count,
                                     profiles=[p.index for p in engine.profiles] if engine and engine.profiles else (0, 1),
                                     comments=comments)
        else:
            onnx_file = manifest.onnx.file
            files = [(build_dir / name, name) for name in manifest.onnx.file_names()]
            comments = [f"Generated by ce_export from {build_dir.absolute() / onnx_file} (target "
                        f"{manifest.target}, {manifest.dtype}).",
                        "MoE nodes are ce_export custom nodes with model-local ONNX functions: ONNX Runtime runs",
                        "their bodies, no custom-op library needed."]
            notes = []
            text = model_config_text(model, ONNX_PLATFORM, inputs, outputs, default_model_filename=onnx_file,
                                     instance_kind="KIND_AUTO", instance_count=instance_count, comments=comments)
        message = validate_model_config(text, f"{repo / model / 'config.pbtxt'}")
        with staged_folder(repo / model, force=force) as staging:
            (staging / "config.pbtxt").write_text(text)
            version_dir = staging / VERSION
            version_dir.mkdir()
            for source, target in files:
                if not source.is_file():
                    raise BuildError(f"{source}: missing (listed in manifest.json)")
                _place(source, version_dir / target, link)
        report(f"  Triton model {model}: {repo / model} ({'tensorrt_plan' if kind == 'trt' else 'onnxruntime_onnx'})"
               + (f"; {notes[0]}" if notes else ""))
        written["models"][model] = {
            "platform": TRT_PLATFORM if kind == "trt" else ONNX_PLATFORM,
            "path": str((repo / model).absolute()),
            "files": [f"{VERSION}/{target}" for _, target in files],
            "schema_checked": message is not None,
            "notes": notes,
        }
    if bound and "trt" in models:
        written["plugin_library"] = library
        written["tritonserver"] = [
            f"LD_PRELOAD={library}:${{LD_PRELOAD}} tritonserver --model-repository={repo.absolute()}",
            f"tritonserver --model-repository={repo.absolute()} --backend-config=tensorrt,plugins=\"{library}\"",
        ]
    else:
        written["tritonserver"] = [f"tritonserver --model-repository={repo.absolute()}"]
    return written
