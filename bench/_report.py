"""The comparison tables: the headline printed to the terminal and ``report.md``.

Both are built from :class:`bench._results.RunData` (saved files only). Runs are grouped by
(scenario, clock, variant, strategy); repeats of a group are shown as mean +- standard deviation.
A scenario's variants (DESIGN.md section 9) compare as strategies do, with a flow-control table:
efficiency against the budget-inclusive bound, the 429s, failed items, adaptive limits.
"""
from __future__ import annotations

import os
import platform
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench._results import STRATEGY_ORDER, RunData, git_commit

__all__ = ["Group", "group_runs", "headline_table", "write_report"]


@dataclass(frozen=True)
class Group:
    """The repeats of one strategy on one scenario and clock."""

    scenario: str
    clock: str
    strategy: str
    runs: tuple[RunData, ...]
    variant: str = ""  #: '' for the scenario as written

    @property
    def label(self) -> str:
        """``strategy`` or ``strategy [variant]``."""
        return f"{self.strategy} [{self.variant}]" if self.variant else self.strategy

    def values(self, key: str) -> list[float]:
        return [float(r.summary[key]) for r in self.runs]

    def mean(self, key: str) -> float:
        return statistics.fmean(self.values(key))

    def sd(self, key: str) -> float:
        xs = self.values(key)
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    @property
    def time_scale(self) -> float:
        return float(self.runs[0].metadata.get("time_scale") or 1.0)

    @property
    def params(self) -> str:
        p = self.runs[0].metadata.get("params") or {}
        shown = {k: ("unbounded" if v is None else v) for k, v in p.items()
                 if k != "lockstep" or v}
        return ", ".join(f"{k}={v}" for k, v in shown.items())


def group_runs(runs: Sequence[RunData]) -> list[Group]:
    by: dict[tuple[str, str, str, str], list[RunData]] = defaultdict(list)
    order: dict[tuple[str, str], int] = {}  # variants in the order first seen (file order)
    for r in runs:
        by[(r.scenario, r.clock, r.variant, r.strategy)].append(r)
        order.setdefault((r.scenario, r.variant), len(order))
    groups = [Group(s, c, st, tuple(rs), v) for (s, c, v, st), rs in by.items()]
    return sorted(groups, key=lambda g: (scenario_key(g.scenario), g.clock != "virtual",
                                         order[(g.scenario, g.variant)],
                                         STRATEGY_ORDER.get(g.strategy, 9), g.strategy))


def scenario_key(name: str) -> tuple[bool, str]:
    """The seed workload first (it is the headline), then the others by name."""
    return (name != "seed", name)


def _baseline(groups: Sequence[Group], g: Group) -> Group | None:
    for b in groups:
        if (b.scenario, b.clock, b.variant, b.strategy) == (g.scenario, g.clock, g.variant,
                                                             "batched"):
            return b
    return None


def _num(g: Group, key: str, digits: int = 1) -> str:
    m = g.mean(key)
    if len(g.runs) > 1:
        return f"{m:.{digits}f} ± {g.sd(key):.{digits}f}"
    return f"{m:.{digits}f}"


def _speedup(groups: Sequence[Group], g: Group) -> str:
    b = _baseline(groups, g)
    if b is None or g.mean("makespan_s") <= 0:
        return "-"
    return f"{b.mean('makespan_s') / g.mean('makespan_s'):.2f}x"


HEADLINE_COLUMNS = ("scenario", "clock", "strategy", "runs", "makespan s", "items/s",
                    "vs batched", "first vis. s", "p50 vis. s", "p99 vis. s", "efficiency",
                    "ok/failed")


Origins = Mapping[Path, str]  #: results file -> where it came from, for runs not run just now


def origin_of(g: Group, origins: Origins | None) -> str:
    """The label of a group's rows: '' for runs this command made, else e.g. ``(reference,
    committed 2026-11-29 879f56a)``."""
    labels = sorted({origins[r.path] for r in g.runs if r.path in origins}) if origins else []
    return f" ({'; '.join(labels)})" if labels else ""


