"""Runs the model over the paged KV cache: prefill of one sequence, and one batched decode step
for many sequences (continuous batching).

Owns the mapping from positions to cache slots (position p lives in block
``block_table[p // block_size]``, slot ``p % block_size``) and paged attention: write the new
K/V, then attend.

* A prefill from position 0 attends to the K/V it just computed (rounded to the pool's dtype,
  so it sees exactly what a later reader of the pool sees) and reads nothing back.
* A chunked prefill (``start_pos > 0``) gathers its table's blocks once per layer and attends
  causally to the cached prefix plus itself.
* A decode step on the CPU reads each sequence's K/V straight from the pool through its block
  table (``paged_kernel.py``, a small C++ kernel compiled on first use): no copy at all.
* Elsewhere (a GPU, or where that kernel cannot be built) a decode step attends in groups of
  sequences whose gathered K/V fit in the CPU's cache (``DECODE_GROUP_BYTES``): each group's copy
  is read back while still cached, instead of the whole batch's history being copied out to
  memory and read in again. The pool's block-major layout puts other layers between two blocks
  of one layer, so a run of consecutive blocks is not one strided view over positions: without
  a kernel of its own, some copy is unavoidable.

It never allocates or frees blocks (the caller owns block tables) and never samples.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import paged_kernel
from .kv_cache import KVCache
from .model import LlamaModel

# Gathered K and V of one decode group, per layer. Small enough to stay in L2/L3 between the
# gather and the attention that reads it; large enough that a group is one SDPA call for about
# 5 sequences of 128 positions (SmolLM2: 1.5 KiB of K+V per position per layer). Alone, 1 and
# 2 MiB measured best among 0.25/1/2/4 MiB at batch 16 and 64 (4 MiB loses most of the gain, 0.25
# all of it); in the whole SmolLM2 step 1 and 2 MiB measured alike.
DECODE_GROUP_BYTES = 1 << 20


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, compile_decode: bool = False,
                 fullgraph: bool = True, paged_kernel_on: bool = True) -> None:
        """``compile_decode``: run decode steps through ``torch.compile`` (``compiled.py``; with
        ``fullgraph`` a graph break is an error). ``paged_kernel_on``: decode with the paged
        kernel where it runs (the CPU, with a compiler); off, always the copy path."""
        cfg, kcfg = model.cfg, kv.cfg
        got = (kcfg.num_layers, kcfg.num_kv_heads, kcfg.head_dim)
        want = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        if got != want:
            raise ValueError(f"KV cache shape (layers, kv_heads, head_dim)={got} does not fit "
                             f"model {cfg.name} {want}")
        self.model = model
        self.kv = kv
        self.cfg = cfg
        self.device = kv.pool.device
        # Each layer's K and V views of the pool [num_blocks, block_size, kv_heads, head_dim],
        # made once: slicing the pool anew costs ops on every layer of every step.
        self.k_pools = [kv.pool[:, i, 0] for i in range(cfg.num_layers)]
        self.v_pools = [kv.pool[:, i, 1] for i in range(cfg.num_layers)]
        # Attention runs in the model's compute dtype; the pool may store K/V narrower.
        self.dtype = model.norm.weight.dtype
        if model.norm.weight.device != self.device:
            raise ValueError(f"model on {model.norm.weight.device} and KV cache on {self.device}: "
                             "they must share a device")
        self._kernel = (paged_kernel.kernel() if paged_kernel_on and self.device.type == "cpu"
                        and kv.pool.dtype in paged_kernel.KINDS else None)
        self._compiled = None
        if compile_decode:
            from .compiled import CompiledModel     # imports torch's compiler stack: only when asked
            self._compiled = CompiledModel(model, fullgraph)

    def _check_table(self, block_table: Sequence[int], length: int) -> None:
        need = self.kv.blocks_for(length)
        if len(block_table) < need:
            raise ValueError(f"block table of {len(block_table)} blocks cannot hold {length} "
                             f"positions (needs {need} of {self.kv.block_size})")

    def _write(self, layer: int, blocks: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> None:
        dtype = self.kv.pool.dtype
        self.k_pools[layer].index_put_((blocks, slots), k.to(dtype))
        self.v_pools[layer].index_put_((blocks, slots), v.to(dtype))

    def _gather(self, layer: int, tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [B, kv_heads, length, head_dim] of the first ``length`` positions of each
        table in ``tables`` [B, n_blocks]."""
        b, n = tables.shape
        flat = tables.reshape(-1)
        out = []
        for pool in (self.k_pools[layer], self.v_pools[layer]):
            x = pool.index_select(0, flat)   # [B*n, bs, kvh, hd]
            x = x.view(b, n * self.kv.block_size, self.cfg.num_kv_heads, self.cfg.head_dim)
            out.append(x[:, :length].transpose(1, 2).to(self.dtype))
        return out[0], out[1]

    @torch.inference_mode()
    def prefill(self, token_ids: Sequence[int], block_table: Sequence[int],
                start_pos: int = 0, on_layer: Optional[Callable[[int], None]] = None,
                every_position: bool = False) -> torch.Tensor:
        """Logits [vocab] after the last of ``token_ids``, placed at ``start_pos`` onward; K/V of
        positions before ``start_pos`` must already be in the table's blocks. ``every_position``:
        logits [n, vocab] after each of them (a prompt's log-probabilities).

        ``on_layer(i)`` runs after each layer's attention: the worker sends heartbeats from it,
        so a long prefill stays visibly alive while a wedged one goes silent."""
        n = len(token_ids)
        if n == 0:
            raise ValueError("prefill needs at least one token")
        end = start_pos + n
        self._check_table(block_table, end)
        bs = self.kv.block_size
        dev = self.device
        positions = torch.arange(start_pos, end, device=dev)
        table = torch.tensor(list(block_table[: self.kv.blocks_for(end)]), dtype=torch.long, device=dev)
        blocks, slots = table[positions // bs], positions % bs
        tables = table.unsqueeze(0)
        # Query i sits at start_pos + i and sees every key up to and including itself.
        mask = None
        if start_pos:
            mask = torch.arange(end, device=dev).unsqueeze(0) <= positions.unsqueeze(1)
        pool_dtype = self.kv.pool.dtype

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self._write(layer, blocks, slots, k, v)
            if start_pos:
                keys, values = self._gather(layer, tables, end)
            else:
                # Nothing cached before this prompt: its own K/V is the whole history. Round it
                # as the pool stores it, so this prefill and a decode reading the pool agree.
                keys, values = (x.to(pool_dtype).to(q.dtype).transpose(0, 1).unsqueeze(0)
                                for x in (k, v))
            out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys, values,
                                                 attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=True)
            if on_layer is not None:
                on_layer(layer)
            return out[0].transpose(0, 1).reshape(n, -1)

        hidden = self.model(torch.tensor(list(token_ids), dtype=torch.long, device=dev), positions, attend)
        return self.model.logits(hidden if every_position else hidden[-1]).float()

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int], positions: Sequence[int],
               block_tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """One step for B sequences in one forward: ``tokens[i]`` at ``positions[i]`` attends to
        positions 0..positions[i] of ``block_tables[i]``. Returns logits [B, vocab]."""
        b = len(tokens)
        if not (b == len(positions) == len(block_tables)) or b == 0:
            raise ValueError(f"decode: {len(tokens)} tokens, {len(positions)} positions, "
                             f"{len(block_tables)} block tables (expected equal and > 0)")
        bs = self.kv.block_size
        lengths = [p + 1 for p in positions]
        for table, length in zip(block_tables, lengths):
            self._check_table(table, length)
        dev = self.device
        pos = torch.tensor(list(positions), dtype=torch.long, device=dev)
        blocks = torch.tensor([table[p // bs] for table, p in zip(block_tables, positions)],
                              dtype=torch.long, device=dev)
        slots = pos % bs
        kv_heads = self.cfg.num_kv_heads
        if self._kernel is not None:
            step = paged_kernel.Step(self._decode_group(block_tables, lengths, mask=False)[0],
                                     lengths, self.kv.num_blocks, bs)

            def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                self._write(layer, blocks, slots, k, v)
                return paged_kernel.decode_attention(self._kernel, q, self.k_pools[layer], self.v_pools[layer],
                                                     step).reshape(b, -1)
            return self._decode(tokens, pos, attend)
        groups = [self._decode_group(block_tables[lo:hi], lengths[lo:hi]) + (lo, hi)
                  for lo, hi in self._decode_groups(lengths)]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self._write(layer, blocks, slots, k, v)
            # The query heads sharing a KV head (heads kvh*g .. kvh*g+g-1, as enable_gqa maps
            # them) become g queries of that KV head, so each KV head's keys are read once.
            grouped = q.reshape(b, kv_heads, -1, q.shape[2])
            if len(groups) == 1:
                tables, longest, mask, _, _ = groups[0]
                keys, values = self._gather(layer, tables, longest)
                return F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask).reshape(b, -1)
            out = q.new_empty(b, q.shape[1] * q.shape[2])
            for tables, longest, mask, lo, hi in groups:
                keys, values = self._gather(layer, tables, longest)
                att = F.scaled_dot_product_attention(grouped[lo:hi], keys, values, attn_mask=mask)
                out[lo:hi] = att.reshape(hi - lo, -1)
            return out

        return self._decode(tokens, pos, attend)

    def _decode(self, tokens: Sequence[int], pos: torch.Tensor, attend) -> torch.Tensor:
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)
        if self._compiled is not None:
            return self._compiled(ids, pos, attend)
        return self.model.logits(self.model(ids, pos, attend)).float()

    def _decode_groups(self, lengths: Sequence[int]) -> list[tuple[int, int]]:
        """Consecutive [lo, hi) ranges of the batch whose gathered K/V (padded to the group's
        longest) stay within ``DECODE_GROUP_BYTES``; at least one sequence each."""
        per_position = 2 * self.cfg.num_kv_heads * self.cfg.head_dim * self.kv.pool.element_size()
        groups, lo, longest = [], 0, 0
        for i, length in enumerate(lengths):
            longest_with = max(longest, length)
            if i > lo and (i + 1 - lo) * longest_with * per_position > DECODE_GROUP_BYTES:
                groups.append((lo, i))
                lo, longest_with = i, length
            longest = longest_with
        groups.append((lo, len(lengths)))
        return groups

    def _decode_group(self, block_tables: Sequence[Sequence[int]], lengths: Sequence[int],
                      mask: bool = True) -> tuple[torch.Tensor, int, Optional[torch.Tensor]]:
        """Block tables [B, n] padded to the group's longest, that length, and the padding mask
        (None when every sequence has the same length, or not ``mask``)."""
        longest = max(lengths)
        n_blocks = self.kv.blocks_for(longest)
        rows = []
        for table, length in zip(block_tables, lengths):
            used = list(table[: self.kv.blocks_for(length)])
            # Pad with a block the sequence owns: its padding positions are masked anyway.
            rows.append(used + [used[0]] * (n_blocks - len(used)))
        pad = None
        if mask and min(lengths) != longest:
            lens = torch.tensor(list(lengths), dtype=torch.long, device=self.device)
            pad = (torch.arange(longest, device=self.device).unsqueeze(0)
                   < lens.unsqueeze(1))[:, None, None, :]
        return torch.tensor(rows, dtype=torch.long, device=self.device), longest, pad
