"""`generate`: greedy tokens from a build folder, printed as they come.

Runtimes: onnxruntime-genai (`og.Model(DIR)` over the folder's genai_config.json; the default when it
is installed and serves the build on CPU), our ONNX Runtime loop over model.onnx (prefill, then one
decode step per token over the KV cache), or the captured PyTorch model (the reference). Text in and
out through the folder's tokenizer when it has one, token ids otherwise.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from ce_export.clients import GENAI_CONFIG, special_tokens
from ce_export.errors import CeExportError, one_line
from ce_export.manifest import Manifest, read_manifest

RUNTIMES = ("genai", "ort", "torch")


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise CeExportError(f"--ids: {text!r} is not a comma-separated list of token ids") from None
    return ids


def generate(folder: str | Path, prompt: str | None = None, ids: list[int] | None = None, max_new_tokens: int = 32,
             runtime: str | None = None, out=None) -> list[int]:
    """Stream the greedy continuation of `prompt` (text) or `ids` to `out` (stdout); returns the new token ids."""
    out = out or sys.stdout
    folder = Path(folder)
    manifest = read_manifest(folder)
    tokenizer = folder_tokenizer(folder)
    if prompt is not None:
        if tokenizer is None:
            raise CeExportError(f"{folder}: no tokenizer in the build folder (its checkpoint had none): "
                                "give token ids with --ids")
        ids = tokenizer.encode(prompt)
    check_request(folder, manifest, ids, max_new_tokens)
    runtime = runtime or default_runtime(folder, manifest)
    stop = eos_ids(folder)
    if runtime == "genai":
        tokens, described = genai_tokens(folder, manifest, ids, max_new_tokens)
    elif runtime == "ort":
        tokens, described = ort_tokens(folder, manifest, ids, max_new_tokens, stop)
    elif runtime == "torch":
        tokens, described = torch_tokens(folder, manifest, ids, max_new_tokens, stop)
    else:
        raise CeExportError(f"--runtime: unknown runtime {runtime!r} (choose from {', '.join(RUNTIMES)})")
    streamer = text_streamer(tokenizer, out) if tokenizer is not None else IdStreamer(out)
    streamer.put(torch.tensor([ids]))
    new = []
    start = time.perf_counter()
    for token in tokens:
        new.append(token)
        if token in stop and tokenizer is not None:
            break  # the EOS ends the text; ids are all printed
        streamer.put(torch.tensor([token]))
    streamer.end()
    seconds = time.perf_counter() - start
    print(f"ce_export: {len(new)} tokens in {seconds:.2f} s, greedy, through {described}", file=sys.stderr)
    return new


def folder_tokenizer(folder: Path):
    from ce_export.tokenizer import load_tokenizer

    return load_tokenizer(folder)


def eos_ids(folder: Path) -> set[int]:
    eos = special_tokens(folder)["eos_token_id"]
    return set() if eos is None else set(eos if isinstance(eos, list) else [eos])


def check_request(folder: Path, manifest: Manifest, ids: list[int], max_new_tokens: int) -> None:
    vocab = manifest.model.vocab_size
    limits = manifest.onnx.limits
    if not ids:
        raise CeExportError("the prompt is empty (no token ids)")
    bad = next((token for token in ids if not 0 <= token < vocab), None)
    if bad is not None:
        raise CeExportError(f"token id {bad} is outside the model's vocabulary (vocab_size={vocab})")
    if max_new_tokens < 1:
        raise CeExportError("--max-new-tokens must be at least 1")
    if len(ids) > limits.max_sequence:
        raise CeExportError(f"the prompt has {len(ids)} tokens; {folder} was built with --max-seq {limits.max_sequence}")
    if len(ids) + max_new_tokens > limits.max_context:
        raise CeExportError(f"{len(ids)} prompt + {max_new_tokens} new tokens exceed the build's context of "
                            f"{limits.max_context} tokens (--max-context)")


def genai_available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def default_runtime(folder: Path, manifest: Manifest) -> str:
    genai = manifest.clients.onnxruntime_genai
    if genai.provider == "cpu" and (folder / GENAI_CONFIG).is_file() and genai_available():
        return "genai"
    return "ort"


def genai_tokens(folder: Path, manifest: Manifest, ids: list[int], max_new_tokens: int) -> tuple[Iterator[int], str]:
    if not genai_available():
        raise CeExportError("--runtime genai: onnxruntime-genai is not installed (pip install 'ce_export[genai]')")
    genai = manifest.clients.onnxruntime_genai
    if not genai.supported or not (folder / GENAI_CONFIG).is_file():
        reason = genai.reason or f"the folder has no {GENAI_CONFIG} (built before ce_export wrote one: rebuild it)"
        raise CeExportError(f"--runtime genai: onnxruntime-genai cannot run {folder}: {reason}")
    import onnxruntime_genai as og

    try:
        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens([ids])
    except RuntimeError as error:  # e.g. a bf16 build's CUDA provider on a CPU-only onnxruntime-genai,
        # or a genai_config.json edited since the build (onnxruntime-genai reports both as RuntimeError)
        raise CeExportError(f"--runtime genai: onnxruntime-genai cannot load {folder}: "
                            f"{one_line(str(error).splitlines()[0] if str(error) else '', 300)}") from None

    def tokens():
        while not generator.is_done():
            try:
                generator.generate_next_token()
            except RuntimeError as error:
                raise CeExportError(f"--runtime genai: onnxruntime-genai failed on {folder}: "
                                    f"{one_line(str(error), 300)}") from None
            yield int(generator.get_next_tokens()[0])

    return tokens(), f"onnxruntime-genai {og.__version__}"


def ort_tokens(folder: Path, manifest: Manifest, ids: list[int], max_new_tokens: int, stop: set[int]):
    import onnxruntime

    from ce_export.onnx_precision import OnnxPrecisionView
    from ce_export.runners import OrtRunner

    view = OnnxPrecisionView(folder / manifest.onnx.file, manifest.dtype)
    runtime = OrtRunner(view.model_for_runtime(), exact_dequantize=manifest.quantized,
                        path=view.onnx_path)
    described = f"ONNX Runtime {onnxruntime.__version__} CPU ({view.numerics_note})"
    return greedy_ids(runtime, manifest, ids, max_new_tokens, stop, view.runtime_torch_dtype), described


def torch_tokens(folder: Path, manifest: Manifest, ids: list[int], max_new_tokens: int, stop: set[int]):
    from ce_export.capture import build_torch_model
    from ce_export.dtypes import DTYPES
    from ce_export.load import load_checkpoint
    from ce_export.quantize import fake_quantize_model, quantize_activations
    from ce_export.runners import TorchRunner

    dtype = DTYPES[manifest.dtype]
    lm = build_torch_model(load_checkpoint(manifest.source.checkpoint(folder)), dtype)
    quantization = manifest.quantization
    if quantization is not None:  # the artifact's q and scales, dequantized in its dtype
        fake_quantize_model(lm, quantization.mode, dtype, dtype)
        if quantization.activations is not None and quantization.activations.scales:
            quantize_activations(lm, quantization.activations.scales)
    described = f"PyTorch {torch.__version__} ({manifest.dtype}, the captured model)"
    return greedy_ids(TorchRunner(lm), manifest, ids, max_new_tokens, stop, dtype), described


def greedy_ids(runner, manifest: Manifest, ids: list[int], max_new_tokens: int, stop: set[int], dtype) -> Iterator[int]:
    """runners.greedy from the prompt `ids` (one row) and an empty KV cache of the manifest's shapes, token by token."""
    from ce_export.runners import greedy

    model = manifest.model
    key, value = (1, model.kv_heads, 0, model.key_dim), (1, model.kv_heads, 0, model.value_dim)
    past = tuple(torch.zeros(shape, dtype=dtype) for _ in range(model.num_layers) for shape in (key, value))
    prompt = torch.tensor([ids])
    for tokens, _ in greedy(runner, prompt, torch.ones_like(prompt), past, max_new_tokens, stop):
        yield int(tokens)


class IdStreamer:
    """Prints token ids as they come (transformers' streamer interface: put / end)."""

    def __init__(self, out):
        self.out = out
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.out.write(" ".join(str(token) for token in value.flatten().tolist()) + " ")
        self.out.flush()

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()


def text_streamer(tokenizer, out):
    """transformers' TextStreamer (it holds text back until a word is complete), writing to `out`."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
