"""The docs stay true: their links resolve, the results they cite exist and are all cited, their commands parse.

README.md and docs/*.md are the pages a user reads; benchmarks/README.md indexes the scripts. Checked here, fast
and without the network:

- every relative link (and its ``#anchor``) in those pages points at a file (and a heading) that exists;
- every ``benchmarks/results/NAME.ext`` (or ``NAME/``) they mention exists, and every file or folder at the top of
  ``benchmarks/results/`` is cited by README.md or a page of docs/ (a ``NAME.json`` is cited with its ``NAME.md``:
  the table and its raw numbers are written together, by the command at the top of the table);
- every ``--flag`` in their commands (``bash`` blocks, and inline code that starts a known command) is accepted by
  the command it follows: ``repblend-distill`` / ``examples/distill.py``, ``repblend-evaluate`` /
  ``examples/evaluate.py`` and the scripts of ``benchmarks/``. Their parsers are built by running each command's
  ``main`` up to its first parse, which is stopped there: nothing else of a command runs;
- the README keeps its two commands (set-up + main job, set-up + tests), and CI runs the second.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
# The pages that cite results. docs/example_card.md is not one: it is a card as the Hub shows it (its links point
# into the pushed dataset repo), kept as an example of the artefact.
DOC_PAGES = [README, *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "example_card.md")]
INDEX_PAGES = [ROOT / "benchmarks" / "README.md"]
ALL_PAGES = DOC_PAGES + INDEX_PAGES

FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.S | re.M)  # list items indent theirs
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")
RESULTS_PATH = re.compile(r"benchmarks/results/([\w.\-/]*[\w/])")
INLINE_CODE = re.compile(r"`([^`]+)`")

DISTILL, EVALUATE = "repblend-distill", "repblend-evaluate"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if ROOT in path.parents else path.name


def _prose(text: str) -> str:
    """The page without its fenced code blocks (links and inline code live outside them)."""
    return FENCE.sub("", text)


# --------------------------------------------------------------------------------------------
# Links and anchors
# --------------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    slugs: dict[str, int] = {}
    found = set()
    for line in _prose(page.read_text()).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            slug = _slug(match.group(1))
            n = slugs.get(slug, 0)
            slugs[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def _links(page: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(_prose(page.read_text()))]


def broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` whose file, or whose ``#anchor`` in a Markdown file, does not exist."""
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {_rel(resolved)})")
    return broken


# --------------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------------


def results_mentions(page: Path) -> set[str]:
    """The ``benchmarks/results/`` entries ``page`` names: link targets and ``benchmarks/results/...`` paths, as
    paths relative to ``benchmarks/results/``. Paths without an extension are output prefixes of commands
    (``--output benchmarks/results/NAME``), not files, and are left out."""
    text = page.read_text()
    names = set()
    for target in _links(page):
        resolved = (page.parent / target.partition("#")[0]).resolve()
        if RESULTS in resolved.parents:
            names.add(str(resolved.relative_to(RESULTS)) + ("/" if target.endswith("/") else ""))
    for match in RESULTS_PATH.finditer(text):
        name = match.group(1)
        if name.endswith("/") or "." in name.rsplit("/", 1)[-1]:
            names.add(name)
    return names


def missing_results(page: Path) -> list[str]:
    return sorted(name for name in results_mentions(page) if not (RESULTS / name).exists())


def uncited_results() -> list[str]:
    """Top-level entries of ``benchmarks/results/`` that neither README.md nor a page of docs/ cites."""
    cited = {name.rstrip("/").split("/")[0] for page in DOC_PAGES for name in results_mentions(page)}
    uncited = []
    for entry in sorted(RESULTS.iterdir()):
        name = entry.name
        if name in cited or (entry.suffix == ".json" and f"{entry.stem}.md" in cited):
            continue
        uncited.append(name)
    return uncited


# --------------------------------------------------------------------------------------------
# Commands and their flags
# --------------------------------------------------------------------------------------------


class _Parsed(Exception):
    """Raised by the first parse of a command's arguments: the parser, and whether it passes unknown flags on."""

    def __init__(self, parser: argparse.ArgumentParser, passes_unknown: bool):
        super().__init__()
        self.parser, self.passes_unknown = parser, passes_unknown


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for option in parser._option_string_actions if option.startswith("--")}


_ACCEPTED: dict[str, tuple[set[str], bool]] = {}


def accepted_flags(program: str) -> tuple[set[str], bool]:
    """``(flags, passes_unknown)`` of ``program`` (``repblend-distill``, ``repblend-evaluate`` or a script of
    benchmarks/). A script that passes unknown flags on (``parse_known_args``) hands them to
    ``examples/distill.py``."""
    if program in _ACCEPTED:
        return _ACCEPTED[program]
    from transformers import HfArgumentParser

    def stop_hf(self, *args, **kwargs):
        raise _Parsed(self, False)

    def stop(passes_unknown):
        def parse(self, *args, **kwargs):
            raise _Parsed(self, passes_unknown)
        return parse

    with pytest.MonkeyPatch.context() as patch:
        if program in (DISTILL, EVALUATE):
            patch.setattr(HfArgumentParser, "parse_args_into_dataclasses", stop_hf)
            module = "distill" if program == DISTILL else "evaluate"
            main = __import__(f"repblend_hf.commands.{module}", fromlist=["main"]).main
            extra = {"--config"} if program == DISTILL else set()  # parse_with_config reads it before the parser
            try:
                main([])
            except _Parsed as parsed:
                result = (_options(parsed.parser) | extra, False)
            else:
                raise AssertionError(f"{program}'s main did not parse its arguments")
        else:
            script = ROOT / "benchmarks" / program
            patch.setattr(argparse.ArgumentParser, "parse_args", stop(False))
            patch.setattr(argparse.ArgumentParser, "parse_known_args", stop(True))
            patch.setattr(sys, "argv", [str(script)])
            patch.syspath_prepend(str(script.parent))
            try:
                runpy.run_path(str(script), run_name="__main__")
            except _Parsed as parsed:
                result = (_options(parsed.parser), parsed.passes_unknown)
            else:
                raise AssertionError(f"benchmarks/{program} did not parse its arguments")
    _ACCEPTED[program] = result
    return result


