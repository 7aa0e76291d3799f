"""Where a worker's JIT caches go (sd_engine/jit_caches.py): cache_dir, the CUDA driver's cache shipped beside the AOT
packages, and the fixed working directory of load_engine's optimize and warm-up steps and of Engine.generate. The
driver only reads CUDA_CACHE_PATH on a GPU; what is checked here is what the process hands it: the folder and its
contents."""

import ctypes
import json
import logging
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from ts.context import Context

from conftest import cpu_handler_block
from package_model import zip_weights
from sd_engine import jit_caches, loading
from sd_engine.errors import ModelLoadError
from sd_engine.loading import MANIFEST, prepare_weights
from sd_handler import StableDiffusionHandler
from sd_engine.engine import Engine, load_engine
from sd_engine.jit_caches import DRIVER_CACHE, fixed_cwd, use_jit_caches

VARIABLES = ("TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH")


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch, tmp_path):
    """Each test starts as a new process would: nothing set yet; the environment is restored after it, and temporary
    folders go below the test's own."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for variable in VARIABLES:
        monkeypatch.setenv(variable, "")  # recorded first, so that the test's own setting is undone after it
        monkeypatch.delenv(variable)


def shipped_cache(weights: Path) -> Path:
    folder = weights / "compile-artifacts" / DRIVER_CACHE
    (folder / "a").mkdir(parents=True)
    (folder / "index").write_bytes(b"index")
    (folder / "a" / "entry").write_bytes(b"sass")
    return folder


def test_cache_dir_holds_every_cache_and_is_seeded_once_from_the_shipped_driver_cache(tmp_path, monkeypatch):
    weights = tmp_path / "model"
    shipped = shipped_cache(weights)
    monkeypatch.chdir(tmp_path)
    use_jit_caches("cache", weights)  # relative: made absolute, as load_engine's later steps run from /
    cache = tmp_path / "cache"
    assert {v: os.environ[v] for v in VARIABLES} == {
        "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions"), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "TRITON_CACHE_DIR": str(cache / "triton"), "CUDA_CACHE_PATH": str(cache / DRIVER_CACHE)}
    assert (cache / DRIVER_CACHE / "a" / "entry").read_bytes() == b"sass"
    # The driver adds to its folder; the next start keeps what it has rather than the shipped copy.
    (cache / DRIVER_CACHE / "a" / "entry").write_bytes(b"newer")
    use_jit_caches("cache", weights)
    assert (cache / DRIVER_CACHE / "a" / "entry").read_bytes() == b"newer"
    assert (shipped / "a" / "entry").read_bytes() == b"sass"  # the weights folder stays as its manifest says


def test_without_cache_dir_the_driver_gets_a_temporary_copy_of_the_shipped_cache(tmp_path):
    weights = tmp_path / "model"
    shipped = shipped_cache(weights)
    use_jit_caches("", weights)
    copy = Path(os.environ["CUDA_CACHE_PATH"])
    assert copy != shipped and not copy.is_relative_to(weights)
    assert (copy / "index").read_bytes() == b"index" and (copy / "a" / "entry").read_bytes() == b"sass"
    assert not any(v in os.environ for v in VARIABLES[:3])  # the others keep their defaults


def test_a_repeated_call_changes_nothing_and_nothing_shipped_leaves_the_defaults(tmp_path):
    weights = tmp_path / "model"
    shipped_cache(weights)
    use_jit_caches("", weights)
    first = os.environ["CUDA_CACHE_PATH"]
    use_jit_caches("", weights)  # load_engine's call after the front's: no second copy
    assert os.environ["CUDA_CACHE_PATH"] == first
    os.environ.pop("CUDA_CACHE_PATH")
    use_jit_caches("", tmp_path / "plain-weights")  # no shipped cache, no cache_dir
    assert not any(v in os.environ for v in VARIABLES)


def test_a_driver_cache_the_environment_names_is_kept_and_seeded_when_empty(tmp_path, monkeypatch):
    weights = tmp_path / "model"
    shipped_cache(weights)
    monkeypatch.setenv("CUDA_CACHE_PATH", str(tmp_path / "mine"))
    use_jit_caches("", weights)
    assert os.environ["CUDA_CACHE_PATH"] == str(tmp_path / "mine")
    assert (tmp_path / "mine" / "a" / "entry").read_bytes() == b"sass"


def test_a_relative_driver_cache_in_the_environment_becomes_absolute(tmp_path, monkeypatch):
    """load_engine's steps and generate run from /: a relative folder would mean another one there."""
    weights = tmp_path / "model"
    shipped_cache(weights)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_CACHE_PATH", "relative-cache")
    use_jit_caches("", weights)
    assert os.environ["CUDA_CACHE_PATH"] == str(tmp_path / "relative-cache")
    assert (tmp_path / "relative-cache" / "a" / "entry").read_bytes() == b"sass"


