"""A checkpoint folder checked before any tensor is read (load.py calls `check_checkpoint` first).

Cheapest first, each failure one LoadError line naming config.json or the file:
1. config.json against its architecture's schema (pydantic, strict: "yes" is not a bool, "128" is
   not an integer): types, ranges and required keys of everything ce_export reads, plus the
   cross-field rules (kv heads divide heads, n_ce < top_k, per-layer lists as long as the model...).
2. The safetensors headers (names, dtypes, shapes; no tensor data): the checkpoint's own layer
   count and embedding shape must agree with the config. Work that grows with a config value (one
   module per layer) then grows with the checkpoint, so `num_hidden_layers: 1000000000` on a
   4-layer checkpoint fails at once.
3. transformers' own config class for the model_type (its typed fields and validation), and its
   model built on the meta device: what transformers itself cannot make of config.json (an unknown
   `hidden_act`, broken rope parameters) fails here, as one line, rather than deep inside capture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from ce_export.errors import LoadError, one_line

SAFETENSORS_INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors' names; what the loader takes
OUR_KEYS = ("use_ce", "n_ce", "bottom_k", "layer_experts_idx")  # CE / trimming keys transformers does not know
INT32_MAX = 2**31 - 1

Count = Annotated[int, Field(ge=1, le=INT32_MAX)]
Index = Annotated[int, Field(ge=0, le=INT32_MAX)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
# Trimmed checkpoints: one entry per layer, -1 / 0 = MoE sub-layer removed, null = dense layer.
ExpertCounts = Count | list[Annotated[int, Field(ge=-1, le=INT32_MAX)] | None]


def cross_field(message: str) -> PydanticCustomError:
    return PydanticCustomError("cross_field", message)


class RopeParameters(BaseModel):
    """transformers' rope_scaling / rope_parameters: the scalars every rope type shares."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    rope_type: str | None = None
    type: str | None = None  # the older spelling of rope_type
    rope_theta: PositiveFloat | None = None
    factor: PositiveFloat | None = None


