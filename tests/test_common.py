"""common.py: atomic writes, per-rank seeding, and one code path under torchrun
(gloo, 2 processes)."""

import os
import random
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import common
import files
import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    files.atomic_torch_save({"step": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        files.atomic_torch_save({"step": 2, "x": Boom()}, path)
    assert torch.load(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"], "the temp file must not be left behind"
    files.atomic_write_text(tmp_path / "a.txt", "new")
    assert (tmp_path / "a.txt").read_text() == "new"


def test_atomic_writes_get_the_mode_of_a_plain_write(tmp_path):
    """A checkpoint, eval.json or teacher.jsonl is as readable as a file written by open() (under
    the same umask), not mkstemp's owner-only 0600."""
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    files.atomic_write_text(tmp_path / "atomic.txt", "x")
    files.atomic_torch_save({"step": 1}, tmp_path / "ckpt.pt")
    mode = lambda name: os.stat(tmp_path / name).st_mode & 0o777
    assert mode("atomic.txt") == mode("ckpt.pt") == mode("plain.txt"), oct(mode("atomic.txt"))


def test_a_checkpoint_reaches_the_disk_before_its_rename(tmp_path, monkeypatch):
    """Fault 7 (issue 22): atomic_torch_save renamed its temp file without an fsync, so after a
    machine crash the rename could be on disk and the data not: an empty checkpoint in place of the
    previous good one. The temp file must be fsync'd before it is renamed over the checkpoint."""
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(
        ("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a))) or
                        replace(a, b))
    files.atomic_torch_save({"step": 3}, tmp_path / "ckpt.pt")
    renamed = [path for kind, path in events if kind == "replace"]
    assert len(renamed) == 1 and events.index(("fsync", renamed[0])) < events.index(
        ("replace", renamed[0])), events
    assert torch.load(tmp_path / "ckpt.pt") == {"step": 3}


def test_seed_is_per_rank():
    common.seed_everything(5, rank=0)
    a = torch.rand(3)
    common.seed_everything(5, rank=1)
    b = torch.rand(3)
    common.seed_everything(5, rank=0)
    assert torch.equal(torch.rand(3), a) and not torch.equal(a, b)


def test_torchrun_two_processes_on_gloo(tmp_path):
    """One code path under torchrun, and (fault 8 of issue 22) a clean teardown: transformers
    imports torch.distributed.nn when a model class loads, whose functions hold group.WORLD as a
    default argument; imported after the group started, they kept it alive past
    destroy_process_group, and a gloo worker thread could release a finished collective during
    interpreter shutdown and abort the rank (SIGABRT, 'terminate called without an active
    exception', ~1 two-rank run in 10 here). After compute_cleanup no gloo thread may be left."""
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys; sys.path.insert(0, {ROOT!r})
        import torch, torch.distributed as dist
        import common, files, models
        ddp, rank, local_rank, world, device = common.compute_init()
        models.tiny_model()    # a model class loads: transformers' lazy imports, as in a trainer
        x = torch.tensor([float(rank + 1)])
        dist.all_reduce(x)
        common.print0(f"ddp={{ddp}} world={{world}} backend={{dist.get_backend()}} \
sum={{x.item()}}")
        files.log_metrics({str(tmp_path / 'm.jsonl')!r}, {{"rank_sum": x}})
        m = common.reduce_metrics({{"d_loss": rank + 1.0, "mem_sampling": 10.0 * (rank + 1)}})
        common.print0(f"reduced {{m}}")
        common.compute_cleanup()
        threads = [open(f"/proc/self/task/{{t}}/comm").read().strip()
                   for t in os.listdir("/proc/self/task")]
        with open(f"{tmp_path}/threads{{rank}}", "w") as f:   # two ranks' prints can interleave
            f.write(repr([t for t in threads if "gloo" in t]))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(script)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith("ddp=")]
    assert lines == ["ddp=True world=2 backend=gloo sum=3.0"]  # print0: one line, from rank 0 only
    # fault 7 of issue 22: a mean hid the rank nearest to running out of memory
    assert "reduced {'d_loss': 1.5, 'mem_sampling': 20.0}" in out.stdout
    left = [(tmp_path / f"threads{r}").read_text() for r in (0, 1)]
    assert left == ["[]", "[]"], left    # gloo's loop and worker threads still running
    # metrics written once, not per rank
    assert (tmp_path / "m.jsonl").read_text() == '{"rank_sum": 3.0}\n'


def test_torchrun_with_one_process_still_runs_every_collective(tmp_path):
    """Fault 1 (issue 9): `torchrun --nproc_per_node=1` on one GPU must exercise the process group,
    as a node does."""
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        import torch, torch.distributed as dist
        import common
        ddp, rank, local_rank, world, device = common.compute_init()
        print(f"ddp={{ddp}} initialized={{dist.is_initialized()}} world={{world}} \
sum={{common.all_reduce_sum(2.5)}}")
        common.compute_cleanup()
    """))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=1", str(script)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ddp=True initialized=True world=1 sum=2.5" in out.stdout


def test_every_collective_hands_over_tensors_on_the_collective_device(monkeypatch):
    """Fault 1 (issue 9): NCCL takes CUDA tensors only, so a Python number (a token count) turned
    into a CPU tensor crashes the first step on a GPU node. With a stand-in device ('meta') as the
    collective device and the collective replaced by a check, every helper must hand over tensors on
    that device, whatever it was given; and no module but common.py calls torch.distributed itself,
    so these helpers are every collective there is."""
    class HandedOver(Exception):
        pass

    seen = []

    def all_reduce(t, *args, **kwargs):
        seen.append(t.device)
        raise HandedOver

    monkeypatch.setattr(common, "is_initialized", lambda: True)
    monkeypatch.setattr(common, "comm_device", lambda: torch.device("meta"))
    monkeypatch.setattr(common.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(common.dist, "get_world_size", lambda: 2)
    param = torch.nn.Parameter(torch.zeros(3, device="meta"))
    param.grad = torch.zeros(3, device="meta")
    calls = [lambda: common.all_reduce_sum(3), lambda: common.all_reduce_sum(torch.tensor(7)),
             lambda: common.reduce_metrics({"d_loss": 0.5, "d_acc": 1}),
             lambda: common.all_reduce_grads([param])]
    for call in calls:
        with pytest.raises(HandedOver):
            call()
    assert seen == [torch.device("meta")] * len(calls)

    for name in sorted(os.listdir(ROOT)):
        if name.endswith(".py") and name != "common.py":
            text = open(os.path.join(ROOT, name)).read()
            assert not re.search(r"\b(torch\.distributed|dist)\.\w+\(", text), (
                f"{name} calls torch.distributed")


def test_prompts_per_step_that_do_not_split_over_the_ranks_are_refused(tmp_path, monkeypatch):
    import argparse

    monkeypatch.setattr(common, "compute_init", lambda device: (None, 0, 0, 2, "cpu"))
    args = argparse.Namespace(device=None, seed=0, out=str(tmp_path / "run"), prompts_per_step=3)
    with pytest.raises(ValueError, match="--prompts-per-step 3 must divide by the world size 2"):
        common.setup(args)
    args.prompts_per_step = 4
    assert common.setup(args) == (0, 2, "cpu")


def test_a_checkpoint_resumes_only_in_the_sharding_it_was_written_in(tmp_path):
    """A --fsdp checkpoint keeps the models in a folder of shards that ckpt.pt names; resumed
    without --fsdp it once loaded nothing and trained on from the initial weights, saying it had
    resumed. Both mismatches now stop with the file's name and the flag to use; a matching one
    loads (a saved None is skipped, as a GAD warmup's reference; so is a state this run has no
    object for, as a GAD-stage reference resumed with --stage warmup)."""
    model = models.tiny_model(seed=0)
    path = tmp_path / "ckpt.pt"
    rng = {"python": random.getstate(), "numpy": np.random.get_state(),
           "torch": torch.get_rng_state()}
    torch.save({"model": model.state_dict(), "ref": None, "rng": rng, "dcp": "ckpt.pt.1.dcp",
                "step": 3}, path)
    with pytest.raises(ValueError, match=f"{path} was written with --fsdp: resume it with --fsdp"):
        common.load_checkpoint(str(path), model=model)
    for ref in (None, model.state_dict()):
        torch.save({"model": model.state_dict(), "ref": ref, "rng": rng, "step": 3}, path)
        other = models.tiny_model(seed=1)
        assert common.load_checkpoint(str(path), model=other, ref=None) == {"step": 3}
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters()))
