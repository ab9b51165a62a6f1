"""Calibration run: the PyTorch model with forward hooks -> per-layer router and similarity statistics.

Per decoder layer it records
- `selection_counts[e]`: how many calibration tokens chose expert e among their top-k (router logits'
  top-k, the experts the MoE op runs);
- `softmax_mass[e]`: the sum over tokens of softmax(router logits)[e], the compression study's
  Expert Drop score (each token contributes 1 in total, so a layer's masses sum to its token count);
  `topk_mass[e]`: the same restricted to the selected top-k (the study's DeepSeek variant);
- `moe_similarity`: mean over tokens of cos(h, h'), h the residual stream entering the
  post-attention norm and h' the residual after the MLP (the Layer Drop score);
- `block_similarity`: mean over tokens of cos(x, y), x the block's input and y its output (the
  Block Drop score).
Higher similarity = the sub-layer or block changes the residual stream less = a better drop candidate.

And per quantized GEMM input, in the same pass, the ranges `ce_export.quantize.activation_ranges`
measures (keyed by the torch module name): every nn.Linear (attention projections, LM head, dense
MLPs), each shared expert and each MoE block's hidden input to the experts; `amax` = max |x| over all
calibration tokens, and `p99_99` = the largest per-batch 99.99th percentile of |x|. FP8 activation
scales are amax / 448.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ce_export.artifacts import staged_folder, write_json
from ce_export.calibration_data import prepare
from ce_export.capture import MoeBlock, build_torch_model
from ce_export.errors import LoadError
from ce_export.load import load_checkpoint
from ce_export.quantize import ActivationRangeCollector
from ce_export.spec import MoeLayerSpec

STATS_FORMAT = 1  # activation_ranges was added without a format change (trim does not read it)
STATS_FILE = "calibration.json"
HEATMAP_FILE = "expert_usage.png"


class _Collector:
    """Hooks on every decoder layer, its post-attention norm and its MoeBlock; sums in float64."""

    def __init__(self, lm: torch.nn.Module):
        self.layers = list(lm.model.layers)
        n = len(self.layers)
        self.tokens = [0] * n
        self.moe_cos = [0.0] * n
        self.block_cos = [0.0] * n
        self.counts: dict[int, torch.Tensor] = {}
        self.mass: dict[int, torch.Tensor] = {}
        self.topk_mass: dict[int, torch.Tensor] = {}
        self._block_in: dict[int, torch.Tensor] = {}
        self._moe_in: dict[int, torch.Tensor] = {}
        self.handles = []
        for index, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._block_pre(index), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._block_post(index)))
            self.handles.append(layer.post_attention_layernorm.register_forward_pre_hook(self._norm_pre(index)))
            block = next((module for module in layer.modules() if isinstance(module, MoeBlock)), None)
            if block is not None:
                experts = block.spec.num_experts
                self.counts[index] = torch.zeros(experts, dtype=torch.float64)
                self.mass[index] = torch.zeros(experts, dtype=torch.float64)
                self.topk_mass[index] = torch.zeros(experts, dtype=torch.float64)
                self.handles.append(block.register_forward_hook(self._router(index)))

    def _block_pre(self, index):
        def hook(module, args, kwargs):
            self._block_in[index] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _norm_pre(self, index):
        def hook(module, args):
            self._moe_in[index] = args[0]
        return hook

    def _block_post(self, index):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            out = out.reshape(-1, out.shape[-1]).float()
            block_in = self._block_in.pop(index).reshape(-1, out.shape[-1]).float()
            moe_in = self._moe_in.pop(index).reshape(-1, out.shape[-1]).float()
            self.block_cos[index] += F.cosine_similarity(block_in, out, dim=-1).double().sum().item()
            self.moe_cos[index] += F.cosine_similarity(moe_in, out, dim=-1).double().sum().item()
            self.tokens[index] += out.shape[0]
        return hook

    def _router(self, index):
        def hook(module: MoeBlock, args, output):
            flat = args[0].reshape(-1, args[0].shape[-1]).float()
            logits = flat @ module.router.float().T
            probs = logits.softmax(dim=-1, dtype=torch.float64)
            top = logits.topk(module.spec.top_k, dim=-1).indices
            selected = torch.zeros_like(probs).scatter_(1, top, 1.0)
            self.counts[index] += selected.sum(0)
            self.mass[index] += probs.sum(0)
            self.topk_mass[index] += (probs * selected).sum(0)
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _run(lm: torch.nn.Module, sequences: torch.Tensor, batch_size: int, progress: bool, collectors) -> None:
    try:
        with torch.no_grad(), _progress(sequences.shape[0], "calibration", progress) as bar:
            for start in range(0, sequences.shape[0], batch_size):
                ids = sequences[start:start + batch_size]
                lm(input_ids=ids, use_cache=False)
                bar.update(ids.shape[0])
    finally:
        for collector in collectors:
            collector.remove()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", disable=not enabled, leave=False)


@torch.no_grad()
def perplexity(lm: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 4, progress: bool = False) -> dict:
    """Next-token perplexity of a causal LM on sequences [N, S] (no padding); reusable for any model."""
    if sequences.ndim != 2 or sequences.shape[0] == 0 or sequences.shape[1] < 2:
        raise LoadError(f"perplexity needs sequences [N, S] with N >= 1 and S >= 2, got {list(sequences.shape)}")
    total_nll, total_tokens = 0.0, 0
    with _progress(sequences.shape[0], "perplexity", progress) as bar:
        for start in range(0, sequences.shape[0], batch_size):
            ids = sequences[start:start + batch_size]
            logits = lm(input_ids=ids, use_cache=False).logits.float()
            total_nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                         reduction="sum").item()
            total_tokens += ids[:, 1:].numel()
            bar.update(ids.shape[0])
    nll = total_nll / total_tokens
    return {"sequences": int(sequences.shape[0]), "predicted_tokens": total_tokens, "nll": nll,
            "perplexity": math.exp(min(nll, 700.0))}


def collect(lm: torch.nn.Module, spec, sequences: torch.Tensor, batch_size: int = 4, progress: bool = True,
            ranges: dict | None = None) -> list[dict]:
    """Run `sequences` through `lm` with the hooks; one statistics dict per decoder layer. When
    `ranges` is a dict, the same pass fills it with ce_export.quantize's activation ranges."""
    collector = _Collector(lm)
    range_collector = ActivationRangeCollector(lm) if ranges is not None else None
    _run(lm, sequences, batch_size, progress, [collector] + ([range_collector] if range_collector else []))
    if range_collector is not None:
        ranges.update(range_collector.ranges)
    layers = []
    for layer in spec.moe_layers:
        index, tokens = layer.layer, collector.tokens[layer.layer]
        entry = {"layer": index, "kind": layer.kind, "tokens": tokens,
                 "moe_similarity": collector.moe_cos[index] / tokens,
                 "block_similarity": collector.block_cos[index] / tokens}
        if isinstance(layer, MoeLayerSpec):
            entry.update(num_experts=layer.num_experts, top_k=layer.top_k, expert_ids=list(layer.expert_ids),
                         selection_counts=[int(c) for c in collector.counts[index].tolist()],
                         softmax_mass=collector.mass[index].tolist(), topk_mass=collector.topk_mass[index].tolist())
        layers.append(entry)
    return layers


