"""`python -m ce_export calibrate` and `trim`: ce_calibrate's commands, which ce_export's command
line finds through the `ce_export.commands` entry point (pyproject.toml) without importing us."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `calibrate` and `trim` to ce_export's subcommands; each sets `run`, which the CLI calls."""
    calibrate = sub.add_parser("calibrate", help="router statistics, layer/block similarities and perplexity on "
                                                 "calibration text (JSON + expert-usage heatmap PNG)")
    calibrate.add_argument("model", help="checkpoint folder, or 'demo'")
    calibrate.add_argument("--out", required=True)
    calibrate.add_argument("--data", help="text, JSONL (a 'text' field) or token ids (.npy / JSON); default: the "
                                          "checkpoint's task.json calibration text when it has one, else built-in corpus")
    calibrate.add_argument("--seq-len", type=int, default=128)
    calibrate.add_argument("--num-sequences", type=int, default=128)
    calibrate.add_argument("--force", action="store_true")
    calibrate.set_defaults(run=run_calibrate)

    trim = sub.add_parser("trim", help="expert / layer / block drop from calibration statistics; writes a checkpoint "
                                       "in the MoE compression study's format")
    trim.add_argument("model", help="checkpoint folder (the one calibrated)")
    trim.add_argument("--stats", required=True, help="calibration.json from `calibrate`")
    trim.add_argument("--out", required=True)
    trim.add_argument("--expert-drop", type=float, default=0.0, help="fraction of experts to drop (by router mass)")
    trim.add_argument("--scope", choices=("global", "layer"), default="global")
    trim.add_argument("--layer-drop", type=int, default=0, help="MoE sub-layers to drop (most similar in/out)")
    trim.add_argument("--block-drop", type=int, default=0, help="whole blocks to drop (most similar in/out)")
    trim.add_argument("--force", action="store_true")
    trim.set_defaults(run=run_trim)


def checkpoint(model: str) -> str | Path:
    """A checkpoint folder; 'demo' writes the built-in demo to a temporary folder."""
    if model != "demo":
        return model
    from ce_export.demo import write_demo_checkpoint

    return write_demo_checkpoint(Path(tempfile.mkdtemp(prefix="ce_export_demo_")) / "demo")


def run_calibrate(args: argparse.Namespace) -> None:
    from ce_calibrate import calibrate

    calibrate(checkpoint(args.model), args.out, data=args.data, seq_len=args.seq_len,
              num_sequences=args.num_sequences, force=args.force)


def run_trim(args: argparse.Namespace) -> None:
    from ce_calibrate import trim

    path = trim(checkpoint(args.model), args.stats, args.out, expert_drop=args.expert_drop, scope=args.scope,
                layer_drop=args.layer_drop, block_drop=args.block_drop, force=args.force)
    print(f"trimmed checkpoint: {path}")
