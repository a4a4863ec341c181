"""Side-by-side benchmark: hessian-spectra against PyHessian, hessian-eigenthings and curvlinops.

Usage (from the repository root, in the bench environment)::

    python bench/run.py [--quick] [--tasks top1 top10 trace density product]
                        [--workloads mlp cnn lm] [--tools ours curvlinops eigenthings pyhessian]
                        [--name NAME] [--threads 2] [--cap SECONDS] [--profile]

Writes ``bench/results/<name>.md`` (the tables, also printed) and
``bench/results/<name>.json`` (every row). Seeds are fixed, so products,
errors and estimates are the same on every run; only times vary.

Protocol:

* Every tool runs in float64 on the same Hessian (see ``workloads.py``); the
  reference (``reference.py``) is the dense float64 Hessian, built once by
  ``n`` double-backward products and cached.
* top-k: error is ``max_i |λ_i − λ*_i| / |λ*_i|`` over the k largest
  (algebraic) eigenvalues. Target 1e-6, PyHessian judged at 1e-2 (its default
  accuracy). A run whose error misses the target is a **miss** and is not timed.
  "default" runs the tool as shipped; "tuned" walks a ladder of settings from
  loose to tight and reports the first one that reaches the target (the time of
  the failed attempts is not counted: the tuning is free, which favours the
  tuned tool).
* trace: every tool gets the same number of products; several seeds; mean and
  RMS relative error against the exact trace, and our reported standard error.
* density: the same number of runs and Lanczos steps for every tool; time,
  products, and the relative error of the density's mean (``∫λ p(λ)dλ`` against
  ``tr(H)/n``) and second moment (against ``||H||_F^2 / n``).
* product: the cost of one Hessian product relative to one full-data gradient,
  single and in a block of 8 (ours: ``matmat`` of 8 rows; curvlinops: its
  native block ``A @ V``; the others: 8 single products). Ours keeps each batch's
  gradient graph between products, so its rows are the steady state of a Krylov
  run; "single, graphs rebuilt" is a first product. Before every timed top-k,
  trace or density call ours drops its graphs, so each call pays for them.

Times are the minimum over ``--reps`` repetitions (1 with ``--quick``) of
successful runs; peak memory is the increase of peak RSS during the first run
(see ``measure.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import peers  # noqa: E402
import workloads  # noqa: E402
from measure import measure  # noqa: E402
from reference import reference  # noqa: E402

TOOLS = ["ours", "curvlinops", "eigenthings", "pyhessian"]
TASKS = ["top1", "top10", "trace", "density", "product"]
TARGET = 1e-6
PYHESSIAN_TARGET = 1e-2
RESULTS = Path(__file__).parent / "results"


def _msg(err: BaseException) -> str:
    """One line for a caught error."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:160] if lines else ''}".rstrip(": ")


