"""The CUDA graph cache's bookkeeping. Capturing and replaying needs a GPU (tests/test_gpu.py does that); here the
capture step is replaced by a fake that calls the function once and reports 100 bytes of graph memory (what a real
capture measures on the GPU), so that keying, the memory cap's eviction and the DeepSpeed workspace rule can be
checked on the CPU."""

import pytest
import torch

from sd_engine import graphs
from sd_engine.graphs import GraphBudget, GraphCache

GRAPH_BYTES = 100


class FakeGraph:
    def __init__(self, replay):
        self.replay = replay


@pytest.fixture
def cache(monkeypatch):
    calls = []

    def fn(x, scale=None, flag=False):
        calls.append(tuple(x.shape))
        return (x * 2,)

    def fake_capture(self, leaves, spec):
        static = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        args, kwargs = graphs.tree_unflatten(static, spec)
        output = self.fn(*args, **kwargs)

        def replay():  # recompute into the static output, as a graph replay would
            output[0].copy_(self.fn(*args, **kwargs)[0])

        return graphs._Entry(FakeGraph(replay), static, output), GRAPH_BYTES

    monkeypatch.setattr(GraphCache, "_capture", fake_capture)
    return GraphCache(fn, "test", torch.device("cpu"), budget=GraphBudget(cap_bytes=2 * GRAPH_BYTES)), calls


def test_each_shape_gets_its_own_graph_and_results_follow_the_inputs(cache):
    wrapped, _ = cache
    a, b = torch.ones(1, 3), torch.full((3, 3), 5.0)
    assert torch.equal(wrapped(a)[0], a * 2)
    assert torch.equal(wrapped(b)[0], b * 2)
    assert torch.equal(wrapped(a + 1)[0], (a + 1) * 2)  # same shape: replayed with the new values
    assert wrapped.captures == 2 and len(wrapped.entries) == 2


def test_outputs_are_copies_not_the_static_buffer(cache):
    wrapped, _ = cache
    first = wrapped(torch.ones(2, 2))[0]
    wrapped(torch.zeros(2, 2))
    assert torch.equal(first, torch.full((2, 2), 2.0))


def test_past_the_memory_cap_the_least_recently_used_graph_is_dropped(cache):
    wrapped, _ = cache
    wrapped(torch.ones(1))
    wrapped(torch.ones(2))
    wrapped(torch.ones(1))  # 1 is now the most recent
    wrapped(torch.ones(3))  # the pool has reached the cap: the least recent (2) goes first
    assert sorted(key[1][0] for key in wrapped.entries) == [(1,), (3,)]
    wrapped(torch.ones(4))  # one out for each one in: the count stays
    assert sorted(key[1][0] for key in wrapped.entries) == [(3,), (4,)]
    assert wrapped.budget.total_bytes == 4 * GRAPH_BYTES  # the pool: each fake capture here grows it


def test_the_cap_is_shared_by_every_module_of_the_pipeline(cache):
    """One budget for UNet, text encoders and VAE: the least recently used graph of any of them goes."""
    unet, _ = cache
    vae = GraphCache(lambda x: (x + 1,), "vae", torch.device("cpu"), budget=unet.budget)
    unet(torch.ones(1))
    vae(torch.ones(1))
    unet(torch.ones(1))  # the VAE's graph is now the least recent
    unet(torch.ones(2))
    assert len(vae.entries) == 0 and len(unet.entries) == 2


def test_without_a_cap_every_graph_stays(cache):
    wrapped, _ = cache
    wrapped.budget.cap_bytes = None
    for n in range(1, 6):
        wrapped(torch.ones(n))
    assert len(wrapped.entries) == 5 and wrapped.budget.total_bytes == 5 * GRAPH_BYTES


def test_non_tensor_arguments_are_part_of_the_key(cache):
    wrapped, _ = cache
    wrapped(torch.ones(1), flag=False)
    wrapped(torch.ones(1), flag=True)
    assert wrapped.captures == 2


def test_python_numbers_bypass_the_cache(cache):
    wrapped, calls = cache
    assert torch.equal(wrapped(torch.ones(1), scale=0.5)[0], torch.full((1,), 2.0))
    assert wrapped.captures == 0 and calls == [(1,)]


def test_larger_batch_drops_older_graphs_when_asked(cache):
    wrapped, _ = cache
    wrapped.reset_on_larger_batch = True
    wrapped.budget.cap_bytes = None
    wrapped(torch.ones(2, 4))
    wrapped(torch.ones(1, 4))  # smaller: kept alongside
    assert len(wrapped.entries) == 2
    wrapped(torch.ones(4, 4))  # larger than any seen: the workspace may move, so older graphs go
    assert [key[1][0] for key in wrapped.entries] == [(4, 4)]
    assert list(wrapped.budget.held) == [(wrapped, key) for key in wrapped.entries]  # dropped ones left it too
    wrapped(torch.ones(2, 4))  # not larger than 4: nothing dropped
    assert len(wrapped.entries) == 2
