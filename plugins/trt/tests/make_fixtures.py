"""Regenerate the kernel-set fixtures of the plugin's logic tests (tests/fixtures/*.inc).

    PYTHONPATH=plugins:. python plugins/trt/tests/make_fixtures.py

Each fixture is what `python -m ce_kernels.aot` writes as kernel_set.inc for a small model, with the
entry names and shared memory of a real compile (Triton, no GPU needed; about a minute each) and a
short stand-in instead of each cubin, so the fixtures stay small. The logic tests plan launches from
them; nothing loads the stand-ins. Run it after changing ce_kernels' launch arguments, grids, tile
tables or aot_cpp.py: the fixtures then no longer compile, or the tests say what moved.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ce_kernels import aot, aot_cpp

FIXTURES = Path(__file__).resolve().parent / "fixtures"

SETS = {
    # name: (model, archs, dtypes)
    "ce_k4_nce2_e8": (aot.AotModel(num_experts=(8,), top_k=4, n_ce=2), [80, 90], ["bf16", "fp16"]),
    "plain_k2_scale2p5_e8": (aot.AotModel(num_experts=(8,), top_k=2, n_ce=0, norm_topk_prob=True, routing_scale=2.5),
                             [90], ["fp16"]),
    "sparsemixer_e8_e16": (aot.AotModel(num_experts=(8, 16), top_k=2, n_ce=0, routing="sparsemixer", jitter_eps=0.01),
                           [90], ["fp16"]),
    "sigmoid_k4_nce2_g4_e16": (aot.AotModel(num_experts=(16,), top_k=4, n_ce=2, norm_topk_prob=True,
                                            routing="sigmoid_topk", routing_scale=2.5, n_group=4, topk_group=2),
                               [90], ["bf16"]),
    "clamped_k4_nce2_e8": (aot.AotModel(num_experts=(8,), top_k=4, n_ce=2, norm_topk_prob=True,
                                        activation="clamped_swiglu", swiglu_alpha=1.702, swiglu_limit=7.0),
                           [90], ["bf16"]),
}


def fixture_source(model: aot.AotModel, archs: list[int], dtypes: list[str]) -> str:
    kernel_set = aot.plan_launches(model, aot.tables_for(dtypes, archs))
    records, images = [], {}
    for arch in archs:
        for build in kernel_set.builds:
            compiled = aot.triton_compile(build, arch)
            records.append({"stem": build.stem, "arch": arch, "entry": compiled.metadata.name,
                            "shared": compiled.metadata.shared})
            images[(build.stem, arch)] = f"stand-in for sm{arch} {build.stem}".encode()
    return aot_cpp.kernel_set_source(model, kernel_set, aot.WORKSPACE, records, images)


def main(names: list[str]) -> int:
    for name in names or SETS:
        model, archs, dtypes = SETS[name]
        path = FIXTURES / f"{name}.inc"
        FIXTURES.mkdir(exist_ok=True)
        path.write_text(fixture_source(model, archs, dtypes))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