def test_a_read_only_shipped_cache_gives_a_writable_copy(tmp_path):
    weights = tmp_path / "model"
    shipped = shipped_cache(weights)
    for path in sorted(shipped.rglob("*"), reverse=True) + [shipped]:
        path.chmod(stat.S_IRUSR | (stat.S_IXUSR if path.is_dir() else 0))
    try:
        use_jit_caches(str(tmp_path / "cache"), weights)
        copy = tmp_path / "cache" / DRIVER_CACHE
        # The owner's write bits (a non-root driver adds entries and rewrites its index; root would not notice).
        assert all(path.stat().st_mode & stat.S_IWUSR for path in [copy] + list(copy.rglob("*")))
        assert (copy / "a" / "entry").read_bytes() == b"sass"
    finally:
        for path in [shipped] + list(shipped.rglob("*")):
            path.chmod(stat.S_IRWXU)


def test_a_failed_copy_is_logged_and_the_start_goes_on(tmp_path, caplog):
    weights = tmp_path / "model"
    shipped_cache(weights)
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="sd_engine.jit_caches"):
        use_jit_caches(str(tmp_path / "cache"), weights)  # no exception: only the start's speed depends on it
    assert "could not copy the shipped one" in caplog.text


def test_setting_the_driver_cache_after_the_driver_started_is_logged(tmp_path, caplog, monkeypatch):
    """A started driver cannot be had on this CPU-only machine: the probe is replaced here (the real one is below)."""
    weights = tmp_path / "model"
    shipped_cache(weights)
    with caplog.at_level(logging.WARNING, logger="sd_engine.jit_caches"):
        use_jit_caches(str(tmp_path / "cache"), weights)
        assert "driver started before" not in caplog.text
        monkeypatch.setattr(jit_caches, "driver_started", lambda: True)
        use_jit_caches(str(tmp_path / "cache"), weights)
        assert caplog.text.count("driver started before") == 1
        assert f"CUDA_CACHE_PATH was set to {tmp_path / 'cache' / DRIVER_CACHE};" in caplog.text
        os.environ.pop("CUDA_CACHE_PATH")
        use_jit_caches("", weights)  # the temporary folder's setting too
        assert caplog.text.count("driver started before") == 2
        monkeypatch.setenv("CUDA_CACHE_PATH", str(tmp_path / "mine"))
        use_jit_caches("", weights)  # the environment's folder: set before the process, nothing to say
        assert caplog.text.count("driver started before") == 2


def test_a_zip_ships_its_cache_too_and_only_files_matching_the_manifest_are_used(tmp_path, caplog):
    """TorchServe extracts a MAR into a new folder at each start, and the handler extracts model.zip after the
    imports began: the cache is read from the zip ahead of that, checked file by file against the zip's manifest."""
    weights = tmp_path / "model"
    shipped_cache(weights)
    (weights / "model_index.json").write_text("{}")
    zip_weights(weights, tmp_path / "model.zip")  # with its manifest, as package_model.py ships it
    use_jit_caches("", tmp_path / "model.zip")
    copy = Path(os.environ.pop("CUDA_CACHE_PATH"))
    assert (copy / "index").read_bytes() == b"index" and (copy / "a" / "entry").read_bytes() == b"sass"
    with zipfile.ZipFile(tmp_path / "model.zip") as archive:  # the folder gets the zip's manifest, then a changed file
        (weights / MANIFEST).write_bytes(archive.read(MANIFEST))
    (weights / "compile-artifacts" / DRIVER_CACHE / "a" / "entry").write_bytes(b"tampered")
    with caplog.at_level(logging.WARNING, logger="sd_engine.jit_caches"):
        use_jit_caches("", weights)
    assert "does not match its sha256" in caplog.text and "compile-artifacts/cuda/a/entry" in caplog.text
    assert "CUDA_CACHE_PATH" not in os.environ  # nothing chosen, nothing copied
    with pytest.raises(ModelLoadError, match="compile-artifacts/cuda/a/entry"):
        prepare_weights(tmp_path, "model")  # the weights' own check fails the load, naming the same file


