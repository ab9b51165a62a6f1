"""The result tables in docs/ are what benchmarks/docs_tables.py generates from the committed results."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))


def docs_tables():
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "benchmarks" / "docs_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_generated_tables_equal_the_committed_results(doc):
    tables = docs_tables()
    for name, body in tables.regions(doc.read_text()).items():
        assert body == tables.render(name), f"{doc.name}: table {name!r} is stale: run python benchmarks/docs_tables.py"


def test_every_table_appears_once_in_the_docs():
    tables = docs_tables()
    placed = [name for doc in DOCS for name in tables.regions(doc.read_text())]
    assert sorted(placed) == sorted(tables.TABLES)


def test_a_changed_result_or_an_unknown_table_is_caught(monkeypatch):
    tables = docs_tables()
    text = "<!-- generated: end-to-end-olmoe-2-layers -->\n<!-- end generated -->\n"
    fresh = tables.regenerate(text)
    real = tables._json

    def slower_onnx_runtime(relative):
        data = real(relative)
        for result in data.get("results", []):
            if result["runtime"].startswith("ONNX Runtime") and "median_ms" in result:
                result["median_ms"] *= 2
        return data

    monkeypatch.setattr(tables, "_json", slower_onnx_runtime)
    assert tables.regenerate(text) != fresh
    with pytest.raises(KeyError, match="unknown generated table 'nope'"):
        tables.regenerate("<!-- generated: nope -->\n<!-- end generated -->")


def anchors(markdown: Path) -> set[str]:
    """GitHub's anchors for a file's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```", "", markdown.read_text(), flags=re.M | re.S)  # no comments in code blocks
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_relative_links_in_the_docs_resolve():
    for doc in [ROOT / "README.md", ROOT / "DESIGN.md", ROOT / "benchmarks" / "README.md", *DOCS]:
        for target, anchor in re.findall(r"\]\(([^)#\s]+)(?:#([^)]*))?\)", doc.read_text()):
            if "://" in target:
                continue
            path = doc.parent / target
            assert path.exists(), f"{doc.relative_to(ROOT)}: link to {target} does not resolve"
            if anchor:
                assert anchor in anchors(path), f"{doc.relative_to(ROOT)}: no heading #{anchor} in {target}"
