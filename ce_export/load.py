"""Stage 1, load: a checkpoint folder (config.json + safetensors) -> LoadedModel.

The checkpoint's tensor names are brought to transformers' in-memory names by transformers' own
weight-conversion mapping for the family (per-expert `mlp.experts.{e}.gate_proj.weight` ... as
transformers 4.x, the CE reference code and transformers 5's save_pretrained write them, fused 3-D
`mlp.experts.gate_up_proj` / `down_proj`, renamed blocks such as Mixtral's `block_sparse_moe`).
Each MoE block's router and routed experts are taken into our layout (families.find_moe_blocks
says where they are); every other tensor of transformers' model (shared experts included) is
checked against its shape. CE checkpoints (`use_ce`, `n_ce`, the block's `ces`) and trimmed
checkpoints with per-layer expert counts are read too. Every tensor is accounted for: an unexpected
tensor is an error, never dropped.

Nothing is read at load time but the safetensors headers: a LoadedModel describes every tensor
(shape, dtype, where it lives) and reads it when asked, memory-mapped and tensor by tensor, so a
checkpoint larger than the machine's memory can be exported. Tensors transformers' mapping merges
(per-expert ones stacked into a layer's [E, 2I, H] / [E, H, I]) and our layout's rearrangements
(transposed or interleaved experts) are done when that tensor is read; their shapes come from
running the same conversion on meta tensors. Values are checked (finite) the first time each
stored tensor is read.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from ce_export import families
from ce_export.checkpoint_check import TensorHeader, check_checkpoint, read_headers, transformers_refusal
from ce_export.errors import LoadError
from ce_export.families import Architecture, MoeBlockLayout
from ce_export.spec import (
    DenseLayerSpec,
    LoadedModel,
    ModelSpec,
    MoeLayerSpec,
    MoeLayerWeights,
    RemovedLayerSpec,
)

IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")
ARCHITECTURES = families.ARCHITECTURES


def load_checkpoint(folder: str | Path) -> LoadedModel:
    folder = Path(folder)
    config = read_config(folder)
    arch = architecture_for(config, folder)
    headers = check_checkpoint(folder, config)  # config.json and the safetensors headers, before any tensor is read
    try:
        lm = families.meta_model(config)
        blocks = families.find_moe_blocks(lm)
    except Exception as error:  # transformers' config validation and model constructors raise many types
        raise transformers_refusal(error, folder / "config.json", arch.model_type) from None
    files = SafetensorsFiles(folder, headers)
    tensors = to_model_names({name: files.stored(name) for name in files.names}, lm, folder)
    spec = model_spec_from_config(config, arch, lm, blocks, tensors, folder)
    moe_weights = {}
    for layer in spec.moe_layers:
        if isinstance(layer, MoeLayerSpec):
            moe_weights[layer.layer] = take_moe_weights(tensors, blocks[layer.layer], layer, folder)
    dense = take_dense_tensors(tensors, spec, lm, blocks, folder)
    leftover = sorted(name for name in tensors if not IGNORED_TENSORS.match(name))
    if leftover:
        raise LoadError(
            f"{folder}: {len(leftover)} tensor(s) the {arch.model_type} layout does not use, "
            f"e.g. {leftover[0]!r} (refusing to drop weights silently)"
        )
    return LoadedModel(spec=spec, moe_weights=LazyMoeWeights(moe_weights), dense_tensors=LazyTensors(dense),
                       source=str(folder))


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as the checkpoint holds it (or assembled from several: a layer's stacked experts),
    not yet read. Every `read()` reads it afresh: a memory-mapped view of the file for a stored
    tensor (its pages are released when the view is dropped), a new tensor for an assembled one."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor] = field(repr=False, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def meta(self) -> torch.Tensor:
        """A tensor of this shape and dtype without data (device "meta")."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