def write_heatmap(layers: list[dict], path: Path, title: str) -> None:
    """Layers x experts image of each expert's share of its layer's softmax mass (blank: no expert)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = max([entry.get("num_experts", 0) for entry in layers] + [1])
    grid = np.full((len(layers), width), np.nan)
    for row, entry in enumerate(layers):
        if "softmax_mass" in entry:
            mass = np.asarray(entry["softmax_mass"])
            grid[row, : mass.size] = mass / mass.sum()
    figure = Figure(figsize=(max(4.0, 0.35 * width + 2.5), max(3.0, 0.3 * len(layers) + 1.5)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xlabel("expert (index in the checkpoint)")
    axes.set_ylabel("layer")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label="share of the layer's router softmax mass")
    figure.tight_layout()
    figure.savefig(str(path), format="png")


def calibrate(model_folder: str | Path, out_dir: str | Path, data: str | Path | None = None, seq_len: int = 128,
              num_sequences: int | None = 128, eval_fraction: float = 0.1, batch_size: int = 4, force: bool = False,
              progress: bool = True, report: Callable[[str], None] = print) -> dict:
    """Calibrate `model_folder`; writes out_dir/calibration.json and out_dir/expert_usage.png; returns the JSON."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LoadError(f"batch_size must be a positive integer, got {batch_size!r}")
    model_folder = Path(model_folder)
    loaded = load_checkpoint(model_folder)
    spec = loaded.spec
    dataset = prepare(model_folder, spec.vocab_size, data, seq_len, num_sequences, eval_fraction)
    report(f"calibration data: {dataset.calibration.shape[0]} x {seq_len} tokens to calibrate, "
           f"{dataset.evaluation.shape[0]} held out ({dataset.tokenizer})")
    lm = build_torch_model(loaded, torch.float32)
    start = time.perf_counter()
    ranges: dict[str, dict] = {}
    layers = collect(lm, spec, dataset.calibration, batch_size, progress, ranges=ranges)
    ppl = perplexity(lm, dataset.evaluation, batch_size, progress)
    report(f"calibrated {len(layers)} layers in {time.perf_counter() - start:.1f} s; "
           f"held-out perplexity {ppl['perplexity']:.3f}")
    stats = {
        "format": STATS_FORMAT,
        "model": {"path": str(model_folder.absolute()), "architecture": spec.architecture,
                  "num_layers": spec.num_layers, "vocab_size": spec.vocab_size, "use_ce": spec.use_ce},
        "data": dataset.describe(),
        "layers": layers,
        "activation_ranges": ranges,
        "perplexity": ppl,
        "heatmap": HEATMAP_FILE,
    }
    with staged_folder(out_dir, force=force) as staging:
        write_json(staging / STATS_FILE, stats)
        write_heatmap(layers, staging / HEATMAP_FILE, f"{spec.architecture} {model_folder.name}: expert usage")
    report(f"calibration: {Path(out_dir).absolute() / STATS_FILE}")
    return stats
