"""Every document the code and the docs cite exists, and so does what they
cite in it.

The project's documents are Markdown files named in capitals (the README,
the protocol spec, the files under docs/ and tests/vectors/).  Every tracked
``*.py`` and ``*.md`` file is scanned for references to them:

* a path whose file name is in capitals and ends in ``.md``, optionally
  with directories before it, must name a file that exists, relative to the
  repository root or to the citing file's directory (Markdown links);
* such a reference followed by a double-quoted text (optionally after a
  comma; the text may run on over one line break and a comment marker)
  names a section: a heading of that document must start with the text
  (case, leading ``#`` marks, section numbers and backquotes aside);
* such a reference followed by ``rule N`` names a rule: the document must
  have a section whose heading speaks of rules, with an item numbered N;
* a Markdown link to such a file with an ``#anchor`` must name the anchor
  GitHub derives from one of the document's headings.

Not references: URLs, the tail of a longer path (a path is read whole,
never from one of its inner directories), globs (``*.md``), lower-case file
names (another project's documents, generated reports), and a file name
that is a whole quoted string literal in code (a path the program opens).
The self-test at the end builds its examples at run time, so that this file
cites nothing itself.
"""

from __future__ import annotations

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: A document reference: optional directories, then a capitalised name.
#: Not preceded by anything that would make it the tail of a longer path,
#: a URL or a glob.
REFERENCE = re.compile(r"(?<![\w./*<>{}:\\-])"
                       r"((?:[\w.-]+/)*[A-Z][A-Z0-9_-]*\.md)(?![\w/])")
#: What may stand between a reference and its quoted section, or inside the
#: section's text where it breaks: a line break and a comment marker
#: (``#``, or ``#:`` before a documented constant).
BREAK = r"[ \t]*\n[ \t]*(?:#:?[ \t]*)?"
SECTION = re.compile(r',?(?:[ \t]+|' + BREAK + r')'
                     r'"([^"\n]+(?:' + BREAK + r'[^"\n]+)?)"')
RULE = re.compile(r"(?:[ \t]+|" + BREAK + r")rule(?:[ \t]+|" + BREAK
                  + r")(\d+)\b")
