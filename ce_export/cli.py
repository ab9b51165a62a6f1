"""`python -m ce_export`: a thin layer over pipeline.py. User errors exit 2 with one line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import warnings
from importlib.metadata import entry_points
from pathlib import Path

from ce_export.errors import CeExportError, one_line

COMMANDS_GROUP = "ce_export.commands"  # entry points: callables that add subcommands setting `run`


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error reported like every other error: exit 2 and one line."""

    def error(self, message: str):
        self.exit(2, f"ce_export: error: {one_line(message)} (see {self.prog} --help)\n")


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ce_export.dtypes import DTYPES
    from ce_export.manifest import TARGETS
    from ce_export.quantize import QUANTIZATIONS

    parser = OneLineParser(
        prog="python -m ce_export",
        description="Export MoE and Compressed-Experts language models to ONNX / TensorRT, verified against PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="export MODEL (a checkpoint folder, or 'demo') and verify it")
    build.add_argument("model", help="checkpoint folder (config.json + safetensors), or 'demo' for the built-in CE model "
                                     "(trained on a synthetic task language; its quality report measures the task)")
    build.add_argument("--out", required=True, help="output folder (must be empty or absent unless --force)")
    build.add_argument("--target", choices=TARGETS, default="portable",
                       help="portable: custom nodes with ONNX function bodies; ort: plain MoE layers as "
                            "com.microsoft::MoE; trt: custom nodes marked for our TensorRT plugin")
    build.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    build.add_argument("--quantize", choices=QUANTIZATIONS,
                       help="explicit Q/DQ in the ONNX: weight-only int8 / fp8 (E4M3) per output channel, int4 / "
                            "int4-g128 per 64 / 128 inputs, int4-channel per output channel; fp8-w8a8: fp8 weights and FP8 activations with "
                            "calibrated static per-tensor scales")
    build.add_argument("--calib", metavar="DATA",
                       help="calibration data as for `calibrate --data` (text, JSONL, .npy, .json): FP8 activation "
                            "scales and the held-out perplexity of the quality report (default: the checkpoint's "
                            "task.json when it has one, as the demo does, else the built-in corpus)")
    build.add_argument("--logits", choices=("all", "last"),
                       help="logits of every position or of the last one only (same output name, [B, 1, V]); "
                            "default: all for portable and ort, last for trt")
    build.add_argument("--max-batch", type=int, default=64)
    build.add_argument("--max-seq", type=int, default=4096, help="longest input sequence per call (prefill)")
    build.add_argument("--max-context", type=int, default=4096, help="longest KV cache (past length)")
    build.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    build.add_argument("--no-verify", action="store_true", help="skip the parity check (not recommended)")
    build.add_argument("--plugin-lib", help="--target trt: our TensorRT plugin library (default: $CE_EXPORT_PLUGIN_LIB "
                                            "or plugins/trt/build/libce_export_trt.so when built)")
    build.add_argument("--triton-repo", help="also write a Triton Inference Server model repository to this folder")

    verify = sub.add_parser("verify", help="rerun the parity check of a build folder; exit 2 when it fails")
    verify.add_argument("folder")

    bench = sub.add_parser("bench", help="time a build folder: PyTorch, transformers and ONNX Runtime side by side")
    bench.add_argument("folder")
    bench.add_argument("--out", help="where bench.json / bench.md / bench.png go (default: the build folder)")
    bench.add_argument("--budget", type=float, default=1.0, help="seconds of timed repetitions per row and point")
    bench.add_argument("--device", default="cpu", help="cpu or cuda[:N]; on cuda the points are the GPU suite's")
    bench.add_argument("--dtype", choices=("fp32", "fp16", "bf16"),
                       help="PyTorch rows' precision (default fp32 on cpu, bf16 on cuda)")
    bench.add_argument("--compile", action="store_true", help="add a fast-path row with the decode step torch.compile'd")
    bench.add_argument("--in-turn", type=non_negative_int, default=5, metavar="ROUNDS",
                       help="then time the captured PyTorch model and ONNX Runtime called in turn, both resident, "
                            "for ROUNDS rounds per point (CPU; default 5; 0: skip)")
    bench.add_argument("--trtexec", action="store_true",
                       help="instead, run trtexec on the folder's TensorRT engine (writes bench_trtexec.json)")

    generate = sub.add_parser("generate", help="greedy tokens from a build folder, printed as they come "
                                               "(onnxruntime-genai when installed, else ONNX Runtime)")
    generate.add_argument("folder", help="a build folder")
    given = generate.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="text, through the folder's tokenizer")
    given.add_argument("--ids", help="comma-separated token ids, e.g. 1,2,3")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--runtime", choices=("genai", "ort", "torch"),
                          help="genai: onnxruntime-genai over genai_config.json (default when installed and it "
                               "serves the build on CPU); ort: our ONNX Runtime loop; torch: the captured PyTorch model")

    demo = sub.add_parser("demo", help="write the built-in demo checkpoint (CE by default; trained, with its tokenizer "
                                       "and task.json) to a folder")
    demo.add_argument("out")
    demo.add_argument("--plain", action="store_true", help="the same model without compressed experts (top-k MoE)")
    demo.add_argument("--force", action="store_true")
    # Other packages' commands (ce_calibrate's `calibrate` and `trim`), found without importing them.
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda entry: entry.name):
        entry.load()(sub)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    from ce_export import pipeline
    from ce_export.demo import write_demo_checkpoint

    if args.command == "build":
        for flag in ("max_batch", "max_seq", "max_context"):
            if getattr(args, flag) < 1:
                raise CeExportError(f"--{flag.replace('_', '-')} must be at least 1")
        options = pipeline.BuildOptions(target=args.target, dtype=args.dtype, max_batch=args.max_batch,
                                        max_seq=args.max_seq, max_context=args.max_context, force=args.force,
                                        verify=not args.no_verify, plugin_library=args.plugin_lib,
                                        quantize=args.quantize, calib=args.calib, logits=args.logits,
                                        triton_repo=args.triton_repo)
        pipeline.build(args.model, args.out, options)
    elif args.command == "verify":
        pipeline.verify(args.folder)
    elif args.command == "bench":
        from ce_export import bench

        if args.trtexec:
            from ce_export.trtexec import run_trtexec

            run_trtexec(args.folder, out=Path(args.folder) / "bench_trtexec.json")
            return
        points = bench.GPU_POINTS if args.device.startswith("cuda") else bench.CPU_POINTS
        data = bench.bench(args.folder, points=points, budget_s=args.budget, device=args.device, dtype=args.dtype,
                           compile_decode=args.compile, in_turn_rounds=args.in_turn)
        files = bench.write_results(data, Path(args.out or args.folder))
        print(bench.markdown_table(data))
        print("results: " + ", ".join(str(f) for f in files))
    elif args.command == "generate":
        from ce_export.generate import generate, parse_ids

        generate(args.folder, prompt=args.prompt, ids=None if args.ids is None else parse_ids(args.ids),
                 max_new_tokens=args.max_new_tokens, runtime=args.runtime)
    elif args.command == "demo":
        path = write_demo_checkpoint(args.out, compressed=not args.plain, force=args.force)
        print(f"demo checkpoint ({'plain' if args.plain else 'CE'}): {path.absolute()}")
    else:  # a command from the entry point group
        args.run(args)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so that the same cleanup runs
    (staged_folder removes its staging folder) before the process exits."""


def raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for category in (UserWarning, FutureWarning, DeprecationWarning):  # libraries' notes to their developers
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    start = time.perf_counter()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, raise_terminated) if in_main_thread else None
    try:
        run(args)
    except CeExportError as error:
        print(f"ce_export: error: {one_line(str(error))}", file=sys.stderr)
        return error.exit_code
    except OSError as error:
        # The machine's failures that no writer reported with its own path (writers do: artifacts.py).
        from ce_export.artifacts import describe_environment_error, environment_errno

        code = environment_errno(error)
        if code is None or error.filename is None:
            raise
        print(f"ce_export: error: {one_line(describe_environment_error(code, Path(error.filename)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ce_export: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("ce_export: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
    if args.command != "generate":  # generate's stdout is the generated text; it reports on stderr
        print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
