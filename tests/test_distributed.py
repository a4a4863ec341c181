"""Distributed operators against single-process references (gloo, 2 and 3 processes on the CPU).

Each world size is launched once (``tests/_distributed_worker.py``, one process
per rank, a free port on 127.0.0.1, a deadline so that a hang fails); the ranks
save their results and the tests below compare them with single-process
operators and dense float64 Hessians over the union of the shards (7, 3 and 5
samples: unequal shards), and with each other bit for bit. The example script
runs under ``torchrun``. Errors that need no process group are checked in this
process, which never initialises one.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import _distributed_worker as w
from hessian_spectra.operators import HessianOperator
from hessian_spectra.operators._collectives import check_agreement, input_checksums
from hessian_spectra.operators.distributed import (
    DDPGGNOperator,
    DDPHessianOperator,
    FSDPHessianOperator,
    broadcast_seed,
)
from reference import dense_loss_hessian, tol

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 240  # a hang fails the test instead of blocking CI
F64 = torch.float64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", **extra)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # stay on the loopback interface
    return env


def _wait(procs: list[subprocess.Popen[bytes]], logs: list[Path], what: str) -> None:
    """Wait for all; on the first failure or at the deadline stop the others and fail."""
    start = time.monotonic()
    while True:
        codes = [p.poll() for p in procs]
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        late = time.monotonic() - start > DEADLINE_S
        if failed or late:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            i = failed[0] if failed else 0
            reason = f"exit status {codes[i]}" if failed else f"no end after {DEADLINE_S} s (hang?)"
            pytest.fail(f"{what}: process {i}: {reason}\n{logs[i].read_text()[-4000:]}")
        if all(c == 0 for c in codes):
            return
        time.sleep(0.05)


def _launch_worker(world: int, suite: str, out: Path) -> list[dict[str, Any]]:
    port = str(_free_port())
    procs, logs = [], []
    for rank in range(world):
        log = out / f"log{rank}.txt"
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_PORT=port)
        with open(log, "wb") as f:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(ROOT / "tests" / "_distributed_worker.py"),
                        str(out),
                        suite,
                    ],
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        logs.append(log)
    _wait(procs, logs, f"{world}-process worker")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _launch_worker(2, "full", tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _launch_worker(3, "core", tmp_path_factory.mktemp("world3"))


@pytest.fixture(scope="module", params=[2, 3], ids=["2proc", "3proc"])
def ranks(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return request.getfixturevalue("two" if request.param == 2 else "three")


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    """Single-process references over the union of all shards."""
    data, model = w.all_batches(), w.make_model()
    V = w.probes(sum(p.numel() for p in model.parameters()))
    H = dense_loss_hessian(model, data, w.loss_fn)
    model7 = w.make_model(hidden=7)
    H7 = dense_loss_hessian(model7, data, w.loss_fn)
    V7 = w.probes(sum(p.numel() for p in model7.parameters()))
    return {"data": data, "model": model, "V": V, "H": H, "V7": V7, "H7": H7}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _bit_identical(ranks: list[dict[str, Any]], key: str) -> bool:
    return all(
        torch.equal(r[key].view(torch.int64), ranks[0][key].view(torch.int64)) for r in ranks
    )


# -- data parallel -----------------------------------------------------------------------
@pytest.mark.parametrize("key", ["hess_plain", "hess_ddp"])
def test_product_equals_single_process_over_union(ranks, single, key):
    sp = HessianOperator(single["model"], single["data"], w.loss_fn) @ single["V"]
    for r in ranks:
        assert _rel(r[key], sp) < tol(F64)
        assert _rel(r[key], single["V"] @ single["H"]) < tol(F64)
    assert _bit_identical(ranks, key)
    assert all(r["allreduce_calls"] == 1 for r in ranks)  # one all-reduce for the block of 3


def test_global_sample_count_weights_unequal_shards(ranks):
    world = len(ranks)
    local = [sum(w.BATCH_SIZES[i] for i in w.SHARDS[world][r]) for r in range(world)]
    assert [r["samples"] for r in ranks] == [(n, 15) for n in local]


def test_top_eigenvalues_equal_single_process_and_every_rank(ranks, single):
    exact = torch.linalg.eigvalsh(single["H"]).flip(0)[:3]
    for r in ranks:
        assert r["eig_converged"]
        assert _rel(r["eig_values"], exact) < tol(F64)
        assert _rel(r["eig_bcast"], exact[:1]) < tol(F64)
    for key in ("eig_values", "eig_vectors", "eig_bcast"):
        assert _bit_identical(ranks, key)


def test_a_run_builds_each_local_graph_once_and_keeps_none(ranks):
    """The algorithm's ``keep_graphs`` block reaches the local operator: one forward per
    local batch for the whole Lanczos run, nothing kept after it."""
    world = len(ranks)
    for rank, r in enumerate(ranks):
        assert r["eig_matvecs"] > 3 and r["eig_forwards"] == len(w.SHARDS[world][rank])
        assert r["graphs_after"] == 0


def test_randomised_algorithms_identical_on_every_rank(two, single):
    from hessian_spectra.algorithms import hutch_plus_plus, spectral_density

    op = HessianOperator(single["model"], single["data"], w.loss_fn)
    hpp = hutch_plus_plus(op, num_matvecs=30, seed=3)
    slq = spectral_density(op, num_runs=2, lanczos_steps=8, seed=4)
    ref = torch.tensor([hpp.estimate, hpp.stderr], dtype=F64)
    assert _rel(two[0]["hutchpp"], ref) < tol(F64)
    assert _rel(two[0]["slq_nodes"], slq.nodes) < tol(F64)
    assert _bit_identical(two, "hutchpp") and _bit_identical(two, "slq_nodes")


def test_model_and_ddp_untouched(ranks, single):
    assert all(r["model_untouched"] for r in ranks)
    # DDP trains afterwards: its all-reduced gradient is the mean of the ranks' gradients
    model = single["model"]
    grads = []
    for rank in range(len(ranks)):
        model.zero_grad()
        model(w.shard(len(ranks), rank)[0][0]).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    assert _rel(ranks[0]["ddp_grad"], torch.stack(grads).mean(0)) < tol(F64)
    assert _bit_identical(ranks, "ddp_grad")


def test_finite_difference_ggn_and_fisher_products(two, single):
    from hessian_spectra.losses import supervised_forward, supervised_loss_of_output
    from hessian_spectra.operators.fisher import EmpiricalFisherOperator, MCFisherOperator
    from hessian_spectra.operators.ggn import GGNOperator

    m, data, V = single["model"], single["data"], single["V"]
    fwd, lof = supervised_forward(), supervised_loss_of_output(torch.nn.functional.cross_entropy)
    fd = HessianOperator(m, data, w.loss_fn, method="finite_difference") @ V
    ggn = GGNOperator(m, data, fwd, lof) @ V
    emp = EmpiricalFisherOperator(m, data, w.loss_fn) @ V
    # MC Fisher: rank r samples with its own seed; the matrix is Σ_r (N_r/N) F_r(seed_r)
    mc = sum(
        sum(w.BATCH_SIZES[i] for i in w.SHARDS[2][r])
        / 15
        * (MCFisherOperator(m, w.shard(2, r), fwd, lof, seed=two[r]["mc_seed"], mc_samples=2) @ V)
        for r in range(2)
    )
    assert two[0]["mc_seed"] != two[1]["mc_seed"]
    for key, ref, rtol in [
        ("hess_fd", fd, 1e-8),
        ("ggn", ggn, tol(F64)),
        ("efisher", emp, tol(F64)),
        ("mcfisher", mc, tol(F64)),
    ]:
        assert _rel(two[0][key], ref) < rtol, key
        assert _bit_identical(two, key), key
    assert _rel(two[0]["hess_fd"], V @ single["H"]) < 1e-8  # truncation O(eps^2)


def test_seed_none_becomes_rank_zeros_seed(two):
    assert two[0]["none_seed"] == two[1]["none_seed"]


# -- sharded model (FSDP2 fully_shard on gloo) -----------------------------------------------
def test_fsdp_finite_difference_product(ranks, single):
    world = len(ranks)
    exact = single["V7"] @ single["H7"]
    fd = (
        HessianOperator(
            w.make_model(hidden=7), single["data"], w.loss_fn, method="finite_difference"
        )
        @ single["V7"]
    )
    for r in ranks:
        assert _rel(r["fsdp"], exact) < 1e-8  # central differences: O(eps^2) + O(eps_mach/eps)
        assert _rel(r["fsdp"], fd) < 1e-8
        assert torch.equal(r["fsdp_sharded"], r["fsdp"])  # sharded vectors, same numbers
        assert r["fsdp_untouched"]
    assert sum(r["fsdp_local_size"] for r in ranks) == exact.shape[1]
    assert len({r["fsdp_local_size"] for r in ranks}) > 1 or world == 1  # uneven shards
    assert _bit_identical(ranks, "fsdp")


def test_algorithms_with_seed_none_agree_across_ranks(two):
    """The seed's default seed=None: every rank draws rank 0's random vectors."""
    for r in two:
        torch.testing.assert_close(r["eig_seed_none"], r["eig_values"][:1], rtol=1e-8, atol=0)
    assert _bit_identical(two, "eig_seed_none")
    assert _bit_identical(two, "trace_seed_none")


def test_every_algorithm_runs_on_vectors_sharded_like_the_parameters(ranks, single):
    """FSDPHessianOperator.sharded(): each rank holds its slice of every vector; the
    results equal the dense float64 Hessian's."""
    H = single["H7"]
    evals = torch.linalg.eigvalsh(H)
    top = evals.flip(0)[:2]
    for r in ranks:
        assert r["sh_local_shape"].tolist() == [3, r["fsdp_local_size"]]
        assert r["sh_eig_converged"]
        for key in ("sh_eig", "sh_block", "sh_auto"):
            assert torch.allclose(r[key], top, rtol=1e-7, atol=0), key
        assert torch.allclose(r["sh_seedless"], top[:1], rtol=1e-7, atol=0)
        assert torch.allclose(r["sh_power"].abs(), evals.abs().max()[None], rtol=1e-5, atol=0)
        X = r["sh_eig_vectors"]  # gathered: eigenvectors of the full Hessian
        assert torch.allclose(X @ H, r["sh_eig"][:, None] * X, atol=1e-6 * float(top[0]))
        est, se = r["sh_trace"].tolist()
        assert abs(est - float(torch.trace(H))) <= 6 * se + 1e-8 * abs(float(torch.trace(H)))
        # full-length runs: every node with weight is an eigenvalue
        live = r["sh_density_nodes"][r["sh_density_weights"] > 1e-12]
        assert all(float((evals - x).abs().min()) < 1e-6 * float(evals.abs().max()) for x in live)
    for key in ("sh_eig", "sh_block", "sh_auto", "sh_seedless", "sh_trace", "sh_density_nodes"):
        assert _bit_identical(ranks, key), key


