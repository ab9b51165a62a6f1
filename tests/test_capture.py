"""The captured model against transformers' own OLMoE on the same weights; what capture leaves untouched."""

import importlib

import pytest
import torch
from transformers import AutoModelForCausalLM, OlmoeForCausalLM

from architectures import save_tiny
from ce_export.capture import build_torch_model, build_traced_model
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


@pytest.mark.parametrize("arch, modeling", [("deepseek_v2", "transformers.models.deepseek_v2.modeling_deepseek_v2"),
                                            ("llama4_text", "transformers.models.llama4.modeling_llama4")])
def test_real_rotary_stays_inside_the_captured_model(arch, modeling, tmp_path):
    """The complex rotary's real replacement changes this model instance only: transformers'
    modeling module and classes are the same objects afterwards, and a stock model built after it
    still rotates with complex frequencies and matches ours."""
    module = importlib.import_module(modeling)
    before = dict(vars(module))
    class_attributes = {name: dict(vars(value)) for name, value in before.items() if isinstance(value, type)}
    loaded = load_checkpoint(save_tiny(arch, tmp_path / arch))
    ours = build_torch_model(loaded)
    build_traced_model(loaded, torch.float32)
    assert vars(module) == before
    for name, attributes in class_attributes.items():  # (transformers caches a few flags on them: new keys)
        assert {key: vars(before[name])[key] for key in attributes} == attributes, name
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / arch, attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(7)[None].expand(2, -1)
    with torch.no_grad():
        assert theirs.model.rotary_emb(theirs.model.embed_tokens(ids), positions).is_complex()
        assert not ours.model.rotary_emb(ours.model.embed_tokens(ids), positions).is_complex()
        want, got = theirs(ids).logits, ours(ids).logits
    assert (got - want).abs().max() / want.abs().max() < 1e-5