def _program(token: str, following: str | None) -> str | None:
    """The command a token starts, if any."""
    if token == "-m" and following in ("repblend_hf.commands.distill", "repblend_hf.commands.evaluate"):
        return DISTILL if following.endswith("distill") else EVALUATE
    if token == DISTILL or token.endswith("examples/distill.py"):
        return DISTILL
    if token == EVALUATE or token.endswith("examples/evaluate.py"):
        return EVALUATE
    match = re.fullmatch(r"(?:.*/)?benchmarks/(\w+\.py)|([a-z]\w*\.py)", token)  # or named alone
    if match and (ROOT / "benchmarks" / (match.group(1) or match.group(2))).is_file():
        return match.group(1) or match.group(2)
    if token.endswith("benchmarks/gpu_check.sh"):  # its extra arguments are speed.py's
        return "speed.py"
    return None


def commands(text: str) -> list[tuple[str, list[str]]]:
    """``(program, flags)`` of every known command in ``text`` (a shell snippet): the ``--flags`` after it."""
    text = re.sub(r"\\\n", " ", text)
    found = []
    for line in text.splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote in a snippet of prose
            tokens = line.split()
        program = None
        for i, token in enumerate(tokens):
            if token in ("&&", "||", ";", "|"):
                program = None
                continue
            started = _program(token, tokens[i + 1] if i + 1 < len(tokens) else None)
            if started is not None:
                program = started
                found.append((program, []))
            elif program is not None and token.startswith("--") and token != "--":
                found[-1][1].append(token.split("=")[0])
    return found


def page_commands(page: Path) -> list[tuple[str, list[str]]]:
    """The commands of ``page``: its ``bash`` blocks, and inline code that starts with a known command."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        if match.group(1) in ("bash", "sh", "shell", ""):
            found += commands(match.group(2))
    for match in INLINE_CODE.finditer(_prose(text)):
        found += commands(" ".join(match.group(1).split()))
    return found


def unknown_flags(page: Path) -> list[str]:
    wrong = []
    for program, flags in page_commands(page):
        if not flags:
            continue
        known, passes_unknown = accepted_flags(program)
        if passes_unknown:
            known = known | accepted_flags(DISTILL)[0]
        wrong += [f"{program}: {flag}" for flag in flags if flag not in known]
    return wrong


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", ALL_PAGES, ids=_rel)
def test_every_relative_link_and_anchor_exists(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", ALL_PAGES, ids=_rel)
def test_every_cited_results_file_exists(page):
    assert missing_results(page) == []


def test_every_results_file_is_cited_by_a_doc():
    """benchmarks/results/ holds what the docs cite; a superseded file leaves the tree (git keeps it), and a doc
    names it with the commit that has it."""
    assert uncited_results() == []


@pytest.mark.parametrize("page", ALL_PAGES, ids=_rel)
def test_every_flag_in_a_command_is_accepted_by_its_command(page):
    assert unknown_flags(page) == []


def test_the_pages_have_commands_to_check():
    """The flag check has something to bite on: the README runs the commands, the docs the benchmarks."""
    programs = {program for page in DOC_PAGES for program, _ in page_commands(page)}
    assert {DISTILL, EVALUATE, "speed.py", "methods.py", "sweep.py"} <= programs


def test_readme_keeps_its_two_commands_and_ci_runs_the_test_command():
    blocks = [m.group(2).strip() for m in FENCE.finditer(README.read_text()) if m.group(1) == "bash"]
    assert blocks[:2] == ["bash scripts/setup.sh && .venv/bin/accelerate launch examples/distill.py",
                          "bash scripts/setup.sh && .venv/bin/python -m pytest -q"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"{blocks[1]} " in ci or ci.rstrip().endswith(blocks[1])
    lines = README.read_text().splitlines()
    assert len(lines) <= 250
    assert lines.index("## Use it") < 100


def test_the_checks_catch_a_missing_file_a_renamed_flag_and_a_broken_anchor(tmp_path, monkeypatch):
    """The helpers above fail on what they should: a page citing a results file that is not there, a flag no
    command accepts, a link to a heading that is not there, and a results file no page cites."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee [`gone.md`](../benchmarks/results/gone.md) and `benchmarks/results/gone.json`, "
                    "[a heading](#no-such-heading), [title](#title).\n\n"
                    "```bash\naccelerate launch examples/distill.py --max_steps 2 --max_stepz 3\n"
                    ".venv/bin/python benchmarks/speed.py --threads 2 --thread 2\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "kept.md").write_text("x")
    (tmp_path / "results" / "kept.json").write_text("{}")
    (tmp_path / "results" / "orphan.png").write_text("x")
    page.write_text(page.read_text().replace("../benchmarks/results/", "results/"))
    assert missing_results(page) == ["gone.json", "gone.md"]
    assert broken_links(page) == ["results/gone.md (no such file)",
                                  "#no-such-heading (no heading #no-such-heading in page.md)"]
    assert unknown_flags(page) == ["repblend-distill: --max_stepz", "speed.py: --thread"]
    cites = tmp_path / "cites.md"
    cites.write_text("[`kept.md`](results/kept.md)")
    monkeypatch.setattr(sys.modules[__name__], "DOC_PAGES", [cites])
    assert uncited_results() == ["orphan.png"]
