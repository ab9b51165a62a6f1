"""End-to-end latency of exported models vs PyTorch, on this machine, in one command.

    python benchmarks/end_to_end.py [--sizes demo mid] [--out benchmarks/results/cpu-<host>]

For each size it writes the checkpoint (random weights from a fixed seed, CE and plain), builds it
(`--target ort`: plain MoE layers through com.microsoft::MoE, CE layers through our function
bodies), runs `ce_export bench` and writes bench.json / bench.md / bench.png per model plus a
summary.md. Sizes: demo (the built-in model) and mid (hidden 512, 16 experts, 4 layers).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from ce_export import bench, pipeline
from ce_export.demo import demo_config, demo_tensors

SIZES = {
    "demo": {},
    "mid": {"hidden_size": 512, "intermediate_size": 256, "num_experts": 16, "num_attention_heads": 8,
            "num_key_value_heads": 8, "vocab_size": 4096, "initializer_range": 0.05},
}


def write_checkpoint(folder: Path, size: str, compressed: bool) -> Path:
    config = demo_config(compressed) | SIZES[size]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(demo_tensors(config), str(folder / "model.safetensors"))
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["demo", "mid"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results") / f"cpu-{platform.node() or 'host'}")
    parser.add_argument("--budget", type=float, default=1.0)
    args = parser.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    summary = [f"Command: `{command}`", ""]
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            for compressed in (True, False):
                name = f"{size}-{'ce' if compressed else 'plain'}"
                print(f"== {name}", flush=True)
                checkpoint = write_checkpoint(Path(scratch) / name / "checkpoint", size, compressed)
                build_dir = Path(scratch) / name / "build"
                pipeline.build(str(checkpoint), build_dir, pipeline.BuildOptions(target="ort"), report=print)
                data = bench.bench(build_dir, budget_s=args.budget)
                data["command"] = command
                data["build"] = f"{size} model, {'CE' if compressed else 'plain'}, --target ort (scratch folder)"
                bench.write_results(data, args.out / name)
                summary += [f"## {name}", "", bench.markdown_table(data), f"![{name}]({name}/bench.png)", ""]
    (args.out / "summary.md").write_text("\n".join(summary))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
