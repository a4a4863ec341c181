"""Time and peak memory of the cross-entropy Hessian-vector product backends.

Usage::

    python bench/bench_fused_ce.py --N 2048 --V 8192            # CPU: eager, compile
    python bench/bench_fused_ce.py --N 16384 --V 50304 --device cuda   # + triton

Each backend is first checked against the eager float64 reference (a backend
whose result is off is reported and not timed). Time is the median of
``--repeats`` calls after a warm-up (compilation excluded). Peak memory is the
extra memory a call needs above its inputs: on CUDA from
``torch.cuda.max_memory_allocated``; on CPU each backend runs in its own
process and the kernel's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) is read around one call. ``(N,V) bufs`` expresses
the peak in units of one float32 ``(N, V)`` tensor (the output alone is ``k``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hessian_spectra.losses.fused_ce import _triton_available, ce_hvp


def _inputs(N: int, V: int, k: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(N, V, generator=g)).to(device=device, dtype=dtype)
    u = torch.randn(k, N, V, generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.1] = -100
    return z, u, labels.to(device)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(
    backend: str, N: int, V: int, k: int, dtype: torch.dtype, device: str, repeats: int
) -> dict:
    z, u, y = _inputs(N, V, k, dtype, device)
    ref = ce_hvp(z.double(), u.double(), y, fused="eager")
    out = ce_hvp(z, u, y, fused=backend)  # warm-up (compiles)
    err = float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
    del out
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    row = {"backend": backend, "rel_err": err, "ok": err <= tol}
    if not row["ok"]:
        return row
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = ce_hvp(z, u, y, fused=backend)
        _sync(device)
        times.append(time.perf_counter() - t)
        del out
    row["ms"] = 1e3 * statistics.median(times)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = ce_hvp(z, u, y, fused=backend)
        torch.cuda.synchronize()
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _rss_kib("VmRSS")
        out = ce_hvp(z, u, y, fused=backend)
        row["peak_mib"] = (_rss_kib("VmHWM") - base) / 1024
    del out
    row["nv_bufs"] = row["peak_mib"] * 2**20 / (N * V * 4)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--N", type=int, default=2048, help="positions (rows)")
    ap.add_argument("--V", type=int, default=8192, help="vocabulary size")
    ap.add_argument("--k", type=int, default=1, help="directions in the block")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", default=None, help="comma-separated; default: all that can run")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    if a._child:
        print(json.dumps(measure(a._child, a.N, a.V, a.k, dtype, a.device, a.repeats)))
        return
    backends = a.backends.split(",") if a.backends else ["eager", "compile"]
    if not a.backends and _triton_available(torch.device(a.device)) is None:
        backends.append("triton")
    rows = []
    for b in backends:
        if a.device == "cpu":  # one process per backend: a clean memory high-water mark
            cmd = [
                sys.executable,
                __file__,
                f"--N={a.N}",
                f"--V={a.V}",
                f"--k={a.k}",
                f"--dtype={a.dtype}",
                "--device=cpu",
                f"--repeats={a.repeats}",
                f"--_child={b}",
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                rows.append({"backend": b, "error": res.stderr.strip().splitlines()[-1]})
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        else:
            rows.append(measure(b, a.N, a.V, a.k, dtype, a.device, a.repeats))
    print(
        f"CE HVP  N={a.N} V={a.V} k={a.k} {a.dtype} on {a.device} "
        f"(threads={torch.get_num_threads()})"
    )
    print(f"{'backend':<9} {'ms':>9} {'peak MiB':>9} {'(N,V) bufs':>11} {'rel err':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<9} failed: {r['error']}")
        elif not r["ok"]:
            print(
                f"{r['backend']:<9} {'-':>9} {'-':>9} {'-':>11} {r['rel_err']:9.1e}  "
                "(inaccurate: not timed)"
            )
        else:
            print(
                f"{r['backend']:<9} {r['ms']:9.2f} {r['peak_mib']:9.1f} {r['nv_bufs']:11.2f} "
                f"{r['rel_err']:9.1e}"
            )


if __name__ == "__main__":
    main()
