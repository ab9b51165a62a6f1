"""The captured model against transformers' own OLMoE on the same weights."""

import torch
from transformers import OlmoeForCausalLM

from ce_export.capture import build_torch_model
from ce_export.load import load_checkpoint


def test_plain_olmoe_logits_match_transformers(demo_plain):
    ours = build_torch_model(load_checkpoint(demo_plain))
    theirs = OlmoeForCausalLM.from_pretrained(demo_plain, attn_implementation="eager", experts_implementation="eager").eval()
    ids = torch.randint(0, 512, (3, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = theirs(ids).logits
        got = ours(ids).logits
    assert (got - want).abs().max() / want.abs().max() < 1e-5


def test_ce_model_runs_compressed_experts(demo_ce, demo_plain):
    """Stock transformers would silently ignore `ces`; ours must not."""
    ce = build_torch_model(load_checkpoint(demo_ce))
    plain = build_torch_model(load_checkpoint(demo_plain))
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(ce(ids).logits, plain(ids).logits, atol=1e-2)
    assert all(layer.mlp.experts.ces is not None for layer in ce.model.layers)  # MoeBlock in the experts slot
