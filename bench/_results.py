"""Results files on disk (DESIGN.md section 6): where they go, how they are written and read.

Layout: ``<out>/<scenario>/<strategy>.json`` for a single run, ``<strategy>-rN.json`` (N from 1)
for repeats; a variant of a scenario (DESIGN.md section 9) gets its own folder,
``<out>/<scenario>/<variant>/<strategy>.json``, so variants never collide. Reports and plots
read these files only (never a live run's objects): ``load_runs``
reduces each file to a small :class:`RunData` -- its metadata, the summary recomputed from its
items, its validation problems, and the samples plots need -- so a directory of large files is
read one file at a time.
"""
from __future__ import annotations

import csv
import functools
import json
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench._metrics import SUMMARY_KEYS, summarize, validate, visible_ok

__all__ = [
    "GANTT_ITEMS",
    "RunData",
    "git_commit",
    "load_runs",
    "mark_untracked",
    "origins",
    "read_doc",
    "result_path",
    "run_data",
    "write_doc",
    "write_summary_csv",
]

GANTT_ITEMS = 150  #: items kept per run for the stage timeline
REPO_ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def git_commit() -> str:
    """The commit of the code that ran (``-dirty`` when the work tree has changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "") if head else "unknown"


def result_path(out: Path, scenario: str, strategy: str, repeat: int | None = None,
                variant: str | None = None) -> Path:
    suffix = f"-r{repeat}" if repeat is not None else ""
    d = Path(out) / scenario
    return (d / variant if variant else d) / f"{strategy}{suffix}.json"


def write_doc(doc: Mapping[str, Any], path: Path) -> None:
    """Write atomically (a reader never sees half a file), compactly (files get large)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(doc, f, separators=(",", ":"), allow_nan=False)
    tmp.replace(path)


