"""What checking the weights' sha256 beside the diffusers import costs each of them, in a fresh process as a worker's
start does it (sd_engine.loading.prepare_weights: the import in a thread, the check in the main thread).

Through TorchServe on an H200 a worker's check and import took 13.6 s together (bench/results/
h200-sd15-2026-12-07-serving-aot-3-model.log: the check ended after 8.3 s, the import 5.3 s later), where the same
host's in-process start, which checks nothing, imported in 8.2 s (h200-sd15-2026-12-07-aot-4sizes.json).

  python3 bench/gpu/overlap.py FOLDER VARIANT
  python3 bench/gpu/overlap.py FOLDER make [--files 4] [--mb 550]

FOLDER: a diffusers folder with a manifest (model_index.json names the pipeline class); `make` writes such a folder of
--files random files of --mb MiB each, the manifest last. VARIANT:
- alone: the import, then the check, one after the other
- thread: as prepare_weights does it (the import in a thread, loading.verify_manifest in this one)
- readinto: the same, the check reading each file into one reused 16 MB buffer instead of a new 4 MB bytes object
  per read
- process: the same, the check in a child process (no GIL, no allocator shared with the import)
Prints one JSON line: seconds from the start to the end of the import and of the check.
"""
import argparse
import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch  # noqa: F401 - a TorchServe worker has imported torch before the handler starts

from sd_engine import loading

HASH_IN_CHILD = """
import hashlib, json, sys
from pathlib import Path
sys.path[:0] = [p for p in sys.argv[2:]]
from sd_engine.loading import file_digests
print(json.dumps(file_digests(Path(sys.argv[1]))))
"""


def digests_readinto(folder: Path) -> dict:
    buffer = bytearray(16 << 20)
    view = memoryview(buffer)
    digests = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name not in (loading.MANIFEST, loading.DONE_MARKER):
            digest = hashlib.sha256()
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    digest.update(view[:n])
            digests[name] = digest.hexdigest()
    return digests


def check(folder: Path, variant: str) -> None:
    expected = json.loads((folder / loading.MANIFEST).read_text())["sha256"]
    if variant == "readinto":
        actual = digests_readinto(folder)
    elif variant == "process":
        out = subprocess.run([sys.executable, "-c", HASH_IN_CHILD, str(folder), *sys.path], check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        actual = json.loads(out)
    else:
        loading.verify_manifest(folder)
        return
    loading.match_manifest(expected, actual)


def make(folder: Path, files: int, mb: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for i in range(files):
        with open(folder / f"part{i}.safetensors", "wb") as f:
            for _ in range(mb):
                f.write(torch.randint(0, 256, (1 << 20,), dtype=torch.uint8).numpy().tobytes())
    (folder / loading.MANIFEST).write_text(json.dumps({"sha256": loading.file_digests(folder)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("variant", choices=("alone", "thread", "readinto", "process", "make"))
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--mb", type=int, default=550)
    args = parser.parse_args()
    if args.variant == "make":
        return make(args.folder, args.files, args.mb)
    done = {}
    start = time.perf_counter()

    def import_pipeline():
        loading._import_pipeline(args.folder)
        done["import_s"] = round(time.perf_counter() - start, 2)

    with loading.collector_paused():
        if args.variant == "alone":
            import_pipeline()
            check(args.folder, "thread")
        else:
            importing = threading.Thread(target=import_pipeline, daemon=True)
            importing.start()
            check(args.folder, args.variant)
            done["check_s"] = round(time.perf_counter() - start, 2)
            importing.join()
    done.setdefault("check_s", round(time.perf_counter() - start, 2))
    if args.variant == "alone":
        done["check_alone_s"] = round(done["check_s"] - done["import_s"], 2)
    print(json.dumps({"variant": args.variant, **done, "total_s": round(time.perf_counter() - start, 2)}))


if __name__ == "__main__":
    main()
