"""The docs are true of the code: the reference pages are what docs/generate.py makes of it now, every
relative link in the README and docs/ points at a file (and heading) that exists, and the README stays a page."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reference_pages_are_generated_from_the_code_as_it_is():
    """Checked to fail: with a config field's description edited, config.md differs."""
    stale = [
        str(p.relative_to(ROOT)) for p, text in _generator().pages().items() if not p.exists() or p.read_text() != text
    ]
    assert not stale, f"stale reference pages {stale}: run `make docs` (python docs/generate.py)"


def test_every_column_and_kind_is_described():
    from dpo_ray.data import schema

    columns = {f.name for s in schema.KINDS.values() for f in s}
    assert set(schema.KIND_DOCS) == set(schema.KINDS)
    assert columns == set(schema.COLUMN_DOCS), columns ^ set(schema.COLUMN_DOCS)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def test_every_relative_link_resolves():
    broken = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_is_a_page_and_the_design_document_is_the_repositorys_own():
    """The design document cited is docs/explanation/architecture.md, not the starting design outside the
    repository (ARCHITECTURE.md)."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    sources = [*(ROOT / "dpo_ray").rglob("*.py"), *(ROOT / "pipeline").rglob("*.py"), *DOCS]
    outside = [str(p.relative_to(ROOT)) for p in sources if "ARCHITECTURE.md" in p.read_text()]
    assert not outside, outside
