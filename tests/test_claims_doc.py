"""docs/claims.md, the README and the sessions-API document name tests as their proof: every
test file and test they name exists, so a renamed or deleted test cannot leave a claim
pointing at nothing."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
DOCS = ("docs/claims.md", "README.md", "docs/sessions-api.md")


def _tests() -> dict[str, set[str]]:
    return {f.name: set(re.findall(r"^(?:async )?def (test_\w+)", f.read_text(), re.M))
            for f in (ROOT / "tests").glob("test_*.py")}


def _named(text: str) -> list[tuple[str | None, str | None]]:
    """(file, test) for every code span that names a test file, a test, or ``::test`` (whose
    file is the last one named before it on the same line)."""
    out: list[tuple[str | None, str | None]] = []
    for line in text.splitlines():
        current = None
        for span in re.findall(r"`([^`]+)`", line):
            if m := re.fullmatch(r"(?:tests/)?(test_\w+\.py)(?:::(test_\w+))?(?: \(.*\))?", span):
                current = m.group(1)
                out.append((current, m.group(2)))
            elif m := re.fullmatch(r"::(test_\w+)", span):
                out.append((current, m.group(1)))
            elif re.fullmatch(r"test_\w+", span):
                out.append((None, span))
    return out


def test_every_test_the_documents_name_exists() -> None:
    tests = _tests()
    every = set().union(*tests.values())
    missing = []
    for doc in DOCS:
        named = _named((ROOT / doc).read_text())
        assert named or doc != "docs/claims.md", "claims.md names no test: the parser is broken"
        for file, test in named:
            if file is not None and file not in tests:
                missing.append(f"{doc}: {file}")
            elif test is not None and test not in (tests[file] if file else every):
                missing.append(f"{doc}: {file or ''}::{test}")
    assert not missing, missing
