"""Plots (matplotlib, Agg, PNG) from saved results only.

Per scenario, under ``<root>/<scenario>/``: ``visible.png`` (items visible over time),
``ecdf.png`` (time-to-visible), ``bars.png`` (throughput and p99 with spread over repeats),
``gantt.png`` (stage timeline of the first items, one panel per strategy). A scenario with
variants (DESIGN.md section 9) compares them as strategies, and adds ``flow.png`` (efficiency
against the budget-inclusive bound and the share of calls answered 429, per variant and
strategy) and ``limits.png`` (each adaptive stage's limit over time). Across scenarios:
``<root>/speedup.png``. Sweeps: ``sweep.png`` next to the sweep's CSV.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.artist import Artist
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from bench._report import Group, group_runs, scenario_key
from bench._results import RunData

__all__ = ["plot_dir", "plot_peers", "plot_sweep"]

STRATEGY_COLORS = {"continuous": "tab:green", "parallel-batches": "tab:orange",
                   "batched": "tab:red"}
STAGE_COLORS = ["tab:blue", "tab:purple", "tab:olive", "tab:cyan", "tab:brown", "tab:pink"]



def _save_visible(fig: Any, ax: Any, title: str, path: Path) -> Path:
    """Axes, title and legend of a visible-items-over-time plot, then save it."""
    ax.set_xlabel("time since start (scenario seconds)")
    ax.set_ylabel("items visible to the user (ok)")
    ax.set_title(title)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)

VARIANT_COLORS = {"fixed-50": "tab:red", "best-fixed": "tab:orange", "pause-all": "tab:purple",
                  "adaptive": "tab:green"}
OTHER_COLORS = ["tab:blue", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
STRATEGY_STYLES = {"continuous": "-", "parallel-batches": "--", "batched": ":"}


def _color(strategy: str) -> str:
    return STRATEGY_COLORS.get(strategy, "tab:gray")


def _gcolor(g: Group) -> str:
    """A variant's colour when the group is a variant, else its strategy's."""
    if not g.variant:
        return _color(g.strategy)
    if g.variant in VARIANT_COLORS:
        return VARIANT_COLORS[g.variant]
    return OTHER_COLORS[sum(map(ord, g.variant)) % len(OTHER_COLORS)]


def _gstyle(g: Group) -> str:
    if g.variant:
        return STRATEGY_STYLES.get(g.strategy, "-")
    return "-" if g.clock == "virtual" else "--"


def _label(g: Group, *, with_clock: bool) -> str:
    s = g.label
    if g.params:
        s += f" ({g.params})"
    if with_clock:
        s += " — virtual" if g.clock == "virtual" else f" — live x{g.time_scale:g}"
    return s


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _title(groups: Sequence[Group], what: str) -> str:
    g = groups[0]
    return f"{g.scenario}: {what} ({g.runs[0].metadata['items']} items)"


def plot_visible(groups: Sequence[Group], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 5))
    both = len({g.clock for g in groups}) > 1
    for g in groups:
        xs = g.runs[0].visible
        n = np.arange(1, xs.size + 1)
        ax.step(np.concatenate([[0.0], xs]), np.concatenate([[0], n]), where="post",
                color=_gcolor(g), linestyle=_gstyle(g),
                linewidth=1.6, label=_label(g, with_clock=both))
    return _save_visible(fig, ax, _title(groups, "items visible over time"), path)


def plot_ecdf(groups: Sequence[Group], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 5))
    both = len({g.clock for g in groups}) > 1
    for g in groups:
        xs = g.runs[0].visible
        if not xs.size:
            continue
        ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post",
                color=_gcolor(g), linestyle=_gstyle(g),
                linewidth=1.6, label=_label(g, with_clock=both))
        p99 = float(np.percentile(xs, 99))
        ax.plot([p99], [0.99], marker="o", color=_gcolor(g), markersize=4)
    ax.axhline(0.99, color="black", linewidth=0.6, alpha=0.5)
    ax.text(0.002, 0.985, " p99", va="top", fontsize=8, transform=ax.get_yaxis_transform())
    ax.set_xlabel("time to visible (scenario seconds)")
    ax.set_ylabel("fraction of ok items visible")
    ax.set_title(_title(groups, "ECDF of time-to-visible"))
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_bars(groups: Sequence[Group], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 0.9 * len(groups) + 4), 4.6))
    labels = [g.strategy.replace("-", "-\n") + (f"\n[{g.variant}]" if g.variant else "")
              + ("\nvirtual" if g.clock == "virtual" else f"\nlive x{g.time_scale:g}")
              for g in groups]
    x = np.arange(len(groups))
    for ax, key, what in ((axes[0], "throughput_per_s", "throughput (ok items / s)"),
                          (axes[1], "visible_p99_s", "p99 time-to-visible (s)")):
        means = [g.mean(key) for g in groups]
        sds = [g.sd(key) for g in groups]
        colors = [to_rgba(_gcolor(g), 0.9 if g.clock == "virtual" else 0.5)
                  for g in groups]
        ax.bar(x, means, yerr=sds, capsize=4, color=colors, edgecolor="black", linewidth=0.5,
               hatch=None)
        for k, g in enumerate(groups):  # every repeat as a dot: the spread, not just its sd
            vals = g.values(key)
            if len(vals) > 1:
                ax.scatter(np.full(len(vals), k) + np.linspace(-0.15, 0.15, len(vals)), vals,
                           color="black", s=10, zorder=3)
            top = max([means[k] + sds[k], *vals])
            ax.annotate(f"{means[k]:.3g}", (k, top), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=8)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel(what)
        ax.set_title(what)
        ax.grid(axis="y", alpha=0.3)
    reps = max(len(g.runs) for g in groups)
    fig.suptitle(_title(groups, "throughput and tail") +
                 (f" — bars: mean ± sd, dots: each of {reps} repeats" if reps > 1 else ""),
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_gantt(groups: Sequence[Group], path: Path) -> Path:
    stage_names: list[str] = [s["name"] for s in groups[0].runs[0].metadata["stages"]]
    colors = {n: STAGE_COLORS[k % len(STAGE_COLORS)] for k, n in enumerate(stage_names)}
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 2.6 * len(groups) + 0.8),
                             squeeze=False, sharex=True)
    xmax = 0.0
    for ax, g in zip(axes[:, 0], groups, strict=True):
        gantt = g.runs[0].gantt
        for name in stage_names:
            rows = [(idx, s, e) for idx, spans, _ in gantt for (n, s, e) in spans if n == name]
            if rows:
                idx, s, e = (np.array(c, dtype=float) for c in zip(*rows, strict=True))
                ax.barh(idx, np.maximum(e - s, 1e-9), left=s, height=0.9, color=colors[name],
                        linewidth=0)
                xmax = max(xmax, float(e.max()))
        vis = [(idx, v) for idx, _, v in gantt if v is not None]
        if vis:
            vi, vt = zip(*vis, strict=True)
            ax.scatter(vt, vi, marker="|", s=12, color="black", linewidths=0.8, zorder=3)
            xmax = max(xmax, max(vt))
        ax.set_ylim(len(gantt), -1)
        ax.set_ylabel("item")
        ax.set_title(_label(g, with_clock=True), fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlim(0, xmax * 1.01 or 1)
    axes[-1, 0].set_xlabel("time since start (scenario seconds)")
    handles: list[Artist] = [Patch(color=colors[n], label=n) for n in stage_names]
    handles.append(Line2D([], [], color="black", marker="|", linestyle="", label="visible"))
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=8)
    n = len(groups[0].runs[0].gantt)
    fig.suptitle(_title(groups, f"stage timeline of the first {n} items"), fontsize=10, x=0.01,
                 ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _save(fig, path)


def plot_speedup(groups: Sequence[Group], path: Path) -> Path | None:
    scen: list[tuple[str, str]] = []
    for g in groups:  # a scenario's variants are entries of their own
        if g.clock == "virtual" and (g.scenario, g.variant) not in scen:
            scen.append((g.scenario, g.variant))
    table: dict[str, dict[str, float]] = {}
    for s, v in scen:
        by = {g.strategy: g.mean("makespan_s") for g in groups
              if g.scenario == s and g.variant == v and g.clock == "virtual"}
        if "batched" in by:
            table[f"{s}\n[{v}]" if v else s] = {k: by["batched"] / x for k, x in by.items()
                                                 if x > 0}
    if not table:
        return None
    strategies = [s for s in ("continuous", "parallel-batches", "batched")
                  if any(s in row for row in table.values())]
    fig, ax = plt.subplots(figsize=(max(9, 1.0 * len(table) + 3), 4.6))
    x = np.arange(len(table))
    w = 0.8 / len(strategies)
    for k, st in enumerate(strategies):
        vals = [table[s].get(st, 0.0) for s in table]
        bars = ax.bar(x + (k - (len(strategies) - 1) / 2) * w, vals, w, color=_color(st),
                      label=st, edgecolor="black", linewidth=0.5)
        ax.bar_label(bars, fmt="%.2fx", fontsize=7)
    ax.set_xticks(x, list(table), fontsize=8 if len(table) > 6 else 9)
    ax.set_ylabel("speedup vs batched (batched makespan / makespan)")
    ax.set_title("Makespan speedup over batched(50), per scenario (virtual clock, full scale)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_flow(groups: Sequence[Group], path: Path) -> Path:
    """Per variant and strategy: efficiency against the budget-inclusive lower bound, and the
    share of calls answered 429 (with the count on each bar)."""
    gs = [g for g in groups if g.runs[0].metadata.get("budgets")]
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 0.9 * len(gs) + 4), 4.6))
    labels = [(g.variant or "as written") + "\n" + g.strategy.replace("-", "-\n")
              + ("" if g.clock == "virtual" else f"\nlive x{g.time_scale:g}") for g in gs]
    x = np.arange(len(gs))
    colors = [to_rgba(_gcolor(g), 0.9 if g.clock == "virtual" else 0.5) for g in gs]
    eff = [g.mean("efficiency") for g in gs]
    share = [100 * float(np.mean([r.overload_share for r in g.runs])) for g in gs]
    count = [float(np.mean([r.overloaded for r in g.runs])) for g in gs]
    failed = [g.mean("failed") for g in gs]
    axes[0].bar(x, eff, color=colors, edgecolor="black", linewidth=0.5)
    for k, v in enumerate(eff):
        note = f"{v:.2f}" + (f"\n{failed[k]:.0f} failed" if failed[k] else "")
        axes[0].annotate(note, (k, v), textcoords="offset points", xytext=(0, 3), ha="center",
                         fontsize=7)
    axes[0].axhline(1.0, color="black", linewidth=0.6, alpha=0.5)
    axes[0].set_ylim(0, 1.15)
    axes[0].set_ylabel("lower bound (incl. budget bound) / makespan")
    axes[0].set_title("efficiency against the budget-inclusive bound", fontsize=10)
    axes[1].bar(x, share, color=colors, edgecolor="black", linewidth=0.5)
    for k, v in enumerate(share):
        axes[1].annotate(f"{count[k]:.0f}", (k, v), textcoords="offset points", xytext=(0, 3),
                         ha="center", fontsize=7)
    axes[1].set_ylabel("calls answered 429 (%)")
    axes[1].set_title("429s (share of calls; count on the bar)", fontsize=10)
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(_title(gs, "flow control per variant"), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_limits(groups: Sequence[Group], path: Path) -> Path:
    """Each adaptive stage's concurrency limit over time (first run of each group)."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for g in groups:
        for stage, tl in g.runs[0].limit_timelines().items():
            ts = [t for t, _ in tl] + [float(g.mean("makespan_s"))]
            vs = [v for _, v in tl] + [tl[-1][1]]
            ax.step(ts, vs, where="post", color=_gcolor(g), linestyle=_gstyle(g),
                    linewidth=1.4, label=f"{stage}: {_label(g, with_clock=True)}")
    ax.set_xlabel("time since start (scenario seconds)")
    ax.set_ylabel("concurrency limit in force")
    ax.set_title(_title(groups, "adaptive limits over time"))
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_dir(runs: Sequence[RunData], root: Path) -> dict[str, list[Path]]:
    """Every plot for the runs under ``root``; returns the files per scenario ("" for the
    cross-scenario ones)."""
    groups = group_runs(runs)
    out: dict[str, list[Path]] = {}
    for scenario in sorted({g.scenario for g in groups}, key=scenario_key):
        gs = [g for g in groups if g.scenario == scenario]
        virtual = [g for g in gs if g.clock == "virtual"] or gs
        if any(g.variant for g in virtual):  # one timeline per variant: continuous only
            virtual = [g for g in virtual if g.strategy == "continuous"] or virtual[:4]
        d = root / scenario
        out[scenario] = [plot_visible(gs, d / "visible.png"), plot_ecdf(gs, d / "ecdf.png"),
                         plot_bars(gs, d / "bars.png"), plot_gantt(virtual, d / "gantt.png")]
        if any(g.runs[0].metadata.get("budgets") for g in gs):
            out[scenario].append(plot_flow(gs, d / "flow.png"))
        if any(g.runs[0].limit_timelines() for g in gs):
            out[scenario].append(plot_limits(gs, d / "limits.png"))
    sp = plot_speedup(groups, root / "speedup.png")
    if sp is not None:
        out[""] = [sp]
    return out


