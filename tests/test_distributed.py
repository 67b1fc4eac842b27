"""tune() on 2 processes (gloo, CPU, spawned from pytest) equals one process on the combined batch; SparseAdamW's
process group reduces only the pivot gradients; failures end every process."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("audiocraft")

from ppt_fast.audio import synth_reference, write_wav  # noqa: E402
from ppt_fast.optim import SparseAdamW  # noqa: E402
from ppt_fast.pivots import PivotSet  # noqa: E402
from ppt_fast.rowgrad import RowGrads  # noqa: E402

# Two processes sum half-batch gradients (each scaled by its share) where one process computes the whole batch's
# mean: fp32 sums in another order, ~1e-7 relative. Adam's m / sqrt(v) keeps that relative size, so after 3 steps
# the trained values agree to ~1e-6; a missing or doubled all-reduce moves them by O(lr) = 1e-3 (tiny-random's lr).
RTOL, ATOL = 1e-4, 2e-6
SETTINGS = dict(model="tiny-random", steps=3, sensitivity_batches=4, batch_size=4, segment_seconds=1.0, count=120,
                prior=0.5, prior_clips=4, verbose=False)  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ref_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.wav"
    write_wav(str(path), synth_reference(4.0, 16000, seed=7), 16000)
    return str(path)


def _summary(result, concepts) -> dict:
    params = dict(result.model.lm.named_parameters())
    return {
        "pivots": {i: (p.names, p.offsets_list, p.indices.clone()) for i, p in result.pivots.items()},
        "values": {n: params[n].detach().reshape(-1)[idx.long()].clone() for n, idx in result.trained if idx.numel()},
        "tokens": {i: t.clone() for i, t in result.tokens.items()},
        "losses": list(result.losses),
        "prior_losses": list(result.prior_losses),
        "trained": result.trained.count,
        "token_entries": sum(t.numel() for t in result.tokens.values()),
        "bytes": result.comm_bytes_per_step,
        "world": result.world_size,
    }


def _tune_worker(rank: int, world: int, port: int, job: dict) -> None:
    torch.set_num_threads(1)
    os.environ["PPT_FAST_CACHE"] = job["cache"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=job["timeout"]))  # fmt: skip
    from ppt_fast.concept import Concept
    from ppt_fast.tuning import TuneCancelled, TuneConfig, tune_to_files

    saved: list[int] = []
    real_save = Concept.save

    def save(self, path, *a, **k):
        saved.append(rank)
        return real_save(self, path, *a, **k)

    Concept.save = save
    progress = None
    if job.get("fail_rank") == rank:

        def progress(p):
            if p.phase == "training" and p.step == 2:
                raise TuneCancelled("stopped on purpose at step 2")

    results = []
    for extra in job.get("runs", [{}]):  # several runs in one process group (one spawn, one import)
        settings = dict(SETTINGS, **extra, **job.get("settings_by_rank", {}).get(rank, {}))
        out = job["out"] if not extra else None
        t0 = time.perf_counter()
        try:
            result, concepts = tune_to_files(job["ref"], TuneConfig(**settings, progress=progress), out)
            res = dict(ok=True, **_summary(result, concepts))
        except Exception as e:  # noqa: BLE001 - the test reads it
            res = dict(ok=False, error=type(e).__name__, message=str(e))
        res.update(saved=list(saved), seconds=time.perf_counter() - t0, file_after=os.path.exists(job["out"]))
        results.append(res)
    torch.save(results if "runs" in job else results[0], os.path.join(job["dir"], f"rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn(tmp_path, ref_wav, **job) -> list[dict]:
    job = {"ref": ref_wav, "cache": str(tmp_path / "cache"), "out": str(tmp_path / "concept.ppt"),
           "dir": str(tmp_path), "timeout": 120, **job}  # fmt: skip
    mp.spawn(_tune_worker, args=(2, _port(), job), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_processes_equal_one_on_the_combined_batch(tmp_path, ref_wav, monkeypatch):
    from ppt_fast.tuning import TuneConfig, tune_to_files

    ranks = _spawn(tmp_path, ref_wav)
    for r in ranks:
        assert r["ok"], r
    monkeypatch.setenv("PPT_FAST_CACHE", str(tmp_path / "cache1"))
    one = _summary(*tune_to_files(ref_wav, TuneConfig(**SETTINGS), str(tmp_path / "one.ppt")))
    assert one["world"] == 1 and one["bytes"] == 0
    for r in ranks:
        assert r["world"] == 2
        # The same pivots everywhere, and the ones one process picks.
        for ident, (names, offsets, idx) in one["pivots"].items():
            assert r["pivots"][ident][0] == names and r["pivots"][ident][1] == offsets
            assert torch.equal(r["pivots"][ident][2], idx)
        assert sorted(r["values"]) == sorted(one["values"])
        for n, v in one["values"].items():
            torch.testing.assert_close(r["values"][n], v, rtol=RTOL, atol=ATOL, msg=n)
        for ident, t in one["tokens"].items():
            torch.testing.assert_close(r["tokens"][ident], t, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(r["prior_losses"]), torch.tensor(one["prior_losses"]), rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
        # One packed fp32 buffer per step: the pivots (+ dense rows), the token entries, the one group's flag, the
        # loss and prior loss, one failure flag per process. Nothing else.
        assert r["bytes"] == 4 * (r["trained"] + r["token_entries"] + 1 + 2 + 2), r["bytes"]
    # The processes agree bitwise with each other (every one takes the same step from the same sums).
    for n in ranks[0]["values"]:
        assert torch.equal(ranks[0]["values"][n], ranks[1]["values"][n]), n
    # Only process 0 wrote the concept file; every process saw it once tune returned.
    assert ranks[0]["saved"] == [0] and ranks[1]["saved"] == []
    assert ranks[0]["file_after"] and ranks[1]["file_after"]
    from ppt_fast import Concept

    c = Concept.load(str(tmp_path / "concept.ppt"))
    assert c.pivots.count == ranks[0]["trained"]


def _dense_entries(preset: str) -> int:
    from ppt_fast.models import load_host

    host = load_host("tiny-random")
    params = dict(host.lm.named_parameters())
    return sum(params[n].numel() for n in host.trainable_names()) if preset == "full" else 0


def test_every_recipe_on_two_processes_equals_one(tmp_path, ref_wav, monkeypatch):
    """dreamstyler (dense rows among the pivots), tokens (no LM weight: the tokens' gradients only) and full (every
    weight's gradient, packed): the same result as one process, and the bytes each step all-reduces."""
    from ppt_fast.tuning import TuneConfig, tune_model

    runs = [{"preset": p, "steps": 2} for p in ("dreamstyler", "tokens", "full")]
    ranks = _spawn(tmp_path, ref_wav, runs=runs)
    monkeypatch.setenv("PPT_FAST_CACHE", str(tmp_path / "cache1"))
    for i, run in enumerate(runs):
        r0, r1 = ranks[0][i], ranks[1][i]
        assert r0["ok"] and r1["ok"], (r0, r1)
        one = _summary(tune_model(ref_wav, TuneConfig(**dict(SETTINGS, **run))), None)
        assert r0["trained"] == one["trained"]
        for n, v in one["values"].items():
            # `full` trains 1.6 M entries, some with gradients near Adam's eps where the rounding of the sum moves
            # the step most: 2e-5 is < 1 % of one step (lr 3e-3); a missing reduction moves entries by ~lr.
            atol = 2e-5 if run["preset"] == "full" else ATOL
            bad = ~torch.isclose(r0["values"][n], v, rtol=RTOL, atol=atol)
            if run["preset"] == "full" and n.endswith("in_proj_bias"):
                # The key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by all keys),
                # so in fp32 it is rounding noise, another noise in every reduction order; Adam scales noise to
                # steps of ~lr. Those entries cannot agree between any two summation orders: not compared.
                d = v.numel() // 3
                bad[d : 2 * d] = False
            where = bad.nonzero().reshape(-1)[:20].tolist()
            assert not bad.any(), (run["preset"], n, where, (r0["values"][n] - v)[bad][:5].tolist())
            assert torch.equal(r0["values"][n], r1["values"][n]), n
        for ident, t in one["tokens"].items():
            torch.testing.assert_close(r0["tokens"][ident], t, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
        # Bytes: the pivots + dense rows (SparseAdamW's buffer, one group flag), or every weight (`full`), or none
        # (`tokens`); then the tokens, two losses, two failure flags.
        tail = r0["token_entries"] + 2 + 2
        want = {"dreamstyler": r0["trained"] + 1, "tokens": 0, "full": _dense_entries("full")}[run["preset"]]
        assert r0["bytes"] == 4 * (want + tail), (run["preset"], r0["bytes"], want, tail)


def test_a_failing_process_ends_the_other_without_a_hang(tmp_path, ref_wav):
    t0 = time.perf_counter()
    ranks = _spawn(tmp_path, ref_wav, fail_rank=1, timeout=300)
    wall = time.perf_counter() - t0
    assert not ranks[1]["ok"] and ranks[1]["error"] == "TuneCancelled", ranks[1]
    assert not ranks[0]["ok"] and ranks[0]["error"] == "DistributedError", ranks[0]
    assert "process 1 of 2 failed while training step" in ranks[0]["message"], ranks[0]["message"]
    # Ended by the flag in the next step's all-reduce, not by the 300 s collective timeout.
    assert wall < 120, wall
    assert ranks[0]["saved"] == [] and not ranks[0]["file_after"]


def test_processes_with_different_settings_are_refused(tmp_path, ref_wav):
    # Process 1 is started with another seed (other batches, other tokens): both refuse before any work, naming it.
    ranks = _spawn(tmp_path, ref_wav, settings_by_rank={1: {"seed": 1}})
    for r in ranks:
        assert not r["ok"] and r["error"] == "DistributedError", r
        assert "different settings" in r["message"] and "same arguments" in r["message"], r["message"]
        assert r["saved"] == []


def _user_loop_worker(rank: int, world: int, port: int, out: str, gather: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = _user_loop(rank, world, gather, dist.group.WORLD)
        torch.save(res, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def _user_loop(rank: int, world: int, gather: bool, group) -> dict:
    """A user's loop: a 2-layer MLP, pivots in both weights, row-scoped gradients on the first, 4 steps of 12
    samples (an uneven split over 2 processes is not needed here: DDP's mean convention, equal halves)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 48), torch.nn.Tanh(), torch.nn.Linear(48, 5))
    g = torch.Generator().manual_seed(2)
    ps = PivotSet.from_masks({n: torch.rand(p.shape, generator=g) < 0.15 for n, p in model.named_parameters()
                              if p.dim() == 2})  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(p.dim() == 2)
    opt = SparseAdamW(model, ps, lr=1e-2, weight_decay=0.1, gather_in_backward=gather, process_group=group)
    rg = RowGrads()
    if gather:
        w = model[0].weight
        rg.add("0.weight", w, [(4, 40)], opt.row_sink(w))
    rg.install()
    gdata = torch.Generator().manual_seed(3)
    per = 12 // world
    bytes_seen = []
    for _ in range(4):
        x, y = torch.randn(12, 10, generator=gdata), torch.randn(12, 5, generator=gdata)
        sl = slice(rank * per, (rank + 1) * per)
        with rg.forward():
            loss = torch.nn.functional.mse_loss(model(x[sl]), y[sl])
        with rg.backward():
            loss.backward()
        opt.clip_grad_norm_(0.5)
        opt.step()
        bytes_seen.append(opt.comm_bytes)
        opt.zero_grad()
    rg.remove()
    st = opt.state_dict()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "state": st,
            "bytes": bytes_seen, "k": ps.count}  # fmt: skip


@pytest.mark.parametrize("gather", [False, True], ids=["dense-grads", "gathered+rowgrads"])
def test_sparse_adamw_process_group_equals_one_process(tmp_path, gather):
    out = str(tmp_path / "loop")
    mp.spawn(_user_loop_worker, args=(2, _port(), out, gather), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]
    one = _user_loop(0, 1, gather, None)
    for r in ranks:
        for n, p in one["params"].items():
            torch.testing.assert_close(r["params"][n], p, rtol=1e-5, atol=1e-6, msg=n)
        _assert_state_close(r["state"], one["state"])
        # One all-reduce of k pivot gradients + one has-gradient flag per group, 4 B each.
        assert r["bytes"] == [4 * (r["k"] + 1)] * 4, r["bytes"]


def _assert_state_close(a: dict, b: dict) -> None:
    def tensors(x, path=""):
        if isinstance(x, torch.Tensor):
            yield path, x
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                yield from tensors(x[k], f"{path}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                yield from tensors(v, f"{path}/{i}")

    ta, tb = dict(tensors(a)), dict(tensors(b))
    assert sorted(ta) == sorted(tb)
    assert any("exp_avg" in k for k in ta), sorted(ta)
    for k in ta:
        if ta[k].is_floating_point():
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-7, msg=k)
        else:
            assert torch.equal(ta[k], tb[k]), k


def test_torchrun_tune_cli(tmp_path, ref_wav):
    """What a user runs: `torchrun --nproc_per_node 2 -m ppt_fast tune ...`; one process prints and writes."""
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    out = tmp_path / "c.ppt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PPT_FAST_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", str(_port()), "-m", "ppt_fast", "tune", ref_wav,
         "--model", "tiny-random", "--out", str(out), "--steps", "3", "--quiet"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("tuned <v1>:") == 1 and proc.stdout.count("wrote ") == 1, proc.stdout
    assert "2 processes:" in proc.stdout and "bytes all-reduced per step" in proc.stdout, proc.stdout
    from ppt_fast import Concept

    assert Concept.load(str(out)).identifiers == ["<v1>"]
