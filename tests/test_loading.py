"""Weights: model.zip extraction (once, never outside the model dir) and pipeline loading errors; the collector's
pause around a server's start."""

import gc
import os
import shutil
import stat
import weakref
import zipfile

import pytest

from package_model import zip_weights
from sd_engine.errors import ModelLoadError
from sd_engine.loading import collector_paused, extract_zip, load_pipeline, prepare_weights


@pytest.fixture
def model_dir(tmp_path, tiny_model_dir):
    zip_weights(tiny_model_dir, tmp_path / "model.zip")
    return tmp_path


def test_zip_is_extracted_next_to_it_and_loads(model_dir):
    weights = prepare_weights(model_dir, "model.zip")
    assert weights == model_dir / "model"
    assert (weights / "model_index.json").is_file()
    assert gc.isenabled()  # paused while the weights were checked, on again
    assert load_pipeline(weights, None).unet is not None


def test_zip_is_extracted_once(model_dir):
    first = prepare_weights(model_dir, "model.zip")
    sentinel = first / "unet" / "config.json"
    mtime = sentinel.stat().st_mtime_ns
    os.utime(sentinel, ns=(mtime - 10**9, mtime - 10**9))
    second = prepare_weights(model_dir, "model.zip")
    assert second == first
    assert sentinel.stat().st_mtime_ns == mtime - 10**9  # not rewritten


def test_changed_zip_is_extracted_again(model_dir, tmp_path, tiny_model_dir):
    prepare_weights(model_dir, "model.zip")
    changed = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed)
    (changed / "extra.txt").write_text("new")
    zip_weights(changed, model_dir / "model.zip")  # a newer package, with its own manifest
    assert (prepare_weights(model_dir, "model.zip") / "extra.txt").read_text() == "new"


def test_folder_is_used_as_is(tiny_model_dir):
    assert prepare_weights(tiny_model_dir.parent, tiny_model_dir.name) == tiny_model_dir.resolve()


def test_missing_weights_name_the_key(tmp_path):
    with pytest.raises(ModelLoadError, match="handler.weights: 'model.zip'"):
        prepare_weights(tmp_path, "model.zip")


def _zip_with(tmp_path, name, data=b"x", mode=None):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as archive:
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        archive.writestr(info, data)
    return path


@pytest.mark.parametrize("name", ["../escape.txt", "a/../../escape.txt", "/abs/escape.txt", "C:/escape.txt"])
def test_entries_outside_the_model_dir_are_refused(tmp_path, name):
    path = _zip_with(tmp_path, name)
    with pytest.raises(ModelLoadError, match="outside the model folder"):
        extract_zip(path, tmp_path / "model")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path.parent / "escape.txt").exists()
    assert not (tmp_path / "model").exists()


def test_symlinks_are_refused(tmp_path):
    path = _zip_with(tmp_path, "link", b"/etc/passwd", mode=stat.S_IFLNK | 0o777)
    with pytest.raises(ModelLoadError, match="symbolic link"):
        extract_zip(path, tmp_path / "model")


def test_absurd_uncompressed_size_is_refused(tmp_path):
    path = _zip_with(tmp_path, "big.bin", b"\0" * 4096)
    with pytest.raises(ModelLoadError, match="more than 1000 bytes"):
        extract_zip(path, tmp_path / "model", max_bytes=1000)


def test_not_a_zip_is_a_clear_error(tmp_path):
    (tmp_path / "model.zip").write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="could not be extracted: BadZipFile"):
        prepare_weights(tmp_path, "model.zip")
    assert not list(tmp_path.glob(".model*partial"))


def test_folder_without_pipeline_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load a diffusers pipeline"):
        load_pipeline(tmp_path, None)


def test_manifest_is_written_by_packaging_and_checked_at_extraction(tmp_path, tiny_model_dir):
    zip_weights(tiny_model_dir, tmp_path / "model.zip")
    with zipfile.ZipFile(tmp_path / "model.zip") as archive:
        assert "sd-weights-manifest.json" in archive.namelist()
    assert (prepare_weights(tmp_path, "model.zip") / "sd-weights-manifest.json").is_file()


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "unet" / "config.json").write_text("{}"), "'unet/config.json' does not match"),
    (lambda d: (d / "vae" / "config.json").unlink(), "'vae/config.json' listed in .* is missing"),
    (lambda d: (d / "stray.bin").write_bytes(b"x"), "'stray.bin' is not listed"),
])
def test_weights_that_do_not_match_the_manifest_are_refused(tmp_path, tiny_model_dir, damage, message):
    zip_weights(tiny_model_dir, tmp_path / "model.zip")
    folder = extract_zip(tmp_path / "model.zip", tmp_path / "model")
    damage(folder)
    with pytest.raises(ModelLoadError, match=message):
        prepare_weights(tmp_path, "model")  # a folder is checked at every load


def test_damaged_zip_is_refused_at_extraction(tmp_path, tiny_model_dir):
    zip_weights(tiny_model_dir, tmp_path / "good.zip")
    with zipfile.ZipFile(tmp_path / "good.zip") as good, zipfile.ZipFile(tmp_path / "model.zip", "w") as bad:
        for info in good.infolist():
            data = good.read(info)
            bad.writestr(info, b"{}" if info.filename == "unet/config.json" else data)
    with pytest.raises(ModelLoadError, match="does not match its sha256"):
        prepare_weights(tmp_path, "model.zip")
    assert not (tmp_path / "model").exists()


def test_a_start_runs_without_the_collector_and_collects_its_garbage_once_at_the_end():
    class Node:
        pass

    def cycle():  # garbage that only the cyclic collector frees
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():  # nested: the outer one decides
            garbage = cycle()
        assert not gc.isenabled()
        for _ in range(100_000):  # enough allocations to run the collector, were it on
            Node()
        assert garbage() is not None
    assert gc.isenabled()
    assert garbage() is None


def test_a_collector_found_off_stays_off():
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_collector_comes_back_when_a_start_fails():
    with pytest.raises(ModelLoadError):
        with collector_paused():
            raise ModelLoadError("the weights are not there")
    assert gc.isenabled()
