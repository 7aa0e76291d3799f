"""Per-stage timing of one pipeline call: text encoder(s), denoising (every UNet call) and VAE decode.

Hooks record a timestamp around each call: CUDA events on a GPU (read after the call, with one synchronize that the
engine's copy of the pixels to the host has already made cheap), the wall clock on the CPU. Used by the engine
for its metrics and by the benchmark.
"""

from __future__ import annotations

import time

import torch


class _CpuStamp:
    def __init__(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end: "_CpuStamp") -> float:  # milliseconds, like torch.cuda.Event.elapsed_time
        return (end.t - self.t) * 1000


class StageTimer:
    """Context manager: `with StageTimer(pipe, cuda) as timer: pipe(...)`, then `timer.calls_ms()`."""

    STAGES = ("text_encoder", "unet", "vae")

    def __init__(self, pipe, cuda: bool):
        self.pipe = pipe
        self.cuda = cuda
        self.spans: dict[str, list] = {stage: [] for stage in self.STAGES}
        self.handles: list = []
        self.decode = None

    def _stamp(self):
        if not self.cuda:
            return _CpuStamp()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _start(self, stage: str) -> None:
        self.spans[stage].append([self._stamp(), None])

    def _stop(self, stage: str) -> None:
        self.spans[stage][-1][1] = self._stamp()

    def __enter__(self) -> "StageTimer":
        vae = self.pipe.vae
        self.decode = vae.decode
        self.own_decode = "decode" in vars(vae)  # an instance attribute (e.g. the graph cache's) to put back

        def timed_decode(*args, **kwargs):
            self._start("vae")
            out = self.decode(*args, **kwargs)
            self._stop("vae")
            return out

        # SDXL's second text encoder counts as text_encoder time: its calls follow the first encoder's, one at a time.
        for attribute, stage in (("text_encoder", "text_encoder"), ("text_encoder_2", "text_encoder"),
                                 ("unet", "unet")):
            module = getattr(self.pipe, attribute, None)
            if module is None:
                continue
            self.handles.append(module.register_forward_pre_hook(lambda m, a, stage=stage: self._start(stage)))
            self.handles.append(module.register_forward_hook(lambda m, a, o, stage=stage: self._stop(stage)))
        vae.decode = timed_decode
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        if self.own_decode:
            self.pipe.vae.decode = self.decode
        else:
            del self.pipe.vae.decode  # back to the class's method

    def calls_ms(self) -> dict[str, list[float]]:
        """Milliseconds of each completed call, per stage."""
        if self.cuda:
            torch.cuda.synchronize()
        return {stage: [start.elapsed_time(end) for start, end in spans if end is not None]
                for stage, spans in self.spans.items()}