def rewritten_zip(source: Path, target: Path, change) -> Path:
    """A copy of the zip `source` with `change(name, data)` applied to each entry (None leaves it out)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            data = change(info.filename, old.read(info))
            if data is not None:
                new.writestr(info.filename, data)
    return target


def corrupt_stream(zip_path: Path, name: str) -> Path:
    """Flip bytes inside the deflated data of entry `name` (zlib's or the CRC's error on reading it)."""
    with zipfile.ZipFile(zip_path) as archive:
        info = archive.getinfo(name)
    raw = bytearray(zip_path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for k in range(start + 2, start + info.compress_size - 2):
        raw[k] ^= 0x5A
    zip_path.write_bytes(bytes(raw))
    return zip_path


ENTRY = f"compile-artifacts/{DRIVER_CACHE}/a/entry"


@pytest.mark.parametrize("case, expected", [
    ("changed", "does not match its sha256"), ("missing", "listed in sd-weights-manifest.json is missing"),
    ("extra", "is not listed"), ("corrupt", "could not be read"), ("bad manifest", "could not be read"),
])
def test_a_bad_shipped_cache_in_a_zip_is_not_used_and_the_start_goes_on(tmp_path, caplog, case, expected):
    weights = tmp_path / "model"
    shipped_cache(weights)
    (weights / "a.txt").write_text("text that deflates " * 50)  # a deflated entry to corrupt
    (weights / "compile-artifacts" / DRIVER_CACHE / "a" / "entry").write_bytes(b"sass " * 200)
    zip_weights(weights, tmp_path / "good.zip")
    bad = tmp_path / "model.zip"
    if case == "corrupt":
        shutil.copy(tmp_path / "good.zip", bad)
        corrupt_stream(bad, ENTRY)
    else:
        def change(name, data):
            if case == "changed" and name == ENTRY:
                return b"other code"
            if case == "missing" and name == ENTRY:
                return None
            if case == "bad manifest" and name == MANIFEST:
                return json.dumps({"sha256": "not a mapping"}).encode()
            return data
        rewritten_zip(tmp_path / "good.zip", bad, change)
        if case == "extra":
            with zipfile.ZipFile(bad, "a") as archive:
                archive.writestr(f"compile-artifacts/{DRIVER_CACHE}/b", b"unlisted")
    with caplog.at_level(logging.WARNING, logger="sd_engine.jit_caches"):
        use_jit_caches("", bad)  # no exception: only the start's speed depends on it
    assert "the shipped one is not used" in caplog.text and expected in caplog.text
    assert "CUDA_CACHE_PATH" not in os.environ


def test_checked_files_refuses_paths_out_of_its_folder_and_more_than_its_size(tmp_path):
    with zipfile.ZipFile(tmp_path / "model.zip", "w") as archive:
        archive.writestr(f"compile-artifacts/{DRIVER_CACHE}/../../escape", b"x")
    with pytest.raises(ModelLoadError, match="would be written outside"):
        loading.checked_files(tmp_path / "model.zip", f"compile-artifacts/{DRIVER_CACHE}")
    weights = tmp_path / "model"
    shipped_cache(weights)  # 9 bytes in two files, no manifest: read unchecked
    assert loading.checked_files(weights, f"compile-artifacts/{DRIVER_CACHE}") == {"a/entry": b"sass",
                                                                                   "index": b"index"}
    with pytest.raises(ModelLoadError, match="holds more than 8 bytes"):
        loading.checked_files(weights, f"compile-artifacts/{DRIVER_CACHE}", max_bytes=8)
    zip_weights(weights, tmp_path / "shipped.zip")  # with a manifest, which the same files match
    assert loading.checked_files(tmp_path / "shipped.zip", f"compile-artifacts/{DRIVER_CACHE}")["a/entry"] == b"sass"
    with pytest.raises(ModelLoadError, match="holds more than 8 bytes"):
        loading.checked_files(tmp_path / "shipped.zip", f"compile-artifacts/{DRIVER_CACHE}", max_bytes=8)
    unlisted = rewritten_zip(tmp_path / "shipped.zip", tmp_path / "no-manifest.zip",
                             lambda name, data: None if name == MANIFEST else data)
    assert loading.checked_files(unlisted, f"compile-artifacts/{DRIVER_CACHE}")["index"] == b"index"  # unchecked


def test_the_handler_sets_the_driver_cache_before_the_imports_beside_the_weights_check(tmp_path, tiny_model_dir,
                                                                                      monkeypatch):
    """The driver reads CUDA_CACHE_PATH when it starts, and the imports beside the weights' check (another thread)
    might start it: the shipped cache must be in place before they begin."""
    weights = tmp_path / "weights"
    shutil.copytree(tiny_model_dir, weights)
    shipped_cache(weights)
    model_dir = tmp_path / "model_dir"
    model_dir.mkdir()
    zip_weights(weights, model_dir / "model.zip")
    seen = []
    real_import = loading._import_pipeline

    def import_pipeline(folder):  # what the import thread finds when it starts
        cache = os.environ.get("CUDA_CACHE_PATH")
        seen.append(cache and (Path(cache) / "a" / "entry").read_bytes())
        real_import(folder)

    monkeypatch.setattr(loading, "_import_pipeline", import_pipeline)
    context = Context("stable-diffusion", str(model_dir), {"model": {}}, 1, None, "0.12.0",
                      model_yaml_config={"handler": cpu_handler_block()})
    handler = StableDiffusionHandler()
    handler.initialize(context)
    assert seen == [b"sass"] and handler.initialized


def test_driver_started_reads_the_driver_and_answers_none_without_one(monkeypatch):
    calls = []

    class Driver:  # libcuda's answer before cuInit, then after it
        def __init__(self, answer):
            self.answer = answer

        def cuDeviceGetCount(self, count):
            calls.append(count)
            return self.answer

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Driver(3))
    assert jit_caches.driver_started() is False
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Driver(0))
    assert jit_caches.driver_started() is True and len(calls) == 2

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert jit_caches.driver_started() is None


def test_fixed_cwd_runs_its_block_from_root_and_always_returns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with fixed_cwd():
        assert os.getcwd() == "/"
    assert os.getcwd() == str(tmp_path)
    with pytest.raises(RuntimeError):
        with fixed_cwd():
            raise RuntimeError("a failed warm-up")
    assert os.getcwd() == str(tmp_path)


def test_load_engine_from_a_relative_folder_leaves_the_working_directory_as_it_was(tiny_model_dir, cpu_config,
                                                                                  monkeypatch, tmp_path):
    """Its optimize and warm-up steps run from /; paths the caller gave relative still mean the same folders."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    relative = os.path.relpath(tiny_model_dir)
    seen = []
    real_warmup = Engine.warmup

    def warmup(self, *args, **kwargs):  # records where the real warm-up runs
        seen.append(os.getcwd())
        return real_warmup(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "warmup", warmup)
    engine = load_engine(cpu_config.replace(cache_dir="jit"), relative, torch.device("cpu"))
    assert seen == ["/"] and engine.timings["warmup_s"] > 0
    assert os.getcwd() == str(tmp_path / "here")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "here" / "jit" / "inductor")


