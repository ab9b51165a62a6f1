"""The PyTorch runtime path, for users without TensorRT: the captured model with our MoE op (Triton
kernels on CUDA), a preallocated KV cache, and decode steps replayed from a CUDA graph.

`FastDecoder` owns one static cache of `max_context` slots for a fixed batch. Slots are the time
axis of the padded batch, exactly as in the exported ONNX model: every row writes slot p at step p,
left padding is masked out, and each row's rotary position is its own count of real tokens. Each
step builds its additive attention mask [B, 1, S, L] from two device tensors (the valid-slot mask
and the slots being written), so a captured decode graph needs nothing from the host but the new
token ids, positions and slot, copied into its static inputs before each replay.

Attention reads only a window of the cache: the first slots up to the next multiple of
`WINDOW_STEP` that holds every written slot, so a decode step at context 512 of a 4096-slot cache
reads 768 slots, not 4096. The cache itself holds whole windows (`max_context` rounded up to a
multiple of `WINDOW_STEP`): a last window of 2049 slots would give attention an unaligned length. Prefill runs eagerly (its shapes change with
every prompt); decode replays a CUDA graph captured once per window (all graphs share one memory
pool), or runs eagerly on CPU or when `cuda_graph=False`. `compile_decode=True` first passes the
decode step through torch.compile (fixed shapes, so it compiles once per window; our MoE op stays
one opaque call) to fuse the norms', rotary's and projections' elementwise work, which dominates a
batch-1 step once the MoE layers are fast; the CUDA graph then captures the compiled step.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache

from ce_export.errors import RuntimeInputError
from ce_export.spec import ModelSpec

WINDOW_STEP = 256  # attention windows (and decode graphs) come in multiples of this many slots


def round_to_window(slots: int) -> int:
    """`slots` rounded up to a whole number of attention windows."""
    return -(-slots // WINDOW_STEP) * WINDOW_STEP


class SlotCache(Cache):
    """A KV cache of fixed-address tensors [B, h, L, d] per layer, written at `write_slots` [S].

    transformers' attention calls `update(k, v, layer)` and attends over what it returns: here the
    cache's first `window` slots, whose unwritten ones the step's attention mask hides.
    """

    def __init__(self, spec: ModelSpec, batch: int, max_context: int, dtype: torch.dtype, device: torch.device):
        # Cache.__init__ builds transformers' own layer objects; this cache stores its tensors itself.
        self.layers = []
        self.layer_class_to_replicate = None
        self.offloading = False
        shapes = spec.past_shapes(batch, max_context)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes[0::2]]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes[1::2]]
        self.write_slots = torch.zeros(1, dtype=torch.long, device=device)
        self.filled = 0  # host-side count of written slots, for get_seq_length
        self.window = max_context  # slots attention reads: [0, window)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.write_slots, key_states.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].index_copy_(2, self.write_slots, value_states.to(self.values[layer_idx].dtype))
        return self.keys[layer_idx][:, :, :self.window], self.values[layer_idx][:, :, :self.window]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.filled

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.keys[0].shape[2]

    @property
    def is_compileable(self) -> bool:
        return True

    @property
    def max_context(self) -> int:
        return self.keys[0].shape[2]


class FastDecoder:
    """Greedy-decoding runtime over a captured causal LM (capture.build_torch_model), batch fixed."""

    def __init__(self, lm: nn.Module, spec: ModelSpec, batch: int, max_context: int, cuda_graph: bool = True,
                 attention: str = "sdpa", compile_decode: bool = False):
        for name, value in (("batch", batch), ("max_context", max_context)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RuntimeInputError(f"FastDecoder: {name} must be a positive integer, got {value!r}")
        self.lm = lm.eval()
        self.spec = spec
        self.batch = batch
        parameter = next(lm.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        set_attention(lm, attention)
        max_context = round_to_window(max_context)
        self.cache = SlotCache(spec, batch, max_context, self.dtype, self.device)
        self.slot_index = torch.arange(max_context, device=self.device)
        self.valid = torch.ones(batch, max_context, dtype=torch.bool, device=self.device)
        self.use_cuda_graph = cuda_graph and self.device.type == "cuda"
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # window -> (graph, its logits)
        self.graph_pool = None
        self.next_positions = None  # [B, 1] rotary positions of the next token per row
        self._decode_step = self._step
        if compile_decode:
            # One compiled variant per window; dynamo's default limit (8) would drop later windows to
            # eager. The limit is raised during the step's calls only (where dynamo recompiles).
            windows = -(-max_context // WINDOW_STEP) + 1
            config = torch._dynamo.config
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            enough_variants = config.patch(name, max(getattr(config, name), windows))
            self._decode_step = enough_variants(torch.compile(self._step, dynamic=False))

    @classmethod
    def from_checkpoint(cls, checkpoint: str, batch: int, max_context: int, dtype: torch.dtype = torch.bfloat16,
                        device: str = "cuda", **options) -> "FastDecoder":
        """Load a checkpoint folder (any architecture `build` takes) straight into the runtime."""
        from ce_export.capture import build_torch_model
        from ce_export.load import load_checkpoint

        loaded = load_checkpoint(checkpoint)
        return cls(build_torch_model(loaded, dtype).to(device), loaded.spec, batch, max_context, **options)

    # --- one forward step over the cache -------------------------------------------------------
    def bucket(self, slots_needed: int) -> int:
        return min(round_to_window(slots_needed), self.cache.max_context)

    def _step(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        slots, window = self.cache.write_slots, self.cache.window
        allowed = (self.valid[:, None, None, :window]
                   & (self.slot_index[None, None, None, :window] <= slots[None, None, :, None]))
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        with torch.no_grad():
            out = self.lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                          past_key_values=self.cache, use_cache=True)
        return out.logits

    def _check_room(self, tokens: int) -> None:
        if self.cache.filled + tokens > self.cache.max_context:
            raise RuntimeInputError(f"{self.cache.filled} + {tokens} tokens exceed the cache of "
                                    f"{self.cache.max_context} slots (max_context)")

    def _check_ids(self, what: str, ids: torch.Tensor, length: int | None = None, check_values: bool = True) -> None:
        """[batch, length] integer token ids in the vocabulary. The values are read (a host sync)
        only when `check_values`: decode skips it for ids already on the device (our own argmax),
        so that a decode loop never waits for the host; an out-of-vocabulary id there would index
        out of bounds on the GPU."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.is_complex() \
                or ids.dtype == torch.bool:
            shape = list(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise RuntimeInputError(f"{what}: expected integer token ids [batch, sequence], got {shape}"
                                    f"{' ' + str(ids.dtype) if isinstance(ids, torch.Tensor) else ''}")
        batch, sequence = ids.shape
        if batch != self.batch:
            raise RuntimeInputError(f"{what}: this decoder was built for batch {self.batch}, got {batch}")
        if sequence < 1 or (length is not None and sequence != length):
            raise RuntimeInputError(f"{what}: expected {length or 'at least 1'} token(s) per row, got {sequence}")
        if check_values and ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.spec.vocab_size:
                raise RuntimeInputError(f"{what}: token id {low if low < 0 else high} is outside the vocabulary "
                                        f"(0..{self.spec.vocab_size - 1})")

    # --- public API ----------------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Start over with a (left-padded) prompt batch [B, S]; returns logits [B, S, V]."""
        self._check_ids("prefill", input_ids)
        batch, length = input_ids.shape
        self.cache.filled = 0
        self.next_positions = None
        self._check_room(length)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, length):
            shape = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise RuntimeInputError(f"prefill: attention_mask must be [{batch}, {length}] like input_ids, got {shape}")
        attention_mask = attention_mask.to(self.device)
        self.valid.fill_(True)
        self.valid[:, :length] = attention_mask.bool()
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.cache.write_slots = torch.arange(length, device=self.device)
        self.cache.window = self.bucket(length)
        logits = self._step(input_ids.to(self.device), positions)
        self.cache.filled = length
        self.next_positions = positions[:, -1:] + 1
        return logits

    def load_past(self, past: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None) -> None:
        """Fill the first P slots with given K/V [B, h, P, d] x 2L (the flat ONNX past), positions 0..P-1."""
        expected = self.spec.past_shapes(self.batch, 0)
        if len(past) != len(expected):
            raise RuntimeInputError(f"load_past: expected {len(expected)} tensors (key and value per layer), got {len(past)}")
        length = past[0].shape[2] if past[0].dim() == 4 else -1
        for tensor, shape in zip(past, expected):
            if tensor.dim() != 4 or tensor.shape[:2] + tensor.shape[3:] != shape[:2] + shape[3:] or tensor.shape[2] != length:
                raise RuntimeInputError(f"load_past: expected [{shape[0]}, {shape[1]}, P, {shape[3]}] tensors with one P, "
                                        f"got {list(tensor.shape)}")
        self.cache.filled = 0
        self._check_room(length)
        for index, tensor in enumerate(past):
            target = (self.cache.keys if index % 2 == 0 else self.cache.values)[index // 2]
            target[:, :, :length].copy_(tensor)
        self.valid.fill_(True)
        if attention_mask is not None:
            self.valid[:, :length] = attention_mask.to(self.device).bool()
        self.cache.filled = length
        valid_counts = self.valid[:, :length].sum(-1, keepdim=True)
        self.next_positions = valid_counts.to(torch.long)

    def decode(self, next_ids: torch.Tensor, advance: bool = True) -> torch.Tensor:
        """One token per row [B, 1] at the next slot; returns logits [B, 1, V] (with a CUDA graph,
        the graph's output buffer: the next step overwrites it, so clone what must be kept).

        advance=False leaves the slot count where it was, so the next call writes the same slot
        again (a benchmark times one context length this way).
        """
        if self.next_positions is None:
            raise RuntimeInputError("decode: no prompt yet (call prefill or load_past first)")
        self._check_ids("decode", next_ids, length=1,
                        check_values=not isinstance(next_ids, torch.Tensor) or next_ids.device.type == "cpu")
        self._check_room(1)
        slot = self.cache.filled
        self.cache.window = self.bucket(slot + 1)
        if self.use_cuda_graph:
            logits = self._replay(next_ids, slot)
        else:
            self.cache.write_slots = torch.tensor([slot], device=self.device)
            logits = self._decode_step(next_ids.to(self.device), self.next_positions)
        if advance:
            self.cache.filled += 1
            self.next_positions = self.next_positions + 1
        return logits

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, new_tokens: int) -> torch.Tensor:
        """Greedy decoding: the new tokens [B, new_tokens]."""
        if not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 1:
            raise RuntimeInputError(f"generate: new_tokens must be a positive integer, got {new_tokens!r}")
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
            # The whole request must fit before any of it runs (the last new token is never cached).
            needed = input_ids.shape[1] + new_tokens - 1
            if needed > self.cache.max_context:
                raise RuntimeInputError(f"generate: {input_ids.shape[1]} prompt + {new_tokens} new tokens need {needed} "
                                        f"cache slots; this decoder has {self.cache.max_context} (max_context)")
        logits = self.prefill(input_ids, attention_mask)
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
        tokens = [next_ids]
        for _ in range(new_tokens - 1):
            next_ids = self.decode(next_ids)[:, -1].argmax(-1, keepdim=True)
            tokens.append(next_ids)
        return torch.cat(tokens, dim=1)

    # --- CUDA graph ----------------------------------------------------------------------------
    def _replay(self, next_ids: torch.Tensor, slot: int) -> torch.Tensor:
        if not self.graphs:
            self.static_ids = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
            self.static_positions = self.next_positions.clone()
            self.static_slot = torch.full((1,), slot, dtype=torch.long, device=self.device)
            self.graph_pool = torch.cuda.graph_pool_handle()
        self.static_ids.copy_(next_ids)
        self.static_positions.copy_(self.next_positions)
        self.static_slot.fill_(slot)
        if self.cache.window not in self.graphs:
            self.graphs[self.cache.window] = self._capture()
        graph, logits = self.graphs[self.cache.window]
        graph.replay()
        return logits

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture one decode step for the current window. Warm-up runs come first (Triton and
        torch.compile compile there, not under capture); they write the slot this step writes anyway."""
        self.cache.write_slots = self.static_slot
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._decode_step(self.static_ids, self.static_positions)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            logits = self._decode_step(self.static_ids, self.static_positions)
        return graph, logits


def set_attention(lm: nn.Module, implementation: str) -> None:
    """Switch transformers' attention kernel (the export uses eager; serving wants sdpa)."""
    if hasattr(lm, "set_attn_implementation"):
        lm.set_attn_implementation(implementation)
    else:
        lm.config._attn_implementation = implementation
