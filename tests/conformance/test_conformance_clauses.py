"""The suite against PROTOCOL.md's clause index: every clause is cited by a test,
every cited id exists, every test cites at least one clause."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from conftest import SPEC, clause_index

#: Tests of the suite itself, not of an implementation: they cite no clause.
SELF_TESTS = ("test_conformance_clauses", "test_conformance_broken")
#: Every other module of the suite (codec, hub, agent, fail-back hub and agent, ...).
MODULES = tuple(sorted(path.stem for path in Path(__file__).parent.glob("test_conformance_*.py")
                       if path.stem not in SELF_TESTS))


def _marks(obj) -> list:
    return list(getattr(obj, "pytestmark", []))


def cited() -> dict[str, set[str]]:
    """{test name: clause ids} over every test of the suite, whatever -k selected."""
    import importlib
    out = {}
    for name in MODULES:
        mod = sys.modules.get(name) or importlib.import_module(name)
        for attr, fn in vars(mod).items():
            if not attr.startswith("test_") or not callable(fn):
                continue
            ids = set()
            params_all_marked = None
            for mark in _marks(fn):
                if mark.name == "clause":
                    ids.update(mark.args)
                elif mark.name == "parametrize":
                    for param in mark.args[1]:
                        pmarks = [m for m in getattr(param, "marks", ()) if m.name == "clause"]
                        for m in pmarks:
                            ids.update(m.args)
                        marked = bool(pmarks)
                        params_all_marked = marked if params_all_marked is None else \
                            params_all_marked and marked
            out[f"{name}::{attr}"] = ids if (ids and params_all_marked is not False) or \
                any(m.name == "clause" for m in _marks(fn)) else set()
    return out


def test_clause_index_parses():
    index = clause_index()
    assert len(index) > 50, f"PROTOCOL.md clause index not found or short: {len(index)}"
    body = SPEC.read_text(encoding="utf-8").split("## Clause index")[0]
    in_text = set(re.findall(r"\[([A-Z]{2}-\d+)\]", body))
    assert in_text - set(index) == set(), "clause ids in the text but not in the index"
    assert set(index) - in_text == set(), "clause ids in the index but not in the text"


def test_every_clause_is_cited():
    """Every MUST clause of PROTOCOL.md (every id marks one) is checked by a test."""
    covered = set().union(*cited().values())
    missing = sorted(set(clause_index()) - covered, key=lambda c: (c[:2], int(c[3:])))
    assert missing == [], f"clauses no conformance test cites: {missing}"


def test_every_cited_clause_exists():
    index = clause_index()
    unknown = {t: sorted(ids - set(index)) for t, ids in cited().items() if ids - set(index)}
    assert unknown == {}, f"tests cite ids PROTOCOL.md does not define: {unknown}"


def test_every_test_cites_a_clause():
    bare = [t for t, ids in cited().items() if not ids]
    assert bare == [], f"tests without @pytest.mark.clause(...): {bare}"
