"""What a new CUDA process pays the first time it meets a shape: cuDNN convolutions (float16, channels-last, SD 1.5's
channel counts), cuBLAS matmuls and PyTorch's default attention (cuDNN's on an H100), each timed three times
(the first call includes choosing and loading, or building, its kernel). Run alone on a fresh machine, then again:
bench/results/h100-2026-12-07-first-calls.txt."""

import time

import torch


def timed(fn, calls: int = 3) -> list[float]:
    """Milliseconds of each of `calls` calls of `fn`, each waited for."""
    out = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(1e3 * (time.perf_counter() - start))
    return out


def main() -> None:
    start = time.perf_counter()
    torch.zeros(1, device="cuda")
    print(f"cuda init {time.perf_counter() - start:.2f} s")
    half = {"device": "cuda", "dtype": torch.half}
    for batch in (2, 16):
        for cin, cout, side in ((320, 320, 64), (640, 640, 32), (1280, 1280, 16), (320, 640, 32), (4, 320, 64),
                                (320, 4, 64)):
            x = torch.randn(batch, cin, side, side, **half).to(memory_format=torch.channels_last)
            w = torch.randn(cout, cin, 3, 3, **half).to(memory_format=torch.channels_last)
            first, *then = timed(lambda: torch.nn.functional.conv2d(x, w, padding=1))
            print(f"conv batch {batch} {cin}->{cout} at {side}x{side}: first {first:.1f} ms, then "
                  f"{', '.join(f'{t:.2f}' for t in then)} ms")
    for rows in (77 * 2, 4096):
        x, w = torch.randn(rows, 768, **half), torch.randn(768, 3072, **half)
        first, *then = timed(lambda: x @ w, 2)
        print(f"matmul {rows}x768x3072: first {first:.1f} ms, then {then[0]:.2f} ms")
    q = torch.randn(2, 8, 4096, 40, **half)
    for ms in timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), 2):
        print(f"sdpa 4096 tokens: {ms:.1f} ms")


if __name__ == "__main__":
    main()
