"""The README stays true: its performance table is generated from the committed result file, and every config key
and make target it documents exists."""

import json
import re
from dataclasses import fields
from pathlib import Path

from report import (DEFAULT_RESULT, END, FAMILY_END, FAMILY_RESULTS, FAMILY_START, SERVING_END, SERVING_RESULTS,
                    SERVING_START, START, family_table, serving_table, table)
from sd_engine.config import EngineConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_performance_table_is_generated_from_the_committed_result():
    block = README[README.index(START) + len(START):README.index(END)].strip()
    assert block == table(json.loads(DEFAULT_RESULT.read_text()))


def test_family_table_is_generated_from_the_committed_results():
    block = README[README.index(FAMILY_START) + len(FAMILY_START):README.index(FAMILY_END)].strip()
    assert block == family_table([(path.stem, json.loads(path.read_text())) for path in FAMILY_RESULTS])


def test_serving_table_is_generated_from_the_committed_serving_results():
    block = README[README.index(SERVING_START) + len(SERVING_START):README.index(SERVING_END)].strip()
    assert block == serving_table([json.loads(path.read_text()) for path in SERVING_RESULTS])


def test_every_handler_key_is_documented():
    for field in fields(EngineConfig):
        assert f"`{field.name}`" in README, field.name


def test_documented_make_targets_exist():
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    for target in ("install", "install-kserve", "model", "package", "serve", "serve-kserve", "query", "stop", "demo",
                   "test", "clean", "help"):
        assert target in targets, target
        assert f"`{target}`" in README or f"make {target}" in README, target


def test_every_committed_image_and_result_the_readme_names_exists():
    for name in set(re.findall(r"bench/results/([\w.-]+\.(?:json|png|jpg))", README)):
        assert (ROOT / "bench" / "results" / name).is_file(), name
