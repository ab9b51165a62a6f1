"""Calibration data: text / JSONL / token-id files (or the built-in corpus) -> fixed-length sequences,
for the build's `--calib DATA` (FP8 activation scales, the quality report's perplexity) and for
ce_calibrate's `calibrate --data`.

Tokenization (tokenizer.py): the checkpoint folder's own tokenizer when it has one (transformers
AutoTokenizer, local files only, never the hub); otherwise the byte-level fallback `byte_tokens`: the text's UTF-8
bytes, each byte value b becoming token id `b % vocab_size` (the identity for any vocabulary of at
least 256 ids, such as the demo model's 512). The fallback is deterministic and needs no files; it
only makes sense for random-weight test models or models actually trained on bytes.

Default data (`data=None`): the checkpoint's own calibration text when its folder carries a task
file (`task.json`, ce_export/task.py: the demo model's), else the built-in English corpus.

All tokens are concatenated into one stream (documents joined by the tokenizer's EOS token when it
has one, else by a newline) and cut into sequences of `seq_len` tokens; the remainder is dropped.
The last `eval_fraction` of the sequences (at least one) is held out for perplexity.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ce_export.errors import LoadError, one_line
from ce_export.task import TASK_FILE, read_task
from ce_export.tokenizer import byte_tokens, load_tokenizer

BUILTIN = "builtin"
CHECKPOINT_TASK = "task.json"  # source: the calibration text of the checkpoint's task file
CORPUS = Path(__file__).with_name("corpus.txt")
BYTE_FALLBACK = "bytes (utf-8 byte value modulo vocab_size)"


@dataclass
class CalibrationData:
    calibration: torch.Tensor  # [N, seq_len] int64
    evaluation: torch.Tensor  # [M, seq_len] int64
    source: str
    tokenizer: str
    total_tokens: int
    info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {
            "source": self.source,
            "tokenizer": self.tokenizer,
            "seq_len": int(self.calibration.shape[1]),
            "calibration_sequences": int(self.calibration.shape[0]),
            "evaluation_sequences": int(self.evaluation.shape[0]),
            "stream_tokens": self.total_tokens,
        }


def parse_json(text: str, where: str):
    """json.loads, with a malformed or too deeply nested document a LoadError naming `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise LoadError(f"{where}: not valid JSON ({error.msg})") from None
    except RecursionError:
        raise LoadError(f"{where}: not valid JSON (nested too deeply)") from None


def read_documents(path: Path) -> list[str] | list[list[int]]:
    """Texts (list of str) or pre-tokenized sequences (list of lists of int) from a data file."""
    if not path.is_file():
        raise LoadError(f"{path}: calibration data file does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = read_token_array(path)
        return [row.tolist() for row in (array[None] if array.ndim == 1 else array)]
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LoadError(f"{path}: not UTF-8 text ({error.reason})") from None
    if suffix == ".jsonl":
        texts = []
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            record = parse_json(line, f"{path}:{number}")
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise LoadError(f"{path}:{number}: expected an object with a string field \"text\"")
            texts.append(record["text"])
        return texts
    if suffix == ".json":
        data = parse_json(content, str(path))
        if not (isinstance(data, list) and data and all(isinstance(row, list) for row in data)
                and all(isinstance(t, int) and not isinstance(t, bool) for row in data for t in row)):
            raise LoadError(f"{path}: expected a JSON list of lists of token ids")
        return data
    return [content]


def read_token_array(path: Path):
    """A .npy file of token ids, without pickle: its header (dtype, shape) is checked against the
    file's size before any data is read, so a header cannot make the reader allocate or loop over
    more than the file holds."""
    import numpy as np
    from numpy.lib import format as npy

    expected = "a 1-D or 2-D integer array of token ids"
    try:
        with open(path, "rb") as handle:
            version = npy.read_magic(handle)
            read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, _, dtype = read_header(handle)
            data_bytes = path.stat().st_size - handle.tell()
    except OSError as error:
        raise LoadError(f"{path}: cannot read it ({error.strerror or error})") from None
    except Exception as error:  # numpy's header parser raises several types (ValueError, SyntaxError, TokenError...)
        raise LoadError(f"{path}: not a readable .npy array ({type(error).__name__}: {one_line(str(error), 200)})") from None
    if dtype.kind not in "iu" or len(shape) not in (1, 2):
        raise LoadError(f"{path}: expected {expected}, got {dtype} {shape}")
    if math.prod(shape) == 0:
        raise LoadError(f"{path}: holds no token ids (shape {shape})")
    if math.prod(shape) * dtype.itemsize != data_bytes:
        raise LoadError(f"{path}: its header describes {shape} {dtype} ({math.prod(shape) * dtype.itemsize} bytes), "
                        f"the file holds {data_bytes} bytes of data")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise LoadError(f"{path}: not a readable .npy array ({one_line(str(error), 200)})") from None


def token_stream(documents, vocab_size: int, model_folder: Path) -> tuple[list[int], str]:
    if documents and isinstance(documents[0], list):
        stream = [token for row in documents for token in row]
        name = "pre-tokenized ids"
    else:
        tokenizer = load_tokenizer(model_folder)
        if tokenizer is None:
            stream = byte_tokens("\n".join(documents), vocab_size)
            name = BYTE_FALLBACK
        else:
            eos = tokenizer.eos_token_id
            stream = []
            for index, text in enumerate(documents):
                if index:
                    stream += [eos] if eos is not None else tokenizer.encode("\n", add_special_tokens=False)
                stream += tokenizer.encode(text, add_special_tokens=False)
            name = f"{type(tokenizer).__name__} from {model_folder}"
    bad = next((t for t in stream if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise LoadError(f"token id {bad} is outside the model's vocabulary (vocab_size={vocab_size})")
    return stream, name


def prepare(model_folder: str | Path, vocab_size: int, data: str | Path | None = None, seq_len: int = 128,
            num_sequences: int | None = None, eval_fraction: float = 0.1) -> CalibrationData:
    """Read, tokenize and split calibration data; `num_sequences` caps the calibration split."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise LoadError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if num_sequences is not None and (not isinstance(num_sequences, int) or num_sequences < 1):
        raise LoadError(f"num_sequences must be a positive integer, got {num_sequences!r}")
    if not 0.0 < eval_fraction < 1.0:
        raise LoadError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction!r}")
    model_folder = Path(model_folder)
    path = CORPUS if data is None else Path(data)
    source = BUILTIN if data is None else str(path.absolute())
    task = read_task(model_folder) if data is None else None
    if task is not None and task.calibration:
        path, source, documents = model_folder / TASK_FILE, CHECKPOINT_TASK, [task.calibration]
    else:
        documents = read_documents(path)
    stream, tokenizer = token_stream(documents, vocab_size, model_folder)
    count = len(stream) // seq_len
    if count < 2:
        raise LoadError(f"{path}: {len(stream)} tokens make {count} sequence(s) of {seq_len}; "
                        f"need at least 2 (one to calibrate, one to evaluate)")
    chunks = torch.tensor(stream[: count * seq_len], dtype=torch.long).reshape(count, seq_len)
    held_out = max(1, round(count * eval_fraction))
    calibration, evaluation = chunks[: count - held_out], chunks[count - held_out:]
    if num_sequences is not None:
        calibration = calibration[:num_sequences]
    return CalibrationData(calibration=calibration, evaluation=evaluation,
                           source=source,
                           tokenizer=tokenizer, total_tokens=len(stream))
