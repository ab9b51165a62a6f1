"""Triton kernels for one (Compressed-Experts) MoE layer, in stages that are tested one by one.

    fused_moe(hidden, router_logits, gate_up, down, ces, top_k, n_ce, norm_topk_prob,
              routing="softmax_topk", routing_scale=1.0, jitter_eps=0.0) -> [T, H]

has the signature and semantics of `ce_export.moe_math.moe_reference`. The stages, in order:
route, mix_compressed_experts_theta (CE only), align_pairs_by_expert,
gate_up_swiglu, down_weighted, sum_main_slots. `ce_kernels.aot` compiles them ahead of time.
"""

from ce_kernels import interpreter_compat
from ce_kernels.align import ExpertAlignment, align_pairs_by_expert, align_pairs_by_expert_torch
from ce_kernels.combine import sum_main_slots, sum_main_slots_torch
from ce_kernels.fused_moe import fused_moe, fused_moe_with_config
from ce_kernels.grouped_gemm import down_weighted, down_weighted_torch, gate_up_swiglu, gate_up_swiglu_torch
from ce_kernels.routing import route
from ce_kernels.theta import mix_compressed_experts_theta
from ce_kernels.tile_configs import GemmTiles, MoeTileConfig, select_tile_config

interpreter_compat.patch()  # numpy >= 2.4 under triton 3.6's interpreter

__all__ = [
    "ExpertAlignment", "GemmTiles", "MoeTileConfig",
    "align_pairs_by_expert", "align_pairs_by_expert_torch",
    "down_weighted", "down_weighted_torch",
    "fused_moe", "fused_moe_with_config",
    "gate_up_swiglu", "gate_up_swiglu_torch",
    "mix_compressed_experts_theta", "route",
    "select_tile_config", "sum_main_slots", "sum_main_slots_torch",
]