def test_generate_runs_from_root_and_leaves_the_working_directory_as_it_was(tiny_engine, cpu_rules, monkeypatch,
                                                                           tmp_path):
    """Each call runs from /, as the warm-up did: a TorchServe worker starts in its model's folder, where the kernels
    the driver compiles at a new batch size would miss the shipped cache's entries (jit_caches module doc)."""
    from sd_engine.requests import parse_request

    monkeypatch.chdir(tmp_path)
    seen = []
    real_run_group = Engine._run_group

    def run_group(self, group):  # records where the real generation runs
        seen.append(os.getcwd())
        return real_run_group(self, group)

    monkeypatch.setattr(Engine, "_run_group", run_group)
    results = tiny_engine.generate([parse_request({"prompt": "a cat", "seed": 1, "num_inference_steps": 2},
                                                  cpu_rules)])
    assert seen == ["/"] and results[0].image.size == (cpu_rules.width, cpu_rules.height)
    assert os.getcwd() == str(tmp_path)


def test_fixed_cwd_runs_its_block_when_the_working_directory_is_removed(tmp_path, monkeypatch):
    """A worker's folder under /tmp may be cleaned while it serves: generate must still run (it enters fixed_cwd at
    each call), from /, before and after the folder goes."""
    gone = tmp_path / "model-folder"
    gone.mkdir()
    monkeypatch.chdir(gone)
    with fixed_cwd():
        gone.rmdir()  # removed while the block runs: not returned to
    assert os.getcwd() == "/"
    os.chdir(tmp_path)
    (tmp_path / "again").mkdir()
    os.chdir(tmp_path / "again")
    (tmp_path / "again").rmdir()  # removed before the block: os.getcwd() fails
    ran = []
    with fixed_cwd():
        ran.append(os.getcwd())
    assert ran == ["/"] and os.getcwd() == "/"