def read_doc(path: Path) -> dict[str, Any]:
    with Path(path).open(encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a results document")
    return doc


def is_results_doc(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("version") == 1 and isinstance(
        doc.get("metadata"), dict) and isinstance(doc.get("items"), list)


@dataclass(frozen=True)
class RunData:
    """What reports and plots need from one results file."""

    path: Path
    metadata: Mapping[str, Any]
    summary: Mapping[str, float | int]  #: recomputed from the items
    problems: tuple[str, ...]  #: from bench's own validation; empty when the file is good
    visible: np.ndarray  #: sorted visible_at of ok items (scenario seconds)
    #: first GANTT_ITEMS items: (index, ((stage, start, end), ...), visible_at or None)
    gantt: tuple[tuple[int, tuple[tuple[str, float, float], ...], float | None], ...]
    calls: Mapping[str, int] = field(default_factory=dict)  #: calls made per stage
    #: the p99 (numpy's linear percentile) over ok items of the time an item spent in the
    #: pipeline: visible_at - its first call's start (0 with no ok item)
    in_pipeline_p99_s: float = 0.0
    hedges: int = 0  #: hedged duplicates started, over all stages (section 6.1)
    hedges_won: int = 0  #: hedges that finished first
    #: calls of the hedged stages that are not hedges (first attempts and retries): what the
    #: hedge allowance (max_extra x calls) is a share of
    hedged_attempts: int = 0

    @property
    def extra_calls(self) -> float:
        """Hedges / the other calls of the hedged stages: the extra calls hedging cost."""
        return self.hedges / self.hedged_attempts if self.hedged_attempts else 0.0

    @property
    def variant(self) -> str:
        """The scenario's variant ('' for the scenario as written)."""
        return str(self.metadata.get("variant") or "")

    @property
    def overloaded(self) -> int:
        """Calls answered with a rate-limit/overload error (429), over all stages."""
        return sum(int(s.get("overloaded") or 0) for s in self.metadata["stages"])

    @property
    def overload_share(self) -> float:
        """429s / calls of the stages that report overloads (0 when none does)."""
        hit = [s["name"] for s in self.metadata["stages"] if s.get("overloaded")]
        n = sum(self.calls.get(name, 0) for name in hit)
        return self.overloaded / n if n else 0.0

    def limit_timelines(self) -> dict[str, list[tuple[float, int]]]:
        """Each adaptive stage's ``limit_timeline`` (scenario seconds, limit)."""
        return {str(s["name"]): [(float(t), int(v)) for t, v in s["limit_timeline"]]
                for s in self.metadata["stages"] if s.get("limit_timeline")}

    @property
    def scenario(self) -> str:
        return str(self.metadata["scenario"])

    @property
    def strategy(self) -> str:
        return str(self.metadata["strategy"])

    @property
    def clock(self) -> str:
        return str(self.metadata["clock"])

    @property
    def repeat(self) -> int | None:
        r = self.metadata.get("repeat")
        return int(r) if r is not None else None

    @property
    def sweep(self) -> Mapping[str, Any] | None:
        return self.metadata.get("sweep")


def run_data(doc: Mapping[str, Any], path: Path) -> RunData:
    items = doc["items"]
    meta = doc["metadata"]
    gantt = []
    for it in sorted(items, key=lambda it: it["index"])[:GANTT_ITEMS]:
        spans = tuple((st["name"], float(st["start"]), float(st["end"])) for st in it["stages"])
        gantt.append((int(it["index"]), spans, it["visible_at"]))
    calls: dict[str, int] = {}
    primary: dict[str, int] = {}
    hedged_calls: dict[str, int] = {}
    in_pipeline = []
    for it in items:
        for st in it["stages"]:
            name = st["name"]
            calls[name] = calls.get(name, 0) + len(st["calls"])
            h = sum(1 for c in st["calls"] if len(c) > 2 and c[2].get("hedge"))
            if h:
                hedged_calls[name] = hedged_calls.get(name, 0) + h
            primary[name] = primary.get(name, 0) + len(st["calls"]) - h
        if it["status"] == "ok" and it["stages"]:
            in_pipeline.append(float(it["visible_at"]) - float(it["stages"][0]["start"]))
    stages = meta["stages"]
    hedged = {s["name"] for s in stages if s.get("hedges")} | set(hedged_calls)
    # the engine's counters when it wrote them, else what the calls say
    hedges = sum(int(s.get("hedges") or hedged_calls.get(s["name"], 0)) for s in stages
                 if s["name"] in hedged)
    won = sum(int(s.get("hedges_won") or 0) for s in stages)
    return RunData(path=Path(path), metadata=meta,
                   summary=summarize(items, stages, meta.get("budgets") or None),
                   problems=tuple(validate(doc)),
                   visible=visible_ok(items), gantt=tuple(gantt), calls=calls,
                   in_pipeline_p99_s=float(np.percentile(in_pipeline, 99)) if in_pipeline
                   else 0.0,
                   hedges=hedges, hedges_won=won,
                   hedged_attempts=sum(primary.get(n, 0) for n in hedged))


#: first line of the ``.gitignore`` bench writes into an output directory it keeps out of git
UNTRACKED_MARK = "# written by python -m bench: fresh output, not kept in git"


def mark_untracked(out: Path) -> None:
    """Make ``out`` a directory git ignores as a whole (its own ``.gitignore`` of ``*``, as
    pytest and mypy do for their caches), so runs into it leave the checkout clean."""
    out.mkdir(parents=True, exist_ok=True)
    f = out / ".gitignore"
    if not f.exists():
        f.write_text(f"{UNTRACKED_MARK}\n*\n", encoding="utf-8")


def _is_marked(d: Path) -> bool:
    try:
        with (d / ".gitignore").open(encoding="utf-8") as f:
            return f.readline().rstrip("\n") == UNTRACKED_MARK
    except (OSError, UnicodeDecodeError):
        return False


def load_runs(root: Path, *, include_sweeps: bool = False) -> list[RunData]:
    """Every results document under ``root`` (other JSON files, e.g. pytest-benchmark's, are
    skipped), sorted by scenario, clock, strategy and repeat. A directory below ``root`` that
    bench marked untracked (``results/latest`` under ``results``) is another output directory:
    its files are not read."""
    root = Path(root)
    nested = {m.parent for m in root.rglob(".gitignore") if m.parent != root
              and _is_marked(m.parent)}
    runs = []
    for path in sorted(root.rglob("*.json")):
        if nested and any(d in nested for d in path.parents):
            continue
        try:
            doc = read_doc(path)
        except (OSError, ValueError):
            continue
        if not is_results_doc(doc):
            continue
        data = run_data(doc, path)
        if data.sweep is None or include_sweeps:
            runs.append(data)
    return sorted(runs, key=sort_key)


STRATEGY_ORDER = {"continuous": 0, "parallel-batches": 1, "batched": 2}


#: the built-in scenarios' variants, from the naive to the adaptive; others follow by name
VARIANT_ORDER = {"": 0, "fixed-50": 1, "best-fixed": 2, "pause-all": 3, "adaptive": 4,
                 "unhedged": 5, "hedged": 6, "p95": 6, "sticky": 7}


def sort_key(r: RunData) -> tuple[str, int, int, str, int, int, str]:
    return (r.scenario, 0 if r.clock == "virtual" else 1, VARIANT_ORDER.get(r.variant, 9),
            r.variant, STRATEGY_ORDER.get(r.strategy, 9), r.repeat or 0, str(r.path))


CSV_FIELDS = ("scenario", "clock", "variant", "strategy", "params", "repeat", "seed",
              "time_scale", "items", *SUMMARY_KEYS, "budget_bound_s", "overloaded",
              "overload_share", "in_pipeline_p99_s", "hedges", "hedges_won", "extra_calls",
              "valid", "path")


def summary_rows(runs: Iterable[RunData], root: Path) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        m = r.metadata
        row: dict[str, Any] = {
            "scenario": r.scenario, "clock": r.clock, "variant": r.variant,
            "strategy": r.strategy,
            "params": json.dumps(m.get("params"), sort_keys=True), "repeat": r.repeat or "",
            "seed": m.get("seed"), "time_scale": m.get("time_scale"), "items": m.get("items"),
        }
        for k in SUMMARY_KEYS:
            v = r.summary[k]
            row[k] = v if isinstance(v, int) else round(float(v), 6)
        bb = r.summary.get("budget_bound_s")
        row["budget_bound_s"] = "" if bb is None else round(float(bb), 6)
        row["overloaded"] = r.overloaded
        row["overload_share"] = round(r.overload_share, 6)
        row["in_pipeline_p99_s"] = round(r.in_pipeline_p99_s, 6)
        row["hedges"] = r.hedges
        row["hedges_won"] = r.hedges_won
        row["extra_calls"] = round(r.extra_calls, 6)
        row["valid"] = "yes" if not r.problems else "NO: " + r.problems[0]
        try:
            row["path"] = str(r.path.relative_to(root))
        except ValueError:
            row["path"] = str(r.path)
        rows.append(row)
    return rows


def write_summary_csv(runs: Sequence[RunData], root: Path, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(summary_rows(runs, root))


def _git(top: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(top), *args], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def _committed(paths: Sequence[Path]) -> dict[Path, str]:
    """Of ``paths``, those committed in git and unchanged since: ``date commit`` of each one's
    last commit."""
    out: dict[Path, str] = {}
    by_top: dict[Path, list[Path]] = {}
    for p in paths:
        where = _git(p.parent, "rev-parse", "--show-toplevel") if p.parent.is_dir() else None
        if where:
            by_top.setdefault(Path(where.strip()), []).append(p.resolve())
    for top, ps in by_top.items():
        pairs = [(p, p.relative_to(top).as_posix()) for p in ps if p.is_relative_to(top)]
        rel = [r for _, r in pairs]
        if not rel:
            continue
        tracked = set((_git(top, "ls-files", "-z", "--", *rel) or "").split("\0")) - {""}
        changed = {line[3:] for line in (_git(top, "status", "--porcelain", "--", *rel)
                                         or "").splitlines()}
        for p, r in pairs:
            if r in tracked and r not in changed:
                when = (_git(top, "log", "-1", "--format=%cs %h", "--", r) or "").strip()
                out[p] = when or "in git"
    return out


def origins(runs: Sequence[RunData], fresh: Iterable[Path] | None) -> dict[Path, str]:
    """Where the runs that this command did not run come from, as a label for their rows:
    ``reference, committed 2026-11-29 879f56a`` (a results file committed in git and unchanged
    since) or ``earlier run, 2026-11-29`` (a file already in the output directory). ``fresh``:
    the files this command wrote; None (``plot``, which runs nothing) labels committed files
    only."""
    new = {Path(p).resolve() for p in fresh or ()}
    old = [r.path for r in runs if r.path.resolve() not in new]
    if not old:
        return {}
    committed = _committed(old)
    labels = {}
    for p in old:
        c = committed.get(p.resolve())
        if c is not None:
            labels[p] = f"reference, committed {c}"
        elif fresh is not None:
            started = next((str(r.metadata.get("started_at") or "")[:10] for r in runs
                            if r.path == p), "")
            labels[p] = f"earlier run, {started}" if started else "earlier run"
    return labels
