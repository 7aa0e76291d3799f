"""Shape-safe CUDA graphs: a bounded cache of graphs per module, keyed by the shapes of the call's inputs.

A CUDA graph replays fixed kernels on fixed memory, so it is only valid for the input shapes it was captured with.
DeepSpeed's own graph wrappers capture once, for the first call, and later calls of another batch size or resolution
fail or silently broadcast. Here each distinct input signature (tensor shapes, dtypes, and the non-tensor arguments)
gets its own graph, captured on first use. What each capture adds to the graphs' memory pool is measured; a
GraphBudget shared by the pipeline's modules sums it and, with a cap (config cuda_graph_memory_gib), once the pool has
reached the cap drops the least recently used graph of any module before each new capture, which reuses its memory.

All graphs of a pipeline share one memory pool: the pipeline calls its modules one after another on one stream and
every output is cloned before the next replay, so one graph's scratch memory may be reused by the next.

DeepSpeed's attention kernels keep one workspace buffer, freed and reallocated whenever a call needs more than the
call before it; graphs captured before would then write into freed memory. optimize.pin_deepspeed_workspace makes it
ask for the largest batch seen, so it only grows with a batch larger than any before; `reset_on_larger_batch` then
drops every graph of the cache before capturing that batch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

logger = logging.getLogger(__name__)


class _Entry:
    def __init__(self, graph, static_leaves, static_output):
        self.graph = graph
        self.static_leaves = static_leaves
        self.static_output = static_output


class GraphBudget:
    """The graphs of one pipeline, least recently used first, and the size of the memory pool they share: the sum of
    what each capture added to it (the pool never shrinks: a dropped graph's blocks stay in it for later captures).
    With a cap, once the pool has reached it each new capture first drops the least recently used graph, whose
    memory that capture then reuses: the count of graphs stops growing, and the pool grows past the cap only by what
    a capture needs beyond the blocks freed for it."""

    def __init__(self, cap_bytes: int | None = None):
        self.cap_bytes = cap_bytes
        self.held: OrderedDict[tuple, int] = OrderedDict()  # (GraphCache, key) -> bytes its capture added
        self.total_bytes = 0  # the shared pool's size: what the graphs hold, now and for the next captures

    def record(self, cache: "GraphCache", key: tuple, size: int) -> None:
        self.held[(cache, key)] = size
        self.total_bytes += size

    def touch(self, cache: "GraphCache", key: tuple) -> None:
        self.held.move_to_end((cache, key))

    def forget(self, cache: "GraphCache", key: tuple) -> None:
        self.held.pop((cache, key), None)

    def make_room(self) -> None:
        """Before a capture: at or past the cap, drop the least recently used graph (of any module)."""
        if self.cap_bytes is not None and self.held and self.total_bytes >= self.cap_bytes:
            (cache, key), size = self.held.popitem(last=False)
            cache.entries.pop(key, None)
            logger.info("%s: dropped its least recently used graph (its capture took %.2f GiB): the graphs' pool "
                        "(%.2f GiB) is at the %.2f GiB cap", cache.name, size / 2**30, self.total_bytes / 2**30,
                        self.cap_bytes / 2**30)


class GraphCache:
    """Wraps `fn` so that each input signature replays its own captured CUDA graph."""

    def __init__(self, fn: Callable, name: str, device: torch.device, pool=None, budget: GraphBudget | None = None,
                 reset_on_larger_batch: bool = False, warmup_calls: int = 2):
        self.fn = fn
        self.name = name
        self.device = device
        self.pool = pool
        self.budget = budget if budget is not None else GraphBudget()
        self.reset_on_larger_batch = reset_on_larger_batch
        self.warmup_calls = warmup_calls
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.largest_batch = 0
        self.captures = 0

    def __call__(self, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        key = signature(leaves, spec)
        if key is None:  # e.g. a python number that changes every call: a graph per value would thrash the cache
            return self.fn(*args, **kwargs)
        entry = self.entries.get(key)
        if entry is None:
            entry = self._add(key, leaves, spec)
        else:
            self.budget.touch(self, key)
        for static, leaf in zip(entry.static_leaves, leaves):
            if isinstance(leaf, torch.Tensor):
                static.copy_(leaf, non_blocking=True)
        entry.graph.replay()
        # Outputs are cloned: the static output is overwritten by the next replay, and callers such as PNDM's
        # scheduler keep earlier model outputs.
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, entry.static_output)

    def _add(self, key: tuple, leaves: list, spec) -> _Entry:
        batch = max((leaf.shape[0] for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.dim()), default=0)
        if self.reset_on_larger_batch and batch > self.largest_batch and self.entries:
            logger.info("%s: batch %d is larger than any captured; dropping %d graph(s)", self.name, batch,
                        len(self.entries))
            for old in self.entries:
                self.budget.forget(self, old)
            self.entries.clear()
        self.largest_batch = max(self.largest_batch, batch)
        self.budget.make_room()
        entry, size = self._capture(leaves, spec)
        self.entries[key] = entry
        self.budget.record(self, key, size)
        self.captures += 1
        logger.info("%s: captured CUDA graph %d for %s, +%.2f GiB (%d cached; the graphs' pool %.2f GiB)", self.name,
                    self.captures, [tuple(leaf.shape) for leaf in leaves if isinstance(leaf, torch.Tensor)],
                    size / 2**30, len(self.entries), self.budget.total_bytes / 2**30)
        return entry

    def _capture(self, leaves: list, spec) -> tuple[_Entry, int]:
        """Capture a graph for these inputs; returns it and what it added to the graphs' memory pool (the pool is
        apart from the allocator's other memory, so the growth of reserved memory over the capture is the pool's)."""
        # Inputs live on the graph's device so that nothing inside the graph copies from host memory.
        static_leaves = [leaf.to(self.device).clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        args, kwargs = tree_unflatten(static_leaves, spec)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy init, workspaces, cuDNN/cuBLAS choices
            for _ in range(self.warmup_calls):
                self.fn(*args, **kwargs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            # Measured from inside: entering torch.cuda.graph empties the allocator's cache, which would hide the
            # capture's growth behind what the warm-up calls left cached.
            before = torch.cuda.memory_reserved(self.device)
            static_output = self.fn(*args, **kwargs)
        size = max(0, torch.cuda.memory_reserved(self.device) - before)
        return _Entry(graph, static_leaves, static_output), size


def signature(leaves: list, spec) -> tuple | None:
    """Hashable description of a call: tensor shapes/dtypes/devices plus the plain non-tensor values."""
    parts: list[Any] = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append((tuple(leaf.shape), leaf.dtype, leaf.device.type))
        elif leaf is None or isinstance(leaf, (bool, str)):
            parts.append(leaf)
        else:
            return None
    return tuple(parts)


def graph_pipeline(pipe, device: torch.device, budget: GraphBudget, reset_on_larger_batch: bool = False,
                   warmup_calls: int = 2) -> dict:
    """Route the pipeline's UNet, text encoder(s) (SDXL has two) and VAE decoder through GraphCaches sharing one
    memory pool and `budget`, in place; each new shape is called `warmup_calls` times before its capture."""
    pool = torch.cuda.graph_pool_handle()
    caches = {"unet": GraphCache(pipe.unet.forward, "unet", device, pool, budget, reset_on_larger_batch,
                                 warmup_calls=warmup_calls)}
    pipe.unet.forward = caches["unet"]
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            caches[name] = encoder.forward = GraphCache(encoder.forward, name, device, pool, budget,
                                                        warmup_calls=warmup_calls)
    # AutoencoderKL.decode accepts a `generator` and ignores it; dropping it keeps the call graphable.
    vae_decode = pipe.vae.decode
    vae = GraphCache(lambda z, return_dict=True: vae_decode(z, return_dict=return_dict), "vae_decode", device, pool,
                     budget, warmup_calls=warmup_calls)
    pipe.vae.decode = lambda z, return_dict=True, generator=None: vae(z, return_dict=return_dict)
    caches["vae_decode"] = vae
    return caches
