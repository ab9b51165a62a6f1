"""Memory and time of `build` at real layer width: peak resident memory per stage against checkpoint size.

    python benchmarks/scale.py [--layers 2 4 8] [--kinds ce plain] [--dtype bf16] [--no-verify-too]
                               [--scratch DIR] [--out benchmarks/results/scale]

For each layer count it writes a random checkpoint of OLMoE-1B-7B's layer width (hidden 2048, 64
experts of intermediate 1024, top-8, vocabulary 50304; CE: n_ce 4, `ces` [64, 3, 2048]; bf16
safetensors, one shard per layer as transformers saves large models), then runs
`python -m ce_export build` on it in a child process while sampling the child's memory from
/proc/<pid>/status ten times a second: VmRSS (all resident pages) and RssAnon (private memory; the
rest, RssFile, is memory-mapped files: the checkpoint's and the artifact's weight pages, which the
kernel can drop and read again). Each sample is attributed to the stage the build last announced
("[stage] ..."). Per stage: peak resident memory, peak / checkpoint bytes, seconds per GB. Results
accumulate in results.json (one row per kind, layer count, dtype and verify flag; a rerun replaces
its row), with results.md and scale.png (peak memory against checkpoint size with the fitted slope)
regenerated from all rows. The checkpoints and builds live in --scratch and are deleted at the end
unless --keep.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "plugins"), str(REPO_ROOT / "calibrate")]

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ce_export.demo import demo_config  # noqa: E402

SIZES = {
    # allenai/OLMoE-1B-7B-0924's layer width
    "olmoe": {"hidden_size": 2048, "intermediate_size": 1024, "num_experts": 64, "num_experts_per_tok": 8,
              "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 50304,
              "max_position_embeddings": 4096, "initializer_range": 0.02},
    # the same code on a model small enough for CI (tests/test_benchmark_dry_run.py)
    "tiny": {"hidden_size": 64, "intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 8,
             "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 256, "initializer_range": 0.2},
}
N_CE = 4
SAMPLE_SECONDS = 0.1
BUDGET = {True: 1.5, False: 1.2}  # issue 11: peak <= factor x checkpoint bytes + 1 GB (verify on / off)
STAGE_LINE = re.compile(r"^\[(.+)\] \.\.\.$")
GB = 1e9


# ---------------------------------------------------------------- checkpoints

def write_checkpoints(folder: Path, layers: int, size: str = "olmoe", seed: int = 0) -> dict[str, Path]:
    """A plain and a CE checkpoint sharing every tensor but `ces` (the CE folder links the plain one's
    shards and adds one of its own). Drawn shard by shard: memory stays at one layer."""
    plain, ce = folder / "plain", folder / "ce"
    if (ce / "model.safetensors.index.json").is_file() and (plain / "model.safetensors.index.json").is_file():
        return {"plain": plain, "ce": ce}
    shutil.rmtree(folder, ignore_errors=True)
    plain.mkdir(parents=True)
    ce.mkdir()
    config = demo_config(True) | SIZES[size] | {"num_hidden_layers": layers, "n_ce": N_CE, "dtype": "bfloat16"}
    hidden, inter, experts, vocab = (config[key] for key in ("hidden_size", "intermediate_size", "num_experts",
                                                             "vocab_size"))
    std = config["initializer_range"]
    shards = layers + 1
    plain_map, ces = {}, {}

    def normal(gen, *shape, scale=std):
        return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)

    def norm(gen, size):
        return (1.0 + torch.randn(size, generator=gen) * 0.1).to(torch.bfloat16)

    for shard in range(shards):
        gen = torch.Generator().manual_seed(seed * 1000 + shard)
        if shard == 0:
            tensors = {"model.embed_tokens.weight": normal(gen, vocab, hidden, scale=1.0),
                       "model.norm.weight": norm(gen, hidden), "lm_head.weight": normal(gen, vocab, hidden)}
        else:
            p = f"model.layers.{shard - 1}."
            tensors = {f"{p}self_attn.{proj}.weight": normal(gen, hidden, hidden)
                       for proj in ("q_proj", "k_proj", "v_proj", "o_proj")}
            for name in ("self_attn.q_norm", "self_attn.k_norm", "input_layernorm", "post_attention_layernorm"):
                tensors[f"{p}{name}.weight"] = norm(gen, hidden)
            tensors[f"{p}mlp.gate.weight"] = normal(gen, experts, hidden)
            for expert in range(experts):
                e = f"{p}mlp.experts.{expert}."
                tensors[e + "gate_proj.weight"] = normal(gen, inter, hidden)
                tensors[e + "up_proj.weight"] = normal(gen, inter, hidden)
                tensors[e + "down_proj.weight"] = normal(gen, hidden, inter)
            ces[f"{p}mlp.ces"] = (1.0 + torch.randn(experts, 3, max(hidden, inter), generator=gen) * 0.3).to(torch.bfloat16)
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(plain / name), metadata={"format": "pt"})
        os.symlink((plain / name).absolute(), ce / name)
        plain_map |= {tensor: name for tensor in tensors}
        del tensors
    save_file(ces, str(ce / "ces.safetensors"), metadata={"format": "pt"})
    (plain / "config.json").write_text(json.dumps(config | {"use_ce": False, "n_ce": 0}, indent=2))
    (ce / "config.json").write_text(json.dumps(config, indent=2))
    for folder_, weight_map in ((plain, plain_map), (ce, plain_map | {name: "ces.safetensors" for name in ces})):
        (folder_ / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {"plain": plain, "ce": ce}


def checkpoint_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


# ---------------------------------------------------------------- measuring a child process

def memory_of(pid: int) -> dict[str, int] | None:
    """VmRSS / RssAnon / RssFile of a process and its descendants, in bytes."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    total = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    pending, seen = [pid], False
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in total:
                    total[key] += int(value.split()[0]) * 1024
            seen = True
        except OSError:
            continue
        pending.extend(children.get(current, []))
    return total if seen else None