class Config(BaseModel):
    """The keys every architecture shares. Extra keys are allowed: transformers' config class
    checks the ones it declares, and the meta-device model build whatever it uses."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    model_type: str
    vocab_size: Count
    hidden_size: Count
    num_hidden_layers: Count
    num_attention_heads: Count
    num_key_value_heads: Count | None = None
    head_dim: Count | None = None
    num_experts_per_tok: Count
    hidden_act: str = "silu"
    max_position_embeddings: Count | None = None
    rms_norm_eps: NonNegativeFloat | None = None
    rope_theta: PositiveFloat | None = None
    rope_scaling: RopeParameters | None = None
    rope_parameters: RopeParameters | None = None
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None  # nn.Embedding's padding_idx: -vocab_size <= id < vocab_size
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    use_ce: bool = False
    n_ce: int | None = None
    layer_experts_idx: list[list[Index]] | None = None

    experts_key: ClassVar[str] = "num_experts"  # the config key with the expert count(s), per architecture

    def expert_counts(self):
        return getattr(self, self.experts_key, None)

    def per_head_dims_from_hidden(self) -> bool:
        return self.head_dim is None

    @model_validator(mode="after")
    def cross_field_rules(self):
        from transformers.activations import ACT2FN

        if self.hidden_act not in ACT2FN:
            raise cross_field(f"hidden_act={self.hidden_act!r} is not an activation transformers knows "
                              f"({', '.join(sorted(ACT2FN))})")
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if kv_heads is not None and heads % kv_heads:
            raise cross_field(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        if self.per_head_dims_from_hidden() and self.hidden_size % heads:
            raise cross_field(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={heads} "
                              f"(and no head_dim is given)")
        top_k, layers = self.num_experts_per_tok, self.num_hidden_layers
        counts = self.expert_counts()
        if counts is None:
            raise cross_field(f"{self.experts_key} is missing (the expert count)")
        if isinstance(counts, int) and top_k > counts:
            raise cross_field(f"num_experts_per_tok={top_k} is more than {self.experts_key}={counts}")
        if isinstance(counts, list) and len(counts) != layers:
            raise cross_field(f"{self.experts_key} lists {len(counts)} layers, num_hidden_layers={layers}")
        if self.use_ce and (self.n_ce is None or isinstance(self.n_ce, bool) or not 1 <= self.n_ce < top_k):
            raise cross_field(f"n_ce={self.n_ce!r} is invalid for num_experts_per_tok={top_k} "
                              f"(use_ce is true: need an integer in 1..{top_k - 1})")
        if self.layer_experts_idx is not None and len(self.layer_experts_idx) != layers:
            raise cross_field(f"layer_experts_idx has {len(self.layer_experts_idx)} entries, one per layer "
                              f"expected ({layers})")
        pad = self.pad_token_id
        if pad is not None and not -self.vocab_size <= pad < self.vocab_size:
            raise cross_field(f"pad_token_id={pad} is outside the vocabulary (vocab_size={self.vocab_size})")
        return self


class OlmoeConfig(Config):
    num_experts: ExpertCounts | None = None
    intermediate_size: Count
    norm_topk_prob: bool = False
    clip_qkv: PositiveFloat | None = None


class MixtralConfig(Config):
    experts_key: ClassVar[str] = "num_local_experts"
    num_local_experts: ExpertCounts | None = None
    intermediate_size: Count


class PhimoeConfig(MixtralConfig):
    router_jitter_noise: NonNegativeFloat = 0.01


class Qwen3MoeConfig(Config):
    num_experts: ExpertCounts | None = None
    num_local_experts: ExpertCounts | None = None
    moe_intermediate_size: Count
    decoder_sparse_step: Count = 1
    mlp_only_layers: list[Index] | None = None
    norm_topk_prob: bool = False

    @property
    def experts_key(self) -> str:  # as load.ARCHITECTURES: num_experts, else num_local_experts
        return "num_local_experts" if self.num_experts is None and self.num_local_experts is not None else "num_experts"

    @model_validator(mode="after")
    def dense_layers_exist(self):
        for layer in self.mlp_only_layers or []:
            if layer >= self.num_hidden_layers:
                raise cross_field(f"mlp_only_layers names layer {layer}; the model has {self.num_hidden_layers}")
        return self


class Qwen2MoeConfig(Qwen3MoeConfig):
    shared_expert_intermediate_size: Count


class DeepseekV2Config(Config):
    experts_key: ClassVar[str] = "n_routed_experts"
    n_routed_experts: ExpertCounts | None = None
    moe_intermediate_size: Count
    n_shared_experts: Index = 1
    first_k_dense_replace: Index = 0
    moe_layer_freq: Count = 1
    routed_scaling_factor: PositiveFloat = 1.0
    topk_method: str | None = "greedy"
    kv_lora_rank: Count
    q_lora_rank: Count | None = None
    qk_rope_head_dim: Count
    qk_nope_head_dim: Count
    v_head_dim: Count

    def per_head_dims_from_hidden(self) -> bool:
        return False  # multi-head latent attention: head sizes are their own keys

    @model_validator(mode="after")
    def dense_prefix_fits(self):
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise cross_field(f"first_k_dense_replace={self.first_k_dense_replace} is more than "
                              f"num_hidden_layers={self.num_hidden_layers}")
        return self


SCHEMAS: dict[str, type[Config]] = {
    "olmoe": OlmoeConfig, "mixtral": MixtralConfig, "qwen2_moe": Qwen2MoeConfig, "qwen3_moe": Qwen3MoeConfig,
    "deepseek_v2": DeepseekV2Config, "phimoe": PhimoeConfig,
}


@dataclass(frozen=True)
class TensorHeader:
    file: str
    dtype: str  # safetensors' name: "F32", "BF16", ...
    shape: tuple[int, ...]


def check_checkpoint(folder: Path, config: dict) -> dict[str, TensorHeader]:
    """All checks above; returns the safetensors headers by tensor name."""
    where = folder / "config.json"
    schema = validate_config(config, where)
    headers = read_headers(folder)
    check_against_headers(schema, headers, folder)
    check_with_transformers(config, schema, where)
    return headers


def validate_config(config: dict, where: Path) -> Config:
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in SCHEMAS:
        raise LoadError(f"{where}: unknown model_type {short(model_type)} (supported: {', '.join(sorted(SCHEMAS))})")
    schema = SCHEMAS[model_type]
    try:
        return schema.model_validate(config)
    except ValidationError as error:
        raise LoadError(f"{where}: {describe(error.errors()[0], config, model_type)}") from None


def describe(error: dict, config: dict, model_type: str) -> str:
    """One pydantic error as `key=value is invalid (why)`, `key is missing`, or a cross-field rule."""
    if error["type"] == "cross_field":
        return error["msg"]
    # The location mixes keys and indices of the input with the names of union members
    # ("eos_token_id", "list[...]", 2): keep the parts that index into config.json.
    key, node = "", config
    for part in error["loc"]:
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            key, node = f"{key}.{part}" if key else part, node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            key, node = f"{key}[{part}]", node[part]
        elif error["type"] == "missing" and isinstance(part, str):
            key = f"{key}.{part}" if key else part
    if error["type"] == "missing":
        return f"{key} is missing (required for {model_type})"
    message = error["msg"]
    return f"{key}={short(error['input'])} is invalid ({message[0].lower() + message[1:]})"


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...)"


def shard_files(folder: Path) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder and, when sharded, the index's weight map."""
    index_path = folder / SAFETENSORS_INDEX
    if not index_path.is_file():
        files = sorted(path.name for path in folder.glob("*.safetensors"))
        if not files:
            raise LoadError(f"{folder}: no *.safetensors files and no {SAFETENSORS_INDEX}")
        return files, None
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise LoadError(f"{index_path}: not a safetensors index ({type(error).__name__}: {error})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise LoadError(f"{index_path}: weight_map must be a non-empty object of tensor name -> file name")
    for name, file in weight_map.items():
        # Shards live in the checkpoint folder itself: no paths, so an index cannot point elsewhere.
        if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
            raise LoadError(f"{index_path}: tensor {name!r} maps to {short(file)}, not a file name in {folder}")
    return sorted(set(weight_map.values())), weight_map


def read_headers(folder: Path) -> dict[str, TensorHeader]:
    """Every tensor's file, dtype and shape from the safetensors headers, reading no tensor data.
    The safetensors library validates each header (lengths, offsets covering the file exactly,
    dtypes, shapes); a tensor in two files, or one the index lists but its shard lacks, is an error."""
    from safetensors import safe_open

    files, weight_map = shard_files(folder)
    headers: dict[str, TensorHeader] = {}
    for file in files:
        path = folder / file
        if not path.is_file():
            raise LoadError(f"{path}: listed in {SAFETENSORS_INDEX} but missing")
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    if name in headers:
                        raise LoadError(f"{path}: tensor {name!r} is also in {headers[name].file}")
                    headers[name] = TensorHeader(file, view.get_dtype(), tuple(view.get_shape()))
        except LoadError:
            raise
        except Exception as error:  # safetensors raises several types for damaged files
            raise LoadError(f"{path}: unreadable safetensors file ({type(error).__name__}: {one_line(str(error), 300)})") from None
    if weight_map is not None:
        for name, file in weight_map.items():
            if headers.get(name) is None or headers[name].file != file:
                raise LoadError(f"{folder / SAFETENSORS_INDEX}: lists {name!r} in {file}, which does not contain it")
    for name, header in headers.items():
        if header.dtype not in FLOAT_DTYPES:
            raise LoadError(f"{folder / header.file}: tensor {name!r} has dtype {header.dtype}; "
                            f"ce_export reads {', '.join(FLOAT_DTYPES)} checkpoints")
    return headers


def check_against_headers(schema: Config, headers: dict[str, TensorHeader], folder: Path) -> None:
    """The config's claims that drive work (modules per layer, embedding rows) against the tensors."""
    where = folder / "config.json"
    layers = sorted({int(name.split(".")[2]) for name in headers
                     if name.startswith("model.layers.") and name.split(".")[2].isdigit()})
    if len(layers) != schema.num_hidden_layers or (layers and layers[-1] != len(layers) - 1):  # not 0..n-1
        held = f"layers {layers[0]}..{layers[-1]} ({len(layers)} distinct)" if layers else "no model.layers.* tensors"
        raise LoadError(f"{where}: num_hidden_layers={schema.num_hidden_layers}, but the safetensors hold {held}")
    embedding = headers.get("model.embed_tokens.weight")
    if embedding is not None and embedding.shape != (schema.vocab_size, schema.hidden_size):
        raise LoadError(f"{where}: vocab_size={schema.vocab_size}, hidden_size={schema.hidden_size}, but "
                        f"model.embed_tokens.weight in {embedding.file} is {list(embedding.shape)}")


# Training-time output switches a checkpoint may carry (e.g. Mixtral fine-tunes save
# output_router_logits: true for the auxiliary loss): the exported decoder returns logits and the
# KV cache only, so transformers' model is always built for that.
INFERENCE_OUTPUTS = {"output_router_logits": False, "output_hidden_states": False, "output_attentions": False,
                     "return_dict": True, "use_cache": True}


def transformers_config_dict(config: dict, experts_keys: tuple[str, ...], expert_count: int) -> dict:
    """config.json as transformers' config class takes it: our CE / trimming keys removed, one
    expert count (trimmed checkpoints list one per layer; our blocks carry their own), and the
    inference outputs the export needs."""
    config = {key: value for key, value in config.items() if key not in OUR_KEYS} | INFERENCE_OUTPUTS
    for key in experts_keys:
        if key in config:
            config[key] = expert_count
    return config


def check_with_transformers(config: dict, schema: Config, where: Path) -> None:
    """transformers' config class and its model (meta device: no memory) built from config.json."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ce_export.load import ARCHITECTURES

    counts = schema.expert_counts()
    counts = [c for c in (counts if isinstance(counts, list) else [counts]) if c is not None and c > 0]
    experts_keys = ARCHITECTURES[schema.model_type].experts_keys
    try:
        hf_config = AutoConfig.for_model(**transformers_config_dict(config, experts_keys, max(counts, default=2)))
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    except Exception as error:  # transformers' validation and constructors raise many types
        raise LoadError(f"{where}: transformers cannot build its {schema.model_type} model from it "
                        f"({type(error).__name__}: {one_line(str(error), 300)})") from None