@dataclass(frozen=True)
class MoeLayerSource:
    """One MoE block's tensors (see spec.MoeLayerWeights), not yet read."""

    router: StoredTensor
    gate_up: StoredTensor
    down: StoredTensor
    ces: StoredTensor | None = None
    router_bias: StoredTensor | None = None
    score_bias: StoredTensor | None = None
    gate_up_bias: StoredTensor | None = None
    down_bias: StoredTensor | None = None
    experts: str = ""  # the path of the block's experts module (where the captured MoeBlock sits)

    def items(self) -> Iterator[tuple[str, StoredTensor]]:
        for item in fields(self):
            stored = getattr(self, item.name)
            if isinstance(stored, StoredTensor):
                yield item.name, stored

    def read(self) -> MoeLayerWeights:
        return MoeLayerWeights(**{item.name: None for item in fields(MoeLayerWeights)}
                               | {name: stored.read() for name, stored in self.items()})


class LazyTensors(Mapping):
    """name -> tensor, read on each access; `stored[name]` describes it without reading."""

    def __init__(self, stored: dict[str, StoredTensor]):
        self.stored = stored

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.stored[name].read()

    def __contains__(self, name) -> bool:
        return name in self.stored

    def __iter__(self):
        return iter(self.stored)

    def __len__(self) -> int:
        return len(self.stored)


class LazyMoeWeights(Mapping):
    """layer -> MoeLayerWeights, the layer read (its experts stacked) on each access; `sources[layer]`
    describes it without reading."""

    def __init__(self, sources: dict[int, MoeLayerSource]):
        self.sources = sources

    def __getitem__(self, layer: int) -> MoeLayerWeights:
        return self.sources[layer].read()

    def __contains__(self, layer) -> bool:
        return layer in self.sources

    def __iter__(self):
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # FLOAT_DTYPES
FINITE_CHECK_CHUNK = 1 << 24  # elements per isfinite pass (bounds its temporary to 16 MB)


class SafetensorsFiles:
    """Every tensor of a checkpoint folder's safetensors files: name, shape and dtype from the
    headers (checkpoint_check.read_headers, unless given); the data on `read`, memory-mapped by
    safetensors, one file mapping per read (so dropping the tensor releases its pages), checked
    finite on its first read."""

    def __init__(self, folder: Path, headers: dict[str, TensorHeader] | None = None):
        self.folder = folder
        if headers is None:
            headers = read_headers(folder)
        self.paths: dict[str, Path] = {name: folder / header.file for name, header in headers.items()}
        self.headers: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            name: (header.shape, SAFETENSORS_DTYPES[header.dtype]) for name, header in headers.items()}
        self.checked: set[str] = set()

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def stored(self, name: str) -> StoredTensor:
        shape, dtype = self.headers[name]
        return StoredTensor(name, shape, dtype, lambda: self.read(name))

    def read(self, name: str) -> torch.Tensor:
        path = self.paths[name]
        try:
            with safe_open(str(path), framework="pt") as handle:
                tensor = handle.get_tensor(name)
        except Exception as error:
            raise LoadError(f"{path}: unreadable safetensors file ({type(error).__name__}: {error})") from None
        if name not in self.checked:
            check_finite(tensor, name, self.folder)
            self.checked.add(name)
        return tensor


def check_finite(tensor: torch.Tensor, name: str, folder: Path) -> None:
    flat = tensor.reshape(-1)
    bad = 0
    for start in range(0, flat.numel(), FINITE_CHECK_CHUNK):
        bad += int((~torch.isfinite(flat[start:start + FINITE_CHECK_CHUNK])).sum())
    if bad:
        raise LoadError(f"{folder}: tensor {name!r} has {bad} non-finite value(s) (NaN or Inf)")


def assembled(name: str, shape: tuple[int, ...], parts: list[tuple[tuple, StoredTensor]]) -> StoredTensor:
    """A tensor made of stored ones: each part is copied to out[index] when it is read, one at a time."""
    dtype = parts[0][1].dtype
    for _, part in parts[1:]:
        dtype = torch.promote_types(dtype, part.dtype)

    def read() -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        for index, part in parts:
            out[index].copy_(part.read())
        return out

    return StoredTensor(name, tuple(shape), dtype, read)


