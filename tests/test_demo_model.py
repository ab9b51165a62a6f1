"""The trained demo model: its language, its training code and the weights that ship with the package."""

import json

import pytest
import torch

from ce_export import moe_math
from ce_export.capture import build_torch_model
from ce_export.demo import WEIGHTS, TRAINING_RECORD, demo_config, demo_task, language, training, write_demo_checkpoint
from ce_export.load import load_checkpoint, parameter_count
from ce_export.task import read_task


def test_language_problems_are_exact_and_held_out_ones_never_trained():
    training_prompts = set()
    for problem, _ in zip(language.problems(seed=3), range(4000)):
        assert not language.is_held_out(problem.prompt)
        training_prompts.add(problem.prompt)
    held_out = language.evaluation_set(seed=5, per_task=50)
    assert len({p.prompt for p in held_out}) == 150 and all(language.is_held_out(p.prompt) for p in held_out)
    assert not training_prompts & {p.prompt for p in held_out}
    for problem in held_out:
        prompt = problem.prompt[:-1]
        if problem.task == "add":
            a, b = prompt.split("+")
            assert int(problem.answer) == int(a) + int(b) and len(problem.answer) == 4
        elif problem.task == "reverse":
            assert problem.answer == prompt.removeprefix("rev ")[::-1]
        else:  # the prompt's brackets followed by the answer balance
            stack = []
            for char in prompt + problem.answer:
                if char in language.BRACKETS:
                    stack.append(char)
                else:
                    assert language.BRACKETS[stack.pop()] == char
            assert not stack


def test_tokenizer_is_the_byte_identity(tmp_path):
    """(onnxruntime-genai reads it the same: test_clients.test_genai_answers_the_demo_task_through_its_tokenizer)"""
    from transformers import AutoTokenizer

    language.write_tokenizer(tmp_path)
    text = "347+085=0432\n([{<=>}])\nrev spark=kraps\n"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.encode(text) == list(text.encode()) and tokenizer.decode(list(text.encode())) == text


@pytest.mark.parametrize("n_ce", [0, 2])
def test_training_block_computes_moe_reference(n_ce):
    config = demo_config(False)
    block = training.TrainableMoe(config, torch.Generator().manual_seed(0))
    if n_ce:
        block.add_compressed_experts(n_ce)
        with torch.no_grad():
            block.ces.add_(0.3 * torch.randn(block.ces.shape, generator=torch.Generator().manual_seed(1)))
    hidden = torch.randn(3, 20, config["hidden_size"], generator=torch.Generator().manual_seed(2))
    out = block(hidden).reshape(-1, config["hidden_size"])
    expected = moe_math.moe_reference(hidden.reshape(-1, config["hidden_size"]), block.router_logits, block.gate_up,
                                      block.down, block.ces, config["num_experts_per_tok"], n_ce, False)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_trained_model_is_written_as_the_checkpoint_ce_export_loads(tmp_path):
    """A few training steps, then the written (fp16-rounded) tensors in ce_export's loading path give
    the training model's logits: the on-disk names and layouts are the ones the training model used."""
    from safetensors.torch import save_file

    lm = training.build_model(demo_config(False), seed=0)
    steps = training.Phase("test", steps=2, learning_rate=1e-3, warmup=1, seed=0)
    training.train(lm, steps, report=lambda line: None)
    for block in training.moe_blocks(lm):
        block.add_compressed_experts(2)
    training.train(lm, training.Phase("test-ce", steps=2, learning_rate=1e-3, warmup=1, seed=0, n_ce=2),
                   report=lambda line: None)
    tensors = training.checkpoint_tensors(lm)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    weights = tmp_path / "weights"
    weights.mkdir()
    save_file(tensors, str(weights / "ce.safetensors"))
    folder = write_demo_checkpoint(tmp_path / "ckpt", compressed=True, weights=weights)
    loaded = load_checkpoint(folder)
    assert loaded.spec.use_ce and loaded.spec.n_ce == 2 and not torch.all(loaded.moe_weights[0].ces == 1)
    with torch.no_grad():
        for parameter in lm.parameters():
            parameter.copy_(parameter.half().float())
        ids = torch.tensor([language.encode("347+085=0432\nrev spark=")])
        expected = lm(input_ids=ids).logits
        actual = build_torch_model(loaded)(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_shipped_checkpoints_and_their_training_record(demo_ce, demo_plain):
    record = json.loads((WEIGHTS / TRAINING_RECORD).read_text())
    assert record["command"].startswith("python -m ce_export.demo.training")
    assert {"platform", "processor", "torch_threads"} <= set(record["machine"]) and record["seconds"] > 0
    plain, ce = record["phases"]["plain"], record["phases"]["ce"]
    assert ce["n_ce"] == 2
    # The acceptance: both >= 90% exact match; CE keeps >= 90% of the plain model's with fewer active expert parameters.
    assert plain["quality"]["accuracy"] >= 0.9 and ce["quality"]["accuracy"] >= 0.9
    assert ce["quality"]["accuracy"] >= 0.9 * plain["quality"]["accuracy"]
    (ce_total, ce_active), (plain_total, plain_active) = (parameter_count(load_checkpoint(f)) for f in (demo_ce, demo_plain))
    assert ce_active < plain_active and ce_total > plain_total  # the ces vectors
    for folder in (demo_ce, demo_plain):
        assert read_task(folder).held_out == demo_task().held_out
        assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "task.json"} <= {
            p.name for p in folder.iterdir()}
