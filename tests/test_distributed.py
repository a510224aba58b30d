"""Multi-process training: `torchrun --nproc_per_node 2` (gloo, CPU) on a patched model.

Users who outgrow one machine scale out with PyTorch distributed / accelerate, not with anything of
ours, so a patched model must train under DDP exactly as it does in one process. The chain checked,
per step (loss, grad norm, TRL's token metrics) and on the final weights, fp32:

    patched, 2 processes x batch 2  ==  patched, 1 process x batch 4  ==  unpatched, 1 process x batch 4

with TRL's `SFTTrainer` (its fused LM head over patchkit's backbone) and `transformers.Trainer`
(patchkit's fused cross-entropy, fed `num_items_in_batch` counted over both ranks). The documents
differ in length, so the ranks' shards hold different token counts and a loss normalised per rank
would not average to the one-process loss. The rows each rank trained on are recorded, so the
global batches are shown to be the same, not assumed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import patchkit
from patchkit.architectures import Llama
from patchkit.parity import tiny_model

from . import distributed_worker as worker

NPROC = 2
TIMEOUT = 240  # seconds for the torchrun job; it takes about 15 s on two shared CPU cores
LOG_RTOL = 1e-5  # measured: <= 1.2e-7 (loss, grad norm, entropy); token accuracy is exact
WEIGHT_TOL = dict(rtol=1e-4, atol=5e-5)  # measured: <= 7e-6 abs, after updates of up to 2e-3 (AdamW, lr 1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TorchrunJob:
    """`python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT`, started at once
    and awaited on first use, so the one-process reference runs while the ranks train."""

    def __init__(self, out: Path):
        self.out = out
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        self.command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                        "--nproc_per_node", str(NPROC), "--master_addr", "127.0.0.1",
                        "--master_port", str(_free_port()), str(Path(worker.__file__)), str(out)]
        self.proc = subprocess.Popen(self.command, env=env, cwd=out, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.output: str | None = None

    def wait(self) -> None:
        if self.output is not None:
            return
        try:
            self.output, _ = self.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stop()
            self.output = self.proc.communicate()[0]
            pytest.fail(f"torchrun job timed out after {TIMEOUT} s: {' '.join(self.command)}\n{self.output[-6000:]}")
        assert self.proc.returncode == 0, (
            f"torchrun job failed (exit {self.proc.returncode}): {' '.join(self.command)}\n{self.output[-6000:]}")

    def result(self, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
        self.wait()
        return json.loads((self.out / f"{kind}.json").read_text()), torch.load(self.out / f"{kind}.pt")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: torchrun and the two ranks it started


@pytest.fixture(scope="module")
def torchrun_job(tmp_path_factory):
    job = TorchrunJob(tmp_path_factory.mktemp("torchrun"))
    yield job
    job.stop()


def _assert_logs_close(got: list[dict], want: list[dict], what: str) -> None:
    assert len(got) == len(want) == worker.STEPS, what
    for step, (g, w) in enumerate(zip(got, want), 1):
        assert g.keys() == w.keys(), what
        for key in w:
            dev = abs(g[key] - w[key]) / max(abs(w[key]), 1e-12)
            assert dev <= LOG_RTOL or abs(g[key] - w[key]) <= 1e-7, (
                f"{what}: step {step} {key} {g[key]!r} vs {w[key]!r} (rel {dev:.2e} > {LOG_RTOL:.0e})")


def _assert_weights_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        torch.testing.assert_close(got[name], want[name], **WEIGHT_TOL, msg=lambda m: f"{what}: {name}: {m}")


@pytest.mark.parametrize("kind", worker.TRAINERS)
def test_two_processes_train_like_one(kind, torchrun_job, tmp_path):
    with patchkit.patched("llama"):
        patched = worker.train(kind, str(tmp_path / "patched"), worker.GLOBAL_BATCH)
    unpatched = worker.train(kind, str(tmp_path / "unpatched"), worker.GLOBAL_BATCH)
    ddp, ddp_weights = torchrun_job.result(kind)

    # What ran: two gloo ranks, DDP-wrapped; in the Trainer runs the loss came from patchkit's fused
    # cross-entropy (no logits) on both ranks and in the patched reference, and not in the unpatched one.
    assert (ddp["world_size"], ddp["distributed_type"], ddp["model_wrapper"]) == (
        NPROC, "DistributedType.MULTI_CPU", "DistributedDataParallel")
    assert patched["world_size"] == unpatched["world_size"] == 1
    if kind == "trainer":
        assert [r["fused_ce"] for r in ddp["ranks"]] == [[True] * worker.STEPS] * NPROC
        assert (patched["fused_ce"], unpatched["fused_ce"]) == ([True] * worker.STEPS, [False] * worker.STEPS)

    # Same global batches: each step, the two ranks' rows together are the one-process batch.
    assert len(patched["seen"]) == worker.STEPS and unpatched["seen"] == patched["seen"]
    shards = [r["seen"] for r in ddp["ranks"]]
    for step, whole in enumerate(patched["seen"]):
        assert all(len(s[step]) == worker.GLOBAL_BATCH // NPROC for s in shards)
        assert sorted(shards[0][step] + shards[1][step]) == sorted(whole), f"step {step + 1}: different global batch"
    targets = [[sum(len(row) - 1 for row in s[step]) for s in shards] for step in range(worker.STEPS)]
    assert any(len(set(t)) > 1 for t in targets), f"token counts per rank {targets}: a per-rank mean would pass too"

    # Same numbers: 2 processes == 1 process (patched) == 1 process (unpatched).
    _assert_logs_close(ddp["logs"], patched["logs"], f"{kind}: 2 processes vs 1 (patched)")
    _assert_logs_close(patched["logs"], unpatched["logs"], f"{kind}: patched vs unpatched (1 process)")
    if kind == "sft":
        assert {"mean_token_accuracy", "entropy"} <= ddp["logs"][0].keys()
    _assert_weights_close(ddp_weights, patched["weights"], f"{kind}: 2 processes vs 1 (patched)")
    _assert_weights_close(patched["weights"], unpatched["weights"], f"{kind}: patched vs unpatched (1 process)")
    initial = dict(tiny_model(Llama).named_parameters())
    moved = max((patched["weights"][n] - initial[n]).abs().max().item() for n in initial)
    assert moved > 10 * WEIGHT_TOL["atol"], f"training barely moved the weights ({moved:.1e}); nothing was compared"
