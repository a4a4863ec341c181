"""Hessian products and top eigenvalues at realistic size, hessian-spectra beside its peers.

One command runs every tool (hessian-spectra, PyHessian 0.1, hessian-eigenthings 1.0.0a5,
curvlinops-for-pytorch) on the workloads of ``realistic_models.py`` in float32 and writes a
Markdown table and the raw JSON to ``bench/results/realistic-<device>[-<name>].{md,json}``::

    python bench/realistic.py                       # CPU; --device cuda on a GPU
    python bench/realistic.py --quick               # small models, one repetition: a check

Every (workload, tool) pair runs in its own process (``--worker``), so one tool's
allocations, threads or crash never touch another's numbers. Measured per pair:

* **cost**: one gradient (forward + backward over the batch, ``torch.autograd.grad``), one
  Hessian product and a block of 8 (per vector), both relative to that process's gradient.
  Ours twice: graphs kept (``with op.keep_graphs():`` around ``op.matvec``, the steady
  state of a Krylov run: only the second backward) and graphs rebuilt (a product outside
  any block: forward, first and second backward). Ours' block is ``op.matmat(V)``, V of
  shape (8, n), after one warm-up block (in which the operator picks vmap or loop);
  curvlinops' is its native ``A @ V``; PyHessian and hessian-eigenthings have none, so
  theirs is 8 single products. Times are the minimum over ``--reps`` alternations of
  gradient and product after a warm-up of each (block: ``--block-reps``).
* **memory**: peak bytes allocated during one training step (forward + ``loss.backward()``
  into ``.grad``), one product, and a block of 8, above what was allocated before the
  call. On CPU from the allocator's own events (``torch.profiler`` with
  ``profile_memory=True``: every allocation and free of torch's CPU allocator, summed in
  time order), on CUDA from ``torch.cuda.max_memory_allocated``. The product's result is
  counted, the model and data are not.
* **retained**: on a fresh operator, the bytes still allocated after each of 5 single
  products (results dropped): held after the first, and the growth per product over
  products 2-5 (a leak would show there). Ours inside ``keep_graphs()``, which keeps each
  batch's gradient graph on purpose (up to ``graph_cache_bytes``).
* **top-1 / top-10** (``--eig-size``; "small" by default on CPU, where one realistic top-10
  takes longer than this whole run): time and products to the k largest eigenvalues,
  error = max relative error against a tight reference (ours ``lanczos(which="LA",
  tol=1e-10)`` on a float64 copy of the model, independent of float32 rounding); a run
  reaches the stated accuracy ``--target`` (1e-3) or is a miss. Each tool with its
  defaults, then with settings that reach the target if the defaults do not.
* **lm50k**: the LM with GPT-2's 50257-token vocabulary: a training step, our GGN product
  (``GGNOperator`` with ``hf_lm_loss_of_output(fused="auto")``) and every tool's Hessian
  product (time and peak memory; one repetition).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

TOOLS = ["ours", "pyhessian", "eigenthings", "curvlinops"]
MIB = 2**20


# -- measuring ------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def memory(fn: Callable[[], Any], device: str) -> tuple[int, int]:
    """``(peak, net)`` bytes allocated during ``fn()`` above those allocated before it
    (``net``: still allocated at its end; ``fn``'s result is dropped inside)."""

    def run() -> None:
        fn()

    gc.collect()
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        gc.collect()
        sync(device)
        return torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
        gc.collect()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() == torch.device("cpu").type or str(e.device_type()).endswith("CPU"):
            cur += e.nbytes()
            peak = max(peak, cur)
    return peak, cur


# -- worker: one (workload, tool) in its own process -------------------------------------------
def _adapter(tool: str, w: Any) -> Any:
    import peers

    return peers.ADAPTERS[tool](w)


def _train_step(w: Any) -> Callable[[], None]:
    params = [p for p in w.model.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        for batch in w.batches:
            (w.loss_fn(w.model, batch) * (batch[0].shape[0] / w.num_samples)).backward()
        for p in params:
            p.grad = None

    return step


def work_cost(a: argparse.Namespace) -> dict[str, Any]:
    import peers
    import realistic_models

    dev = a.device
    w = realistic_models.build(a.workload, a.size, dev)
    out: dict[str, Any] = {
        "workload": w.name,
        "tool": a.tool,
        "n": w.num_params,
        "desc": w.description,
    }
    grad = peers.gradient_fn(w)
    step = _train_step(w)
    ad = _adapter(a.tool, w)
    singles: dict[str, Callable[[], Any]] = {"single": ad.matvec}
    if a.tool == "ours":  # a second operator, outside any keep_graphs() block
        from hessian_spectra import HessianOperator

        plain = HessianOperator(w.model, w.batches, w.loss_fn, seed=0)
        v = ad._rand(1)[0]
        singles = {"kept": ad.matvec, "rebuilt": lambda: plain.matvec(v)}
    light = a.workload == "lm50k"  # one repetition, no block, no retained memory
    reps = 1 if light else a.reps
    # times: a warm-up of each, then alternate the gradient and the products
    grad()
    for fn in singles.values():
        fn()
    if a.tool == "ours":
        ad.matvec()  # the kept graph is in place for the "kept" timings
    t: dict[str, list[float]] = {"grad": [], **{k: [] for k in singles}}
    for _ in range(reps):
        t["grad"].append(timed(grad, dev))
        for k, fn in singles.items():
            t[k].append(timed(fn, dev))
    out["grad_s"] = min(t["grad"])
    for k in singles:
        out[f"{k}_s"] = min(t[k])
    print(
        f"  {w.name}/{a.tool}: times {dict((k, round(min(v), 4)) for k, v in t.items())}",
        flush=True,
    )
    if not light:
        if a.tool == "ours":
            ad.block8()  # warm-up: the operator measures vmap against a loop here
        out["block8_s"] = min(timed(ad.block8, dev) for _ in range(a.block_reps))
        out["block_kind"] = ad.block_kind
        if a.tool == "ours":
            out["block_rows"] = getattr(ad.op, "block_rows", None)
        print(f"  {w.name}/{a.tool}: block {out['block8_s']:.4f} s", flush=True)
    # peak memory
    out["train_peak"], _ = memory(step, dev)
    if a.tool == "ours":
        out["rebuilt_peak"], _ = memory(singles["rebuilt"], dev)
        ad.op.clear_graphs()  # the first product of a Krylov run: builds and keeps the graph
        out["first_in_block_peak"], out["kept_bytes"] = memory(ad.matvec, dev)
        out["kept_peak"], _ = memory(ad.matvec, dev)  # above the kept graph
        if not light:
            ad.op.clear_graphs()
            out["block8_peak"], _ = memory(ad.block8, dev)
            out["block_rows_mem"] = getattr(ad.op, "block_rows", None)
        ad.op.clear_graphs()
    else:
        out["single_peak"], _ = memory(ad.matvec, dev)
        if not light:
            out["block8_peak"] = (
                memory(ad.block8, dev)[0] if ad.block_kind == "native" else out["single_peak"]
            )
    print(f"  {w.name}/{a.tool}: memory done", flush=True)
    if a.tool == "ours" and a.workload == "lm50k":
        out.update(_ggn(w, dev, reps))
    if not light:  # retained between products, on a fresh operator
        del ad
        gc.collect()
        ad = _adapter(a.tool, w)
        nets = [memory(ad.matvec, dev)[1] for _ in range(5)]
        out["retained_bytes"] = nets
        out["held_after_1"] = nets[0]
        out["growth_per_product"] = sum(nets[1:]) / 4
    return out


def _ggn(w: Any, dev: str, reps: int) -> dict[str, Any]:
    """Our GGN product on the HuggingFace model (fused cross-entropy output product)."""
    import realistic_models

    from hessian_spectra import GGNOperator, hf_lm_forward, hf_lm_loss_of_output

    G = GGNOperator(
        w.model.hf,
        realistic_models.hf_batches(w),
        hf_lm_forward(),
        hf_lm_loss_of_output(fused="auto"),
    )
    v = torch.randn(w.num_params, generator=torch.Generator().manual_seed(0)).to(dev)
    G.matvec(v)  # warm-up
    s = min(timed(lambda: G.matvec(v), dev) for _ in range(reps))
    peak, _ = memory(lambda: G.matvec(v), dev)
    return {"ggn_s": s, "ggn_peak": peak}


def work_ref(a: argparse.Namespace) -> dict[str, Any]:
    import realistic_models

    from hessian_spectra import HessianOperator, lanczos

    w = realistic_models.build(a.workload, a.eig_size, a.device, torch.float64)
    t = time.perf_counter()
    res = lanczos(
        HessianOperator(w.model, w.batches, w.loss_fn), k=10, which="LA", tol=1e-10, seed=0
    )
    return {
        "workload": w.name,
        "n": w.num_params,
        "desc": w.description,
        "top": sorted(res.eigenvalues.tolist(), reverse=True),
        "converged": bool(res.converged),
        "products": res.num_matvecs,
        "seconds": time.perf_counter() - t,
    }


def _settings(tool: str, k: int) -> list[tuple[str, dict[str, Any]]]:
    """Defaults first, then settings tried in order until one reaches the target (ours: the
    default and ``tol`` at the target's accuracy, both)."""
    if tool == "ours":
        return [("default: lanczos", {}), ("tol=1e-3", {"tol": 1e-3})]
    if tool == "curvlinops":
        return [("default: eigsh tol=0", {"tol": 0.0})]
    if tool == "eigenthings":
        tuned = [
            (
                f"which=LA, reorth, max_iter={m}",
                {"which": "LA", "reorthogonalize": True, "max_iter": m, "tol": 1e-8},
            )
            for m in (40, 80)
        ]
        return [("default", {}), *tuned]
    return [
        ("default (maxIter=100, tol=1e-3)", {}),
        ("maxIter=300, tol=1e-5", {"maxIter": 300, "tol": 1e-5}),
    ]


def work_eig(a: argparse.Namespace) -> dict[str, Any]:
    import measure
    import peers
    import realistic_models

    ref = json.loads(Path(a.ref).read_text())["top"]
    w = realistic_models.build(a.workload, a.eig_size, a.device)
    ad = _adapter(a.tool, w)
    rows = []
    for k in (1, 10):
        for label, kw in _settings(a.tool, k):
            ad.reset()
            m = measure.measure(lambda k=k, kw=kw: ad.topk(k, seed=0, **kw), a.cap, memory=False)
            row: dict[str, Any] = {
                "k": k,
                "setting": label,
                "products": ad.count,
                "seconds": m.seconds,
            }
            if m.error is not None:
                row["status"] = f"> cap ({a.cap:.0f} s)" if m.capped else "crash"
                row["note"] = f"{type(m.error).__name__}: {str(m.error)[:160]}"
            else:
                vals = m.value[0]
                err = peers.max_rel_error(vals[:k], ref) if len(vals) >= k else math.inf
                row["error"] = err
                row["status"] = "ok" if err <= a.target else "miss"
            rows.append(row)
            print(
                f"  {w.name}/{a.tool} top{k} {label}: {row['status']} {row.get('error')}",
                flush=True,
            )
            if row["status"] == "ok" and a.tool != "ours":  # ours: also the tolerance of the target
                break
    return {
        "workload": w.name,
        "tool": a.tool,
        "n": w.num_params,
        "desc": w.description,
        "rows": rows,
    }


# -- the driver -------------------------------------------------------------------------------
def spawn(
    a: argparse.Namespace, kind: str, workload: str, tool: str, timeout: float, extra: list[str]
) -> dict:
    out = Path(a.tmp) / f"{kind}-{workload}-{tool}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--workload", workload, "--tool", tool,
           "--device", a.device, "--size", a.size, "--eig-size", a.eig_size, "--reps", str(a.reps),
           "--block-reps", str(a.block_reps), "--threads", str(a.threads), "--cap", str(a.cap),
           "--target", str(a.target), "--worker-out", str(out), *extra]  # fmt: skip
    print(f"[{time.strftime('%H:%M:%S')}] {kind} {workload} {tool}", flush=True)
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
        if p.returncode == 0 and out.exists():
            res = json.loads(out.read_text())
        else:
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
            res = {"workload": workload, "tool": tool, "status": "crash", "note": tail[0][:200]}
        sys.stdout.write(p.stdout)
    except subprocess.TimeoutExpired:
        res = {"workload": workload, "tool": tool, "status": f"> {timeout:.0f} s (process killed)"}
    res["wall_s"] = time.perf_counter() - t
    return res


def fmt_t(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def fmt_r(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def mib(b: float | None) -> str:
    return "–" if b is None else f"{b / MIB:.0f}" if abs(b) >= 10 * MIB else f"{b / MIB:.1f}"


TOOL_NAMES = {
    "ours": "hessian-spectra",
    "pyhessian": "PyHessian 0.1",
    "eigenthings": "hessian-eigenthings 1.0.0a5",
    "curvlinops": "curvlinops",
}


def _div(x: float | None, y: float | None) -> float | None:
    return None if x is None or not y else x / y


def _order(r: dict) -> tuple[int, int]:
    wls = ["cnn", "lm", "lm50k"]
    wl, tool = r.get("workload"), r.get("tool")
    return (wls.index(wl) if wl in wls else 9, TOOLS.index(tool) if tool in TOOLS else 9)


def cost_table(rows: list[dict]) -> list[str]:
    md = [
        "| workload | tool | product | gradient | product ÷ gradient | block of 8, per vector ÷ gradient "
        "| training-step peak (MiB) | product peak ÷ training step | block-of-8 peak ÷ training step "
        "| held after product 1 (MiB) | growth per product, 2-5 (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=_order):
        name = TOOL_NAMES.get(r["tool"], r["tool"])
        if "grad_s" not in r:
            md.append(
                f"| {r['workload']} | {name} | {r.get('status')}: {r.get('note', '')} |"
                + " – |" * 8
            )
            continue
        g, tr = r["grad_s"], r.get("train_peak")
        held = mib(r.get("held_after_1"))
        growth = mib(r.get("growth_per_product"))
        blk = r.get("block8_s")
        blk_r = fmt_r(blk / 8 / g) + f" ({r.get('block_kind', '')})" if blk is not None else "–"
        blk_m = fmt_r(r["block8_peak"] / tr) if r.get("block8_peak") is not None and tr else "–"
        if r["tool"] == "ours":
            md.append(
                f"| {r['workload']} | {name} | graphs kept (Krylov run) | {fmt_t(g)} | {fmt_r(r['kept_s'] / g)} "
                f"| {blk_r} | {mib(tr)} | {fmt_r(r['kept_peak'] / tr)} above the {mib(r['kept_bytes'])} MiB kept graph; "
                f"first product of the run {fmt_r(_div(r.get('first_in_block_peak'), tr))} "
                f"| {blk_m} | {held} | {growth} |"
            )
            md.append(
                f"| {r['workload']} | {name} | standalone (graphs rebuilt) | {fmt_t(g)} "
                f"| {fmt_r(r['rebuilt_s'] / g)} | – | {mib(tr)} | {fmt_r(r['rebuilt_peak'] / tr)} | – | – | – |"
            )
            if "ggn_s" in r:
                md.append(
                    f"| {r['workload']} | {name} | GGN (fused CE) | {fmt_t(g)} | {fmt_r(r['ggn_s'] / g)} | – "
                    f"| {mib(tr)} | {fmt_r(r['ggn_peak'] / tr)} | – | – | – |"
                )
        else:
            md.append(
                f"| {r['workload']} | {name} | single | {fmt_t(g)} | {fmt_r(r['single_s'] / g)} | {blk_r} | {mib(tr)} "
                f"| {fmt_r(r['single_peak'] / tr)} | {blk_m} | {held} | {growth} |"
            )
    return md


def eig_table(refs: dict[str, dict], rows: list[dict], target: float) -> list[str]:
    md = [
        f"| workload | k | tool | setting | status (max rel. error <= {target:g}) | max rel. error | time "
        "| products | time ÷ ours |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ours_t: dict[tuple[str, int], float] = {}
    for r in rows:
        if r["tool"] == "ours":
            for x in r.get("rows", []):
                if x["status"] == "ok":
                    ours_t.setdefault((r["workload"], x["k"]), x["seconds"])
    for k in (1, 10):
        for r in rows:
            if "rows" not in r:
                if k == 1:
                    md.append(
                        f"| {r['workload']} | – | {TOOL_NAMES.get(r['tool'])} | – | {r.get('status')} | – | – | – | – |"
                    )
                continue
            for x in r["rows"]:
                if x["k"] != k:
                    continue
                base = ours_t.get((r["workload"], k))
                ratio = fmt_r(x["seconds"] / base) + "x" if base and x["status"] == "ok" else "–"
                err = x.get("error")
                md.append(
                    f"| {r['workload']} | {k} | {TOOL_NAMES.get(r['tool'])} | {x['setting']} | {x['status']} "
                    f"| {'–' if err is None else f'{err:.1e}'} | {fmt_t(x['seconds'])} | {x['products']} | {ratio} |"
                )
    return md


def targets(rows: list[dict]) -> list[str]:
    md = ["| target | workload | verdict |", "|---|---|---|"]
    by = {(r["workload"], r["tool"]): r for r in rows if "grad_s" in r}
    for wl in dict.fromkeys(r["workload"] for r in sorted(rows, key=_order)):
        o, p = by.get((wl, "ours")), by.get((wl, "pyhessian"))
        if o and p:
            x = (o["kept_s"] / o["grad_s"]) / (p["single_s"] / p["grad_s"])
            v = "met" if x <= 1 else "NOT MET"
            md.append(
                f"| single product (graphs kept) at most PyHessian's, each ÷ its gradient | {wl} | {v}: "
                f"{o['kept_s'] / o['grad_s']:.2f} vs {p['single_s'] / p['grad_s']:.2f} ({x:.2f}x); graphs rebuilt: "
                f"{o['rebuilt_s'] / o['grad_s']:.2f} |"
            )
        peers_m = {t: by[(wl, t)]["single_peak"] for t in TOOLS[1:] if (wl, t) in by}
        if o and peers_m:
            t_min = min(peers_m, key=peers_m.__getitem__)
            best = peers_m[t_min]
            v = "met" if o["rebuilt_peak"] <= best else "NOT MET"
            md.append(
                f"| single-product peak at most the cheapest peer's | {wl} | {v}: ours {mib(o['rebuilt_peak'])} MiB "
                f"(standalone product; inside a Krylov run: {mib(o['kept_peak'])} MiB above a {mib(o['kept_bytes'])} MiB graph) vs "
                f"{TOOL_NAMES[t_min]} {mib(best)} MiB |"
            )
        if o and o.get("block8_peak") is not None:
            x = o["block8_peak"] / o["train_peak"]
            v = "met" if x < 10 else "NOT MET"
            md.append(f"| block of 8: peak below 10x a training step | {wl} | {v}: {x:.2f}x |")
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--quick", action="store_true", help="small models, 1 repetition (a check of the script)"
    )
    p.add_argument("--workloads", nargs="+", default=["cnn", "lm", "lm50k"])
    p.add_argument("--tools", nargs="+", default=TOOLS)
    p.add_argument(
        "--tasks",
        nargs="+",
        default=["cost", "eig"],
        help="cost (times and memory), eig (top-1/top-10)",
    )
    p.add_argument("--size", default=None, help="full or small (default: full; small with --quick)")
    p.add_argument(
        "--eig-size", default=None, help="size for top-k (default: full on CUDA, small on CPU)"
    )
    p.add_argument(
        "--reps", type=int, default=None, help="timed repetitions (default 3; 1 with --quick)"
    )
    p.add_argument("--block-reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--cap",
        type=float,
        default=None,
        help="seconds per top-k call (default 120; 30 with --quick)",
    )
    p.add_argument(
        "--target", type=float, default=1e-3, help="relative accuracy of top-k eigenvalues"
    )
    p.add_argument("--name", default=None)
    p.add_argument(
        "--combine",
        nargs="+",
        default=None,
        help="run nothing: write --name from the results of these earlier --name runs (later ones win)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="replace the rows of this run in the results of the same --name, keep the others",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tool", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ref", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.size = a.size or ("small" if a.quick else "full")
    a.eig_size = a.eig_size or ("small" if a.quick or not a.device.startswith("cuda") else "full")
    a.reps = a.reps or (1 if a.quick else 3)
    a.cap = a.cap or (30.0 if a.quick else 120.0)
    torch.set_num_threads(a.threads)
    if a.worker:
        import warnings

        warnings.filterwarnings("ignore")
        fn = {"cost": work_cost, "ref": work_ref, "eig": work_eig}[a.worker]
        res = fn(a)
        Path(a.worker_out).write_text(json.dumps(res))
        return

    name = a.name or ("quick" if a.quick else a.size)
    stem = HERE / "results" / f"realistic-{a.device.split(':')[0]}-{name}"
    stem.parent.mkdir(exist_ok=True)
    import tempfile

    t0 = time.perf_counter()
    load0 = os.getloadavg()
    cost: list[dict] = []
    refs: dict[str, dict] = {}
    eig: list[dict] = []
    a.sources = []
    if a.combine:  # no run: the rows of earlier runs, a later name replacing an earlier one's
        by: dict[tuple[str, str], dict] = {}
        byeig: dict[tuple[str, str], dict] = {}
        for nm in a.combine:
            old = json.loads(
                (HERE / "results" / f"realistic-{a.device.split(':')[0]}-{nm}.json").read_text()
            )
            by.update({(r["workload"], r["tool"]): r for r in old["cost"]})
            byeig.update({(r["workload"], r["tool"]): r for r in old["eig"]})
            refs.update(old["refs"])
            src = old["info"]
            a.sources.append(
                f"{src['command']} ({src['date']}, {src['total_s']} s, load {src['load_start']} -> {src['load_end']})"
            )
        cost, eig = list(by.values()), list(byeig.values())
        a.tasks = []
    if a.merge and stem.with_suffix(".json").exists():
        old = json.loads(stem.with_suffix(".json").read_text())
        new_cost = (
            {(wl, tool) for wl in a.workloads for tool in a.tools} if "cost" in a.tasks else set()
        )
        cost += [r for r in old["cost"] if (r["workload"], r["tool"]) not in new_cost]
        if "eig" not in a.tasks:
            refs.update(old["refs"])
            eig += old["eig"]
    with tempfile.TemporaryDirectory() as tmp:
        a.tmp = tmp
        if "cost" in a.tasks:
            for wl in a.workloads:
                for tool in a.tools:
                    cost.append(spawn(a, "cost", wl, tool, 20 * a.cap, []))
                    report(a, stem, t0, load0, cost, refs, eig, final=False)
        if "eig" in a.tasks:
            for wl in [x for x in a.workloads if x != "lm50k"]:
                ref = spawn(a, "ref", wl, "ours", 20 * a.cap, [])
                refs[wl] = ref
                if "top" not in ref:
                    continue
                rp = Path(tmp) / f"ref-{wl}.json"
                rp.write_text(json.dumps(ref))
                for tool in a.tools:
                    eig.append(spawn(a, "eig", wl, tool, 12 * a.cap, ["--ref", str(rp)]))
                    report(a, stem, t0, load0, cost, refs, eig, final=False)
    report(a, stem, t0, load0, cost, refs, eig, final=True)


def report(
    a: argparse.Namespace,
    stem: Path,
    t0: float,
    load0: tuple[float, ...],
    cost: list[dict],
    refs: dict[str, dict],
    eig: list[dict],
    final: bool,
) -> None:
    """Write the Markdown and JSON (after every worker, so an interrupted run keeps its rows)."""
    total = time.perf_counter() - t0
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python bench/realistic.py " + " ".join(sys.argv[1:]),
        "device": a.device if a.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": a.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "size": a.size,
        "eig_size": a.eig_size,
        "reps": a.reps,
        "block_reps": a.block_reps,
        "cap_s": a.cap,
        "target": a.target,
        "load_start": [round(x, 2) for x in load0],
        "load_end": [round(x, 2) for x in os.getloadavg()],
        "total_s": round(total, 1),
        "complete": final,
        "versions": _versions(),
    }
    if a.sources:  # the settings are in each source's command
        for key in (
            "size",
            "eig_size",
            "reps",
            "block_reps",
            "cap_s",
            "threads",
            "load_start",
            "load_end",
            "total_s",
        ):
            info.pop(key)
        info["combined from"] = a.sources
    md = [f"- {k}: {v}" for k, v in info.items()]
    if cost:
        md += [
            "",
            "### Products and memory (float32)",
            "",
            *cost_table(cost),
            "",
            "### Targets",
            "",
            *targets(cost),
        ]
    if refs:
        md += [
            "",
            f"### Top-1 and top-10 eigenvalues (float32, {a.eig_size} size)",
            "",
            "References:",
            "",
        ]
        for wl, r in refs.items():
            top = r.get("top")
            if top:
                md.append(
                    f"- {wl} ({r['desc']}, n = {r['n']}): λ1 = {top[0]:.6g}, λ10 = {top[-1]:.6g}; float64 "
                    f"lanczos tol=1e-10, converged {r['converged']}, {r['products']} products, {r['seconds']:.1f} s"
                )
            else:
                md.append(f"- {wl}: {r.get('status')} {r.get('note', '')}")
        md += ["", *eig_table(refs, eig, a.target)]
    text = "\n".join(md) + "\n"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(
        json.dumps({"info": info, "cost": cost, "refs": refs, "eig": eig}, indent=1)
    )
    if final:
        print(text)
        print(f"wrote {stem}.md and .json")


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for d in (
        "hessian-spectra",
        "pyhessian",
        "hessian-eigenthings",
        "curvlinops-for-pytorch",
        "transformers",
    ):
        with contextlib.suppress(Exception):
            out[d] = metadata.version(d)
    return out


if __name__ == "__main__":
    main()