def measure_build(checkpoint: Path, out: Path, dtype: str, verify: bool, log: Path) -> dict:
    """Run the build in a child process; per stage its peak memory and wall time."""
    command = [sys.executable, "-m", "ce_export", "build", str(checkpoint), "--out", str(out), "--dtype", dtype,
               "--force"] + ([] if verify else ["--no-verify"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "plugins"),
                                                       str(REPO_ROOT / "calibrate"), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
    stages: list[dict] = [{"stage": "start-up", "start": 0.0, "peak_rss": 0, "peak_anon": 0}]
    lines: list[str] = []
    log_file = log.open("w")

    def read_output() -> None:
        for line in child.stdout:
            now = time.perf_counter() - start
            lines.append(f"{now:8.1f} {line.rstrip()}")
            log_file.write(lines[-1] + "\n")  # as it comes: a long build can be followed
            log_file.flush()
            match = STAGE_LINE.match(line.strip())
            if match:
                stages.append({"stage": match.group(1), "start": now, "peak_rss": 0, "peak_anon": 0})

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    while child.poll() is None:
        sample = memory_of(child.pid)
        if sample:
            stage = stages[-1]
            stage["peak_rss"] = max(stage["peak_rss"], sample["VmRSS"])
            stage["peak_anon"] = max(stage["peak_anon"], sample["RssAnon"])
        time.sleep(SAMPLE_SECONDS)
    reader.join()
    wall = time.perf_counter() - start
    log_file.close()
    for stage, following in zip(stages, stages[1:] + [{"start": wall}]):
        stage["seconds"] = round(following["start"] - stage["start"], 1)
    parity = re.search(r"parity (PASSED|FAILED)", "\n".join(lines))
    return {"command": " ".join(shlex.quote(part) for part in command[1:]), "returncode": child.returncode,
            "wall_seconds": round(wall, 1), "parity": parity.group(1) if parity else None, "stages": stages,
            "peak_rss": max(stage["peak_rss"] for stage in stages),
            "peak_anon": max(stage["peak_anon"] for stage in stages),
            "artifact_bytes": sum(path.stat().st_size for path in out.glob("model.onnx*")) if out.is_dir() else None,
            "log_tail": lines[-3:]}


# ---------------------------------------------------------------- results

def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    versions = {name: importlib.metadata.version(name) for name in ("torch", "onnxruntime", "onnx-ir", "transformers")}
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": memory, "python": platform.python_version(),
            **versions}


