"""The PyTorch runtime path (static KV cache, CUDA-graph decode on GPU) against the reference model."""

import re

import pytest
import torch

from architectures import configs, save_tiny
from client_runs import transformers_generate
from ce_export.capture import build_torch_model
from ce_export.errors import RuntimeInputError
from ce_export.load import load_checkpoint
from ce_export.runners import TorchRunner
from ce_export.runtime import WINDOW_STEP, FastDecoder
from ce_export.verify import compare, generation_prompt


def flat_reference_steps(loaded, ids, next_ids):
    """Prefill logits, then one decode step's logits, through the flat DynamicCache interface."""
    reference = TorchRunner(build_torch_model(loaded))
    batch, length = ids.shape
    empty = tuple(torch.zeros(shape) for shape in loaded.spec.past_shapes(batch, 0))
    positions = torch.arange(length).expand(batch, -1)
    prefill = reference(ids, torch.ones_like(ids), positions, empty)
    decode = reference(next_ids, torch.ones(batch, length + 1, dtype=torch.long), torch.full((batch, 1), length),
                       tuple(prefill[1:]))
    return prefill, decode


def test_generation_matches_transformers_generate_on_a_left_padded_batch(demo_ce):
    loaded = load_checkpoint(demo_ce)
    ids, mask = generation_prompt(loaded.spec.vocab_size)
    expected = transformers_generate(build_torch_model(loaded), ids, mask, 24)
    fast = FastDecoder.from_checkpoint(demo_ce, batch=2, max_context=40, dtype=torch.float32, device="cpu")
    assert torch.equal(fast.generate(ids, mask, 24), expected)
    # The same decoder starts over cleanly with another prompt.
    assert torch.equal(fast.generate(ids, mask, 24), expected)


@pytest.mark.parametrize("arch", sorted(configs()))
def test_prefill_and_decode_logits_match_the_flat_reference(arch, tmp_path):
    loaded = load_checkpoint(save_tiny(arch, tmp_path / arch))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, loaded.spec.vocab_size, (2, 9), generator=gen)
    next_ids = torch.randint(0, loaded.spec.vocab_size, (2, 1), generator=gen)
    prefill, decode = flat_reference_steps(loaded, ids, next_ids)

    fast = FastDecoder(build_torch_model(loaded), loaded.spec, batch=2, max_context=16)
    assert compare(prefill[0], fast.prefill(ids))["max_rel"] < 1e-5
    assert compare(decode[0], fast.decode(next_ids))["max_rel"] < 1e-5

    # A past handed over in the exported model's layout gives the same step, and advance=False
    # keeps the context fixed (what the benchmark times).
    fast.load_past(tuple(prefill[1:]))
    for _ in range(2):
        assert compare(decode[0], fast.decode(next_ids, advance=False))["max_rel"] < 1e-5


