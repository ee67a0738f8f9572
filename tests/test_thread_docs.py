"""Every public method of the two daemons says which thread runs it.

The convention: a class with public methods ends its docstring with a
``Threads::`` block, one line per group of methods::

    Threads::

        submit, forget       repagent-recv
        run                  repagent-sync-N
        *                    any thread, with Stream.lock held

Each line is method names (comma-separated; ``*`` for every public method
not named on another line), two or more spaces, and the thread (a line
indented further goes on the one above): one of the
threads docs/DESIGN.md "Threads and locks" lists in its tables, ``main``,
or ``any thread``, with whatever else is worth saying (a lock held, a
caller).  The test fails on a public method no line covers, a name that is
not a public method of the class, and a line that names no thread, so the
blocks cannot drift from the code or from the thread tables.
"""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAEMONS = ("repagent.py", "rephub.py")
#: A line of a Threads:: block: names, a gap of two or more spaces, text.
LINE = re.compile(r"^(\*|[A-Za-z_][\w, ]*?)\s{2,}(\S.*)$")
ROW = re.compile(r"^\|\s*`([^`]+)`")


def thread_names() -> set[str]:
    """The first column of docs/DESIGN.md's thread tables, plus main."""
    with open(os.path.join(ROOT, "docs", "DESIGN.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("## Threads and locks")
    end = text.find("\n## ", start + 1)
    names = {"main"}
    for line in text[start:end if end > 0 else None].splitlines():
        match = ROW.match(line)
        if match:
            names.add(match.group(1))
    return names


def public_methods(cls: ast.ClassDef) -> list[str]:
    """Methods a caller outside the class may call (no properties)."""
    out = []
    for node in cls.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        if any(isinstance(d, ast.Name) and d.id == "property" or
               isinstance(d, ast.Attribute) and d.attr in ("setter", "deleter")
               for d in node.decorator_list):
            continue
        out.append(node.name)
    return out


def threads_block(doc: str) -> list[str] | None:
    """The lines of the docstring's Threads:: block, or None."""
    lines = doc.splitlines()
    try:
        start = lines.index("Threads::")
    except ValueError:
        return None
    block, base = [], None
    for line in lines[start + 1:]:
        if not line.strip():
            if block:
                break
            continue
        indent = len(line) - len(line.lstrip())
        if base is None:
            base = indent
        if indent < max(base, 1):
            break
        if indent > base and block:     # a continuation of the line above
            block[-1] += " " + line.strip()
        else:
            block.append(line.strip())
    return block


def problems_of(cls: ast.ClassDef, threads: set[str]) -> list[str]:
    """What is wrong with one class's Threads:: block (empty: nothing)."""
    methods = public_methods(cls)
    if not methods:
        return []
    block = threads_block(ast.get_docstring(cls) or "")
    if block is None:
        return [f"{cls.name}: no Threads:: block for {', '.join(methods)}"]
    problems, named, star = [], set(), False
    for line in block:
        match = LINE.match(line)
        if not match:
            problems.append(f"{cls.name}: Threads:: line {line!r} is not 'names  thread'")
            continue
        names, text = match.groups()
        if not (any(re.search(rf"(?<![\w-]){re.escape(t)}(?![\w-])", text) for t in threads)
                or "any thread" in text):
            problems.append(f"{cls.name}: {line!r} names no thread of docs/DESIGN.md")
        if names == "*":
            star = True
            continue
        for name in (n.strip() for n in names.split(",")):
            if name not in methods:
                problems.append(f"{cls.name}: Threads:: names {name!r}, "
                                "not a public method of the class")
            named.add(name)
    if not star:
        problems += [f"{cls.name}.{m}: no Threads:: line names it"
                     for m in methods if m not in named]
    return problems


@pytest.mark.parametrize("path", DAEMONS)
def test_every_public_method_names_its_thread(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    threads = thread_names()
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            problems += problems_of(node, threads)
    assert not problems, "\n".join(problems)


def test_the_check_catches_what_it_should():
    """Built at run time, so that this file holds no block itself."""
    threads = {"main", "repagent-recv"}

    def check(doc: str) -> list[str]:
        src = (f"class C:\n    {doc!r}\n    def run(self): pass\n"
               "    def stop(self): pass\n    def _own(self): pass\n")
        return problems_of(ast.parse(src).body[0], threads)

    good = "C.\n\nThreads::\n\n    run       repagent-recv\n    stop      main, at exit\n"
    assert check(good) == []
    assert check("C.\n\nThreads::\n\n    *    any thread\n") == []
    assert check("C.\n\nThreads::\n\n    run, stop    the loop of\n"
                 "                 repagent-recv\n") == []
    assert check("C.") == ["C: no Threads:: block for run, stop"]
    assert check("C.\n\nThreads::\n\n    run    repagent-recv\n") == [
        "C.stop: no Threads:: line names it"]
    assert check("C.\n\nThreads::\n\n    run, gone    main\n    stop  main\n") == [
        "C: Threads:: names 'gone', not a public method of the class"]
    assert check("C.\n\nThreads::\n\n    *    the recv loop\n") == [
        "C: '*    the recv loop' names no thread of docs/DESIGN.md"]
    assert "main" in thread_names() and len(thread_names()) > 10


def lock_orders_of_design() -> dict[str, list[str]]:
    """docs/DESIGN.md "Threads and locks": each daemon's lock order block."""
    with open(os.path.join(ROOT, "docs", "DESIGN.md"), encoding="utf-8") as f:
        text = f.read()
    out = {}
    for name in ("repagent", "rephub"):
        start = text.index(f"### {name}\n", text.index("## Threads and locks"))
        after = text.index("The lock order, outermost first", start)
        block = text[text.index("```\n", after) + 4:]
        out[name] = block[:block.index("```")].strip().splitlines()
    return out


@pytest.mark.parametrize("path", DAEMONS)
def test_each_daemon_states_the_lock_order_of_design(path):
    """The lock order at the top of each daemon is docs/DESIGN.md's, line for line."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    lines = doc[doc.index("Lock order, outermost first"):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith("::")) + 2
    block = []
    for line in lines[start:]:
        if not line.startswith("    "):
            break
        block.append(line.strip())
    assert block == lock_orders_of_design()[path[:-3]]