def test_fsdp_lanczos(ranks, single):
    exact = torch.linalg.eigvalsh(single["H7"]).flip(0)[:2]
    for r in ranks:
        assert torch.allclose(r["fsdp_eig"], exact, rtol=1e-7, atol=0)
    assert _bit_identical(ranks, "fsdp_eig")


# -- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "pattern"),
    [
        (
            "err_params",
            r"ValueError: .*disagree on the parameter set: shapes differ between rank 0 "
            r"and rank 1: 0\.weight \[6, 4\] vs \[7, 4\]",
        ),
        (
            "err_dtype",
            r"ValueError: .*different dtypes \(rank 0: torch\.float64, rank 1: torch\.float32\)",
        ),
        ("err_values", r"ValueError: .*parameter values differ between rank 0 and ranks \[1\]"),
        ("err_dtensor", r"TypeError: .*DTensors.*use FSDPHessianOperator"),
        ("err_fsdp_plain", r"TypeError: .*fully_shard.*DDPHessianOperator"),
    ],
)
def test_errors_raised_on_every_rank(two, key, pattern):
    for r in two:
        assert re.match(pattern, r[key]), r[key]


def test_a_nan_sample_on_one_rank_raises_on_every_rank(two):
    """Rank 1's shard holds batches 1 and 2 of the union, its local batch 1 a NaN sample."""
    assert two[1]["err_nonfinite"].startswith(
        "NonFiniteError: DDPHessianOperator on rank 1: HessianOperator: the product holds NaN "
        "or inf from batch 1: its loss is nan"
    ), two[1]["err_nonfinite"]
    assert two[0]["err_nonfinite"].startswith(
        "NonFiniteError: DDPHessianOperator: the product holds NaN or inf on ranks [1]"
    ), two[0]["err_nonfinite"]