def _fmt_t(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_e(e: float | None) -> str:
    if e is None:
        return "–"
    if not math.isfinite(e):
        return "inf"
    return f"{e:.1e}"


def _fmt_m(m: float | None) -> str:
    return "–" if m is None else f"{m:.0f}"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.rows: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}

    # -- helpers ---------------------------------------------------------------------------
    def add(self, **row: Any) -> dict[str, Any]:
        self.rows.append(row)
        line = "  ".join(f"{k}={v}" for k, v in row.items() if k not in ("info", "values", "_retime"))
        print("   ", line, flush=True)
        return row

    def timed(self, ad: peers.Adapter, fn: Any, ok: Any, cap: float | None) -> dict[str, Any]:
        """Run ``fn`` once (counted, memory), check it with ``ok``; repeat for time if it passed."""
        ad.reset()
        m = measure(fn, cap)
        if m.capped:  # a burst of load on a shared machine can do this: one more try
            print("    capped; trying once more", flush=True)
            ad.reset()
            m = measure(fn, cap)
        products = ad.count
        out: dict[str, Any] = {"products": products, "peak_mib": m.peak_mib, "seconds": m.seconds,
                               "seconds_raw": m.seconds}
        if m.error is not None:
            out["status"] = f"> cap ({cap:.0f} s)" if m.capped else "crash"
            out["note"] = "" if m.capped else _msg(m.error)
            out["seconds"] = None if not m.capped else m.seconds
            return out
        out["value"] = m.value
        passed, extra = ok(m.value)
        out.update(extra)
        if not passed:
            out["status"] = "miss"
            out["seconds"] = None
            return out
        out["status"] = "ok"
        out["_retime"] = (ad, fn, cap)
        return out

    def retime(self, rows: list[dict[str, Any]]) -> None:
        """Repeat the passing runs round-robin (``--reps`` in all) and keep each one's minimum time,
        so a burst of load on the machine hits every tool alike."""
        todo = [r for r in rows if "_retime" in r]
        for _ in range(self.a.reps - 1):
            for r in todo:
                ad, fn, cap = r["_retime"]
                ad.reset()
                m = measure(fn, cap, memory=False)
                if m.error is None:
                    r["seconds"] = min(r["seconds"], m.seconds)
        for r in todo:
            del r["_retime"]
        if todo and self.a.reps > 1:
            print(f"    retimed {len(todo)} passing runs x {self.a.reps - 1}", flush=True)

    # -- tasks -----------------------------------------------------------------------------
    def topk(self, w: workloads.Workload, ads: dict[str, peers.Adapter], ref: dict, k: int) -> None:
        task = f"top{k}"
        cap = self.a.cap
        tols = [1e-4, 1e-6, 1e-8] if self.a.quick else [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-10]
        iters = [20, 40, 80, 160, 320] if self.a.quick else [20, 40, 60, 80, 120, 160, 240, 320, 480]
        iters = [m for m in iters if k <= m < w.num_params]

        def check(target: float) -> Any:
            def ok(value: Any) -> tuple[bool, dict]:
                vals, info = value
                err = peers.max_rel_error(vals[:k], ref["top"]) if len(vals) >= k else math.inf
                return err <= target, {"error": err, "values": vals[:k], "info": info}

            return ok

        def one(tool: str, setting: str, kw: dict, target: float) -> dict:
            ad = ads[tool]
            r = self.timed(ad, lambda: ad.topk(k, seed=0, **kw), check(target), cap)
            return self.add(workload=w.name, task=task, tool=tool, setting=setting, target=target, **{
                key: r.get(key) for key in ("status", "error", "seconds", "seconds_raw", "products", "peak_mib", "note",
                                         "values", "info", "_retime") if key in r or key != "_retime"
            })

        def ladder(tool: str, settings: list[tuple[str, dict]], target: float) -> None:
            tried = []
            for label, kw in settings:
                row = one(tool, f"tuned: {label}", kw, target)
                if row["status"] == "ok" or row["status"].startswith(">"):
                    row["tried"] = tried
                    return
                tried.append(label)
                row["superseded"] = True  # a failed rung of the ladder, not a result
            if tried:
                self.rows[-1].pop("superseded", None)
                self.rows[-1]["tried"] = tried[:-1]

        if "ours" in ads:
            if peers.Ours.has("eigenpairs"):
                one("ours", "default: eigenpairs (auto)", {"solver": "eigenpairs"}, TARGET)
            one("ours", "default", {}, TARGET)
            ladder("ours", [(f"tol={t:g}", {"tol": t}) for t in tols], TARGET)
            if peers.Ours.has("block_lanczos"):
                blk = {"solver": "block_lanczos"}
                one("ours", "default: block_lanczos", blk, TARGET)
                ladder("ours", [(f"block_lanczos tol={t:g}", {"tol": t, **blk}) for t in tols], TARGET)
        if "curvlinops" in ads:
            one("curvlinops", "default: eigsh tol=0", {"tol": 0.0}, TARGET)
            ladder("curvlinops", [(f"eigsh tol={t:g}", {"tol": t}) for t in tols], TARGET)
        if "eigenthings" in ads:
            one("eigenthings", "default", {}, TARGET)
            ladder("eigenthings", [(f"which=LA, reorth, max_iter={m}, tol=1e-8",
                                    {"which": "LA", "reorthogonalize": True, "max_iter": m, "tol": 1e-8})
                                   for m in iters], TARGET)
        if "pyhessian" in ads:
            one("pyhessian", "default (maxIter=100, tol=1e-3)", {}, PYHESSIAN_TARGET)
        self.retime([r for r in self.rows if r.get("workload") == w.name and r.get("task") == task])

    def trace(self, w: workloads.Workload, ads: dict[str, peers.Adapter], ref: dict) -> None:
        m = self.a.trace_matvecs
        exact = ref["trace"]
        jobs: list[tuple[str, str, Any]] = []
        if "ours" in ads:
            jobs += [("ours", "hutch++", lambda s: ads["ours"].trace(m, s, "hutch++")),
                     ("ours", "hutchinson", lambda s: ads["ours"].trace(m, s, "hutchinson"))]
        if "curvlinops" in ads:
            jobs.append(("curvlinops", "hutchpp_trace", lambda s: ads["curvlinops"].trace(m, s)))
        if "eigenthings" in ads:
            jobs.append(("eigenthings", "trace (hutch++)", lambda s: ads["eigenthings"].trace(m, s, "hutch++")))
        if "pyhessian" in ads:
            jobs.append(("pyhessian", f"trace(maxIter={m}, tol=0) (hutchinson)", lambda s: ads["pyhessian"].trace(m, s)))
            jobs.append(("pyhessian", "default trace() (maxIter=100, tol=1e-3)", lambda s: ads["pyhessian"].trace(None, s)))
        for tool, setting, fn in jobs:
            ad = ads[tool]
            errs, times, prods, stderrs, peaks, status, note = [], [], [], [], [], "ok", ""
            for seed in range(self.a.trace_seeds):
                ad.reset()
                r = measure(lambda fn=fn, seed=seed: fn(seed), self.a.cap, memory=(seed == 0))
                if r.error is not None:
                    status = "> cap" if r.capped else "crash"
                    note = _msg(r.error)
                    break
                est, info = r.value
                errs.append((est - exact) / abs(exact))
                times.append(r.seconds)
                prods.append(ad.count)
                if r.peak_mib is not None:
                    peaks.append(r.peak_mib)
                if "stderr" in info and math.isfinite(info["stderr"]):
                    stderrs.append(info["stderr"] / abs(exact))
            self.add(
                workload=w.name, task="trace", tool=tool, setting=setting, status=status, note=note,
                products=round(statistics.mean(prods), 1) if prods else None,
                seconds=statistics.mean(times) if times else None,
                mean_abs_error=statistics.mean(abs(e) for e in errs) if errs else None,
                rms_error=math.sqrt(statistics.mean(e * e for e in errs)) if errs else None,
                mean_reported_stderr=statistics.mean(stderrs) if stderrs else None,
                peak_mib=peaks[0] if peaks else None, seeds=len(errs),
            )

    def density(self, w: workloads.Workload, ads: dict[str, peers.Adapter], ref: dict) -> None:
        R, M = self.a.density_runs, self.a.density_steps
        mean_ref = ref["trace"] / ref["n"]
        m2_ref = ref["fro2"] / ref["n"]
        for tool, ad in ads.items():
            ad.reset()
            r = measure(lambda ad=ad: ad.density(R, M, 0), self.a.cap)
            row: dict[str, Any] = {"products": ad.count, "seconds": r.seconds, "peak_mib": r.peak_mib}
            if r.error is not None:
                row["status"] = "> cap" if r.capped else "crash"
                row["note"] = _msg(r.error)
            else:
                summ, _ = r.value
                row["status"] = "ok"
                row["mean_error"] = abs(summ["mean"] - mean_ref) / abs(mean_ref)
                row["m2_error"] = None if summ["second_moment"] is None else abs(summ["second_moment"] - m2_ref) / m2_ref
                row["note"] = summ["returns"]
            self.add(workload=w.name, task="density", tool=tool, setting=f"{R} runs x {M} steps", **row)

    def product(self, w: workloads.Workload, ads: dict[str, peers.Adapter]) -> None:
        """Per-product cost; the repetitions go round-robin over all tools, so a burst of load
        on the machine hits every tool alike, and the minimum per entry is kept."""
        grad = peers.gradient_fn(w)
        entries: list[tuple[str, str, Any, int]] = [("gradient", "one full-data gradient", grad, 1)]
        for tool, ad in ads.items():
            entries.append((tool, "single", ad.matvec, 1))
            if hasattr(ad, "matvec_cold") and hasattr(getattr(ad, "op", None), "clear_graphs"):
                entries.append((tool, "single, graphs rebuilt (a first product)", ad.matvec_cold, 1))  # type: ignore[attr-defined]
            if tool == "curvlinops":
                entries.append((tool, "single via to_scipy (eigsh's path)", ad.matvec_scipy, 1))  # type: ignore[attr-defined]
            entries.append((tool, f"block of 8 ({ad.block_kind})", ad.block8, 8))
        first: dict[int, Any] = {}
        for i, (_, _, fn, _) in enumerate(entries):
            first[i] = measure(fn)  # warm-up; also the memory figure
        best = {i: math.inf for i in range(len(entries))}
        for _ in range(self.a.product_reps):
            for i, (_, _, fn, _) in enumerate(entries):
                if first[i].error is None:
                    best[i] = min(best[i], measure(fn, memory=False).seconds)
        tg = best[0]
        for i, (tool, label, _, k) in enumerate(entries):
            if first[i].error is not None:
                self.add(workload=w.name, task="product", tool=tool, setting=label, status="crash",
                         note=_msg(first[i].error))
                continue
            t = best[i] / k
            if label.startswith("block of 8"):  # ours names the mechanism it chose by now
                label = f"block of 8 ({ads[tool].block_kind})"
            self.add(workload=w.name, task="product", tool=tool, setting=label, status="ok",
                     seconds=t, per_gradient=t / tg, peak_mib=first[i].peak_mib)

    # -- driver ----------------------------------------------------------------------------
    def run(self) -> None:
        a = self.a
        self.meta = {
            "command": "python bench/run.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": _machine(),
            "threads": torch.get_num_threads(),
            "versions": _versions(),
            "loadavg_start": _loadavg(),
            "dtype": "float64",
            "args": vars(a),
        }
        t_all = time.perf_counter()
        for name in a.workloads:
            t_w = time.perf_counter()
            w = workloads.build(name)
            print(f"== {name}: n={w.num_params}, {w.num_samples} samples; reference ...", flush=True)
            ref = reference(w, recompute=a.recompute_reference)
            self.meta.setdefault("references", {})[name] = {k: v for k, v in ref.items() if k != "top"} | {
                "top10": ref["top"][:10]}
            self.meta.setdefault("workloads", {})[name] = {
                "n": w.num_params, "samples": w.num_samples, "batches": len(w.batches), "description": w.description}
            ads: dict[str, peers.Adapter] = {}
            for tool in a.tools:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        ads[tool] = peers.ADAPTERS[tool](w)
                except Exception as e:  # a tool that cannot even start is a result too
                    self.add(workload=name, task="setup", tool=tool, status="crash",
                             note=_msg(e))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for task in a.tasks:
                    print(f"-- {name} / {task}", flush=True)
                    if task == "top1":
                        self.topk(w, ads, ref, 1)
                    elif task == "top10":
                        self.topk(w, ads, ref, 10)
                    elif task == "trace":
                        self.trace(w, ads, ref)
                    elif task == "density":
                        self.density(w, ads, ref)
                    elif task == "product":
                        self.product(w, ads)
            if a.profile and "ours" in ads:
                _profile(ads["ours"], a.name, name)
            self.meta.setdefault("seconds_per_workload", {})[name] = round(time.perf_counter() - t_w, 1)
        self.meta["loadavg_end"] = _loadavg()
        self.meta["seconds_total"] = round(time.perf_counter() - t_all, 1)


