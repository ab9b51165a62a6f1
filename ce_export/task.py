"""A checkpoint's own task: held-out problems with exact answers, measured in every build's quality report.

A checkpoint folder may carry `task.json` (the demo's does, and `trim` copies it to the trimmed
checkpoint):

    {"format": 1, "name": ..., "description": ...,
     "stop": "\n",                       # the text that ends an answer
     "calibration": "...",               # text from the training distribution (calibration data)
     "held_out": [{"task": "add", "prompt": "357+46=", "answer": "403"}, ...]}

Exact match: the greedy continuation of the prompt, in tokens of the checkpoint's tokenizer, starts
with the tokens of answer + stop. Prompts run as one left-padded batch (prefill, then one decode
step per token over the KV cache), so any decoder with the exported model's flat interface
(ONNX Runtime, the captured PyTorch model) is measured the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ce_export.errors import LoadError
from ce_export.tokenizer import byte_tokens, load_tokenizer

TASK_FILE = "task.json"
TASK_FORMAT = 1


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    stop: str
    calibration: str
    held_out: list[dict]

    def to_json(self) -> dict:
        return {"format": TASK_FORMAT, "name": self.name, "description": self.description, "stop": self.stop,
                "calibration": self.calibration, "held_out": self.held_out}

    def held_out_text(self) -> str:
        return "".join(p["prompt"] + p["answer"] + self.stop for p in self.held_out)


def read_task(folder: str | Path) -> Task | None:
    """The folder's task.json, or None when it has none."""
    path = Path(folder) / TASK_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != TASK_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {TASK_FORMAT}")
        problems = data["held_out"]
        if not problems or not all(isinstance(p.get(k), str) for p in problems for k in ("task", "prompt", "answer")):
            raise ValueError("held_out must be a non-empty list of {task, prompt, answer} strings")
        return Task(name=data["name"], description=data.get("description", ""), stop=data["stop"],
                    calibration=data.get("calibration", ""), held_out=problems)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as error:
        raise LoadError(f"{path}: not a valid task file ({type(error).__name__}: {error})") from None


def write_task(folder: str | Path, task: Task) -> None:
    (Path(folder) / TASK_FILE).write_text(json.dumps(task.to_json(), indent=1) + "\n")


def answers(runtime, prompts: list[list[int]], new_tokens: int, spec, dtype) -> list[list[int]]:
    """Greedy `new_tokens` after each prompt, all prompts as one left-padded batch (pad id 0)."""
    from ce_export.capture import empty_past
    from ce_export.runners import greedy

    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    steps = greedy(runtime, ids, mask, empty_past(spec, len(prompts), 0, dtype), new_tokens)
    return torch.cat([tokens for tokens, _ in steps], dim=1).tolist()


def exact_match(runtime, task: Task, tokenizer, spec, dtype) -> dict:
    """Exact-match accuracy of `runtime` on the task's held-out problems, overall and per task."""
    prompts = [tokenizer.encode(p["prompt"], add_special_tokens=False) for p in task.held_out]
    expected = [tokenizer.encode(p["answer"] + task.stop, add_special_tokens=False) for p in task.held_out]
    generated = answers(runtime, prompts, max(len(e) for e in expected), spec, dtype)
    correct = [got[:len(want)] == want for got, want in zip(generated, expected)]
    per_task: dict[str, list[bool]] = {}
    for problem, ok in zip(task.held_out, correct):
        per_task.setdefault(problem["task"], []).append(ok)
    return {"problems": len(correct), "correct": sum(correct), "accuracy": sum(correct) / len(correct),
            "per_task": {name: sum(oks) / len(oks) for name, oks in per_task.items()},
            "correct_by_problem": correct}


def compare_on_task(task: Task, tokenizer, reference, candidate, spec, candidate_dtype) -> dict:
    """Exact match of a reference decoder (PyTorch fp32) and a candidate (the artifact) side by side."""
    expected = exact_match(reference, task, tokenizer, spec, torch.float32)
    actual = exact_match(candidate, task, tokenizer, spec, candidate_dtype)
    return compare_exact_match(task, tokenizer, expected, actual)


def compare_exact_match(task: Task, tokenizer, expected: dict, actual: dict) -> dict:
    """The task report of two exact_match results: the reference's (PyTorch fp32) and the candidate's
    (the artifact), which may have been recorded at different times (the build's verify stage runs
    ONNX Runtime first, then PyTorch, never both models resident)."""
    differing = sum(a != b for a, b in zip(expected["correct_by_problem"], actual["correct_by_problem"]))
    return {"name": task.name, "problems": expected["problems"], "metric": "exact match of the greedy answer",
            "tokenizer": type(tokenizer).__name__, "accuracy_torch_fp32": expected["accuracy"],
            "accuracy_onnx": actual["accuracy"], "accuracy_delta": actual["accuracy"] - expected["accuracy"],
            "per_task_torch_fp32": expected["per_task"], "per_task_onnx": actual["per_task"],
            "problems_scored_differently": differing}


class ByteTokens:
    """The byte fallback (tokenizer.byte_tokens: token id = byte % vocab_size) behind tokenizer.encode."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return byte_tokens(text, self.vocab_size)


def task_tokenizer(folder: str | Path, vocab_size: int):
    """The checkpoint's tokenizer, or the byte fallback when its folder has none (as calibration does)."""
    return load_tokenizer(Path(folder)) or ByteTokens(vocab_size)


def held_out_sequences(task: Task, tokenizer, seq_len: int, count: int) -> torch.Tensor:
    """The held-out problems' text, tokenized and cut into at most `count` sequences [N, seq_len] (perplexity)."""
    stream = tokenizer.encode(task.held_out_text(), add_special_tokens=False)
    rows = min(count, len(stream) // seq_len)
    if rows < 1:
        raise LoadError(f"task {task.name!r}: its held-out text has {len(stream)} tokens, fewer than {seq_len}")
    return torch.tensor(stream[: rows * seq_len], dtype=torch.long).reshape(rows, seq_len)