def test_failure_on_one_rank_raises_everywhere(two):
    assert two[1]["err_rank"] == "ValueError: the dataloader yielded no batches"
    assert two[0]["err_rank"].startswith(
        "RuntimeError: DDPHessianOperator could not be built on every rank (rank 1: ValueError: "
        "the dataloader yielded no batches)"
    )
    assert "several devices (cpu, meta)" in two[1]["err_devices"]
    assert two[0]["err_devices"].startswith("RuntimeError:") and "rank 1" in two[0]["err_devices"]


def test_without_process_group_the_error_says_how_to_start_one():
    import torch.distributed as dist

    assert not dist.is_initialized()
    model, data = w.make_model(), w.all_batches()
    for make in (
        lambda: DDPHessianOperator(model, data, w.loss_fn),
        lambda: DDPGGNOperator(model, data, lambda m, b: m(b[0]), lambda o, b: o.sum()),
        lambda: FSDPHessianOperator(model, data, w.loss_fn),
        broadcast_seed,
    ):
        with pytest.raises(RuntimeError, match=r"init_process_group.*torchrun --nproc_per_node"):
            make()


def test_mixed_device_types_across_ranks_are_refused():
    records = [
        {"device_type": "cuda", "dtype": "torch.float32"},
        {"device_type": "cpu", "dtype": "torch.float32"},
    ]
    with pytest.raises(
        ValueError, match=r"devices are mixed across ranks \(rank 0: cuda, rank 1: cpu\)"
    ):
        check_agreement(records, "DDPHessianOperator")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_input_checksums_exact_and_sensitive(dtype):
    V = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0), dtype=F64)
    c = input_checksums(V, dtype)
    assert torch.equal(c, input_checksums(V.clone(), dtype))
    assert bool((c == c.round()).all()) and bool((c < 2.0 ** (53 if dtype == F64 else 24)).all())
    W = V.clone()
    W[2, 517] = torch.nextafter(W[2, 517], torch.tensor(10.0, dtype=F64))  # one ulp
    d = input_checksums(W, dtype)
    assert torch.equal(d[[0, 1, 3]], c[[0, 1, 3]]) and d[2] != c[2]
    assert not torch.equal(input_checksums(V[:, torch.randperm(1000)], dtype), c)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_product_and_cpu_rank_beside_gpu_rank(tmp_path, single):
    ranks = _launch_worker(2, "gpu", tmp_path)
    for r in ranks:
        assert _rel(r["gpu_hess"], single["V"] @ single["H"]) < tol(F64)
        assert re.match(
            r"ValueError: .*devices are mixed across ranks \(rank 0: cuda, rank 1: cpu\)",
            r["err_gpu_mixed"],
        ), r["err_gpu_mixed"]
    assert _bit_identical(ranks, "gpu_hess")


# -- the example, as documented ------------------------------------------------------------
def test_example_runs_under_torchrun(tmp_path):
    log = tmp_path / "torchrun.txt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(ROOT / "examples" / "distributed_lanczos.py"),
        "--check",
    ]
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    _wait([proc], [log], "torchrun examples/distributed_lanczos.py")
    out = log.read_text()
    assert "converged=True" in out and "-> OK" in out, out
