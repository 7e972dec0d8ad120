"""Docstrings point to documentation that is in the repository: ``docs/<file>.md`` "Section" names a heading of that
file, and nothing points outside the repository to the design notes it was built from."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rl", "rollout", "rewards", "trainers")
# ``docs/algorithms.md`` "GiGPO", or several: "SAPO", "CISPO" / "DAPO" and "Overlong penalty" (a name may start on
# the next line)
REFERENCE = re.compile(r"docs/([\w-]+\.md)`{0,2}\s+(\"[^\"\n]+\"(?:(?:,\s*|\s+and\s+)\"[^\"\n]+\")*)")


def _sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def _headings(doc: Path) -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^#+\s+(.+)$", doc.read_text(), flags=re.M)}


def test_no_source_points_outside_the_repository():
    bad = [str(p.relative_to(ROOT)) for p in _sources() if "shared/reference" in p.read_text()]
    assert not bad, f"these files point to design notes that are not in the repository: {bad}"


def test_section_references_name_existing_headings():
    refs, missing = 0, []
    for path in [*_sources(), *sorted((ROOT / "tests").rglob("*.py"))]:
        for doc, sections in REFERENCE.findall(path.read_text()):
            target = ROOT / "docs" / doc
            for section in re.findall(r'"([^"]+)"', sections):
                refs += 1
                if not target.exists() or section not in _headings(target):
                    missing.append(f"{path.relative_to(ROOT)}: docs/{doc} \"{section}\"")
    assert refs > 20  # the pattern still matches how docstrings cite sections
    assert not missing, missing