def derived(stored: StoredTensor, shape: tuple[int, ...], transform: Callable[[torch.Tensor], torch.Tensor],
            name: str | None = None) -> StoredTensor:
    """`stored` rearranged by `transform` (a transpose, an interleave, a reshape) when it is read."""
    return StoredTensor(name or stored.name, tuple(shape), stored.dtype, lambda: transform(stored.read()).contiguous())


def read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise LoadError(f"{folder}: not a checkpoint folder (does not exist or is not a directory)")
    path = folder / "config.json"
    if not path.is_file():
        raise LoadError(f"{path}: missing (a checkpoint folder needs config.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LoadError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:
        raise LoadError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(config, dict):
        raise LoadError(f"{path}: expected a JSON object")
    return config


def architecture_for(config: dict, folder: Path) -> Architecture:
    reason = families.refusal(config.get("model_type"))
    if reason is not None:
        raise LoadError(f"{folder / 'config.json'}: {reason}")
    return ARCHITECTURES[config["model_type"]]


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder by name (memory-mapped views; nothing checked but the headers)."""
    files = SafetensorsFiles(folder)
    tensors = {}
    for name, path in files.paths.items():
        with safe_open(str(path), framework="pt") as handle:
            tensors[name] = handle.get_tensor(name)
    return tensors


class ModelTensors(dict):
    """Tensors by transformers' in-memory name; `origins` names the checkpoint tensors that each
    merged one came from (for messages)."""

    def __init__(self):
        super().__init__()
        self.origins: dict[str, list[str]] = {}


def to_model_names(tensors: dict[str, StoredTensor], lm: torch.nn.Module, folder: Path) -> ModelTensors:
    """The checkpoint's tensors under transformers' in-memory names, converted by transformers'
    weight-conversion mapping for `lm` (renamings, and per-expert tensors merged into 3-D ones).
    Names the mapping does not touch (already in-memory names, `ces`) pass through renamed only.
    Nothing is read: a merged tensor's shape and dtype come from the conversion run on meta tensors,
    and the conversion runs on the stored tensors each time the merged one is read."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(lm)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    meta_state = lm.state_dict()
    out = ModelTensors()
    pending: dict[str, tuple] = {}  # target name -> (converter, [(source name, pattern, stored)])
    for name in sorted(tensors, key=dot_natural_key):
        renamed, pattern = rename_source_key(name, renamings, converters, lm.base_model_prefix, meta_state)
        if renamed not in meta_state and name in meta_state:
            renamed, pattern = name, None
        if pattern is None:
            if renamed in out:
                raise LoadError(f"{folder}: {name!r} and another tensor both map to {renamed!r}")
            out[renamed] = tensors[name]
            continue
        _, parts = pending.setdefault(renamed, (by_pattern[pattern], []))
        parts.append((name, pattern, tensors[name]))
    for target, (prototype, parts) in pending.items():
        sources: dict[str, list[str]] = {}
        for name, pattern, _ in parts:
            sources.setdefault(pattern, []).append(name)
        check_complete_expert_lists(sources, folder)
        try:
            converted = _convert(prototype, target, parts, lm, lambda stored: stored.meta())
        except Exception as error:  # torch.stack / cat on inconsistent shapes
            first = [names[0] for names in sources.values()]
            raise LoadError(f"{folder}: cannot merge {', '.join(first)} ... into {target!r} "
                            f"(shape mismatch: {error})") from None
        for name, value in converted.items():
            reader = (stacked_reader(prototype, parts, tuple(value.shape), value.dtype) if len(converted) == 1 else None) \
                or _merged_reader(prototype, target, parts, lm, name)
            out[name] = StoredTensor(name, tuple(value.shape), value.dtype, reader)
            out.origins[name] = [n for names in sources.values() for n in names]
    return out


def _convert(prototype, target: str, parts: list, lm: torch.nn.Module, tensor_of: Callable) -> dict[str, torch.Tensor]:
    converter = copy.deepcopy(prototype)
    for name, pattern, stored in parts:
        converter.add_tensor(target, name, pattern, tensor_of(stored))
    converted = converter.convert(target, model=lm, config=lm.config)
    return {name: value[0] if isinstance(value, list) else value for name, value in converted.items()}


def stacked_reader(prototype, parts: list, shape: tuple, dtype: torch.dtype) -> Callable[[], torch.Tensor] | None:
    """For the converters that stack per-expert tensors (MergeModulelist(dim=0)), then concatenate the
    stacks in the order of their source patterns (Concatenate), as MoE experts are merged: a reader
    that copies each stored part into its place in one preallocated tensor, the same values as the
    converter's with one copy of the merged tensor in memory instead of about four (the parts, each
    pattern's stack, the concatenation). None for any other converter."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    operations = list(prototype.operations)
    if not operations or type(operations[0]) is not MergeModulelist or operations[0].dim != 0:
        return None
    if len(operations) == 1 and len(prototype.source_patterns) == 1:
        concat_dim = 0
    elif len(operations) == 2 and type(operations[1]) is Concatenate:
        concat_dim = operations[1].dim % len(shape)
    else:
        return None
    by_pattern = {pattern: [stored for _, p, stored in parts if p == pattern] for pattern in prototype.source_patterns}
    by_pattern = {pattern: stored for pattern, stored in by_pattern.items() if stored}
    blocks, offset = [], 0
    for stored in by_pattern.values():
        stacked = (len(stored), *stored[0].shape)
        blocks.append((offset, stacked[concat_dim], stored))
        offset += stacked[concat_dim]
    if offset != shape[concat_dim]:
        return None

    def read() -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        for start, size, stored in blocks:
            block = out.narrow(concat_dim, start, size)
            for index, part in enumerate(stored):
                block[index].copy_(part.read())
        return out

    return read


def _merged_reader(prototype, target: str, parts: list, lm: torch.nn.Module, name: str) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        return _convert(prototype, target, parts, lm, lambda stored: stored.read())[name]
    return read


def check_complete_expert_lists(sources: dict[str, list[str]], folder: Path) -> None:
    """Every per-expert list to merge holds experts 0..E-1 in each of its patterns (else: which one is missing)."""
    expected = None
    numbered = {}
    for pattern, names in sources.items():
        if "*" not in pattern:
            continue
        regex = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)") + "$")
        ids = {}
        for name in names:
            match = regex.search(name)
            if match:
                ids[int(match.group(1))] = name
        numbered[pattern] = ids
        expected = set(ids) if expected is None else expected | set(ids)
    if not expected:
        return
    full = set(range(max(expected) + 1))
    for pattern, ids in numbered.items():
        missing = sorted(full - set(ids))
        if missing:
            example = next(iter(ids.values()))
            index = re.escape(pattern).replace(r"\*", r"(\d+)")
            name = re.sub(index + "$", pattern.replace("*", str(missing[0])), example)
            raise LoadError(f"{folder}: missing tensor {name!r}")


def config_int(config: dict, key: str, folder: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise LoadError(f"{folder / 'config.json'}: {key} must be a positive integer, got {value!r}")
    return value


def model_spec_from_config(config: dict, arch: Architecture, lm: torch.nn.Module, blocks: dict[int, MoeBlockLayout],
                           tensors: dict, folder: Path) -> ModelSpec:
    where = folder / "config.json"
    hidden = config_int(config, "hidden_size", folder)
    num_layers = config_int(config, "num_hidden_layers", folder)
    heads = config_int(config, "num_attention_heads", folder)
    top_k = next((layout.top_k for layout in blocks.values()), 0)
    use_ce = bool(config.get("use_ce", False))
    n_ce = config.get("n_ce", 0) if use_ce else 0
    if use_ce and (not isinstance(n_ce, int) or isinstance(n_ce, bool) or not 1 <= n_ce < top_k):
        raise LoadError(f"{where}: n_ce={n_ce!r} is invalid for top_k={top_k} (need 1..{top_k - 1})")
    kv_heads, key_dim, value_dim = families.kv_cache_dims(arch, lm.config)
    if heads % kv_heads and not arch.latent_kv_cache:
        raise LoadError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")

    expert_counts = per_layer_expert_counts(config, arch, num_layers, where, blocks)
    kept_ids = config.get("layer_experts_idx")
    if kept_ids is not None and (not isinstance(kept_ids, list) or len(kept_ids) != num_layers):
        raise LoadError(f"{where}: layer_experts_idx must be a list with one entry per layer ({num_layers})")

    layers = []
    for layer, count in enumerate(expert_counts):
        layout = blocks.get(layer)
        if layout is None or count is None:
            layers.append(DenseLayerSpec(layer))
            continue
        if count in (-1, 0):
            layers.append(RemovedLayerSpec(layer, module=layout.block))
            continue
        if layout.top_k > count:
            raise LoadError(f"{where}: layer {layer} keeps {count} experts, fewer than top_k={layout.top_k}")
        ids = tuple(kept_ids[layer]) if kept_ids is not None else tuple(range(count))
        if len(ids) != count:
            raise LoadError(f"{where}: layer_experts_idx[{layer}] has {len(ids)} entries, expected {count}")
        try:
            routing = families.routing_fields(arch, lm, layout)
        except families.UnsupportedFamily as error:
            raise LoadError(f"{where}: {error}") from None
        intermediate = layout.intermediate_size
        layer_spec = MoeLayerSpec(
            layer=layer, num_experts=count, hidden_size=hidden, intermediate_size=intermediate, top_k=layout.top_k,
            n_ce=n_ce, expert_ids=ids, ces_width=max(hidden, intermediate) if n_ce else 0, module=layout.block,
            **routing,
        )
        check_layer(layer_spec, where, trimmed=kept_ids is not None)
        layers.append(layer_spec)
    if not use_ce:
        stray = next((name for name in tensors if name.endswith(".ces")), None)
        if stray is not None:
            raise LoadError(f"{where}: checkpoint has {stray!r} but use_ce is not true (compressed experts would be ignored)")
    floats = [tensor.dtype for tensor in tensors.values() if isinstance(tensor.dtype, torch.dtype) and tensor.dtype.is_floating_point]
    checkpoint_dtype = str(max(set(floats), key=floats.count)).removeprefix("torch.") if floats else "unknown"
    return ModelSpec(
        architecture=arch.model_type, vocab_size=config_int(config, "vocab_size", folder), hidden_size=hidden,
        num_layers=num_layers, num_attention_heads=heads, kv_heads=kv_heads, key_dim=key_dim, value_dim=value_dim,
        use_ce=use_ce, n_ce=n_ce, checkpoint_dtype=checkpoint_dtype, moe_layers=tuple(layers), hf_config=config,
    )


def check_layer(layer: MoeLayerSpec, where: Path, trimmed: bool = False) -> None:
    """What a layer's routing asks of the op, checked where the config says it; `trimmed`: the
    checkpoint's experts were dropped (layer_experts_idx)."""
    if layer.weights_on_input and layer.top_k != 1:
        raise LoadError(f"{where}: top_k={layer.top_k}: the routing weight on the expert input (Llama 4) is "
                        f"supported for top-1 routing only")
    if layer.weights_on_input and layer.n_ce:
        raise LoadError(f"{where}: n_ce={layer.n_ce} is invalid for top-1 routing (CE needs auxiliary experts)")
    if layer.n_group > 1 and trimmed:
        raise LoadError(f"{where}: layer {layer.layer}: experts dropped (layer_experts_idx) under group-limited routing "
                        f"(n_group={layer.n_group}) are not supported: the groups are ranges of the original expert ids")
    if layer.n_group > 1:
        per_group, rest = divmod(layer.num_experts, layer.n_group)
        if rest or per_group < 2 or not 1 <= layer.topk_group <= layer.n_group or layer.top_k > layer.topk_group * per_group:
            raise LoadError(f"{where}: layer {layer.layer}: n_group={layer.n_group}, topk_group={layer.topk_group} "
                            f"do not fit {layer.num_experts} experts and top_k={layer.top_k}")


def per_layer_expert_counts(config: dict, arch: Architecture, num_layers: int, where: Path,
                            blocks: dict[int, MoeBlockLayout]) -> list:
    key = next((key for key in arch.experts_keys if isinstance(config.get(key), list)), None)
    if key is None:  # one count for every MoE layer, as transformers built them
        return [blocks[layer].num_experts if layer in blocks else None for layer in range(num_layers)]
    counts = config[key]
    if len(counts) != num_layers:
        raise LoadError(f"{where}: {key} lists {len(counts)} layers, num_hidden_layers={num_layers}")
    for count in counts:
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < -1):
            raise LoadError(f"{where}: {key} entry {count!r} is not -1, 0, null or a count")
    return counts


