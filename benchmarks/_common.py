"""The tail every benchmark shares: the JSON record, the Markdown report, its header and table lines, a timer.

Each script in ``benchmarks/`` measures something different but ends the same way: make the results folder,
write ``<output>.json`` (indented, newline-terminated), write ``<output>.md`` (a title, the command that made
it, tables) and print the report. Those steps live here once, so that every report is written alike. Scripts
run as ``python benchmarks/<name>.py``, which puts this folder on ``sys.path``: ``from _common import ...``.
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["command", "evaluate_arguments", "known_arguments", "markdown_table", "mean_std", "run_logged",
           "save_figure", "seconds_since", "starting_set_command", "time_calls", "write_json", "write_markdown"]

ROOT = Path(__file__).resolve().parents[1]
#: One distillation iteration at this learning rate moves nothing (0 is refused): it rebuilds a run's starting set.
TINY_LR = "1e-12"


def command(script: str, argv: Sequence[str] | None = None) -> str:
    """``.venv/bin/python benchmarks/<script> <argv>`` (default: this process's arguments), shell-quoted."""
    return f".venv/bin/python {shlex.join([f'benchmarks/{script}', *(sys.argv[1:] if argv is None else argv)])}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a Markdown table: ``| a | b |``, ``|---|---|`` and one line per row (cells as ``str``)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def mean_std(values: Sequence[float], digits: int = 1) -> str:
    """``"mean ± std"`` with the population std (the spread of these runs, as the reports say)."""
    return f"{statistics.mean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def save_figure(fig, ax, title: str, path: str | Path) -> Path:
    """The end of a benchmark plot: ``title`` (10 pt), a small legend, tight layout, ``path`` at 120 dpi, closed."""
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def seconds_since(start: float, digits: int = 1) -> float:
    """Wall-clock seconds since ``start`` (a ``time.time()``), rounded as the reports print them."""
    return round(time.time() - start, digits)


def time_calls(fn, repeats: int) -> list[float]:
    """Wall-clock seconds (``time.perf_counter``) of ``repeats`` calls of ``fn()``, one after another."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def write_json(output: str | Path, record: Any) -> Path:
    """Write ``record`` to ``<output>.json`` (indent 2, a final newline), creating the folder; returns the path."""
    path = Path(output).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def write_markdown(output: str | Path, lines: Sequence[str], echo: bool = True) -> Path:
    """Write ``lines`` to ``<output>.md`` (joined by newlines, a final newline); print them unless not ``echo``."""
    path = Path(output).with_suffix(".md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    if echo:
        print("\n".join(lines))
    return path


def known_arguments(extra: list[str], classes: Sequence[type]) -> list[str]:
    """The pass-through arguments (``--name value`` or a bare ``--name``) that are fields of ``classes``."""
    names = {f"--{f}" for cls in classes for f in cls.__dataclass_fields__}
    return [x for i, x in enumerate(extra)
            if x in names or (i > 0 and extra[i - 1] in names and not x.startswith("--"))]


def evaluate_arguments(extra: list[str]) -> list[str]:
    """The pass-through arguments ``examples/evaluate.py`` takes: its DataArguments and EvaluateArguments."""
    from repblend_hf.commands.evaluate import EvaluateArguments
    from repblend_hf.pipeline import DataArguments

    return known_arguments(extra, (DataArguments, EvaluateArguments))


def run_logged(argv: list[str], log: Path) -> None:
    """One subprocess with its output in ``log``; a failure names the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    began = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(argv[-12:])}  (log: {log})", flush=True)
    with open(log, "a") as f:
        code = subprocess.run(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"failed (exit {code}) after {time.time() - began:.0f} s; see {log}, fix the cause and rerun "
                         "the same command (finished runs are kept)")


def starting_set_command(method: str, seed: int, out: Path, distill_args: Sequence[str], eval_seeds: int,
                         cpu_threads: int = 1) -> list[str]:
    """``examples/distill.py`` (run from the repository root) rebuilding a run's starting set: the run's method, seed
    and ``distill_args`` (pairs, experts, data) for one iteration at learning rates that move nothing, then its final
    evaluation with ``eval_seeds`` seeds; the set and its ``results.json`` land in ``out``."""
    frozen = [x for lr in ("--lr_img", "--lr_txt", "--lr_sim", "--lr_lr") for x in (lr, TINY_LR)]
    return [sys.executable, "examples/distill.py", "--method", method, "--seed", str(seed), *distill_args,
            "--max_steps", "1", *frozen, "--baselines", "", "--eval_seeds", str(eval_seeds), "--save_strategy", "no",
            "--cpu_threads", str(cpu_threads), "--disable_tqdm", "true", "--output_dir", str(out)]