def test_cache_overflow_and_wrong_batch_are_clear_errors(demo_ce):
    loaded = load_checkpoint(demo_ce)
    fast = FastDecoder(build_torch_model(loaded), loaded.spec, batch=1, max_context=256)
    with pytest.raises(ValueError, match="exceed the cache of 256 slots"):
        fast.prefill(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="built for batch 1"):
        fast.prefill(torch.zeros(2, 4, dtype=torch.long))
    fast.prefill(torch.zeros(1, 256, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed"):
        fast.decode(torch.zeros(1, 1, dtype=torch.long))


def test_inputs_beyond_what_the_decoder_was_built_for_are_clear_errors(demo_ce):
    """Batch, sequence and context beyond the built decoder, and malformed inputs: a
    RuntimeInputError (a ValueError; exit 2 with one line under the CLI), never an index error
    deep in torch or, on a GPU, a device-side assert."""
    loaded = load_checkpoint(demo_ce)
    vocab = loaded.spec.vocab_size
    fast = FastDecoder(build_torch_model(loaded), loaded.spec, batch=2, max_context=256)
    ids = torch.zeros(2, 3, dtype=torch.long)
    cases = [
        (lambda: fast.decode(torch.zeros(2, 1, dtype=torch.long)), "no prompt yet"),
        (lambda: fast.prefill(torch.zeros(3, 3, dtype=torch.long)), "built for batch 2, got 3"),
        (lambda: fast.prefill(torch.zeros(2, 257, dtype=torch.long)), "exceed the cache of 256 slots"),
        (lambda: fast.prefill(torch.zeros(2, 0, dtype=torch.long)), "at least 1 token"),
        (lambda: fast.prefill(torch.zeros(6, dtype=torch.long)), "integer token ids [batch, sequence]"),
        (lambda: fast.prefill(torch.zeros(2, 3)), "integer token ids"),
        (lambda: fast.prefill(torch.full((2, 3), vocab)), f"token id {vocab} is outside the vocabulary"),
        (lambda: fast.prefill(torch.full((2, 3), -1)), "token id -1 is outside the vocabulary"),
        (lambda: fast.prefill(ids, torch.ones(2, 4, dtype=torch.long)), "attention_mask must be [2, 3]"),
        (lambda: fast.generate(ids, None, new_tokens=255), "3 prompt + 255 new tokens need 257 cache slots"),
        (lambda: fast.generate(ids, None, new_tokens=0), "new_tokens must be a positive integer"),
        (lambda: fast.load_past(tuple(torch.zeros(2, 4, 3, 32) for _ in range(3))), "expected 8 tensors"),
        (lambda: fast.load_past(tuple(torch.zeros(2, 4, 257, 32) for _ in range(8))), "exceed the cache of 256 slots"),
        (lambda: fast.load_past(tuple(torch.zeros(1, 4, 3, 32) for _ in range(8))), "expected [2, 4, P, 32]"),
        (lambda: FastDecoder(build_torch_model(loaded), loaded.spec, batch=0, max_context=8), "batch must be a positive"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeInputError) as raised:
            call()
        assert message in str(raised.value) and "\n" not in str(raised.value)
    fast.prefill(ids)
    for bad, message in ((torch.zeros(2, 2, dtype=torch.long), "expected 1 token(s) per row, got 2"),
                         (torch.full((2, 1), vocab), "outside the vocabulary")):
        with pytest.raises(RuntimeInputError, match=re.escape(message)):
            fast.decode(bad)
    long = torch.zeros(2, 253, dtype=torch.long)  # a long prompt keeps the boundary cases to a few decode steps
    assert fast.generate(long, None, new_tokens=4).shape == (2, 4)  # exactly the 256 slots: fine
    with pytest.raises(RuntimeInputError, match=re.escape("253 prompt + 5 new tokens need 257 cache slots")):
        fast.generate(long, None, new_tokens=5)


def test_the_cache_holds_whole_attention_windows(demo_ce):
    """max_context 257 (a benchmark's context 256 plus the decoded token) gets two full windows, so
    attention never reads an unaligned 257-slot window."""
    loaded = load_checkpoint(demo_ce)
    fast = FastDecoder(build_torch_model(loaded), loaded.spec, batch=1, max_context=257)
    assert fast.cache.max_context == 512 and fast.bucket(257) == 512 and fast.bucket(1) == 256


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph decode needs a GPU")
def test_cuda_graph_decode_replays_the_eager_step(demo_ce):
    loaded = load_checkpoint(demo_ce)
    ids, mask = generation_prompt(loaded.spec.vocab_size)
    lm = build_torch_model(loaded).cuda()
    eager = FastDecoder(lm, loaded.spec, batch=2, max_context=40, cuda_graph=False).generate(ids.cuda(), mask.cuda(), 24)
    graphed = FastDecoder(lm, loaded.spec, batch=2, max_context=40, cuda_graph=True)
    assert torch.equal(graphed.generate(ids.cuda(), mask.cuda(), 24), eager)
    assert set(graphed.graphs) == {256}


def test_attention_reads_a_window_of_the_cache_not_all_of_it(demo_ce):
    """Decoding across a window boundary (256 slots) gives the same tokens as one full-width step
    would: the window grows, nothing written before it is lost."""
    loaded = load_checkpoint(demo_ce)
    ids, mask = generation_prompt(loaded.spec.vocab_size)
    lm = build_torch_model(loaded)
    prompt = torch.cat([ids[:, :1].expand(-1, 245), ids], dim=1)  # 253 tokens, the first 3 of row 0 padded
    prompt_mask = torch.cat([torch.zeros(2, 245, dtype=torch.long), mask], dim=1)
    prompt_mask[1] = 1
    expected = transformers_generate(lm, prompt, prompt_mask, 8)
    fast = FastDecoder(build_torch_model(loaded), loaded.spec, batch=2, max_context=600)
    windows = []
    logits = fast.prefill(prompt, prompt_mask)
    tokens = [logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(7):
        windows.append(fast.bucket(fast.cache.filled + 1))
        tokens.append(fast.decode(tokens[-1])[:, -1].argmax(-1, keepdim=True))
    assert windows == [256] * 3 + [512] * 4
    assert torch.equal(torch.cat(tokens, dim=1), expected)


def test_compiled_decode_step_generates_the_same_tokens(demo_ce):
    """torch.compile of the decode step (inductor's CPU backend here) with our op left opaque."""
    loaded = load_checkpoint(demo_ce)
    ids, mask = generation_prompt(loaded.spec.vocab_size)
    expected = transformers_generate(build_torch_model(loaded), ids, mask, 8)
    fast = FastDecoder(build_torch_model(loaded), loaded.spec, batch=2, max_context=24, compile_decode=True)
    assert torch.equal(fast.generate(ids, mask, 8), expected)
    limits = dict(torch._dynamo.config.get_config_copy())
    FastDecoder(fast.lm, loaded.spec, batch=1, max_context=40 * WINDOW_STEP, compile_decode=True)
    assert torch._dynamo.config.get_config_copy() == limits  # its 41 variants are allowed inside its calls only
