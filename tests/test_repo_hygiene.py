"""The repository explains itself: no citations of notes users do not have, no work-period names,
no broken relative links in the docs, and the contract page lists what the code offers."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

# Files exempt from the wording check, each with the reason (none today).
EXEMPT_FROM_WORDING: dict[str, str] = {}

OUTSIDE_NOTES = re.compile(r"DESIGN(\.md|\s*§)")
WORK_PERIOD = re.compile(r"session ?[0-9]", re.IGNORECASE)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [p for p in out.decode().split("\0") if p]


def _text(rel: str) -> str | None:
    path = ROOT / rel
    if not path.is_file():
        return None  # deleted in the working tree but still in the index
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None  # binary (figures, compressed tokenizers)


def wording_problems(rel: str, text: str) -> list[str]:
    """Lines of ``text`` that cite an outside design file or name a numbered work period."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for pattern, what in ((OUTSIDE_NOTES, "cites a design file users do not have"),
                              (WORK_PERIOD, "names a work period instead of a date, hardware and content")):
            m = pattern.search(line)
            if m:
                found.append(f"{rel}:{n}: {what}: {m.group(0)!r}")
    return found


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"[`*_]", "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", md.read_text(encoding="utf-8"), re.M)}


def link_problems(rel: str, text: str) -> list[str]:
    """Relative links in markdown ``text`` (at ``rel``) whose file, or heading anchor, is missing."""
    base = (ROOT / rel).parent
    found, in_code = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for m in LINK.finditer(line):
            target = m.group(1) or m.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # http(s):, mailto: and in-page anchors
            path, _, anchor = target.partition("#")
            dest = (base / path).resolve()
            if not dest.exists():
                found.append(f"{rel}:{n}: link to missing {target!r}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                found.append(f"{rel}:{n}: no heading for anchor {target!r}")
    return found


def test_no_outside_citations_or_work_periods():
    problems = []
    for rel in _tracked():
        if WORK_PERIOD.search(rel):
            problems.append(f"{rel}: the file name names a work period; name it by date, hardware and content")
        if rel == THIS or rel in EXEMPT_FROM_WORDING:
            continue
        text = _text(rel)
        if text is not None:
            problems += wording_problems(rel, text)
    assert not problems, "\n".join(problems)


def test_markdown_links_resolve():
    docs = [r for r in _tracked() if r.endswith(".md")]
    assert "README.md" in docs and "docs/contracts.md" in docs and "benchmarks/RESULTS.md" in docs
    problems = []
    for rel in docs:
        text = _text(rel)
        if text is not None:
            problems += link_problems(rel, text)
    assert not problems, "\n".join(problems)


def test_checks_catch_what_they_look_for(tmp_path):
    """The two checks are not vacuous: each flags a planted mistake and passes the fixed line."""
    assert wording_problems("x.md", "as measured in Session 3 on the H200")
    assert wording_problems("x.py", "# see DESIGN.md §5")
    assert not wording_problems("x.md", "as measured on the H200 on 2026-11-30 (tuned kernels)")
    assert link_problems("README.md", "[gone](benchmarks/results/no-such-file.md)")
    assert link_problems("README.md", "[bad anchor](deltanet/ops/delta_rule/README.md#no-such-heading)")
    assert not link_problems("README.md", "[ok](deltanet/ops/delta_rule/README.md#6-numerics) and "
                                          "`[not a link](nowhere.md)` and [web](https://example.org)")


def test_every_result_file_is_listed_in_results_page():
    """benchmarks/RESULTS.md names every dated result page (current or historical)."""
    page = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    pages = sorted(p.name for p in (ROOT / "benchmarks" / "results").glob("*.md"))
    missing = [name for name in pages if f"results/{name}" not in page]
    assert not missing, f"benchmarks/RESULTS.md does not list: {missing}"


def test_contracts_page_lists_layer_types_presets_backends_and_commands():
    from deltanet.cli import BENCHES, EVAL_TASKS
    from deltanet.models import LAYER_TYPES, PRESETS
    from deltanet.ops import BACKENDS

    page = (ROOT / "docs" / "contracts.md").read_text(encoding="utf-8")
    names = [f"`{t}`" for t in LAYER_TYPES] + [f"`{p}`" for p in PRESETS] + [f'"{b}"' for b in BACKENDS]
    names += [f"`deltanet eval {t}`" for t in EVAL_TASKS] + [f"`deltanet bench {b}`" for b in BENCHES]
    names += ["`deltanet train`", "`deltanet data prepare`", "`deltanet generate`"]
    missing = [n for n in names if n not in page]
    assert not missing, f"docs/contracts.md does not mention: {missing}"
