"""Stage 5, verify: PyTorch vs ONNX Runtime on the exported decoder -> parity.json.

Two checks, both against the captured PyTorch model (whose MoE blocks run moe_math.py):
- logits and present K/V on several (batch, sequence, past) shapes, with and without past;
  per output the max absolute error and the relative error max|ort - torch| / max|torch|;
- greedy generation (runners.greedy: prefill, then a decode loop over the KV cache) from a
  left-padded batch: ONNX Runtime must produce the same tokens as the PyTorch model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ce_export.artifacts import atomic_file
from ce_export.capture import empty_past
from ce_export.manifest import LogitsCase, LogitsCheck, OutputErrors, Parity
from ce_export.runners import TorchRunner, greedy_tokens

GENERATION_TOKENS = 32


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria for one exported precision.

    statistic/threshold: the relative-error statistic of each output vs the fp32 reference that
    must stay under the threshold (max for fp32; for fp16/bf16 the mean, since a router near-tie
    that rounding flips changes a few tokens' outputs completely, on any runtime).
    near_tie: generation may diverge from PyTorch only at a step whose two candidate tokens'
    PyTorch logits differ by at most this fraction of that step's largest |logit|, or
    router_near_tie: ... at which one of the token's routers is near-tied (`router_margin`): a few
    units of the dtype's rounding (fp16 unit roundoff 4.9e-4, bf16 3.9e-3).
    """

    statistic: str
    threshold: float
    near_tie: float
    router_near_tie: float = 0.0


TOLERANCES = {
    "fp32": Tolerance("max_rel", 1e-4, 0.0),
    "fp16": Tolerance("mean_rel", 2e-2, 2e-2, router_near_tie=2e-3),
    "bf16": Tolerance("mean_rel", 5e-2, 5e-2, router_near_tie=1e-2),
}


@dataclass(frozen=True)
class ParityCase:
    batch: int
    sequence: int
    past: int

    @property
    def name(self) -> str:
        return f"b{self.batch}_s{self.sequence}_p{self.past}"


PARITY_CASES = (
    ParityCase(1, 1, 0), ParityCase(1, 7, 0), ParityCase(2, 16, 0), ParityCase(4, 64, 0),
    ParityCase(1, 1, 16), ParityCase(2, 1, 37), ParityCase(4, 8, 20), ParityCase(3, 64, 64),
)


def random_inputs(case: ParityCase, spec, dtype, gen: torch.Generator):
    ids = torch.randint(0, spec.vocab_size, (case.batch, case.sequence), generator=gen)
    mask = torch.ones(case.batch, case.past + case.sequence, dtype=torch.int64)
    positions = torch.arange(case.past, case.past + case.sequence).expand(case.batch, -1).contiguous()
    past = tuple(torch.randn(shape, generator=gen).to(dtype) for shape in spec.past_shapes(case.batch, case.past))
    return ids, mask, positions, past


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    reference, candidate = reference.double(), candidate.double()
    if reference.shape != candidate.shape:
        inf = float("inf")
        return {"shape_mismatch": [list(reference.shape), list(candidate.shape)], "max_abs": inf, "max_rel": inf,
                "mean_abs": inf, "mean_rel": inf}
    if reference.numel() == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "mean_abs": 0.0, "mean_rel": 0.0}
    abs_err = (reference - candidate).abs()
    scale = reference.abs().max().item() or 1.0
    return {"max_abs": abs_err.max().item(), "max_rel": abs_err.max().item() / scale,
            "mean_abs": abs_err.mean().item(), "mean_rel": abs_err.mean().item() / scale}


@dataclass
class RecordedCase:
    """One parity shape: its inputs and what the runtime returned."""

    case: ParityCase
    inputs: tuple
    outputs: list[torch.Tensor]


def record_logits(runtime, spec, dtype, cases=PARITY_CASES, seed=0, progress=None) -> list[RecordedCase]:
    """Run the runtime on every parity shape (random inputs, drawn in order from `seed`) and keep its outputs."""
    gen = torch.Generator().manual_seed(seed)
    recorded = []
    for case in cases:
        inputs = random_inputs(case, spec, dtype, gen)
        recorded.append(RecordedCase(case, inputs, runtime(*inputs)))
        if progress is not None:
            progress.update()
    return recorded