def take(tensors: dict[str, StoredTensor], name: str, shape: tuple, folder: Path) -> StoredTensor:
    if name not in tensors:
        raise LoadError(f"{folder}: missing tensor {name!r}")
    tensor = tensors.pop(name)
    merged = getattr(tensors, "origins", {}).get(name)
    origin = f" (merged from {merged[0]!r} ... {merged[-1]!r})" if merged else ""
    if tuple(tensor.shape) != tuple(shape):
        raise LoadError(f"{folder}: tensor {name!r}{origin} has shape {list(tensor.shape)}, config implies {list(shape)}")
    if not (isinstance(tensor.dtype, torch.dtype) and tensor.dtype.is_floating_point):
        dtype = str(tensor.dtype).removeprefix("torch.")
        raise LoadError(f"{folder}: tensor {name!r} has dtype {dtype}, expected floating point")
    return tensor


def take_moe_weights(tensors: dict[str, StoredTensor], layout: MoeBlockLayout, layer: MoeLayerSpec,
                     folder: Path) -> MoeLayerSource:
    """The block's router and routed experts in the op's layout (gate_up [E, 2I, H] gate rows then up
    rows, down [E, H, I]), whatever transformers' layout (transposed, interleaved gate/up); rearranged
    when read."""
    experts, hidden, inter = layer.num_experts, layer.hidden_size, layer.intermediate_size
    parts = {"router": take(tensors, layout.router_weight, (experts, hidden), folder)}
    if layout.transposed:
        transpose = lambda tensor: tensor.transpose(1, 2)  # noqa: E731
        parts["gate_up"] = derived(take(tensors, layout.gate_up, (experts, hidden, 2 * inter), folder),
                                   (experts, 2 * inter, hidden), transpose)
        parts["down"] = derived(take(tensors, layout.down, (experts, inter, hidden), folder),
                                (experts, hidden, inter), transpose)
    else:
        parts["gate_up"] = take(tensors, layout.gate_up, (experts, 2 * inter, hidden), folder)
        parts["down"] = take(tensors, layout.down, (experts, hidden, inter), folder)
    if layout.gate_up_bias is not None:
        parts["gate_up_bias"] = take(tensors, layout.gate_up_bias, (experts, 2 * inter), folder)
        parts["down_bias"] = take(tensors, layout.down_bias, (experts, hidden), folder)
    if layout.interleaved:  # rows g0, u0, g1, u1, ... -> gate rows, then up rows
        def deinterleave(tensor: torch.Tensor) -> torch.Tensor:
            return torch.cat([tensor[:, 0::2], tensor[:, 1::2]], dim=1)

        for name in ("gate_up", "gate_up_bias"):
            if name in parts:
                parts[name] = derived(parts[name], parts[name].shape, deinterleave)
    if layout.router_bias:
        parts["router_bias"] = take(tensors, layout.router_bias, (experts,), folder)
    if layout.score_bias:
        parts["score_bias"] = take_score_bias(tensors, layout.score_bias, experts, folder)
    if layer.is_compressed:
        name = f"{layout.block}.ces"
        ces = tensors.get(name)
        if ces is not None and len(ces.shape) == 3 and ces.shape[2] < layer.ces_width:
            raise LoadError(
                f"{folder}: {name} has width {ces.shape[2]}, but the activation scale needs "
                f"{inter} (intermediate_size > hidden_size); store ces as [E, 3, max(H, I)]"
            )
        parts["ces"] = take(tensors, name, (experts, 3, layer.ces_width), folder)
    return MoeLayerSource(**parts, experts=layout.experts)