def plot_sweep(rows: Sequence[Mapping[str, Any]], param: str, path: Path, title: str) -> Path:
    """Sweep curves: makespan and p99 time-to-visible against the swept value, per strategy."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.3))
    strategies = sorted({str(r["strategy"]) for r in rows}, key=lambda s: (s not in
                                                                            STRATEGY_COLORS, s))
    for ax, key, what in ((axes[0], "makespan_s", "makespan (s)"),
                          (axes[1], "throughput_per_s", "throughput (ok items / s)"),
                          (axes[2], "visible_p99_s", "p99 time-to-visible (s)")):
        for st in strategies:
            pts = sorted((float(r["value"]), float(r[key])) for r in rows if r["strategy"] == st)
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, color=_color(st), label=st)
        ax.set_xlabel(param)
        ax.set_ylabel(what)
        ax.set_title(what, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


PEER_STYLES = {"engine continuous": ("tab:green", "-"), "stagepipe": ("tab:blue", "--"),
               "pypeln thread": ("tab:purple", "-."), "asyncio + Semaphore": ("tab:olive", ":"),
               "engine batched": ("tab:red", "-"),
               "ThreadPoolExecutor batches": ("tab:brown", "--")}


def plot_peers(doc: Mapping[str, Any], path: Path) -> Path:
    """Items visible over time, one line per peer (from the saved peers.json)."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for rec in doc["peers"]:
        xs = np.sort([v for v, ok in zip(rec["visible"], rec["ok"], strict=True)
                      if v is not None and ok])
        color, style = PEER_STYLES.get(rec["peer"], ("tab:gray", "-"))
        ax.step(np.concatenate([[0.0], xs]), np.arange(xs.size + 1), where="post", color=color,
                linestyle=style, linewidth=1.6, label=rec["peer"])
    return _save_visible(fig, ax, f"{doc['scenario']}: the same workload through peers "
                         f"({doc['items']} items, live x{doc['time_scale']:g})", path)
