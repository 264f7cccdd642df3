"""The running batch of `imitate serve`: one KV cache shared by every live sequence, grown in place.

Layout (chosen for CPU, measured in bench/RESULTS.md "Serve throughput"): per layer, one key and one value buffer
of shape [max rows, kv heads, capacity, head dim]. Row r is a sequence; columns [start, end) are the live time
axis, shared by all rows; row r's real tokens are [first[r], end) — it is *left-padded* to the batch's length by
the columns before first[r], which the attention mask hides. A decoding step writes one column at `end` for
every row (a slice assignment, no copy of the past) and attends to the view [start, end + 1). transformers'
DynamicCache instead concatenates, copying the whole cache of every layer at every step.

- A new sequence is prefilled alone (batch 1, no padding: exactly the computation of a one-at-a-time run) into a
  plain DynamicCache, then copied into a free row at columns [end - L, end). If L is longer than the batch, the
  window just moves left (`start -= ...`) into free room; only when the buffer has no room is it reallocated
  (doubling, live columns re-centred), so reallocation is amortised.
- A finished sequence leaves by moving the last row into its place (one row copied, order does not matter);
  leading columns that no row uses any more are dropped by moving `start` right (free). When the last one leaves
  a grown buffer, the buffers are released (an idle server keeps no GBs of cache from a burst of long requests).
- Buffers are zero-initialised: a hidden column gets weight 0 in the softmax, and 0 * a finite value is 0 (an
  uninitialised NaN there would poison the sum).

Attention gets an explicit 4-D boolean mask [rows, 1, 1, columns] and per-row position ids, so transformers
builds no mask of its own and RoPE sees each sequence's true positions. Only models whose layers are all plain
full attention are served (a sliding window would need its own mask).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin


class _Geometry:
    """The shared time axis: buffer capacity, live window [start, end), first real column of each row."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.start = self.end = capacity // 2
        self.first: list[int] = []

    @property
    def width(self) -> int:
        return self.end - self.start


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values in preallocated buffers; `update` writes the step's column in place."""

    is_sliding = False

    def __init__(self, geometry: _Geometry, max_rows: int):
        super().__init__()
        self.geo = geometry
        self.max_rows = max_rows
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.allocate(key_states.shape[1], key_states.shape[-1], key_states.dtype)

    def allocate(self, heads: int, dim: int, dtype: torch.dtype) -> None:
        self.k = torch.zeros(self.max_rows, heads, self.geo.capacity, dim, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        rows, end = key_states.shape[0], self.geo.end
        self.k[:rows, :, end : end + 1] = key_states
        self.v[:rows, :, end : end + 1] = value_states
        self.keys = self.k[:rows, :, self.geo.start : end + 1]
        self.values = self.v[:rows, :, self.geo.start : end + 1]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.geo.width + query_length, 0

    def get_seq_length(self) -> int:
        return self.geo.width

    def get_max_length(self) -> int:
        return -1


class Batch:
    """The live rows of the decoding batch and their shared cache. Not thread-safe: one engine thread owns it."""

    def __init__(self, model: Any, max_rows: int, capacity: int = 256):
        self.model = model
        self.max_rows = max_rows
        self.initial_capacity = capacity
        self.geo = _Geometry(capacity)
        n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.layers = [SlotLayer(self.geo, max_rows) for _ in range(n_layers)]
        self.cache = Cache(layers=self.layers)
        self.positions: list[int] = []  # position id of each row's next input token

    @property
    def rows(self) -> int:
        return len(self.positions)

    def prefill(self, prompt: list[int]) -> tuple[DynamicCache, torch.Tensor]:
        """Run the prompt alone; its cache (to `add` once per sequence) and the next-token logits [vocab]."""
        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([prompt])
        out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        return cache, out.logits[0, -1].float()

    def add(self, prefilled: DynamicCache, length: int) -> int:
        """Copy a prefilled sequence (its `length` tokens) into a new row; its row index."""
        if self.rows >= self.max_rows:
            raise RuntimeError("the batch is full")  # the engine admits no more than max_rows
        geo = self.geo
        if geo.end - length < 0:
            self._reallocate(max(length, geo.width))
        row = self.rows
        for layer, src in zip(self.layers, prefilled.layers, strict=True):
            if not layer.is_initialized:
                layer.allocate(src.keys.shape[1], src.keys.shape[-1], src.keys.dtype)
            layer.k[row, :, geo.end - length : geo.end] = src.keys[0]
            layer.v[row, :, geo.end - length : geo.end] = src.values[0]
        geo.first.append(geo.end - length)
        geo.start = min(geo.start, geo.end - length)
        self.positions.append(length)
        return row

    def remove(self, row: int) -> None:
        """Drop a row: the last row moves into its place (the caller moves its bookkeeping the same way)."""
        last = self.rows - 1
        geo = self.geo
        if row != last:
            lo = min(geo.first[last], geo.end)
            for layer in self.layers:
                if layer.is_initialized:
                    layer.k[row, :, lo : geo.end] = layer.k[last, :, lo : geo.end]
                    layer.v[row, :, lo : geo.end] = layer.v[last, :, lo : geo.end]
            geo.first[row], self.positions[row] = geo.first[last], self.positions[last]
        geo.first.pop()
        self.positions.pop()
        if geo.first:
            geo.start = min(geo.first)
        elif geo.capacity > self.initial_capacity:  # empty after long sequences: give the grown buffers back
            self.release()
        else:  # empty: re-centre the window, nothing to move
            geo.start = geo.end = geo.capacity // 2

    def release(self) -> None:
        """Drop the cache buffers of an empty batch (the next `add` allocates them at the initial capacity): a
        burst of long sequences grows them to GBs, and an idle server should not keep that."""
        if self.rows:
            raise RuntimeError("release() needs an empty batch")
        for layer in self.layers:
            layer.k = layer.v = layer.keys = layer.values = None
            layer.is_initialized = False
        self.geo.capacity = self.initial_capacity
        self.geo.start = self.geo.end = self.initial_capacity // 2

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One step for every row: feed each row's last token, return next-token logits [rows, vocab]."""
        geo = self.geo
        if geo.end + 1 > geo.capacity:
            self._reallocate(geo.width)
        rows = self.rows
        ids = torch.tensor(tokens).view(rows, 1)
        pos = torch.tensor(self.positions).view(rows, 1)
        columns = torch.arange(geo.start, geo.end + 1)
        mask = (columns[None, :] >= torch.tensor(geo.first)[:, None]).view(rows, 1, 1, -1)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, cache=self.cache, use_cache=True, logits_to_keep=1
        )
        geo.end += 1
        for i in range(rows):
            self.positions[i] += 1
        return out.logits[:, -1].float()

    def _reallocate(self, width: int) -> None:
        """New buffers with room for a live window of `width` columns plus as much again (capacity doubles until
        it does, never shrinks), the live columns copied so that the window ends at `end` = its start + width."""
        geo = self.geo
        capacity = geo.capacity
        while capacity < 2 * (width + 1):
            capacity *= 2
        end = (capacity - width) // 2 + width
        shift = end - geo.end  # old column c is now c + shift
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            k, v = layer.k, layer.v
            layer.k = torch.zeros(k.shape[0], k.shape[1], capacity, k.shape[3], dtype=k.dtype)
            layer.v = torch.zeros_like(layer.k)
            layer.k[:, :, geo.start + shift : end] = k[:, :, geo.start : geo.end]
            layer.v[:, :, geo.start + shift : end] = v[:, :, geo.start : geo.end]
        geo.capacity = capacity
        geo.start += shift
        geo.end = end
        geo.first = [f + shift for f in geo.first]