# -- environment ---------------------------------------------------------------------------
def _machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}"


def _loadavg() -> str:
    try:
        return open("/proc/loadavg").read().split()[0:3].__str__()
    except OSError:
        return "?"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for d in ("torch", "numpy", "scipy", "hessian-spectra", "PyHessian", "hessian-eigenthings",
              "curvlinops-for-pytorch", "backpack-for-pytorch"):
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = "not installed"
    return out


def _profile(ad: peers.Adapter, run_name: str, wl: str) -> None:
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    ad.topk(10, seed=0)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(40)
    s.write("\n\n== by own time ==\n")
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    path = RESULTS / f"{run_name}-profile-{wl}.txt"
    path.write_text(s.getvalue())
    print(f"   profile of ours top-10 on {wl}: {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions, seeds and ladder rungs (~10 min on 2 cores)")
    p.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    p.add_argument("--workloads", nargs="+", default=list(workloads.WORKLOADS), choices=list(workloads.WORKLOADS))
    p.add_argument("--tools", nargs="+", default=TOOLS, choices=TOOLS)
    p.add_argument("--name", default=None, help="results/<name>.md and .json (default cpu-quick / cpu-full)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cap", type=float, default=None, help="time cap per call in seconds (default 60 quick, 300 full)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--trace-matvecs", type=int, default=None)
    p.add_argument("--trace-seeds", type=int, default=None)
    p.add_argument("--density-runs", type=int, default=None)
    p.add_argument("--density-steps", type=int, default=None)
    p.add_argument("--product-reps", type=int, default=None)
    p.add_argument("--recompute-reference", action="store_true")
    p.add_argument("--profile", action="store_true", help="cProfile ours top-10 per workload into results/")
    a = p.parse_args(argv)
    q = a.quick
    a.name = a.name or ("cpu-quick" if q else "cpu-full")
    a.cap = a.cap or (60.0 if q else 300.0)
    a.reps = a.reps or (1 if q else 3)
    a.trace_matvecs = a.trace_matvecs or (30 if q else 99)
    a.trace_seeds = a.trace_seeds or (3 if q else 10)
    a.density_runs = a.density_runs or (3 if q else 10)
    a.density_steps = a.density_steps or (20 if q else 80)
    a.product_reps = a.product_reps or (5 if q else 10)
    torch.set_num_threads(a.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    b = Bench(a)
    b.run()
    (RESULTS / f"{a.name}.json").write_text(
        json.dumps({"meta": b.meta, "rows": b.rows}, indent=1, default=str))
    import report

    md = report.markdown(b.meta, b.rows)
    print(md)
    (RESULTS / f"{a.name}.md").write_text(md)
    print(f"wrote {RESULTS / (a.name + '.md')} and .json")


if __name__ == "__main__":
    main()
