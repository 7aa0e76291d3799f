"""The documentation stays true: the README is a short front door (under 200 lines) whose links all resolve, its
tables are generated from the committed result files, and every config key and make target is documented."""

import json
import re
from dataclasses import fields
from pathlib import Path

from report import (DEFAULT_RESULT, END, FAMILY_END, FAMILY_RESULTS, FAMILY_START, SERVING_END, SERVING_RESULTS,
                    SERVING_START, START, family_table, serving_table, table)
from sd_engine.config import EngineConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PAGES = {path: path.read_text() for path in [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))}
DOCS = "\n".join(PAGES.values())


def block(start: str, end: str) -> str:
    return DOCS[DOCS.index(start) + len(start):DOCS.index(end)].strip()


def test_performance_table_is_generated_from_the_committed_result():
    assert block(START, END) == table(json.loads(DEFAULT_RESULT.read_text()))


def test_family_table_is_generated_from_the_committed_results():
    assert block(FAMILY_START, FAMILY_END) == family_table([(path.stem, json.loads(path.read_text()))
                                                             for path in FAMILY_RESULTS])


def test_serving_table_is_generated_from_the_committed_serving_results():
    assert block(SERVING_START, SERVING_END) == serving_table([json.loads(path.read_text())
                                                               for path in SERVING_RESULTS])


def test_every_handler_key_is_documented():
    for field in fields(EngineConfig):
        assert f"`{field.name}`" in DOCS, field.name


def test_documented_make_targets_exist():
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    for target in ("install", "install-kserve", "model", "package", "serve", "serve-kserve", "query", "playground",
                   "stop", "demo", "test", "clean", "help"):
        assert target in targets, target
        assert f"`{target}`" in README or f"make {target}" in README, target


def test_every_committed_image_and_result_the_docs_name_exists():
    for name in set(re.findall(r"bench/results/([\w.-]+\.(?:json|png|jpg))", DOCS)):
        assert (ROOT / "bench" / "results" / name).is_file(), name


def test_the_readme_is_a_short_front_door_and_every_link_resolves():
    assert len(README.splitlines()) < 200
    slugs = {path: {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                    for line in page.splitlines() if line.startswith("#")} for path, page in PAGES.items()}
    for path, page in PAGES.items():
        for target, anchor in re.findall(r"\]\(((?!https?:)[^)#\s]*)(?:#([^)\s]+))?\)", page):
            linked = (path.parent / target).resolve() if target else path
            assert linked.exists(), (path.name, target)
            if anchor:
                assert anchor in slugs.get(linked, set()), (path.name, target, anchor)