def origin_note(groups: Sequence[Group], origins: Origins | None) -> str:
    """One sentence under a table that has labelled rows; '' when none is."""
    labels = {origin_of(g, origins) for g in groups} - {""}
    if not labels:
        return ""
    kinds = []
    if any("reference, committed" in lb for lb in labels):
        kinds.append("*reference, committed* rows are read from results files committed in git "
                     "(unchanged since that commit)")
    if any("earlier run" in lb for lb in labels):
        kinds.append("*earlier run* rows from results files already in the output directory")
    return ("Rows marked in brackets were not run by this command: " + "; ".join(kinds)
            + ".")


def _row(groups: Sequence[Group], g: Group, origins: Origins | None = None) -> list[str]:
    clock = (g.clock if g.clock == "virtual" else f"live x{g.time_scale:g}") \
        + origin_of(g, origins)
    return [g.scenario, clock, g.label, str(len(g.runs)), _num(g, "makespan_s"),
            _num(g, "throughput_per_s", 2), _speedup(groups, g), _num(g, "first_visible_s"),
            _num(g, "visible_p50_s"), _num(g, "visible_p99_s"), _num(g, "efficiency", 3),
            f"{g.mean('ok'):.0f}/{g.mean('failed'):.0f}"]


def headline_table(runs: Sequence[RunData], origins: Origins | None = None) -> str:
    """A fixed-width table for the terminal: one row per (scenario, clock, strategy); rows of
    runs this command did not make are labelled with their ``origins``."""
    groups = group_runs(runs)
    rows = [list(HEADLINE_COLUMNS)] + [_row(groups, g, origins) for g in groups]
    widths = [max(len(r[k]) for r in rows) for k in range(len(HEADLINE_COLUMNS))]
    lines = []
    for n, r in enumerate(rows):
        cells = [c.ljust(w) if k < 3 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths,
                                                                                  strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    note = origin_note(groups, origins)
    if note:
        lines += ["", note.replace("*", "")]
    return "\n".join(lines)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join(" --- " if k < 3 else " ---: " for k in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _limits(g: Group) -> str:
    """An adaptive stage's limit: its last value and the range it moved in (first run)."""
    out = []
    for name, tl in g.runs[0].limit_timelines().items():
        values = [v for _, v in tl]
        out.append(f"{name} {values[0]}→{values[-1]} (range {min(values)}-{max(values)})")
    return "; ".join(out) or "-"


def flow_control(groups: Sequence[Group], scenario: str) -> list[str]:
    """The variants of a scenario with provider accounts, side by side: efficiency against the
    budget-inclusive bound, 429s, failed items, adaptive limits."""
    gs = [g for g in groups if g.scenario == scenario and g.runs[0].metadata.get("budgets")]
    if not gs:
        return []
    accounts = gs[0].runs[0].metadata["budgets"]
    acct = "; ".join(
        f"{b['name']} ({', '.join(b.get('stages') or [])}): "
        + ", ".join(f"{v:,.0f} {k}/min" for k, v in b["per_minute"].items()) for b in accounts)
    header = ["clock", "variant", "strategy", "runs", "makespan s", "budget bound s",
              "lower bound s", "efficiency", "429s", "429 share", "failed", "adaptive limit"]
    rows = []
    for g in gs:
        clock = g.clock if g.clock == "virtual" else f"live x {g.time_scale:g}"
        bb = [float(r.summary.get("budget_bound_s", 0.0)) for r in g.runs]
        share = statistics.fmean(r.overload_share for r in g.runs)
        rows.append([clock, g.variant or "(as written)", g.strategy, str(len(g.runs)),
                     _num(g, "makespan_s"), f"{statistics.fmean(bb):.1f}",
                     _num(g, "lower_bound_s"), _num(g, "efficiency", 3),
                     f"{statistics.fmean(r.overloaded for r in g.runs):.0f}",
                     f"{100 * share:.1f}%", f"{g.mean('failed'):.0f}", _limits(g)])
    return ["", f"**Flow control** against the account ({acct}). *budget bound* = (tokens or "
                "requests of the calls that succeeded - the provider's one-minute burst) ÷ the "
                "per-second rate, the same account for every variant; *efficiency* = lower "
                "bound (including the budget bound) / makespan; *429s* = calls answered with a "
                "rate-limit error, *429 share* = of the calls of the stages that got any.", "",
            *_md_table(header, rows)]


def _mean_of(g: Group, attr: str) -> float:
    return statistics.fmean(float(getattr(r, attr)) for r in g.runs)


def _unhedged(groups: Sequence[Group], g: Group) -> Group | None:
    """The baseline of a hedged group: the same scenario, clock and strategy in the variant
    named ``unhedged``, else in a variant (or the scenario as written) that made no hedge."""
    same = [b for b in groups if (b.scenario, b.clock, b.strategy) == (g.scenario, g.clock,
                                                                       g.strategy)]
    named = [b for b in same if b.variant == "unhedged"]
    plain = [b for b in same if all(r.hedges == 0 and r.hedged_attempts == 0 for r in b.runs)]
    found = named or plain
    return found[0] if found else None


def _ratio(x: float, base: Group | None, attr: str, g: Group) -> str:
    if base is None or base is g:
        return "-"
    b = _mean_of(base, attr) if attr != "makespan_s" else base.mean("makespan_s")
    return f"{x / b:.3f}x" if b > 0 else "-"


def hedging(groups: Sequence[Group], scenario: str) -> list[str]:
    """The variants of a scenario where some run hedged (DESIGN.md section 10), side by side
    with the unhedged baseline: makespan, per-item p99 time in the pipeline, extra calls,
    hedges won."""
    gs = [g for g in groups if g.scenario == scenario]
    if not any(r.hedges for g in gs for r in g.runs):
        return []
    header = ["clock", "variant", "strategy", "runs", "makespan s", "vs unhedged",
              "per-item p99 s", "vs unhedged", "hedges", "extra calls", "hedges won"]
    rows = []
    for g in gs:
        clock = g.clock if g.clock == "virtual" else f"live x {g.time_scale:g}"
        base = _unhedged(groups, g)
        p99 = _mean_of(g, "in_pipeline_p99_s")
        hedges, won = _mean_of(g, "hedges"), _mean_of(g, "hedges_won")
        rows.append([clock, g.variant or "(as written)", g.strategy, str(len(g.runs)),
                     _num(g, "makespan_s"), _ratio(g.mean("makespan_s"), base, "makespan_s", g),
                     f"{p99:.2f}", _ratio(p99, base, "in_pipeline_p99_s", g), f"{hedges:.0f}",
                     f"{100 * _mean_of(g, 'extra_calls'):.2f}%",
                     f"{won:.0f} ({100 * won / hedges:.0f}%)" if hedges else "-"])
    return ["", "**Hedging** (DESIGN.md section 10). *per-item p99* = the p99 over ok items of "
                "the time an item spent in the pipeline (visible - its first call's start); "
                "*vs unhedged* = this / the `unhedged` variant's, same clock and strategy; "
                "*extra calls* = hedges / the other calls (first attempts and retries) of the "
                "hedged stages, which the allowance `max_extra` caps; *hedges won* = hedges "
                "that finished first.", "", *_md_table(header, rows)]


def _agreement(groups: Sequence[Group], scenario: str) -> list[str]:
    virtual = {g.label: g for g in groups if g.scenario == scenario and g.clock == "virtual"}
    live = [g for g in groups if g.scenario == scenario and g.clock == "live"]
    rows = []
    for g in live:
        v = virtual.get(g.label)
        if v is None:
            continue
        cells = [g.label, str(len(g.runs))]
        for key in ("makespan_s", "visible_p50_s", "visible_p99_s"):
            vm, lm = v.mean(key), g.mean(key)
            diff = f"{100 * (lm - vm) / vm:+.1f}%" if vm else "-"
            cells += [f"{vm:.1f}", f"{_num(g, key)}", diff]
        rows.append(cells)
    if not rows:
        return []
    loads = [float(r.metadata["load_avg_1m"]) for g in live for r in g.runs
             if r.metadata.get("load_avg_1m") is not None]
    load = (f" The machine's 1-minute load average at the start of the live runs was "
            f"{min(loads):.1f}-{max(loads):.1f} on {live[0].runs[0].metadata.get('cpus', '?')} "
            "CPUs; other work on the machine shows up as live overhead.") if loads else ""
    header = ["strategy", "live runs", "makespan virtual", "makespan live", "Δ",
              "p50 virtual", "p50 live", "Δ", "p99 virtual", "p99 live", "Δ"]
    return ["", f"**Live vs virtual** (live at time_scale {live[0].time_scale:g}, times in "
                "scenario seconds; the virtual clock predicts what the live engine does with "
                "the same latencies, so Δ is the live engine's overhead and lag plus the "
                f"machine's noise).{load}", "", *_md_table(header, rows)]


def write_report(runs: Sequence[RunData], root: Path, path: Path,
                 plots: dict[str, list[Path]] | None = None, *,
                 wall_s: float | None = None, extra: Sequence[str] = (),
                 origins: Origins | None = None, reference: Path | None = None) -> None:
    """``report.md``: per scenario, per clock, one row per strategy, then live vs virtual; rows
    of runs this command did not make are labelled with their ``origins``. Sweeps, peers and
    live services not under ``root`` are linked from ``reference`` when it has them."""
    groups = group_runs(runs)
    plots = plots or {}
    first = runs[0].metadata if runs else {}
    lines = [
        "# Conveyor benchmark results", "",
        f"Written by `python -m bench` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from the "
        f"results files under `{root.name}/`; commit `{first.get('git_commit', git_commit())}`, "
        f"Python {first.get('python', platform.python_version())}, "
        f"{first.get('cpus', '?')} CPUs" + (f", {wall_s:.0f} s wall time." if wall_s else "."),
        "",
        "All times are in **scenario seconds** since the run started, with every item requested "
        "at t = 0: live runs sleep each latency x time_scale and their times are divided back, "
        "so live and virtual runs compare directly. *makespan* = last item visible; *vs batched* "
        "= batched makespan / this makespan; *first/p50/p99 vis.* = time until an item is "
        "visible to the user (ok items); *efficiency* = lower bound / makespan, where the lower "
        "bound is the busiest stage's work divided by its concurrency, or the longest single "
        "item, whichever is larger (no schedule can beat it). Repeats show mean ± sd.", "",
    ]
    bad = [r for r in runs if r.problems]
    note = origin_note(groups, origins)
    lines += ["## Headline", "", *_md_table(HEADLINE_COLUMNS,
                                            [_row(groups, g, origins) for g in groups]), ""]
    if note:
        lines += [note, ""]
    for scenario in sorted({g.scenario for g in groups}, key=scenario_key):
        lines += [f"## {scenario}", ""]
        desc = next((r.metadata.get("description") for r in runs
                     if r.scenario == scenario and r.metadata.get("description")), None)
        if desc:
            lines += [f"*{desc}*", ""]
        stages = next(r.metadata["stages"] for r in runs if r.scenario == scenario)
        lines += ["Stages: " + " → ".join(f"{s['name']} ({s['concurrency']})" for s in stages)
                  + f"; {next(r.metadata['items'] for r in runs if r.scenario == scenario)} "
                  "items.", ""]
        header = ["clock", "strategy", "params", "runs", "items/s", "makespan s", "vs batched",
                  "first vis. s", "p50 vis. s", "p90 vis. s", "p99 vis. s", "efficiency",
                  "ok", "failed"]
        rows = []
        for g in groups:
            if g.scenario != scenario:
                continue
            clock = (g.clock if g.clock == "virtual" else f"live x {g.time_scale:g}") \
                + origin_of(g, origins)
            rows.append([clock, g.label, g.params, str(len(g.runs)),
                         _num(g, "throughput_per_s", 2), _num(g, "makespan_s"),
                         _speedup(groups, g), _num(g, "first_visible_s"),
                         _num(g, "visible_p50_s"), _num(g, "visible_p90_s"),
                         _num(g, "visible_p99_s"), _num(g, "efficiency", 3),
                         f"{g.mean('ok'):.0f}", f"{g.mean('failed'):.0f}"])
        lines += _md_table(header, rows)
        lines += flow_control(groups, scenario)
        lines += hedging(groups, scenario)
        lines += _agreement(groups, scenario)
        for p in plots.get(scenario, []):
            rel = p.relative_to(path.parent) if p.is_relative_to(path.parent) else p
            lines += ["", f"![{p.stem}]({rel.as_posix()})"]
        lines.append("")
    for p in plots.get("", []):
        rel = p.relative_to(path.parent) if p.is_relative_to(path.parent) else p
        lines += [f"![{p.stem}]({rel.as_posix()})", ""]
    def found(rel: str) -> tuple[Path | None, str]:
        """``root/rel``, else the reference's (with a note saying so)."""
        for base, note in ((root, ""), (reference, " (the committed reference results, not "
                                                    "run by this command)")):
            if base is not None and (base / rel).exists():
                return base / rel, note
        return None, ""

    def link(p: Path) -> str:
        return Path(os.path.relpath(p, path.parent)).as_posix()

    sweep_dir, sweep_note = found("sweeps")
    sweeps = sorted(sweep_dir.glob("*/sweep.png")) if sweep_dir else []
    if sweeps:
        lines += ["## Sweeps", "", "One parameter at a time on the virtual clock, every strategy "
                  "at every point (`python -m bench sweep --scenario seed --param PATH=A:B:STEP`;"
                  f" the numbers are in each folder's `sweep.csv`){sweep_note}.", ""]
        for png in sweeps:
            lines += [f"### {png.parent.name.replace('--', ': ')}", "",
                      f"![{png.parent.name}]({link(png)})", ""]
    peers, peers_note = found("peers/peers.md")
    if peers is not None:
        lines += ["## Peers", "", f"The seed workload through stagepipe, pypeln, asyncio and a "
                  f"ThreadPoolExecutor batch loop beside the engine: [{link(peers)}]"
                  f"({link(peers)}) (`python -m bench peers --scenario seed`){peers_note}.", ""]
    live, live_note = found("live-services/report.md")
    if live is not None and live.resolve() != path.resolve():
        lines += ["## Live services", "", "The sync job itself (requests, openai and psycopg2 "
                  "against the fake servers and a throwaway PostgreSQL 15), per strategy with "
                  f"the CPU it used: [{link(live)}]({link(live)}) (`python -m bench "
                  "live-services`; not part of the default suite, it needs PostgreSQL)"
                  f"{live_note}.", ""]
    lines += list(extra)
    lines += ["## Validation", ""]
    if bad:
        lines.append(f"**{len(bad)} of {len(runs)} results files fail bench's own check:**")
        lines += [f"- `{r.path.name}` ({r.scenario}, {r.clock}): {r.problems[0]}" for r in bad]
    else:
        lines.append(f"All {len(runs)} results files pass bench's own check (summary "
                     "recomputed from the items; per-stage limits, stage order, barriers and "
                     "visibility checked from the recorded calls).")
    lines += ["", "The per-run JSON files (DESIGN.md section 6) sit next to this report when it "
              "was generated; they are large (about 2 MB per run) and are regenerated by the "
              "command that wrote them rather than kept in git.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
