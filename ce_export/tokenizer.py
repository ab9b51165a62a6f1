"""A checkpoint's tokenizer: its own files through transformers (local files only, never the hub),
or the byte fallback `byte_tokens` when its folder has none (calibration data, task.json, generate)."""

from __future__ import annotations

from pathlib import Path

from ce_export.errors import LoadError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def byte_tokens(text: str, vocab_size: int) -> list[int]:
    """The documented fallback tokenizer: UTF-8 bytes, id = byte % vocab_size."""
    return [byte % vocab_size for byte in text.encode("utf-8")]


def load_tokenizer(model_folder: Path):
    """The checkpoint's tokenizer (local files only), or None when the folder has none."""
    if not any((model_folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer, PretrainedConfig

    try:
        # Never the checkpoint folder's own Python (auto_map): a tokenizer that needs it is refused.
        return AutoTokenizer.from_pretrained(str(model_folder), local_files_only=True, trust_remote_code=False)
    except Exception as error:  # tokenizers raise many types for broken files
        try:  # a trimmed checkpoint's config.json (per-layer num_experts) is one transformers rejects
            return AutoTokenizer.from_pretrained(str(model_folder), local_files_only=True, trust_remote_code=False,
                                                 config=PretrainedConfig())
        except Exception:
            raise LoadError(f"{model_folder}: has tokenizer files but they cannot be loaded "
                            f"({type(error).__name__}: {error})") from None
