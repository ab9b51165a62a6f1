"""A checkpoint folder checked before any tensor is read (load.py calls `check_checkpoint` first).

Cheapest first, each failure one LoadError line naming config.json or the file:
1. config.json's keys against one schema for every family (pydantic, strict: "yes" is not a bool,
   "128" is not an integer): types and ranges of the sizes, counts and routing options the families
   share, ce_export's CE / trimming keys, and the cross-field rules (kv heads divide heads, top-k
   within the expert count, n_ce < top-k, per-layer lists one per layer...). What differs between
   families comes from the family's transformers config class, not from a list kept here: which
   keys it declares (its expert count, its intermediate sizes: required) and whether its head size
   defaults to hidden_size / heads.
2. The safetensors headers (names, dtypes, shapes; no tensor data): the checkpoint's own layer
   count and embedding shape must agree with the config. Work that grows with a config value (one
   module per layer) then grows with the checkpoint, so `num_hidden_layers: 1000000000` on a
   4-layer checkpoint fails at once.
3. transformers' own config class (a strict dataclass: the type of every key it declares, its own
   validation) and its model built on the meta device (load.py, `transformers_refusal` for the
   message): what transformers itself cannot make of config.json (an unknown `hidden_act`, broken
   rope parameters) fails there, as one line, rather than deep inside capture.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

from ce_export import families
from ce_export.errors import LoadError, one_line

SAFETENSORS_INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors' names; what the loader takes
INT32_MAX = 2**31 - 1
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk")  # where transformers' config classes keep the top-k
# Required (besides Config's own: vocab, hidden and layer sizes, heads) where the family's transformers
# config class declares them: they set tensor shapes, and transformers' defaults are a large model's.
REQUIRED_IF_DECLARED = ("intermediate_size", "moe_intermediate_size")
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.")  # a decoder layer's tensors (families.decoder_layers)

Count = Annotated[int, Field(ge=1, le=INT32_MAX)]
Index = Annotated[int, Field(ge=0, le=INT32_MAX)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
# Trimmed checkpoints: one entry per layer, -1 / 0 = MoE sub-layer removed, null = dense layer.
ExpertCounts = Count | list[Annotated[int, Field(ge=-1, le=INT32_MAX)] | None]


def cross_field(message: str) -> PydanticCustomError:
    return PydanticCustomError("cross_field", message)


@dataclass(frozen=True)
class Family:
    """What config.json's checks take from the family's transformers config class."""

    model_type: str
    declared: frozenset[str]  # the keys the class declares (its fields and their aliases)
    head_dim_from_hidden: bool  # no head_dim in config.json: transformers uses hidden_size / heads
    latent_attention: bool  # multi-head latent attention: head sizes are keys of their own

    @property
    def experts_key(self) -> str:
        return next((key for key in families.EXPERT_COUNT_KEYS if key in self.declared), families.EXPERT_COUNT_KEYS[0])


@cache
def family(model_type: str) -> Family:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    fields = {item.name: item for item in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else {}
    declared = set(fields) | set(getattr(config_class, "attribute_map", {}))
    head_dim = fields.get("head_dim")
    return Family(model_type, frozenset(declared), head_dim is None or head_dim.default is None,
                  families.ARCHITECTURES[model_type].latent_kv_cache)


class RopeParameters(BaseModel):
    """transformers' rope_scaling / rope_parameters: the scalars every rope type shares."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    rope_type: str | None = None
    type: str | None = None  # the older spelling of rope_type
    rope_theta: PositiveFloat | None = None
    factor: PositiveFloat | None = None