def compare_logits(reference_lm, recorded: list[RecordedCase], output_names, tolerance: Tolerance, progress=None,
                   record=None, logits: str = "all") -> LogitsCheck:
    """The parity report of recorded runtime outputs against the reference (PyTorch, past in fp32).
    `record(inputs, expected)`, when given, receives each shape's feed and the reference's outputs;
    `logits`: the artifact's (capture.LOGITS), the reference computes the same positions."""
    reference = TorchRunner(reference_lm, logits)
    results = []
    for entry in recorded:
        expected = reference(*entry.inputs)
        if record is not None:
            record(entry.inputs, expected)
        per_output = {name: compare(e, a) for name, e, a in zip(output_names, expected, entry.outputs)}
        results.append(case_result(entry.case, expected[0], entry.outputs[0], per_output))
        if progress is not None:
            progress.update()
    return summarize_cases(results, tolerance)


def check_logits(reference_lm, runtime, spec, output_names, dtype, tolerance: Tolerance, cases=PARITY_CASES, seed=0,
                 record=None, logits: str = "all") -> LogitsCheck:
    return compare_logits(reference_lm, record_logits(runtime, spec, dtype, cases, seed), output_names, tolerance,
                          record=record, logits=logits)


def case_result(case: ParityCase, expected_logits, actual_logits, per_output: dict[str, dict]) -> LogitsCase:
    """`per_output`: verify.compare's errors of each output."""
    top1 = (expected_logits.argmax(-1) == actual_logits.argmax(-1)).double().mean().item()
    outputs = {name: OutputErrors.model_validate(errors) for name, errors in per_output.items()}
    return LogitsCase(case=case.name, batch=case.batch, sequence=case.sequence, past=case.past,
                      max_rel=max(r.max_rel for r in outputs.values()), mean_rel=max(r.mean_rel for r in outputs.values()),
                      logits_top1_agreement=top1, outputs=outputs)


def summarize_cases(results: list[LogitsCase], tolerance: Tolerance, **extra) -> LogitsCheck:
    """The logits check over every parity shape; `extra`: further keys of the report."""
    worst = max(getattr(r, tolerance.statistic) for r in results)
    return LogitsCheck(statistic=tolerance.statistic, threshold=tolerance.threshold, worst=worst,
                       max_rel=max(r.max_rel for r in results), passed=bool(worst <= tolerance.threshold), cases=results,
                       **extra)


def perplexity(runtime, sequences: torch.Tensor, spec, dtype, logits: str = "all", progress=None) -> float:
    """exp(mean next-token NLL) of `sequences` [N, S], each run as one prefill; a runtime whose
    logits cover the last position only is fed the sequences token by token over its KV cache."""
    if logits == "last":
        return perplexity_token_by_token(runtime, sequences, spec, dtype, progress)
    total_nll, count = 0.0, 0
    for row in sequences:
        if progress is not None:
            progress.update()
        ids = row[None]
        positions = torch.arange(ids.shape[1])[None]
        past = tuple(torch.zeros(shape, dtype=dtype) for shape in spec.past_shapes(1, 0))
        logits = runtime(ids, torch.ones_like(ids), positions, past)[0].float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total_nll += nll.item()
        count += ids.shape[1] - 1
    return float(torch.exp(torch.tensor(total_nll / count)))


def perplexity_token_by_token(runtime, sequences: torch.Tensor, spec, dtype, progress=None) -> float:
    batch, length = sequences.shape
    past = tuple(torch.zeros(shape, dtype=dtype) for shape in spec.past_shapes(batch, 0))
    total_nll = 0.0
    for position in range(length - 1):
        ids = sequences[:, position:position + 1]
        mask = torch.ones(batch, position + 1, dtype=torch.int64)
        logits, *past = runtime(ids, mask, torch.full((batch, 1), position), tuple(past))
        total_nll += torch.nn.functional.cross_entropy(logits[:, -1].float(), sequences[:, position + 1],
                                                       reduction="sum").item()
        if progress is not None:  # in rows, as `perplexity` counts
            progress.update(batch / (length - 1))
    return float(torch.exp(torch.tensor(total_nll / (batch * (length - 1)))))


