#!/usr/bin/env python3
"""Package a diffusers weights folder for TorchServe.

Default: zip the weights into `model.zip` and build `<model-store>/<name>.mar` with torch-model-archiver, holding the
handler (sd_handler.py), the engine package (sd_engine/), model.zip and the model config. The handler extracts
model.zip once per model dir at load.

--no-archive: for multi-GB weights. Writes the folder `<model-store>/<name>/` (MAR-INF/MANIFEST.json, handler,
engine, config) and copies the weights into `<model-store>/<name>/model/` unzipped; the packaged config's
`handler.weights` is set to `model`. Start TorchServe with `--models <name>=<name>` for this layout.

An existing archive of the same name is overwritten. Exit codes: 0 packaged, 1 archiver failed, 2 bad arguments.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

from sd_engine.config import EngineConfig
from sd_engine.errors import ConfigError
from sd_engine.loading import MANIFEST, file_digests

ROOT = Path(__file__).resolve().parent.parent
HANDLER = ROOT / "handler" / "sd_handler.py"
ENGINE = ROOT / "handler" / "sd_engine"
STORED_SUFFIXES = {".safetensors", ".bin", ".ckpt", ".pt"}  # already dense: deflating them costs time, saves ~nothing


def manifest_text(digests: dict[str, str]) -> str:
    """The sha256 manifest the engine checks at load (sd_engine.loading.verify_manifest)."""
    return json.dumps({"sha256": digests}, indent=1)


def digests_with_progress(weights: Path) -> dict[str, str]:
    """file_digests with a progress bar on stderr (multi-GB weights take a while to hash)."""
    from tqdm import tqdm

    total = sum(p.stat().st_size for p in weights.rglob("*") if p.is_file())
    with tqdm(total=total, unit="B", unit_scale=True, desc="sha256", file=sys.stderr) as bar:
        return file_digests(weights, progress=bar.update)


def zip_weights(weights: Path, out: Path) -> None:
    """Zip the folder's files (not its manifest or extraction marker) plus a fresh manifest of them."""
    from tqdm import tqdm

    digests = digests_with_progress(weights)
    with zipfile.ZipFile(out, "w") as archive, tqdm(total=len(digests), unit="file", desc="zip",
                                                     file=sys.stderr) as bar:
        for name in digests:
            path = weights / name
            kind = zipfile.ZIP_STORED if path.suffix in STORED_SUFFIXES else zipfile.ZIP_DEFLATED
            archive.write(path, name, compress_type=kind)
            bar.update()
        archive.writestr(MANIFEST, manifest_text(digests))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path, help="diffusers folder (with model_index.json)")
    parser.add_argument("model_store", type=Path, help="TorchServe model store to write into (created if missing)")
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "model-config.yaml",
                        help="model-config.yaml to ship (default: config/model-config.yaml, the GPU one)")
    parser.add_argument("--model-name", default="stable-diffusion", help="model name (default: %(default)s)")
    parser.add_argument("--version", default="1.0", help="model version (default: %(default)s)")
    parser.add_argument("--no-archive", action="store_true", help="write a folder instead of a .mar (large weights)")
    args = parser.parse_args(argv)

    if not (args.weights / "model_index.json").is_file():
        parser.error(f"{args.weights} is not a diffusers folder (no model_index.json)")
    config = yaml.safe_load(args.config.read_text()) or {}
    try:  # a config the engine refuses fails here, not in every worker TorchServe starts and restarts
        EngineConfig.from_mapping(config.get("handler"))
    except ConfigError as e:
        parser.error(f"{args.config}: {e}")
    args.model_store.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="sd-package-") as tmp:
        stage = Path(tmp)
        # A folder given to --extra-files lands with its contents at the archive root, so `code/sd_engine/`
        # becomes `sd_engine/` next to the handler.
        shutil.copytree(ENGINE, stage / "code" / "sd_engine", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        extra = [stage / "code"]
        config_file = args.config
        if args.no_archive:
            config.setdefault("handler", {})["weights"] = "model"
            config_file = stage / "model-config.yaml"
            config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        else:
            print(f"zipping {args.weights} ...", file=sys.stderr)
            zip_weights(args.weights, stage / "model.zip")
            extra.append(stage / "model.zip")

        command = [  # = torch-model-archiver, run by this interpreter so no console script on PATH is needed
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", args.model_name, "--version", args.version, "--handler", str(HANDLER),
            "--extra-files", ",".join(str(p) for p in extra), "--config-file", str(config_file),
            "--export-path", str(args.model_store), "--archive-format", "no-archive" if args.no_archive else "default",
            "--force",
        ]
        print(f"running torch-model-archiver for {args.model_name} ...", file=sys.stderr)
        if subprocess.run(command).returncode != 0:
            print("torch-model-archiver failed", file=sys.stderr)
            return 1

    if args.no_archive:
        target = args.model_store / args.model_name / "model"
        print(f"copying weights into {target} ...", file=sys.stderr)
        digests = digests_with_progress(args.weights)  # of the source: a damaged copy then fails the load
        shutil.copytree(args.weights, target, dirs_exist_ok=True)
        (target / MANIFEST).write_text(manifest_text(digests))
        print(args.model_store / args.model_name)
    else:
        print(args.model_store / f"{args.model_name}.mar")
    return 0


if __name__ == "__main__":
    sys.exit(main())
