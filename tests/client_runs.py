"""Greedy tokens from the field's clients (transformers' generate included) and from PyTorch, for the
client, family and runtime tests."""

import pytest
import torch

from ce_export.capture import build_torch_model
from ce_export.load import load_checkpoint


def transformers_generate(lm, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' own greedy generate (its cache, its positions for left padding): the new tokens [B, N]."""
    with torch.no_grad():
        out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:]


def torch_tokens(checkpoint, ids: list[int], new_tokens: int) -> list[int]:
    """transformers' generate on the captured PyTorch model (MoE blocks through moe_math.py)."""
    prompt = torch.tensor([ids])
    return transformers_generate(build_torch_model(load_checkpoint(checkpoint)), prompt, torch.ones_like(prompt),
                                 new_tokens)[0].tolist()


def genai_tokens(folder, ids: list[int], new_tokens: int) -> list[int]:
    """onnxruntime-genai's own API on the folder as the build left it."""
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([ids])
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def until_genai_stops(tokens: list[int], eos=None, pad=0) -> list[int]:
    """onnxruntime-genai has no "no EOS": a checkpoint without one ends at the pad token (manifest note)."""
    stop = pad if eos is None else eos
    return tokens[:tokens.index(stop) + 1] if stop in tokens else tokens
