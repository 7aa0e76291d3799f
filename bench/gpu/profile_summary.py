"""Where a profiled start spent its time: py-spy's raw output (`py-spy record --format raw --idle`, one line per
distinct stack, root first, then its sample count) as the functions that held the most wall time, counting each
function once per stack (inclusive), then the innermost frames (self). Line numbers are dropped, so a function's
samples add up. --under NAME adds the frames (native ones included) beneath the first frame whose label contains
NAME, each counted once per stack: what that call waited for. RAW may be gzipped.
Usage: python3 bench/gpu/profile_summary.py RAW --rate 50 [--top 40] [--under AOTICompiledModel.__call__]
"""
import argparse
import gzip
import re
from collections import Counter

LINE = re.compile(r":\d+\)$")


def label(frame: str) -> str:
    return LINE.sub(")", frame.strip())


def short(frame: str, width: int = 150) -> str:
    """C++ frames carry their whole template signature: its start and the library are what say what it is."""
    return frame if len(frame) <= width else frame[:width - 30] + " ... " + frame[frame.rfind(" ("):]


def summarize(lines, rate: float, top: int, under: str | None = None) -> str:
    inclusive, innermost, beneath, total, within = Counter(), Counter(), Counter(), 0, 0
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [label(f) for f in stack.split(";")]
        total += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
        innermost[frames[-1]] += int(count)
        at = next((i for i, frame in enumerate(frames) if under and under in frame), None)
        if at is not None:
            within += int(count)
            for frame in set(frames[at + 1:]):
                beneath[frame] += int(count)
    out = [f"{total} samples at {rate:g} Hz: {total / rate:.1f} thread-seconds (every thread's, idle included; a "
           "function that runs on one thread only, such as load_engine, counts its wall time)",
           "", f"inclusive, the {top} largest Python functions (s, share):"]
    python = [(f, n) for f, n in inclusive.most_common() if ".py)" in f or "<frozen" in f]
    out += [f"{n / rate:8.2f} {n / total:6.1%}  {f}" for f, n in python[:top]]
    out += ["", f"innermost frames, the {top} largest (s, share):"]
    out += [f"{n / rate:8.2f} {n / total:6.1%}  {short(f)}" for f, n in innermost.most_common(top)]
    if under:
        out += ["", f"beneath {under} ({within / rate:.2f} s), the {top} largest frames (s, share of its time):"]
        out += [f"{n / rate:8.2f} {n / max(within, 1):6.1%}  {short(f)}" for f, n in beneath.most_common(top)]
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", help="py-spy record --format raw output")
    parser.add_argument("--rate", type=float, required=True, help="the sampling rate py-spy ran at (Hz)")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--under", help="also list what runs beneath the first frame containing this")
    args = parser.parse_args()
    with (gzip.open if args.raw.endswith(".gz") else open)(args.raw, "rt") as f:
        print(summarize(f, args.rate, args.top, args.under))


if __name__ == "__main__":
    main()