def generation_prompt(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 8 tokens; the first is left-padded by 3 (pad id 0), as batched serving does."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, :3] = 0
    mask[0, :3] = 0
    return ids, mask


def check_generation(lm_at_export_dtype, runtime, spec, dtype, tolerance: Tolerance, new_tokens: int = GENERATION_TOKENS,
                     onnx_tokens: list | None = None, onnx_seconds: float | None = None, progress=None) -> dict:
    """`onnx_tokens`: the runtime's tokens from an earlier run (runners.greedy_tokens on generation_prompt,
    taking `onnx_seconds`), to compare with a PyTorch model without running the runtime again."""
    ids, mask = generation_prompt(spec.vocab_size)
    start = time.perf_counter()
    torch_runner = TorchRunner(lm_at_export_dtype, logits="last")
    expected, step_logits = greedy_tokens(torch_runner, ids, mask, empty_past(spec, ids.shape[0], 0, torch_runner.dtype),
                                          new_tokens, progress)
    torch_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if onnx_tokens is None:
        actual, _ = greedy_tokens(runtime, ids, mask, empty_past(spec, ids.shape[0], 0, dtype), new_tokens)
    else:
        actual = torch.tensor(onnx_tokens)
    ort_seconds = time.perf_counter() - start if onnx_seconds is None else onnx_seconds
    rows = []
    for row, (e, a) in enumerate(zip(expected, actual)):
        differ = (e != a).nonzero()
        if not len(differ):
            rows.append({"identical": True, "first_difference": None, "near_tie_margin": None, "passed": True})
            continue
        step = int(differ[0])
        logits = step_logits[row, step]
        margin = ((logits[e[step]] - logits[a[step]]) / logits.abs().max()).item()
        result = {"identical": False, "first_difference": step, "near_tie_margin": margin,
                  "passed": bool(margin <= tolerance.near_tie)}
        if not result["passed"] and tolerance.router_near_tie > 0:
            prefix = torch.cat([ids[row], e[:step]])[None]
            prefix_mask = torch.cat([mask[row], torch.ones(step, dtype=mask.dtype)])[None]
            router = router_margin(lm_at_export_dtype, prefix, prefix_mask)
            result["router_margin"] = router
            result["passed"] = router is not None and router <= tolerance.router_near_tie
        rows.append(result)
    return {"new_tokens": new_tokens, "near_tie_tolerance": tolerance.near_tie,
            "passed": all(r["passed"] for r in rows), "rows": rows,
            "torch_tokens": expected.tolist(), "onnx_tokens": actual.tolist(),
            "torch_seconds": torch_seconds, "onnxruntime_seconds": ort_seconds}


def router_margin(lm, ids: torch.Tensor, mask: torch.Tensor) -> float | None:
    """The closest routing decision of the last token of `ids` [1, S], over the MoE layers: the gap
    between the router logits on either side of a selection boundary (the k-th and (k+1)-th, and for
    CE the last main and first compressed expert), over the layer's largest |logit|.

    A greedy step whose two candidate tokens are far apart can still flip under rounding when one
    of the routers choosing the experts for that token is near-tied: the experts then differ and so
    does the whole output. Such a divergence is rounding, not a wrong artifact. None: no MoE layer.
    """
    from ce_export.capture import MoeBlock

    margins = []

    def hook(block, args):
        hidden = args[0].reshape(-1, args[0].shape[-1])[-1:].float()
        choice = block.router_logits(hidden.to(block.router.dtype)).float()[0]
        if block.score_bias is not None:  # sigmoid routing: experts are chosen by sigmoid(logits) + bias
            choice = choice.sigmoid() + block.score_bias.float()
        ordered = choice.sort(descending=True).values
        scale = ordered.abs().max().clamp(min=1e-12)
        boundaries = {block.spec.top_k, block.spec.top_k - block.spec.n_ce}
        for k in boundaries:
            if 0 < k < ordered.numel():
                margins.append(((ordered[k - 1] - ordered[k]) / scale).item())

    handles = [m.register_forward_pre_hook(hook) for m in lm.modules() if isinstance(m, MoeBlock)]
    try:
        with torch.no_grad():
            lm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    finally:
        for handle in handles:
            handle.remove()
    return min(margins) if margins else None


def plot_parity(parity: Parity, path: Path) -> None:
    """parity.png: per shape, the max and mean relative error of every output, and the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = parity.logits.cases
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(cases)), 4))
    for stat, marker in (("max_rel", "o"), ("mean_rel", "x")):
        for index, case in enumerate(cases):
            values = [max(getattr(r, stat), 1e-12) for r in case.outputs.values()]
            ax.scatter([index] * len(values), values, marker=marker, s=14, alpha=0.6,
                       color="tab:red" if stat == "max_rel" else "tab:blue",
                       label=f"{stat} per output" if index == 0 else None)
    ax.axhline(parity.logits.threshold, color="black", linestyle="--",
               label=f"threshold on {parity.logits.statistic} ({parity.logits.threshold:.0e})")
    ax.set_xticks(range(len(cases)), [case.case for case in cases], rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("relative error vs PyTorch fp32")
    verdict = "PASSED" if parity.passed else "FAILED"
    ax.set_title(f"parity {verdict}: {parity.dtype}, {parity.runtime}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as partial:
        fig.savefig(partial, format="png", dpi=110)
    plt.close(fig)
