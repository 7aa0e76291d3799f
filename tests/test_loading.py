"""Weights: model.zip extraction (once, never outside the model dir) and pipeline loading errors."""

import os
import stat
import zipfile

import pytest

from package_model import zip_weights
from sd_engine.errors import ModelLoadError
from sd_engine.loading import extract_zip, load_pipeline, prepare_weights


@pytest.fixture
def model_dir(tmp_path, tiny_model_dir):
    zip_weights(tiny_model_dir, tmp_path / "model.zip")
    return tmp_path


def test_zip_is_extracted_next_to_it_and_loads(model_dir):
    weights = prepare_weights(model_dir, "model.zip")
    assert weights == model_dir / "model"
    assert (weights / "model_index.json").is_file()
    assert load_pipeline(weights, None).unet is not None


def test_zip_is_extracted_once(model_dir):
    first = prepare_weights(model_dir, "model.zip")
    sentinel = first / "unet" / "config.json"
    mtime = sentinel.stat().st_mtime_ns
    os.utime(sentinel, ns=(mtime - 10**9, mtime - 10**9))
    second = prepare_weights(model_dir, "model.zip")
    assert second == first
    assert sentinel.stat().st_mtime_ns == mtime - 10**9  # not rewritten


def test_changed_zip_is_extracted_again(model_dir, tmp_path):
    prepare_weights(model_dir, "model.zip")
    with zipfile.ZipFile(model_dir / "model.zip", "a") as archive:
        archive.writestr("extra.txt", "new")
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
    with pytest.raises(ModelLoadError, match="not a valid zip"):
        prepare_weights(tmp_path, "model.zip")


def test_folder_without_pipeline_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load a diffusers pipeline"):
        load_pipeline(tmp_path, None)