def row_key(row: dict) -> tuple:
    return row["size"], row["kind"], row["layers"], row["dtype"], row["verify"]


def summarize(row: dict) -> dict:
    size = row["checkpoint_bytes"]
    row["peak_over_checkpoint"] = round(row["peak_rss"] / size, 3)
    row["anon_over_checkpoint"] = round(row["peak_anon"] / size, 3)
    # A bf16 build's budget is in checkpoint bytes; an fp16 or fp32 build's in its artifact's bytes.
    row["budget_basis"] = "checkpoint" if row["dtype"] == "bf16" or not row["artifact_bytes"] else "artifact"
    basis = size if row["budget_basis"] == "checkpoint" else row["artifact_bytes"]
    row["budget_bytes"] = BUDGET[row["verify"]] * basis + GB
    row["within_budget_rss"] = row["peak_rss"] <= row["budget_bytes"]
    row["within_budget_anon"] = row["peak_anon"] <= row["budget_bytes"]
    for stage in row["stages"]:
        stage["peak_over_checkpoint"] = round(stage["peak_rss"] / size, 3)
        stage["seconds_per_gb"] = round(stage["seconds"] / (size / GB), 2)
    return row


def write_results(rows: list[dict], out: Path, info: dict) -> None:
    rows = sorted(rows, key=lambda row: (row["kind"], row["verify"], row["dtype"], row["layers"]))
    (out / "results.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    lines = ["# `build` at OLMoE-1B-7B layer width: peak memory and time", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_bytes'] / 2**30:.0f} GiB; "
             f"torch {info['torch']}, onnxruntime {info['onnxruntime']}, onnx-ir {info['onnx-ir']}.",
             "Peak RSS counts every resident page, including memory-mapped weight files (the checkpoint's and the "
             "artifact's, which the kernel can drop and read again); peak anon is private memory only. "
             "Budget (issue 11): 1.5 x checkpoint + 1 GB with verification, 1.2 x + 1 GB without; fp16 and fp32 "
             "builds 1.5 x their artifact's bytes (model.onnx + model.onnx.data) + 1 GB.", "",
             "| model | layers | dtype | verify | checkpoint GB | peak RSS GB (x ckpt) | peak anon GB (x ckpt) | budget GB "
             "| within budget | wall s | s/GB | parity |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        size = row["checkpoint_bytes"] / GB
        lines.append(f"| {row['kind']} | {row['layers']} | {row['dtype']} | {'on' if row['verify'] else 'off'} | "
                     f"{size:.2f} | {row['peak_rss'] / GB:.2f} ({row['peak_over_checkpoint']:.2f}) | "
                     f"{row['peak_anon'] / GB:.2f} ({row['anon_over_checkpoint']:.2f}) | {row['budget_bytes'] / GB:.2f} "
                     f"({row['budget_basis']}) | {'yes' if row['within_budget_rss'] else 'NO'} | "
                     f"{row['wall_seconds']:.0f} | {row['wall_seconds'] / size:.0f} | {row['parity'] or '-'} |")
    lines += ["", "Per stage (peak RSS GB / peak anon GB / seconds):", ""]
    for row in rows:
        stages = "; ".join(f"{stage['stage']}: {stage['peak_rss'] / GB:.2f} / {stage['peak_anon'] / GB:.2f} / "
                           f"{stage['seconds']:.0f} s" for stage in row["stages"])
        lines.append(f"- {row['kind']}, {row['layers']} layers, {row['dtype']}, verify {'on' if row['verify'] else 'off'}: "
                     f"{stages}")
    lines += ["", "Builds measured (each by the benchmark command after it):", ""]
    lines += [f"- `python {row['command']}` ({row['measured']}; `{row['benchmark_command']}`)" for row in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "scale.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[tuple, list[dict]] = {}
    for row in rows:
        series.setdefault((row["kind"], row["dtype"], row["verify"]), []).append(row)
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for (kind, dtype, verify), points in sorted(series.items()):
        colour = next(colours)
        x = np.array([p["checkpoint_bytes"] / GB for p in points])
        for key, marker, style, label in (("peak_rss", "o", "-", "RSS"), ("peak_anon", "x", ":", "anon")):
            y = np.array([p[key] / GB for p in points])
            name = f"{kind} {dtype} verify {'on' if verify else 'off'}, {label}"
            if len(points) >= 2:
                slope, intercept = np.polyfit(x, y, 1)
                grid = np.linspace(0, x.max() * 1.05, 20)
                ax.plot(grid, slope * grid + intercept, style, color=colour, linewidth=1)
                name += f": {slope:.2f} GB/GB + {intercept:.2f}"
            ax.scatter(x, y, marker=marker, color=colour, label=name)
    top = max(row["checkpoint_bytes"] for row in rows) / GB * 1.05
    for verify, factor in BUDGET.items():
        ax.plot([0, top], [1, factor * top + 1], "--", color="grey" if verify else "silver", linewidth=1,
                label=f"budget {factor} x + 1 GB ({'verify' if verify else 'no verify'})")
    ax.set_xlabel("checkpoint size (GB)")
    ax.set_ylabel("peak memory of the build (GB)")
    ax.set_title(f"ce_export build at {rows[0]['size']} width: peak memory against checkpoint size", fontsize=10)
    ax.set_xlim(0, top)
    ax.set_ylim(0, None)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--size", choices=sorted(SIZES), default="olmoe")
    parser.add_argument("--kinds", nargs="+", choices=("ce", "plain"), default=["ce", "plain"])
    parser.add_argument("--dtype", nargs="+", choices=("bf16", "fp16", "fp32"), default=["bf16"])
    parser.add_argument("--no-verify-too", action="store_true", help="also measure each build with --no-verify")
    parser.add_argument("--scratch", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "scratch")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "scale")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and builds in --scratch")
    args = parser.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.json"
    rows = {row_key(row): row for row in json.loads(results.read_text())["rows"]} if results.is_file() else {}
    info = machine()
    try:
        for layers in args.layers:
            started = time.perf_counter()
            checkpoints = write_checkpoints(args.scratch / f"{args.size}-width-{layers}l", layers, args.size)
            print(f"checkpoints, {layers} layers: {time.perf_counter() - started:.0f} s", flush=True)
            for kind in args.kinds:
                for dtype in args.dtype:
                    for verify in ([True, False] if args.no_verify_too else [True]):
                        name = f"{kind}-{layers}l-{dtype}{'' if verify else '-noverify'}"
                        row = measure_build(checkpoints[kind], args.scratch / "build", dtype, verify,
                                            args.out / f"{name}.log")
                        row |= {"size": args.size, "kind": kind, "layers": layers, "dtype": dtype, "verify": verify,
                                "checkpoint_bytes": checkpoint_bytes(checkpoints[kind]), "benchmark_command": command,
                                "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
                        rows[row_key(row)] = summarize(row)
                        print(f"{name}: peak RSS {row['peak_rss'] / GB:.2f} GB ({row['peak_over_checkpoint']:.2f} x), "
                              f"anon {row['peak_anon'] / GB:.2f} GB, {row['wall_seconds']:.0f} s, "
                              f"parity {row['parity']}, exit {row['returncode']}", flush=True)
                        write_results(list(rows.values()), args.out, info)
                        shutil.rmtree(args.scratch / "build", ignore_errors=True)
            if not args.keep:
                shutil.rmtree(args.scratch / f"{args.size}-width-{layers}l", ignore_errors=True)
    finally:
        shutil.rmtree(args.scratch / "build", ignore_errors=True)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
