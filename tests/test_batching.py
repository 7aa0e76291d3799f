"""The engine's micro-batcher for fronts without one (KServe): concurrent submissions on the tiny model."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sd_engine.batching import Batcher, BatcherClosed
from sd_engine.engine import Engine, GenerationResult
from sd_engine.errors import GenerationError
from sd_engine.requests import parse_request


class CountingEngine:
    """The real tiny engine, with each generate() call's request count recorded."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, requests):
        self.calls.append(len(requests))
        return self.engine.generate(requests)


def image(result):
    assert isinstance(result, GenerationResult), result
    return np.asarray(result.image, dtype=np.int16)


def test_concurrent_submissions_share_engine_calls_and_each_gets_its_own_image(tiny_engine, cpu_rules):
    counting = CountingEngine(tiny_engine)
    seen = []
    batcher = Batcher(counting, max_images=4, max_delay_s=30, on_batch=seen.append)
    requests = [parse_request({"prompt": f"a fox {i}", "seed": i}, cpu_rules) for i in range(4)]
    start = threading.Barrier(4)

    def submit(request):
        start.wait()
        return batcher.submit([request]).result(timeout=120)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(submit, requests))
    batcher.close()
    # The worker waits (up to 30 s) until 4 images are queued, then makes one engine call for them.
    assert counting.calls == [4] and seen[0].images == 4 and seen[0].submissions == 4
    assert all(q >= 0 for q in seen[0].queue_seconds)
    for request, [result] in zip(requests, answers):
        assert result.request == request
        alone = tiny_engine.generate([request])[0]
        assert np.abs(image(result) - image(alone)).max() <= 2  # batched kernels round a little differently


def test_a_failing_group_fails_its_own_submission_only(tiny_engine, cpu_rules):
    from test_engine import _FailingPipe  # fails every call at height 128; a CPU cannot run out of memory on demand

    engine = Engine(_FailingPipe(RuntimeError("boom")), tiny_engine.config, tiny_engine.device, rules=cpu_rules,
                    max_batch_size=4)
    batcher = Batcher(engine, max_images=2, max_delay_s=30)
    good = batcher.submit([parse_request({"prompt": "ok"}, cpu_rules)])
    bad = batcher.submit([parse_request({"prompt": "big", "height": 128}, cpu_rules)])
    [ok], [failed] = good.result(timeout=60), bad.result(timeout=60)
    assert isinstance(ok, GenerationResult) and isinstance(failed, GenerationError)
    batcher.close()


def test_an_unexpected_engine_exception_fails_one_batch_and_the_worker_lives_on(tiny_engine, cpu_rules):
    class ExplodingOnce(CountingEngine):  # the real engine never raises; this reaches the batcher's last guard
        def generate(self, requests):
            if not self.calls:
                self.calls.append(len(requests))
                raise RuntimeError("boom")
            return super().generate(requests)

    batcher = Batcher(ExplodingOnce(tiny_engine), max_images=1, max_delay_s=0)
    request = parse_request({"prompt": "a fox", "seed": 1}, cpu_rules)
    [first] = batcher.submit([request]).result(timeout=60)
    [second] = batcher.submit([request]).result(timeout=60)
    assert isinstance(first, GenerationError) and isinstance(second, GenerationResult)
    batcher.close()


def test_close_finishes_what_was_queued_and_refuses_the_rest(tiny_engine, cpu_rules):
    batcher = Batcher(tiny_engine, max_images=8, max_delay_s=0)
    futures = [batcher.submit([parse_request({"prompt": "p", "seed": i}, cpu_rules)]) for i in range(3)]
    batcher.close(timeout=120)
    assert all(isinstance(f.result(timeout=0)[0], GenerationResult) for f in futures)
    with pytest.raises(BatcherClosed) as caught:
        batcher.submit([parse_request({"prompt": "late"}, cpu_rules)])
    assert caught.value.status == 503


def test_asyncio_fronts_await_results_without_blocking_the_loop(tiny_engine, cpu_rules):
    batcher = Batcher(tiny_engine, max_images=2, max_delay_s=30)

    async def main():
        ticks = 0

        async def ticker():  # runs while the GPU (here the CPU) works: the loop is free
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        clock = asyncio.create_task(ticker())
        results = await asyncio.gather(*(batcher.generate([parse_request({"prompt": "p", "seed": i}, cpu_rules)])
                                         for i in range(2)))
        clock.cancel()
        return results, ticks

    results, ticks = asyncio.run(main())
    assert [len(r) for r in results] == [1, 1] and ticks > 1
    batcher.close()