ANCHOR = re.compile(r"#([\w-]+)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
FENCE = re.compile(r"^[ \t]*(```|~~~)")
NUMBERING = re.compile(r"^(?:\d+(?:\.\d+)*[.)]?[ \t]+)")


def tracked_files() -> list[str]:
    """The repository's *.py and *.md files, relative to ROOT."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", "*.py", "*.md"], cwd=ROOT,
            capture_output=True, check=True).stdout
        return sorted(f for f in out.decode().split("\0") if f)
    except (OSError, subprocess.CalledProcessError):   # not a git checkout
        found = []
        for top, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs
                       if not d.startswith(".") and d != "__pycache__"]
            found += [os.path.relpath(os.path.join(top, f), ROOT)
                      for f in files if f.endswith((".py", ".md"))]
        return sorted(found)


def headings(path: str) -> list[tuple[int, str, int]]:
    """(level, text, line index) of each Markdown heading outside code
    fences."""
    out, fenced = [], False
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f.read().splitlines()):
            if FENCE.match(line):
                fenced = not fenced
                continue
            m = None if fenced else HEADING.match(line)
            if m:
                out.append((len(m.group(1)), m.group(2), i))
    return out


def normalise(text: str) -> str:
    text = " ".join(text.replace("`", "").split())
    return NUMBERING.sub("", text).casefold()


def slug(text: str) -> str:
    """The anchor GitHub gives a heading (before de-duplication)."""
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, text, _ in headings(path):
        base = slug(text)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def has_rule(path: str, number: str) -> bool:
    """Has the document a section about rules with an item ``number``?"""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    marks = headings(path)
    item = re.compile(rf"^[ \t]*{number}\.[ \t]")
    for k, (level, text, start) in enumerate(marks):
        if "rule" not in text.casefold():
            continue
        end = next((i for lv, _, i in marks[k + 1:] if lv <= level),
                   len(lines))
        if any(item.match(line) for line in lines[start + 1:end]):
            return True
    return False


def resolve(root: str, citing: str, ref: str) -> str | None:
    """The file ``ref`` names from ``citing``, or None."""
    for base in (root, os.path.dirname(os.path.join(root, citing))):
        path = os.path.normpath(os.path.join(base, ref))
        if os.path.isfile(path):
            return path
    return None


def is_path_literal(text: str, start: int, end: int) -> bool:
    """The name is a whole string literal, in double or single quotes."""
    before, after = text[start - 1:start], text[end:end + 1]
    return before in ("'", '"') and after == before


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def check_file(rel: str, root: str = ROOT) -> list[str]:
    """The bad references in one file, each as 'file:line: what'."""
    with open(os.path.join(root, rel), encoding="utf-8",
              errors="replace") as f:
        text = f.read()
    problems = []
    for m in REFERENCE.finditer(text):
        ref = m.group(1)
        if is_path_literal(text, m.start(1), m.end(1)):
            continue
        where = f"{rel}:{line_of(text, m.start(1))}"
        path = resolve(root, rel, ref)
        if path is None:
            problems.append(f"{where}: {ref} does not exist")
            continue
        shown = os.path.relpath(path, root)
        rest = text[m.end(1):]
        section = SECTION.match(rest)
        if section:
            cited = re.sub(BREAK, " ", section.group(1))
            wanted = normalise(cited)
            if not any(normalise(h).startswith(wanted)
                       for _, h, _ in headings(path)):
                problems.append(f'{where}: {ref} "{cited}": no such heading '
                                f"in {shown}")
        rule = RULE.match(rest)
        if rule and not has_rule(path, rule.group(1)):
            problems.append(f"{where}: {ref} rule {rule.group(1)}: no "
                            f"numbered rule {rule.group(1)} in {shown}")
        anchor = ANCHOR.match(rest)
        if anchor and anchor.group(1) not in anchors(path):
            problems.append(f"{where}: {ref}#{anchor.group(1)}: no heading "
                            f"with that anchor in {shown}")
    return problems


def test_every_cited_document_section_and_rule_exists():
    files = tracked_files()
    assert files, "no files found to check"
    problems = [p for rel in files for p in check_file(rel)]
    assert not problems, "bad document references:\n" + "\n".join(problems)


def test_the_checker_catches_a_bad_reference(tmp_path):
    """The checks have teeth: a missing file, section, rule and anchor are
    named, and URLs, globs and path literals are left alone."""
    md = ".md"   # joined at run time: this file itself cites no document
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / ("GOOD" + md)).write_text(
        "# Good\n\n## The rules\n\n1. **One.** x\n\n"
        "## Data flows\n\n```\n# Not a heading\n```\n", encoding="utf-8")
    good, missing = "docs/GOOD" + md, "docs/MISSING" + md
    (tmp_path / "cite.py").write_text(
        f'# {good} "Data flows", {good} rule 1, [a]({good}#the-rules)\n'
        f"# {missing}\n"
        f'# {good} "No such section"\n'
        f"# {good} rule 2\n"
        f'# {good} "Not a\n# heading"\n'
        f"# [b]({good}#nowhere)\n"
        f'OPEN = "docs/ABSENT{md}"  # a path in code; a URL and a glob:\n'
        f"# https://example.org/x/NOTHERE{md} docs/*{md}\n",
        encoding="utf-8")
    problems = check_file("cite.py", str(tmp_path))
    lines = [p.split(":")[1] for p in problems]
    assert lines == ["2", "3", "4", "5", "7"], problems
    assert missing + " does not exist" in problems[0]
    assert "No such section" in problems[1]
    assert "rule 2" in problems[2]
    assert '"Not a heading"' in problems[3]
    assert "#nowhere" in problems[4]
