"""The greedy-generation pass rules: a divergence must be explained by a near-tie, of the token's
logits or of one of its routers."""

import torch

from ce_export.capture import MoeBlock, build_torch_model
from ce_export.load import load_checkpoint
from ce_export.verify import generation_prompt, router_margin


def test_router_margin_is_the_closest_selection_boundary_of_the_last_token(demo_ce):
    lm = build_torch_model(load_checkpoint(demo_ce))
    ids, mask = generation_prompt(lm.config.vocab_size)
    ids, mask = ids[1:], mask[1:]
    untied = router_margin(lm, ids, mask)
    assert untied is not None and untied > 1e-3

    block = next(module for module in lm.model.layers[2].modules() if isinstance(module, MoeBlock))
    seen = {}

    def record_last_token(module, args):
        seen.setdefault("x", args[0].reshape(-1, args[0].shape[-1])[-1])

    handle = block.register_forward_pre_hook(record_last_token)
    with torch.no_grad():
        lm(input_ids=ids, attention_mask=mask)
    handle.remove()
    order = (seen["x"].float() @ block.router.float().T).argsort(descending=True)
    boundary = block.spec.top_k - block.spec.n_ce  # CE: the last main expert vs the first compressed one
    with torch.no_grad():  # the expert just past the boundary now scores exactly as the one before it
        block.router[order[boundary]] = block.router[order[boundary - 1]]
    assert router_margin(lm, ids, mask) == 0.0