def test_a_cancelled_submission_is_skipped_and_the_others_are_answered(tiny_engine, cpu_rules):
    """A client that gives up (a gRPC deadline, a closed connection) cancels its future; the loop goes on."""
    batcher = Batcher(tiny_engine, max_images=4, max_delay_s=0, start=False)
    gone = batcher.submit([parse_request({"prompt": "gone", "seed": 1}, cpu_rules)])
    kept = batcher.submit([parse_request({"prompt": "kept", "seed": 2}, cpu_rules)])
    assert gone.cancel()
    batcher.close()  # queued work still runs: here on this thread
    batcher.run()
    assert gone.cancelled() and isinstance(kept.result(timeout=0)[0], GenerationResult)


def test_an_asyncio_caller_that_gives_up_mid_call_does_not_stop_the_loop(tiny_engine, cpu_rules):
    batcher = Batcher(tiny_engine, max_images=1, max_delay_s=0)

    async def impatient():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.generate([parse_request({"prompt": "p", "num_inference_steps": 20,
                                                                    "height": 128, "width": 128}, cpu_rules)]),
                                   timeout=0.01)
        return await batcher.generate([parse_request({"prompt": "next", "seed": 3}, cpu_rules)])

    [result] = asyncio.run(impatient())
    assert isinstance(result, GenerationResult)
    batcher.close()


def test_a_full_queue_refuses_with_503(tiny_engine, cpu_rules):
    from sd_engine.batching import QueueFull

    batcher = Batcher(tiny_engine, max_images=1, max_delay_s=0, start=False, max_queued=2)
    for i in range(2):
        batcher.submit([parse_request({"prompt": "p", "seed": i}, cpu_rules)])
    with pytest.raises(QueueFull) as caught:
        batcher.submit([parse_request({"prompt": "one too many"}, cpu_rules)])
    assert caught.value.status == 503
    batcher.close()
    batcher.run()


def test_requests_spread_over_adapters_are_batched_by_adapter_set_oldest_first(tiny_engine, cpu_rules):
    """Four queued submissions alternating two adapters, two images a call: first-come batching would make two calls
    mixing both (each split again by the engine into two pipeline calls of one); grouping makes one call per adapter."""

    class KeyRecordingEngine(CountingEngine):
        def generate(self, requests):
            self.calls.append([dict(r.loras) for r in requests])
            return self.engine.generate(requests)

    recording = KeyRecordingEngine(tiny_engine)
    batcher = Batcher(recording, max_images=2, max_delay_s=0, start=False)
    spread = [{"style": 0.5}, {"detail": 0.5}, {"style": 0.5}, {"detail": 0.5}]
    futures = [batcher.submit([parse_request({"prompt": "p", "seed": i, "num_inference_steps": 2, "loras": loras},
                                             cpu_rules)]) for i, loras in enumerate(spread)]
    batcher.close()
    batcher.run()  # everything is queued before the worker starts: here on this thread
    assert recording.calls == [[{"style": 0.5}] * 2, [{"detail": 0.5}] * 2]
    for future, loras in zip(futures, spread):
        [result] = future.result(timeout=0)
        assert isinstance(result, GenerationResult) and dict(result.request.loras) == loras


def test_submissions_held_back_for_a_later_batch_count_towards_the_queue_bound(tiny_engine, cpu_rules):
    """While the worker waits (max_delay_s) to fill a batch of one key, submissions of another key that it took off
    the queue and holds still count against max_queued: the third gets a 503."""
    import time

    from sd_engine.batching import QueueFull

    batcher = Batcher(tiny_engine, max_images=4, max_delay_s=30, max_queued=2)
    first = batcher.submit([parse_request({"prompt": "p", "seed": 1}, cpu_rules)])
    other = batcher.submit([parse_request({"prompt": "p", "seed": 2, "num_inference_steps": 3}, cpu_rules)])
    deadline = time.monotonic() + 30
    while batcher._held < 2 and time.monotonic() < deadline:  # the worker took both off the queue and holds them
        time.sleep(0.01)
    assert batcher._held == 2
    with pytest.raises(QueueFull):
        batcher.submit([parse_request({"prompt": "one too many"}, cpu_rules)])
    batcher.close()
    assert isinstance(first.result(timeout=120)[0], GenerationResult)
    assert isinstance(other.result(timeout=120)[0], GenerationResult)
