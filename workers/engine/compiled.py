"""The decode step compiled by ``torch.compile`` (inductor): the opt-in ``ModelRunner(...,
compile_decode=True)``.

Eager decode runs some 2,500 small torch ops a step at batch 1 (norms, rotary embedding, the
int8 layers' row scaling, residuals), each on data the weights streaming through the cache have
just evicted; inductor fuses them into a few dozen C++ loops. The parts it cannot trace stay
opaque custom ops: fbgemm's packed linear kernels (``dsrv::packed_linear``, by a handle per layer)
and paged attention (``dsrv::paged_attend``, which calls the runner's ``attend`` of this step,
handed over in a thread-local: it writes the KV pool and reads block tables, neither of which
the compiled graph needs to see).

Measured (``python -m bench.engine --compile both``, SmolLM2 int8, 1 thread, README): batch-1
decode 34.9 tok/s against 26.1 eager, batch 16 and 64 8-10 % faster. The cost is compile time:
one graph for batch 1 and one with a dynamic batch for the rest, together 30 s to 7 minutes on 2
loaded cores the first time (inductor's on-disk cache makes later starts faster), which is why it
is off by default. A worker turns it on with ``torch_compile_config`` and compiles before
it registers (``warm_up``): its first request pays nothing and no compile stalls its heartbeats.
"""
from __future__ import annotations

import threading
import time
import weakref
from typing import Callable, Optional, Sequence

import torch

from .model import Attend, LlamaModel

_linears: list = []            # handle -> weakref of an Int8Linear / Fp16Linear
_context = threading.local()   # .attend: the runner's attend callback of the step in flight


@torch.library.custom_op("dsrv::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int) -> torch.Tensor:
    return _linears[handle]().kernel(x)


@packed_linear.register_fake
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], _linears[handle]().out_features)


@torch.library.custom_op("dsrv::paged_attend", mutates_args=())
def paged_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return _context.attend(layer, q, k, v).contiguous()


@paged_attend.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


def _opaque_attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.ops.dsrv.paged_attend(q, k, v, layer)


def register(module) -> int:
    """A handle for ``module``'s kernel (``module.kernel(x)``), for ``dsrv::packed_linear``."""
    _linears.append(weakref.ref(module))
    return len(_linears) - 1


class CompiledModel:
    """``model``'s forward and LM head as one compiled function of (token ids, positions)."""

    def __init__(self, model: LlamaModel, fullgraph: bool = True) -> None:
        """``fullgraph``: a graph break is an error instead of a silent split into pieces."""
        for module in model.modules():
            if hasattr(module, "kernel") and getattr(module, "handle", None) is None:
                module.handle = register(module)
        self.model = model

        def forward(token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return model.logits(model(token_ids, positions, _opaque_attend)).float()
        self._forward = torch.compile(forward, fullgraph=fullgraph)

    def __call__(self, token_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Logits [T, vocab] (float32), as ``model.logits(model(token_ids, positions, attend))``."""
        self.model.rotary.check(positions)      # data-dependent: not inside the graph
        _context.attend = attend
        try:
            return self._forward(token_ids, positions)
        finally:
            _context.attend = None


def default_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The decode batch sizes a worker warms up: 1 and 2 compile the two graphs (batch 1 and any
    batch, which torch.compile makes dynamic at the second size it sees), ``max_batch`` checks the
    widest step runs without recompiling."""
    return tuple(sorted({1, min(2, max_batch), max_batch}))


def warm_up(runner, allocator, batch_sizes: Sequence[int],
            say: Optional[Callable[[str], None]] = None) -> float:
    """One decode step at each of ``batch_sizes`` (fewer where ``allocator`` lacks a block per
    sequence), so the compiled step is compiled before any request needs it. Each sequence is one
    token at position 0 in a block of its own, freed afterwards; what it writes there is
    overwritten before anyone reads it. Returns the seconds taken."""
    start = time.monotonic()
    sizes = sorted({min(b, allocator.num_free) for b in batch_sizes} - {0})
    tables = [allocator.allocate(1) for _ in range(max(sizes, default=0))]
    try:
        for i, b in enumerate(sizes):
            if say is not None:
                say(f"compiling the decode step: batch {b} ({i + 1} of {len(sizes)})")
            step = time.monotonic()
            runner.decode([0] * b, [0] * b, tables[:b])
            if say is not None:
                say(f"decode step at batch {b} ready in {time.monotonic() - step:.1f} s")
    finally:
        for table in tables:
            allocator.free(table)
    return time.monotonic() - start
