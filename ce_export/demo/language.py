"""The demo model's language: three small tasks with one exact answer each, one problem per line.

    357+046=0403            addition of 3-digit numbers (zero-padded: every digit has its place)
    ([{<>=}])               the closing brackets of an unbalanced bracket string (after the "=")
    rev spark=kraps         reversal of a word

A line is a prompt (everything up to and including its "=") and its answer, ended by a
newline, which is the model's end-of-sequence token. Text is tokenized byte by byte: token id =
byte value (a byte-level BPE tokenizer with no merges, so transformers and onnxruntime-genai read
it; ids 256.. of the model's vocabulary are unused). Problems are drawn from seeded generators;
every problem whose prompt hashes to 0 modulo HELD_OUT_MODULUS is held out: training never sees
it, the evaluation set is drawn only from those.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from pathlib import Path

TASKS = ("add", "brackets", "reverse")
STOP = "\n"
EOS_TOKEN_ID = ord(STOP)
PAD_TOKEN_ID = 0
HELD_OUT_MODULUS = 16
BRACKETS = {"(": ")", "[": "]", "{": "}", "<": ">"}
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    answer: str

    @property
    def line(self) -> str:
        return self.prompt + self.answer + STOP

    def to_json(self) -> dict:
        return {"task": self.task, "prompt": self.prompt, "answer": self.answer}


def addition(rng: random.Random) -> Problem:
    a, b = rng.randrange(1000), rng.randrange(1000)
    return Problem("add", f"{a:03d}+{b:03d}=", f"{a + b:04d}")


def brackets(rng: random.Random) -> Problem:
    """A random prefix of a balanced string (at most 4 open at once) that leaves 1 to 4 open."""
    while True:
        stack, text = [], []
        for _ in range(rng.randint(2, 10)):
            if stack and (len(stack) == 4 or rng.random() < 0.4):
                text.append(BRACKETS[stack.pop()])
            else:
                opening = rng.choice(tuple(BRACKETS))
                stack.append(opening)
                text.append(opening)
        if stack:
            return Problem("brackets", "".join(text) + "=", "".join(BRACKETS[b] for b in reversed(stack)))


def reverse(rng: random.Random) -> Problem:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
    return Problem("reverse", f"rev {word}=", word[::-1])


GENERATORS = {"add": addition, "brackets": brackets, "reverse": reverse}


def is_held_out(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % HELD_OUT_MODULUS == 0


def problems(seed: int, held_out: bool = False):
    """An endless stream of problems, tasks in turn at random; only training problems, or only held-out ones."""
    rng = random.Random(seed)
    while True:
        problem = GENERATORS[rng.choice(TASKS)](rng)
        if is_held_out(problem.prompt) == held_out:
            yield problem


def evaluation_set(seed: int, per_task: int) -> list[Problem]:
    """`per_task` distinct held-out problems of each task, grouped by task."""
    chosen: dict[str, dict[str, Problem]] = {task: {} for task in TASKS}
    for problem in problems(seed, held_out=True):
        bucket = chosen[problem.task]
        if len(bucket) < per_task:
            bucket.setdefault(problem.prompt, problem)
        if all(len(b) == per_task for b in chosen.values()):
            return [p for task in TASKS for p in chosen[task].values()]
    raise AssertionError("unreachable")


def text(seed: int, lines: int) -> str:
    """`lines` training problems, one per line (calibration data)."""
    stream = problems(seed)
    return "".join(next(stream).line for _ in range(lines))


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte value (what a byte-level BPE vocabulary holds)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    mapping = bytes_to_unicode()
    return [mapping[b] for b in range(256)]


def write_tokenizer(folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json: byte-level BPE, no merges, token id = byte value."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(vocab={char: byte for byte, char in enumerate(byte_alphabet())}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(folder)
