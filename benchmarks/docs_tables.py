"""The result tables in docs/*.md, generated from the committed results in benchmarks/results/.

A generated table sits in a doc between `<!-- generated: NAME -->` and `<!-- end generated -->`,
NAME one of TABLES. Rerun this after committing new results:

    python benchmarks/docs_tables.py           # rewrite every marked region in docs/*.md
    python benchmarks/docs_tables.py --check   # exit 1 naming each region that differs

tests/test_docs_tables.py checks that the docs equal what this writes from the committed results.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
REGION = re.compile(r"(<!-- generated: ([a-z0-9-]+) -->\n)(.*?)(<!-- end generated -->)", flags=re.S)

QUANTIZATION_MODES = ("int8", "fp8", "int4", "int4-g128", "int4-channel", "fp8-w8a8")
DTYPES = ("fp32", "fp16", "bf16")


def _json(relative: str) -> dict:
    return json.loads((RESULTS / relative).read_text())


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in rows]


def _ms(value: float) -> str:
    """Three significant figures, at least the integer part."""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _error(value: float) -> str:
    return "0" if value == 0 else f"{value:.0e}"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def _compression_rows() -> dict[tuple[str, str], dict]:
    return {(row["model"], row["method"]): row for row in _json("compression-demo/results.json")["rows"]}


# ---------------------------------------------------------------- the tables

def demo_checkpoints() -> list[str]:
    rows = _compression_rows()
    labels = {("plain", "none"): "plain top-4 MoE",
              ("plain", "top-2 of its top-4, no CE"): "plain, routed to its top-2 (no CE, no fine-tuning: what CE starts from)",
              ("CE", "none"): "CE (2 main + 2 compressed), `build demo`"}
    body = []
    for key, label in labels.items():
        row = rows[key]
        kinds = ", ".join(f"{kind} {100 * share:.0f}%" for kind, share in row["per_task_onnx"].items())
        body.append([label, f"{_percent(row['accuracy_onnx'])} ({kinds})", f"{row['perplexity_onnx']:.3f}",
                     f"{row['active_parameters']:,} / {row['total_parameters']:,}"])
    return _table(["checkpoint", "exact match on the held-out problems (per kind)", "perplexity on their text",
                   "parameters active per token / total"], body) + [
        "", "From `benchmarks/results/compression-demo/results.json` (fp32 builds, ONNX Runtime)."]


def quantization_modes() -> list[str]:
    measured = _json("quantization-demo/results.json")["results"]
    parity = {(row["model"], row["mode"], row["dtype"]): row for row in measured}
    study = _compression_rows()

    def parity_cell(model: str, mode: str) -> str:
        cells = [f"{dtype} {parity[model, mode, dtype]['statistic']} {parity[model, mode, dtype]['worst']:.1e}"
                 + ("" if parity[model, mode, dtype]["passed"] else " FAILED")
                 for dtype in DTYPES if (model, mode, dtype) in parity]
        return "; ".join(cells)

    def trained_cell(method: str) -> str:
        row = study["CE", method]
        return f"{_mb(row['weight_bytes'])}, {_percent(row['accuracy_onnx'])}, {row['perplexity_onnx']:.3f}"

    body = [["unquantized", parity_cell("demo", "unquantized"), trained_cell("none")]]
    body += [[f"`{mode}`", parity_cell("demo", mode), trained_cell(f"quantize {mode}")] for mode in QUANTIZATION_MODES]
    body += [[f"{mode} on the demo with hidden size {model.rsplit(' ', 1)[1]} (random weights)", parity_cell(model, mode), "-"]
             for model, mode, dtype in parity if model != "demo" and dtype == "fp32"]
    return _table(["mode", "parity on the trained demo, worst of 8 shapes (threshold: the dtype's)",
                   "fp32 build of the trained CE demo: weight bytes, exact match, perplexity"], body) + [
        "", "From `benchmarks/results/quantization-demo/results.json` (parity) and "
            "`benchmarks/results/compression-demo/results.json` (the trained CE demo)."]


def compression_study() -> list[str]:
    body = []
    for row in _json("compression-demo/results.json")["rows"]:
        body.append([row["model"], row["method"], _percent(row["accuracy_onnx"]), f"{row['perplexity_onnx']:.2f}",
                     f"{_millions(row['active_parameters'])} / {_millions(row['total_parameters'])}",
                     _mb(row["weight_bytes"]), f"{row['prefill_ms']:.2f}", f"{row['decode_ms']:.3f}"])
    return _table(["model", "compression", "exact match", "perplexity", "active / total parameters", "weights",
                   "prefill ms", "decode ms"], body)


def build_memory() -> list[str]:
    dtype_order = {dtype: index for index, dtype in enumerate(DTYPES[::-1])}  # bf16, fp16, fp32
    rows = sorted(_json("scale/results.json")["rows"],
                  key=lambda row: (dtype_order[row["dtype"]], row["layers"], not row["verify"]))
    body = []
    for row in rows:
        base = row["checkpoint_bytes"] if row["budget_basis"] == "checkpoint" else row["artifact_bytes"]
        factor = (row["budget_bytes"] - 1e9) / base
        basis = "checkpoint" if row["budget_basis"] == "checkpoint" else f"artifact ({base / 1e9:.2f} GB)"
        body.append([str(row["layers"]), f"{row['checkpoint_bytes'] / 1e9:.2f} GB", row["dtype"],
                     "on" if row["verify"] else "off",
                     f"{row['peak_rss'] / 1e9:.2f} GB ({row['peak_rss'] / row['checkpoint_bytes']:.2f}x)",
                     f"{factor:.1f}x {basis} + 1 GB = {row['budget_bytes'] / 1e9:.2f} GB",
                     "yes" if row["within_budget_rss"] else "NO", f"{row['wall_seconds']:.0f} s",
                     row["parity"] or "-"])
    return _table(["layers", "checkpoint", "`--dtype`", "verify", "peak resident (x checkpoint)", "budget (issue 11)",
                   "within", "wall", "parity"], body)


def _end_to_end(folders: list[str]) -> list[str]:
    """One row per model and point, one column per runtime: median ms (parity), the fastest bold."""
    runtimes, cells, order = [], {}, []
    for folder in folders:
        data = _json(f"{folder}/bench.json")
        model = "CE" if data["compressed"] else "plain"
        for result in data["results"]:
            key = (model, result["label"])
            if key not in cells:
                cells[key] = {}
                order.append(key)
            if result["runtime"] not in runtimes:
                runtimes.append(result["runtime"])
            cells[key][result["runtime"]] = result
    body = []
    for key in order:
        timed = {runtime: r for runtime, r in cells[key].items() if "median_ms" in r}
        fastest = min(timed, key=lambda runtime: timed[runtime]["median_ms"])
        row = [f"{key[0]}, {key[1]}"]
        for runtime in runtimes:
            result = cells[key].get(runtime)
            if result is None:
                row.append("-")
            elif "median_ms" not in result:
                row.append("failed")
            else:
                ms = _ms(result["median_ms"])
                row.append(f"{f'**{ms}**' if runtime == fastest else ms} ({_error(result['parity_max_rel'])})")
        body.append(row)
    return _table(["model, point", *runtimes], body)


def end_to_end_demo() -> list[str]:
    return _end_to_end(["cpu-2core/demo-plain", "cpu-2core/demo-ce"])


def end_to_end_olmoe_2_layers() -> list[str]:
    return _end_to_end(["olmoe-2-layers-cpu-2core/olmoe-2-layers-plain", "olmoe-2-layers-cpu-2core/olmoe-2-layers-ce"])


def end_to_end_olmoe_2_layers_last() -> list[str]:
    return _end_to_end(["olmoe-2-layers-last-cpu-2core/olmoe-2-layers-plain",
                        "olmoe-2-layers-last-cpu-2core/olmoe-2-layers-ce"])


def moe_layer_cpu() -> list[str]:
    data = _json("moe-layer-cpu-2core/moe_layer_cpu.json")
    tokens = [str(t) for t in data["tokens"]]
    fastest = {t: min(row["by_tokens"][t]["median_ms"] for row in data["rows"].values()) for t in tokens}

    def cell(row: dict, t: str) -> str:
        ms = row["by_tokens"][t]["median_ms"]
        return f"**{_ms(ms)}**" if ms == fastest[t] else _ms(ms)

    body = [[row["label"], *(cell(row, t) for t in tokens)] for row in data["rows"].values()]
    body += [[f"floor, {name}", *(_ms(data["floors"][reference][t]["floor_ms"]) for t in tokens)]
             for reference, name in (("ce", "CE"), ("top8", "top-8"))]
    sparse, fused = data["rows"]["ort_ce_sparse"]["by_tokens"], data["rows"]["ort_top8_ms"]["by_tokens"]
    body.append(["CE sparse / com.microsoft::MoE top-8, from the rows above",
                 *(f"{sparse[t]['median_ms'] / fused[t]['median_ms']:.2f}x" for t in tokens)])
    interleaved = data["head_to_head"]
    body.append(["**CE sparse / com.microsoft::MoE top-8, interleaved**",
                 *(f"{interleaved[t]['ratio_median']:.2f}x" for t in tokens)])
    worst = max(cell["rel_err"] for row in data["rows"].values() for cell in row["by_tokens"].values())
    ceilings = data["ceilings"]
    return _table(["implementation", *(f"T={t}" for t in tokens)], body) + [
        "", f"Fastest implementation per T in bold. Largest relative error vs `moe_math.py` in this table: "
            f"{worst:.1e}. Floor: touched expert bytes at "
            f"{ceilings['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s or FLOPs at {ceilings['matmul_flops_per_s'] / 1e9:.0f} "
            f"GFLOP/s, whichever is longer ({ceilings['source']}). Interleaved: the two sessions resident and "
            f"called in turn, each call after a 0.2 s pause (for the other's threads to stop spinning), the median "
            f"of the rounds' ratios; the rows are timed one after another."]


def moe_layer_cpu_decode_forms() -> list[str]:
    forms = _json("moe-layer-cpu-2core/moe_layer_cpu.json")["decode_forms"]
    body = [[str(t), _ms(forms["scanned"][str(t)]["median_ms"]), _ms(forms["gathered"][str(t)]["median_ms"])]
            for t in forms["tokens"]]
    faster = forms["gathered_faster_at_tokens"]
    return _table(["T", "scan (sparse form) ms", "gather ms"], body) + [
        "", f"Gather faster at T = {', '.join(map(str, faster)) if faster else 'none of these'}."]


def ort_breakdown() -> list[str]:
    data = _json("ort-breakdown-2core/breakdown.json")
    peak = data["ceilings"]["matmul_flops_per_s"] / 1e9
    classes = {name: entry for name, entry in data["profile"]["classes"].items() if entry["nodes"]}
    total = sum(entry["ms"] for entry in classes.values())
    body = []
    for name, entry in classes.items():
        rate = entry["gflop"] / (entry["ms"] / 1e3) if entry["gflop"] else None
        body.append([name, _ms(entry["ms"]), f"{100 * entry['ms'] / total:.0f}%",
                     f"{rate:.0f} ({100 * rate / peak:.0f}%)" if rate else "-"])
    curve = data["expert_gemm_curve"]
    return _table(["class (ONNX Runtime's profile)", "ms per call", "share", "GFLOP/s (of the 2048^3 rate)"], body) + [
        "", "One expert's gate and up GEMM against tokens per expert c, ms per expert: in the sparse body's "
            "form (weights read in place) and with the weights as prepacked constants, called in turn:", ""] + _table(
        ["c"] + [str(point["tokens"]) for point in curve],
        [[f"{form} ms"] + [f"{point[form]['ms']:.2f}" for point in curve] for form in ("in_place", "prepacked")])


TABLES: dict[str, Callable[[], list[str]]] = {
    "demo-checkpoints": demo_checkpoints,
    "quantization-modes": quantization_modes,
    "compression-study": compression_study,
    "build-memory": build_memory,
    "end-to-end-demo": end_to_end_demo,
    "end-to-end-olmoe-2-layers": end_to_end_olmoe_2_layers,
    "end-to-end-olmoe-2-layers-last": end_to_end_olmoe_2_layers_last,
    "moe-layer-cpu": moe_layer_cpu,
    "moe-layer-cpu-decode-forms": moe_layer_cpu_decode_forms,
    "ort-breakdown": ort_breakdown,
}


def render(name: str) -> str:
    return "\n".join(TABLES[name]()) + "\n"


def regenerate(text: str, source: str = "doc") -> str:
    """`text` with each marked region replaced by its table; an unknown name is an error."""
    def replace(match: re.Match) -> str:
        name = match.group(2)
        if name not in TABLES:
            raise KeyError(f"{source}: unknown generated table {name!r} (known: {', '.join(TABLES)})")
        return match.group(1) + render(name) + match.group(4)
    return REGION.sub(replace, text)


def regions(text: str) -> dict[str, str]:
    """Each marked region's name -> its current content."""
    return {match.group(2): match.group(3) for match in REGION.finditer(text)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report the regions that differ; exit 1 if any")
    args = parser.parse_args(argv)
    stale = []
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text()
        fresh = regenerate(text, str(doc.relative_to(ROOT)))
        if fresh == text:
            continue
        if args.check:
            stale += [f"{doc.relative_to(ROOT)}: {name}" for name, body in regions(text).items() if body != render(name)]
        else:
            doc.write_text(fresh)
            print(f"rewrote {doc.relative_to(ROOT)}")
    for line in stale:
        print(f"stale: {line}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
