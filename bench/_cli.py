"""``python -m bench``: the command line.

    python -m bench                       the default suite -> results/latest/ (git-ignored)
    python -m bench --out results         the same, rewriting the committed reference results
    python -m bench run --scenario seed --clock live --repeats 3 --out DIR
    python -m bench sweep --scenario seed --param stages.analyze.concurrency=10:200:10
    python -m bench compare DIR_A DIR_B
    python -m bench plot DIR
    python -m bench list
    python -m bench peers --scenario seed
    python -m bench live-services [--items N] [--strategies A,B] [--time-scale X]
                                  [--processes N] [--out DIR]

Exit status: 0 on success, 1 when a run failed or a results file fails validation, 2 on a usage
error or an invalid scenario file (one line naming the file and the field).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from bench._scenario import (
    STRATEGY_NAMES,
    Scenario,
    ScenarioError,
    builtin_names,
    builtin_path,
    load_scenario,
    resolve_scenario,
    scenario_variants,
    variant_scenario,
)

__all__ = ["main"]

#: the committed reference results (README's figures); written only when asked: --out results
REFERENCE_OUT = Path("results")
#: where runs go by default: git-ignored (bench writes its own .gitignore there), so running the
#: suite leaves the checkout clean
DEFAULT_OUT = REFERENCE_OUT / "latest"
DEFAULT_LIVE_SCENARIO = "seed"
DEFAULT_LIVE_REPEATS = 3


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def _strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STRATEGY_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(STRATEGY_NAMES)}, got {text!r}")
    return names


def _names(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of names, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Conveyor's benchmark harness. Without a sub-command: the default suite -- "
                    "every built-in scenario x strategy on the virtual clock at full scale, "
                    f"then '{DEFAULT_LIVE_SCENARIO}' live at its time_scale with "
                    f"{DEFAULT_LIVE_REPEATS} repeats (each run in its own process) -- written "
                    f"to {DEFAULT_OUT}/ (git-ignored) with summary.csv, report.md and plots. "
                    f"The committed reference results in {REFERENCE_OUT}/ are rewritten only "
                    f"with --out {REFERENCE_OUT}.")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"output directory of the default suite (default: {DEFAULT_OUT}, "
                        f"git-ignored; --out {REFERENCE_OUT} rewrites the committed reference "
                        "results)")
    p.add_argument("--live-repeats", type=int, default=DEFAULT_LIVE_REPEATS, metavar="N",
                   help="repeats of the live runs in the default suite; 0 skips them "
                        f"(default: {DEFAULT_LIVE_REPEATS})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, *, out: bool = True) -> None:
        sp.add_argument("--scenario", required=True, metavar="NAME|FILE",
                        help="a built-in scenario (see 'list') or a path to a TOML file")
        sp.add_argument("--strategies", type=_strategies, metavar="A,B,...",
                        help="which of the scenario's strategies (default: all of them)")
        sp.add_argument("--clock", choices=("live", "virtual"), default="virtual",
                        help="virtual: instant, full scale (default); live: real threads "
                             "sleeping latency x time-scale")
        sp.add_argument("--time-scale", type=_positive_float, metavar="X",
                        help="live runs sleep latency x X (default: the scenario's time_scale)")
        if out:
            sp.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                            help=f"output directory (default: {DEFAULT_OUT}, git-ignored)")

    run = sub.add_parser("run", help="run a scenario's strategies; write results, CSV, report "
                                     "and plots to --out")
    common(run)
    run.add_argument("--variants", type=_names, metavar="A,B,...",
                     help="which of the scenario's [variants] (default: all of them; a scenario "
                          "without variants runs as written)")
    run.add_argument("--repeats", type=_positive_int, default=1, metavar="N",
                     help="live: N runs with the same seed; virtual: seeds seed..seed+N-1")
    run.add_argument("--no-plots", action="store_true", help="skip the plots")

    sweep = sub.add_parser("sweep", help="one parameter over a range -> sweep.csv, sweep.png")
    common(sweep, out=False)
    sweep.add_argument("--variant", metavar="NAME",
                       help="sweep one of the scenario's [variants] (default: the scenario as "
                            "written)")
    sweep.add_argument("--param", required=True, metavar="PATH=START:STOP:STEP",
                       help="e.g. stages.analyze.concurrency=10:200:10, "
                            "stages.fetch.slow_share=0:0.1:0.01, strategies.batched.size="
                            "10,25,50,100, strategies.parallel-batches.lanes=1:6:1, "
                            "strategies.continuous.max_in_flight=50,100,200,400,800")
    sweep.add_argument("--out", type=Path, metavar="DIR",
                       help=f"default: {DEFAULT_OUT}/sweeps/<scenario>--<param>")
    sweep.add_argument("--keep-runs", action="store_true",
                       help="keep every point's results file under DIR/points")

    cmp_ = sub.add_parser("compare", help="ratios B/A per scenario, clock and strategy, with "
                                          "the spread over repeats")
    cmp_.add_argument("a", type=Path, metavar="A", help="a results directory or file")
    cmp_.add_argument("b", type=Path, metavar="B", help="a results directory or file")

    plot = sub.add_parser("plot", help="re-draw the plots, summary.csv and report.md of a "
                                       "results directory from its files")
    plot.add_argument("dir", type=Path, metavar="DIR")

    sub.add_parser("list", help="the built-in scenarios")

    peers = sub.add_parser("peers", help="the same workload through stagepipe, pypeln, "
                                         "asyncio+Semaphore and a ThreadPoolExecutor batch "
                                         "loop, side by side with the engine (live)")
    peers.add_argument("--scenario", required=True, metavar="NAME|FILE")
    peers.add_argument("--items", type=_positive_int, metavar="N",
                       help="run only the first N items (default: all)")
    peers.add_argument("--time-scale", type=_positive_float, metavar="X",
                       help="sleep latency x X (default: the scenario's time_scale)")
    peers.add_argument("--out", type=Path, default=DEFAULT_OUT / "peers", metavar="DIR",
                       help=f"where peers.csv and peers.md go (default: {DEFAULT_OUT}/peers)")

    ls = sub.add_parser("live-services",
                        help="the example sync job on real clients (requests, openai) against "
                             "the fake servers and a throwaway PostgreSQL 15; not part of the "
                             "default suite")
    ls.add_argument("--items", type=_positive_int, default=None, metavar="N",
                    help="contacts 1..N (default: 1000)")
    ls.add_argument("--strategies", type=_strategies, metavar="A,B,...",
                    help="default: continuous,batched,parallel-batches")
    ls.add_argument("--time-scale", type=_positive_float, metavar="X",
                    help="sleep the injected latency x X (default: the module's, see "
                         "bench/_live_services.py)")
    ls.add_argument("--processes", type=_positive_int, default=1, metavar="N",
                    help="run the job's stages in N worker processes, each with its own "
                         "clients (default: 1, threads in the pipeline process)")
    ls.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                    help=f"results go to DIR/live-services/ (default: {DEFAULT_OUT})")
    ls.add_argument("--no-plots", action="store_true", help="skip the plots")
    return p


# --------------------------------------------------------------------------- commands


def _prepare_out(out: Path) -> None:
    """The default output directory (or one below it) is git-ignored: mark it so before
    anything is written there."""
    from bench._results import mark_untracked

    default = DEFAULT_OUT.resolve()
    if out.resolve() == default or out.resolve().is_relative_to(default):
        mark_untracked(DEFAULT_OUT)


def _finish(out: Path, *, plots: bool = True, wall_s: float | None = None,
            extra: Sequence[str] = (), fresh: Sequence[Path] | None = None) -> int:
    """summary.csv, report.md and plots for everything under ``out``; print the headline.

    ``fresh``: the results files this command wrote; rows of the others are labelled with
    where they come from (a committed reference file, an earlier run). None: nothing ran
    (``plot``), only committed files are labelled."""
    from bench._plots import plot_dir
    from bench._report import headline_table, write_report
    from bench._results import load_runs, origins, write_summary_csv

    runs = load_runs(out)
    if not runs:
        print(f"no results files under {out}", file=sys.stderr)
        return 1
    labels = origins(runs, fresh)
    drawn = plot_dir(runs, out) if plots else {}
    write_summary_csv(runs, out, out / "summary.csv")
    default = out.resolve() == DEFAULT_OUT.resolve()
    write_report(runs, out, out / "report.md", drawn, wall_s=wall_s, extra=extra,
                 origins=labels, reference=REFERENCE_OUT if default else None)
    print()
    print(headline_table(runs, labels))
    print(f"\nwrote {out / 'report.md'}, {out / 'summary.csv'}"
          + (f" and {sum(len(v) for v in drawn.values())} plots" if drawn else ""))
    bad = [r for r in runs if r.problems]
    for r in bad:
        print(f"INVALID {r.path}: {r.problems[0]}", file=sys.stderr)
    return 1 if bad else 0


def cmd_default(args: argparse.Namespace) -> int:
    from bench._harness import execute, plan
    from bench._progress import Progress

    t0 = time.perf_counter()
    out: Path = args.out
    scenarios = [load_scenario(builtin_path(n)) for n in builtin_names()]
    for sc in scenarios:  # a fresh suite: nothing stale mixed into the report
        d = out / sc.name
        if d.is_dir():
            for f in [*d.glob("*.json"), *(d / v for v in sc.variants)]:
                if f.is_dir():
                    for g in f.glob("*.json"):
                        g.unlink()
                elif f.exists():
                    f.unlink()
    _prepare_out(out)
    jobs = []
    for sc in scenarios:  # every variant of every scenario x strategy, virtual
        for vsc in scenario_variants(sc):
            jobs += plan(vsc, strategies=None, clock="virtual", repeats=1, time_scale=None,
                         out=out)
    live = [sc for sc in scenarios if sc.name == DEFAULT_LIVE_SCENARIO]
    if args.live_repeats > 0:
        for sc in live:
            jobs += plan(sc, strategies=None, clock="live", repeats=args.live_repeats,
                         time_scale=None, out=out)
    outcomes = execute(jobs, Progress(len(jobs)))
    failed = [o for o in outcomes if not o.ok]
    rc = _finish(out, wall_s=time.perf_counter() - t0, fresh=[j.path for j in jobs])
    print(f"default suite: {len(outcomes)} runs in {time.perf_counter() - t0:.0f} s"
          + (f", {len(failed)} FAILED" if failed else ""))
    return 1 if failed or rc else 0


def cmd_run(args: argparse.Namespace) -> int:
    from bench._harness import execute, plan
    from bench._progress import Progress

    t0 = time.perf_counter()
    sc = resolve_scenario(args.scenario)
    names = _check_strategies(sc, args.strategies)
    jobs = []
    for vsc in scenario_variants(sc, args.variants):
        jobs += plan(vsc, strategies=names, clock=args.clock, repeats=args.repeats,
                     time_scale=args.time_scale, out=args.out)
    _prepare_out(args.out)
    outcomes = execute(jobs, Progress(len(jobs)))
    rc = _finish(args.out, plots=not args.no_plots, wall_s=time.perf_counter() - t0,
                 fresh=[j.path for j in jobs])
    return 1 if any(not o.ok for o in outcomes) or rc else 0


def _check_strategies(sc: Scenario, names: list[str] | None) -> list[str]:
    have = [s.name for s in sc.strategies]
    for n in names or []:
        if n not in have:
            raise ScenarioError(sc.source, "strategies",
                                f"has no {n!r} (it defines: {', '.join(have)})")
    return names or have


def cmd_sweep(args: argparse.Namespace) -> int:
    from bench._progress import Progress
    from bench._sweep import parse_param, run_sweep

    try:
        param = parse_param(args.param)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    sc = resolve_scenario(args.scenario)
    if args.variant:
        sc = variant_scenario(sc, args.variant)
    names = _check_strategies(sc, args.strategies)
    var = f"--{sc.variant}" if sc.variant else ""
    out = args.out or DEFAULT_OUT / "sweeps" / f"{sc.name}{var}--{param.slug}"
    _prepare_out(out)
    rows, outcomes = run_sweep(sc, param, strategies=names, clock=args.clock,
                               time_scale=args.time_scale, out=out, keep_runs=args.keep_runs,
                               progress=Progress(len(param.values) * len(names)))
    budgeted = bool(sc.accounts())  # then: efficiency vs the budget-inclusive bound, 429s
    what = "makespan s / eff. / 429s / failed" if budgeted else "makespan s / p99 vis. s"
    width = max(26, len(what))
    print(f"\n{'value':>10}  " + "  ".join(f"{n:>{width}}" for n in names))
    print(f"{'':>10}  " + "  ".join(f"{what:>{width}}" for _ in names))
    for v in param.values:
        cells = []
        for n in names:
            r = next((r for r in rows if r["value"] == v and r["strategy"] == n), None)
            if r is None:
                cells.append(f"{'FAILED':>{width}}")
            elif budgeted:
                cells.append(f"{r['makespan_s']:.1f} / {r['efficiency']:.3f} / "
                             f"{100 * r['overload_share']:.1f}% / {r['failed']}".rjust(width))
            else:
                cells.append(f"{r['makespan_s']:>12.1f} / {r['visible_p99_s']:>11.1f}"
                             .rjust(width))
        print(f"{v!s:>10}  " + "  ".join(cells))
    print(f"\nwrote {out / 'sweep.csv'} and {out / 'sweep.png'}")
    bad = [r for r in rows if r["valid"] != "yes"]
    return 1 if bad or any(not o.ok for o in outcomes) else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from bench._results import load_runs, read_doc, run_data

    def load(p: Path) -> list[Any]:
        if p.is_dir():
            return load_runs(p)
        if p.is_file():
            return [run_data(read_doc(p), p)]
        raise _UsageError(f"{p}: no such file or directory")

    a, b = load(args.a), load(args.b)

    def groups(runs: list[Any]) -> dict[tuple[str, str, str], list[Any]]:
        out: dict[tuple[str, str, str], list[Any]] = {}
        for r in runs:  # a variant compares as a strategy does: "continuous [adaptive]"
            strategy = f"{r.strategy} [{r.variant}]" if r.variant else r.strategy
            out.setdefault((r.scenario, r.clock, strategy), []).append(r)
        return out

    ga, gb = groups(a), groups(b)
    if len(ga) == 1 and len(gb) == 1 and set(ga) != set(gb):
        ka, kb = next(iter(ga)), next(iter(gb))  # two single files: compare them as they are
        gb = {ka: gb[kb]}
    common = sorted(set(ga) & set(gb))
    if not common:
        print("compare: no (scenario, clock, strategy) in common", file=sys.stderr)
        return 1
    keys = (("makespan_s", "makespan"), ("throughput_per_s", "items/s"),
            ("visible_p50_s", "p50 vis."), ("visible_p99_s", "p99 vis."),
            ("efficiency", "efficiency"))
    print(f"B / A, mean ratio [min-max over repeat pairs]; A = {args.a}, B = {args.b}")
    header = f"{'scenario':<18}{'clock':<9}{'strategy':<30}{'runs':>7}" + "".join(
        f"{lbl:>24}" for _, lbl in keys)
    print(header)
    print("-" * len(header))
    for k in common:
        ra, rb = ga[k], gb[k]
        cells = []
        for key, _ in keys:
            xa = [float(r.summary[key]) for r in ra]
            xb = [float(r.summary[key]) for r in rb]
            if min(xa) <= 0:
                cells.append(f"{'-':>24}")
                continue
            mean = statistics.fmean(xb) / statistics.fmean(xa)
            lo, hi = min(xb) / max(xa), max(xb) / min(xa)
            cells.append(f"{mean:>10.3f} [{lo:.3f}-{hi:.3f}]".rjust(24))
        print(f"{k[0]:<18}{k[1]:<9}{k[2]:<30}{f'{len(ra)}/{len(rb)}':>7}" + "".join(cells))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    if not args.dir.is_dir():
        raise _UsageError(f"{args.dir}: not a directory")
    sweep_csv = args.dir / "sweep.csv"
    if sweep_csv.exists():
        from bench._sweep import plot_sweep_csv

        png = plot_sweep_csv(sweep_csv, args.dir / "sweep.png", args.dir.name.split("--")[0])
        print(f"wrote {png}")
        return 0
    return _finish(args.dir)


def cmd_list(args: argparse.Namespace) -> int:
    for name in builtin_names():
        sc = load_scenario(builtin_path(name))
        stages = " -> ".join(f"{s.name}({s.concurrency})" for s in sc.stages)
        print(f"{name:<18} {sc.items:>6} items  {stages}")
        print(f"{'':<18} {sc.description}")
        print(f"{'':<18} strategies: {', '.join(s.name for s in sc.strategies)}; "
              f"file: {builtin_path(name)}")
    print(f"{'live-services':<18} {1000:>6} items  fetch(50) -> analyze(50) -> save(10) -> "
          "assign(10)")
    print(f"{'':<18} the sync job on real clients: fake messages/OpenAI servers on loopback "
          "(300/500 ms medians, 2% at 10x) into a throwaway PostgreSQL 15")
    print(f"{'':<18} strategies: continuous, batched, parallel-batches; not a scenario file "
          "(needs PostgreSQL, not in the default suite): python -m bench live-services")
    return 0


def cmd_live_services(args: argparse.Namespace) -> int:
    from bench._live_report import live_rows
    from bench._live_services import (
        DEFAULT_ITEMS,
        DEFAULT_TIME_SCALE,
        LiveServicesSpec,
        run_live_services,
    )
    from bench._progress import Progress
    from bench._results import load_runs

    t0 = time.perf_counter()
    spec = LiveServicesSpec(items=args.items or DEFAULT_ITEMS,
                            time_scale=args.time_scale or DEFAULT_TIME_SCALE,
                            processes=args.processes)
    names = args.strategies or ["continuous", "batched", "parallel-batches"]
    _prepare_out(args.out)
    outcomes, report = run_live_services(spec, strategies=names, out=args.out,
                                         progress=Progress(len(names)), plots=not args.no_plots)
    if report is not None:
        rows = live_rows(load_runs(report.parent))
        print(f"\n{'strategy':<18}{'procs':>6}{'items/s':>9}{'makespan s':>12}"
              f"{'efficiency':>12}{'vs batched':>12}{'vs par.-b.':>12}{'CPU s':>8}")
        for r in rows:
            vb, vp = r["vs_batched"], r["vs_parallel_batches"]
            cpu = (r["cpu_s"] or {}).get("total")
            print(f"{r['strategy']:<18}{r['processes']:>6}{r['throughput_per_s']:>9.2f}"
                  f"{r['makespan_s']:>12.1f}"
                  f"{r['efficiency']:>12.3f}{f'{vb:.2f}x' if vb else '-':>12}"
                  f"{f'{vp:.2f}x' if vp else '-':>12}"
                  f"{f'{cpu:.1f}' if cpu is not None else '-':>8}")
        print(f"\nwrote {report} (live-services: {len(outcomes)} runs in "
              f"{time.perf_counter() - t0:.0f} s)")
    return 0 if outcomes and all(o.ok for o in outcomes) else 1


def cmd_peers(args: argparse.Namespace) -> int:
    from bench._peers import run_peers

    sc = resolve_scenario(args.scenario)
    _prepare_out(args.out)
    return run_peers(sc, items=args.items, time_scale=args.time_scale, out=args.out)


class _UsageError(Exception):
    pass


def _out_problem(out: Path | None) -> str | None:
    """--out must be a directory or a path that can become one (not a file, nor under one)."""
    if out is None:
        return None
    p = out
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir():
        where = "is a file" if p == out else f"is under {p}, which is a file"
        return f"--out: expected a directory, {out} {where}"
    return None


COMMANDS = {None: cmd_default, "run": cmd_run, "sweep": cmd_sweep, "compare": cmd_compare,
            "plot": cmd_plot, "list": cmd_list, "peers": cmd_peers,
            "live-services": cmd_live_services}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a usage line on bad arguments
    if args.command is None and args.live_repeats < 0:
        parser.error("--live-repeats: expected an integer >= 0")
    bad_out = _out_problem(getattr(args, "out", None))
    if bad_out:  # before anything runs (it would fail every run's write, after the runs)
        print(f"{parser.prog}: error: {bad_out}", file=sys.stderr)
        return 2
    try:
        return cast(int, COMMANDS[args.command](args))
    except ScenarioError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except _UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