def take_score_bias(tensors: dict[str, StoredTensor], name: str, experts: int, folder: Path) -> StoredTensor:
    """The routing's selection bias, [E] (Ernie stores [1, E])."""
    shape = tuple(tensors[name].shape) if name in tensors else (experts,)
    stored = take(tensors, name, shape if shape in ((experts,), (1, experts)) else (experts,), folder)
    return stored if stored.shape == (experts,) else derived(stored, (experts,), lambda t: t.reshape(experts))


def take_dense_tensors(tensors: dict[str, StoredTensor], spec: ModelSpec, lm: torch.nn.Module,
                       blocks: dict[int, MoeBlockLayout], folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of transformers' model outside what our op takes over, checked against its shape:
    attention, norms, dense MLPs, and the MoE blocks' other parts (shared experts and their gates)."""
    shapes = {name: tuple(tensor.shape) for name, tensor in lm.state_dict().items()}
    layers_path, _ = families.decoder_layers(lm)
    for layer in spec.moe_layers:
        layout = blocks.get(layer.layer)
        if isinstance(layer, MoeLayerSpec):
            for name in layout.routed_names():
                shapes.pop(name, None)
        elif isinstance(layer, RemovedLayerSpec):
            shapes = {name: shape for name, shape in shapes.items() if not name.startswith(layout.block + ".")}
            norm = f"{layers_path}.{layer.layer}.post_attention_layernorm."
            if not any(name.startswith(norm) for name in tensors):
                shapes = {name: shape for name, shape in shapes.items() if not name.startswith(norm)}
    if getattr(lm.config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return {name: take(tensors, name, shape, folder) for name, shape in shapes.items()}


def parameter_count(model: LoadedModel) -> tuple[int, int]:
    """(total parameters, parameters active per token), from the tensors' shapes (nothing is read);
    shared experts are among the dense tensors."""
    total = active = sum(stored.numel for stored in model.dense_tensors.stored.values())
    for layer in model.spec.moe_layers:
        if not isinstance(layer, MoeLayerSpec):
            continue
        source = model.moe_weights.sources[layer.layer]
        per_expert = math.prod(source.gate_up.shape[1:]) + math.prod(source.down.shape[1:])
        per_expert += sum(t.shape[1] for t in (source.gate_up_bias, source.down_bias) if t is not None)
        always = sum(t.numel for t in (source.router, source.router_bias, source.score_bias) if t is not None)
        total += always + per_expert * layer.num_experts + (source.ces.numel if source.ces is not None else 0)
        active += always + per_expert * layer.n_main + (3 * layer.ces_width * layer.n_ce if source.ces is not None else 0)
    return total, active


def weight_bytes(model: LoadedModel) -> int:
    """Bytes of every tensor the model uses, as the checkpoint stores them."""
    return (sum(stored.nbytes for stored in model.dense_tensors.stored.values())
            + sum(stored.nbytes for source in model.moe_weights.sources.values() for _, stored in source.items()))