class Config(BaseModel):
    """The keys ce_export reads or the families share, wherever they occur. Extra keys are allowed:
    transformers' config class checks the ones it declares, and the meta-device model build
    whatever it uses. Validated with the family (`Family`) as context."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    model_type: str
    vocab_size: Count
    hidden_size: Count
    num_hidden_layers: Count
    num_attention_heads: Count
    intermediate_size: Count | None = None
    moe_intermediate_size: Count | None = None
    shared_expert_intermediate_size: Count | None = None
    num_key_value_heads: Count | None = None
    head_dim: Count | None = None
    num_experts_per_tok: Count | None = None
    moe_topk: Count | list[Count] | None = None
    num_experts: ExpertCounts | None = None
    num_local_experts: ExpertCounts | None = None
    n_routed_experts: ExpertCounts | None = None
    moe_num_experts: ExpertCounts | None = None
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
    # routing and layer-pattern options of several families
    norm_topk_prob: bool | None = None
    clip_qkv: PositiveFloat | None = None
    router_jitter_noise: NonNegativeFloat | None = None
    decoder_sparse_step: Count | None = None
    mlp_only_layers: list[Index] | None = None
    first_k_dense_replace: Index | None = None
    moe_layer_freq: Count | None = None
    routed_scaling_factor: PositiveFloat | None = None
    n_shared_experts: Index | None = None
    n_group: Count | None = None
    topk_group: Count | None = None
    kv_lora_rank: Count | None = None
    q_lora_rank: Count | None = None
    qk_rope_head_dim: Count | None = None
    qk_nope_head_dim: Count | None = None
    v_head_dim: Count | None = None
    # ce_export's: Compressed Experts and trimming (the compression study's format)
    use_ce: bool = False
    n_ce: int | None = None
    layer_experts_idx: list[list[Index]] | None = None

    def expert_counts(self) -> tuple[str | None, Any]:
        """(key, value) of the expert count: the first of families.EXPERT_COUNT_KEYS config.json holds."""
        key = next((key for key in families.EXPERT_COUNT_KEYS if getattr(self, key) is not None), None)
        return key, getattr(self, key) if key else None

    def top_k(self) -> tuple[str | None, int | None]:
        key = next((key for key in TOP_K_KEYS if isinstance(getattr(self, key), int)), None)
        return key, getattr(self, key) if key else None

    @model_validator(mode="after")
    def cross_field_rules(self, info: ValidationInfo):
        from transformers.activations import ACT2FN

        fam: Family = info.context["family"]
        for key in REQUIRED_IF_DECLARED:
            if key in fam.declared and getattr(self, key) is None:
                raise cross_field(f"{key} is missing (required for {fam.model_type})")
        if self.hidden_act not in ACT2FN:
            raise cross_field(f"hidden_act={self.hidden_act!r} is not an activation transformers knows "
                              f"({', '.join(sorted(ACT2FN))})")
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if kv_heads is not None and heads % kv_heads and not fam.latent_attention:
            raise cross_field(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        if fam.head_dim_from_hidden and not fam.latent_attention and self.head_dim is None and self.hidden_size % heads:
            raise cross_field(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={heads} "
                              f"(and no head_dim is given)")
        layers = self.num_hidden_layers
        experts_key, counts = self.expert_counts()
        if counts is None:
            raise cross_field(f"{fam.experts_key} is missing (the expert count)")
        top_k_key, top_k = self.top_k()
        if isinstance(counts, int) and top_k is not None and top_k > counts:
            raise cross_field(f"{top_k_key}={top_k} is more than {experts_key}={counts}")
        if isinstance(counts, list) and len(counts) != layers:
            raise cross_field(f"{experts_key} lists {len(counts)} layers, num_hidden_layers={layers}")
        if self.use_ce and (self.n_ce is None or isinstance(self.n_ce, bool) or self.n_ce < 1
                            or (top_k is not None and self.n_ce >= top_k)):
            need = f"an integer in 1..{top_k - 1}" if top_k is not None else "a positive integer below the top-k"
            raise cross_field(f"n_ce={self.n_ce!r} is invalid for {top_k_key or 'the top-k'}={top_k} "
                              f"(use_ce is true: need {need})")
        if self.layer_experts_idx is not None and len(self.layer_experts_idx) != layers:
            raise cross_field(f"layer_experts_idx has {len(self.layer_experts_idx)} entries, one per layer "
                              f"expected ({layers})")
        pad = self.pad_token_id
        if pad is not None and not -self.vocab_size <= pad < self.vocab_size:
            raise cross_field(f"pad_token_id={pad} is outside the vocabulary (vocab_size={self.vocab_size})")
        for layer in self.mlp_only_layers or []:
            if layer >= layers:
                raise cross_field(f"mlp_only_layers names layer {layer}; the model has {layers}")
        if self.first_k_dense_replace is not None and self.first_k_dense_replace > layers:
            raise cross_field(f"first_k_dense_replace={self.first_k_dense_replace} is more than "
                              f"num_hidden_layers={layers}")
        return self


@dataclass(frozen=True)
class TensorHeader:
    file: str
    dtype: str  # safetensors' name: "F32", "BF16", ...
    shape: tuple[int, ...]


def check_checkpoint(folder: Path, config: dict) -> dict[str, TensorHeader]:
    """Steps 1 and 2 above (config.json's model_type is one load.architecture_for accepted); returns
    the safetensors headers by tensor name."""
    where = folder / "config.json"
    schema = validate_config(config, where)
    headers = read_headers(folder)
    check_against_headers(schema, headers, folder)
    return headers


def validate_config(config: dict, where: Path) -> Config:
    model_type = config["model_type"]
    try:
        return Config.model_validate(config, context={"family": family(model_type)})
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
    layers = sorted({int(match.group(1)) for name in headers if (match := LAYER_INDEX.search(name))})
    if len(layers) != schema.num_hidden_layers or (layers and layers[-1] != len(layers) - 1):  # not 0..n-1
        held = f"layers {layers[0]}..{layers[-1]} ({len(layers)} distinct)" if layers else "no decoder layer tensors"
        raise LoadError(f"{where}: num_hidden_layers={schema.num_hidden_layers}, but the safetensors hold {held}")
    embedding = headers.get("model.embed_tokens.weight")
    if embedding is not None and embedding.shape != (schema.vocab_size, schema.hidden_size):
        raise LoadError(f"{where}: vocab_size={schema.vocab_size}, hidden_size={schema.hidden_size}, but "
                        f"model.embed_tokens.weight in {embedding.file} is {list(embedding.shape)}")


def transformers_refusal(error: Exception, where: Path, model_type: str) -> LoadError:
    """What transformers raised for config.json (its config class's validation, or building its
    model on the meta device: constructors raise many types) as one line."""
    return LoadError(f"{where}: transformers cannot build its {model_type} model from it "
                     f"({type(error).__name__}: {one_line(str(error), 300)})")
