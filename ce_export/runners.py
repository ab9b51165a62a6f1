"""The decoder runners that verify, synchronized parity, bench, task and generate share, and the greedy loop.

Both runners take and return torch tensors through capture.KvCacheDecoder's flat interface:
    runner(input_ids, attention_mask, position_ids, past) -> [logits, present K/V ...]
    runner.prepare(input_ids, attention_mask, position_ids, past) -> PreparedStep
`prepare` converts (and, for ONNX Runtime, binds) the inputs once, so that `run()` is only the call
itself: what bench times.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ce_export.capture import KvCacheDecoder
from ce_export.errors import RuntimeInputError, VerifyError, one_line

CPU_PROVIDER, CUDA_PROVIDER = "CPUExecutionProvider", "CUDAExecutionProvider"
# ONNX Runtime's intra-op threads when a runner is not given `threads` (unset: one per physical core).
# For processes sharing a machine, as parallel test workers do: ONNX Runtime's threads spin while
# they wait, and two sessions with a thread per core each on the same cores ran 7-9x slower.
THREADS_VARIABLE = "CE_EXPORT_ORT_THREADS"


def threads_from_environment() -> int:
    """CE_EXPORT_ORT_THREADS as a thread count; 0 when unset."""
    value = os.environ.get(THREADS_VARIABLE, "").strip()
    if not value:
        return 0
    if not value.isdigit() or int(value) < 1:
        raise RuntimeInputError(f"{THREADS_VARIABLE}={value!r}: expected a positive number of threads")
    return int(value)


ORT_FLOAT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
                   "tensor(bfloat16)": torch.bfloat16}
NUMPY_DTYPES = {torch.int64: np.int64, torch.float32: np.float32, torch.float16: np.float16}


@dataclass
class PreparedStep:
    """One prepared call: `run()` is what is timed, `logits()` the last position's logits after it
    (fp32, on the CPU). `inputs`: tensors whose memory the call reads in place, kept alive with it."""

    run: Callable[[], object]
    logits: Callable[[], torch.Tensor]
    inputs: tuple = ()


def onnx_runtime_errors() -> tuple[type[Exception], ...]:
    """The exception types ONNX Runtime raises for a model it cannot load or run (its own, not Python's)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException", "InvalidProtobuf",
             "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return tuple(getattr(state, name) for name in names if hasattr(state, name))


class ProviderError(RuntimeError):
    """An ONNX Runtime session did not get the execution provider it was asked for."""


def require_provider(session, provider: str) -> None:
    """ONNX Runtime falls back to the CPU provider, with a log line, when it cannot start the one
    asked for (onnxruntime without CUDA, a missing CUDA library): refuse such a session."""
    granted = session.get_providers()
    if provider not in granted:
        raise ProviderError(f"ONNX Runtime did not give the session {provider} (it got {', '.join(granted)}): "
                            "not timing it under that label")


class OrtRunner:
    """ONNX Runtime session over an exported decoder, on the CPU or a CUDA device. A file ONNX
    Runtime cannot load or run is a VerifyError naming it (exit 2), not a traceback.

    exact_dequantize: run Q/DQ nodes as written. By default ONNX Runtime fuses DequantizeLinear(int8
    weight) -> MatMul into MatMulNBits, which also quantizes the activations: faster, but not the
    weight-only math the file states.
    weights_as_stored: hold each weight once, as the file stores it (verification of large models).
    By default ONNX Runtime constant-folds what it can at load time (transposes and splits of weights
    become new fp32 initializers beside the originals; casts of bf16 weights in onnx_precision's view
    would become an fp32 copy of the model) and prepacks MatMul weights into copies of its own. With
    weights_as_stored neither happens: the session keeps the weights of the external-data file
    memory-mapped, derived tensors exist only while an op needs them, and without the CPU memory
    arena they are returned to the system afterwards. Same kernels, same results; slower.
    profile_dir: ONNX Runtime's own profiler records every node's time of every call, in a file in
    that folder; `profile_events` ends the recording and returns them.
    """

    def __init__(self, model, device: torch.device | str = "cpu", *, threads: int | None = None,
                 exact_dequantize: bool = False, weights_as_stored: bool = False, path: str | Path | None = None,
                 profile_dir: str | Path | None = None):
        """model: a file, or an onnx_ir model (held in memory; its external data stays in its folder),
        for which `path` names the file it was read from in messages."""
        import onnx_ir as ir
        import onnxruntime as ort

        self.device = torch.device(device)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if exact_dequantize:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        extra = {}
        if weights_as_stored:
            options.add_session_config_entry("session.disable_prepacking", "1")
            options.enable_cpu_mem_arena = False
            extra["disabled_optimizers"] = ["ConstantFolding"]
        if profile_dir is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(profile_dir) / "onnxruntime_profile")
        threads = threads or threads_from_environment()
        if threads:
            options.intra_op_num_threads = threads
        provider = CUDA_PROVIDER if self.device.type == "cuda" else CPU_PROVIDER
        providers = [CPU_PROVIDER]
        if provider == CUDA_PROVIDER:
            providers = [(CUDA_PROVIDER, {"device_id": self.device.index or 0}), CPU_PROVIDER]
        source = str(model)
        if path is None:
            path = "model.onnx (in memory)" if isinstance(model, ir.Model) else model
        self.path = Path(path)
        if isinstance(model, ir.Model):
            folders = {value.const_value.base_dir for value in model.graph.initializers.values()
                       if isinstance(value.const_value, ir.ExternalTensor)}
            if len(folders) > 1:
                raise ValueError(f"external data in several folders: {sorted(map(str, folders))}")
            if folders:
                options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                 str(folders.pop()))
            source = ir.serde.serialize_model(model).SerializeToString()
        try:
            self.session = ort.InferenceSession(source, options, providers=providers, **extra)
        except onnx_runtime_errors() as error:
            raise VerifyError(f"{self.path}: ONNX Runtime cannot load it ({one_line(str(error), 300)})") from None
        require_provider(self.session, provider)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        past_type = self.session.get_inputs()[3].type if len(self.input_names) > 3 else "tensor(float)"
        self.past_dtype = ORT_FLOAT_TYPES.get(past_type, torch.float32)

    def __call__(self, input_ids, attention_mask, position_ids, past: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        arrays = [input_ids, attention_mask, position_ids, *past]
        feed = {name: tensor.detach().contiguous().numpy() for name, tensor in zip(self.input_names, arrays)}
        try:
            outputs = self.session.run(self.output_names, feed)
        except onnx_runtime_errors() as error:
            shapes = ", ".join(f"{name} {list(array.shape)}" for name, array in list(feed.items())[:4])
            raise VerifyError(f"{self.path}: ONNX Runtime failed running it on {shapes}, ... "
                              f"({one_line(str(error), 300)})") from None
        return [torch.from_numpy(out) for out in outputs]

    def prepare(self, input_ids, attention_mask, position_ids, past: tuple[torch.Tensor, ...]) -> PreparedStep:
        """The inputs copied to the device once and bound in place with the outputs (IO binding)."""
        tensors = [t.to(self.device).contiguous() for t in (input_ids, attention_mask, position_ids)]
        tensors += [t.to(self.device, self.past_dtype).contiguous() for t in past]
        binding = self.session.io_binding()
        device_type, device_id = ("cuda" if self.device.type == "cuda" else "cpu"), self.device.index or 0
        for name, tensor in zip(self.input_names, tensors):
            binding.bind_input(name, device_type, device_id, NUMPY_DTYPES[tensor.dtype], list(tensor.shape),
                               tensor.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, device_type, device_id)
        if device_type == "cuda":
            torch.cuda.synchronize(self.device)  # the inputs were copied on PyTorch's stream, ORT reads on its own

        def run():
            self.session.run_with_iobinding(binding)
            if device_type == "cuda":
                binding.synchronize_outputs()

        def logits():
            return torch.from_numpy(np.asarray(binding.get_outputs()[0].numpy(), dtype=np.float32))[:, -1]

        return PreparedStep(run, logits, tuple(tensors))

    def profile_events(self) -> list[dict]:
        """The profiler's events since the session started (it needs `profile_dir`), in the Chrome
        trace format ONNX Runtime writes: per node call, "cat" "Node", its "name", "ts" and "dur" in
        microseconds, and "args" with "op_name" and the input and output shapes. Ends the recording."""
        path = self.session.end_profiling()
        if not path:
            raise ValueError(f"{self.path}: no profile: the runner was made without profile_dir")
        return json.loads(Path(path).read_text())

    def check_names(self, inputs: list[str], outputs: list[str], manifest: Path) -> None:
        """The session's inputs and outputs are the ones manifest.json lists, in its order."""
        for what, listed, actual in (("inputs", inputs, self.input_names), ("outputs", outputs, self.output_names)):
            if list(listed) != actual:
                raise VerifyError(f"{manifest}: onnx.{what} {short_list(listed)} disagree with {self.path.name}'s "
                                  f"{short_list(actual)}")


def short_list(names: list[str]) -> str:
    return str(names[:3])[:-1] + (f", ... ({len(names)})]" if len(names) > 3 else "]")


class TorchRunner:
    """A causal LM (captured, or stock transformers) through KvCacheDecoder, on the device of its
    parameters; `logits` as an ONNX file computes them (every position, or the last one). The past
    is fed in the model's compute dtype."""

    def __init__(self, lm: torch.nn.Module, logits: str = "all"):
        self.decoder = KvCacheDecoder(lm, logits).eval()
        parameter = next(lm.parameters())
        self.dtype = getattr(lm, "compute_dtype", None) or parameter.dtype
        self.device = parameter.device

    def _on_device(self, input_ids, attention_mask, position_ids, past) -> tuple:
        return (*(t.to(self.device) for t in (input_ids, attention_mask, position_ids)),
                tuple(t.to(self.device, self.dtype) for t in past))

    def __call__(self, input_ids, attention_mask, position_ids, past: tuple[torch.Tensor, ...]):
        with torch.no_grad():
            return self.decoder(*self._on_device(input_ids, attention_mask, position_ids, past))

    def prepare(self, input_ids, attention_mask, position_ids, past: tuple[torch.Tensor, ...]) -> PreparedStep:
        """The inputs moved to the device and the past converted once, outside the call."""
        inputs = self._on_device(input_ids, attention_mask, position_ids, past)
        out = {}

        def run():
            out.pop("logits", None)  # a prefill's logits can be GBs: free the last ones first
            with torch.no_grad():
                out["logits"] = self.decoder(*inputs)[0]

        return PreparedStep(run, lambda: out["logits"][:, -1].float().cpu())


def greedy(runner, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: tuple[torch.Tensor, ...],
           new_tokens: int, stop: set[int] | frozenset[int] = frozenset(),
           progress=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy decoding over the flat KV cache, one step at a time: the (left-padded, pad masked out)
    prompt with `past` (empty), then one token per row per step. Yields each step's tokens [B, 1]
    and the logits they were chosen from [B, V] (fp32), as they come; ends after `new_tokens` steps,
    or after a step whose tokens are all in `stop`."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    step_ids, mask = input_ids, attention_mask
    for _ in range(new_tokens):
        if progress is not None:
            progress.update()
        logits, *past = runner(step_ids, mask, positions, tuple(past))
        logits = logits[:, -1].float()
        step_ids = logits.argmax(-1, keepdim=True)
        yield step_ids, logits
        if stop and set(step_ids.flatten().tolist()) <= stop:
            return
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        positions = positions[:, -1:] + 1


def greedy_tokens(runner, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: tuple[torch.Tensor, ...],
                  new_tokens: int, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`greedy` run to the end: (the new tokens [B, N], the logits of each step [B, N, V])."""
    steps = list(greedy(runner, input_ids, attention_mask, past, new_tokens, progress=progress))
    return torch.cat([tokens for tokens, _ in steps], dim=1), torch.stack([logits for _, logits in steps], dim=1)
