"""Helpers for the tests that run an entry point as a user would (gad.py, distillm2.py, amm.py):
as a subprocess, under torchrun, or its main() in this process."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, args, torchrun=False, check=True):
    """`python script args`, or under `torchrun --nproc_per_node=2` (gloo on CPU), from the
    repository root; one thread per process so two ranks do not fight over the cores."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=2"] if torchrun else []) + [script] + args
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def run_here(script, args):
    """`python script args` (a trainer) in this process, at one thread as run_script's processes:
    the same kernels without a new interpreter's imports (4 s a run). Returns what it printed."""
    import importlib
    import torch
    threads, printed = torch.get_num_threads(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(printed):
            importlib.import_module(script[:-len(".py")]).main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    return printed.getvalue()


def metrics(folder):
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]


def student_weights(folder):
    """The exported student's tensors (OUT/student/model.safetensors)."""
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "student", "model.safetensors"))


def resumed_on_two_ranks(script, args, full, cut, stop):
    """`script args` on two ranks stopped after `stop` steps and resumed into `cut` equals the
    uninterrupted two-rank run in `full`: the exported student bit for bit (the same ops in the
    same order, every state restored). Returns cut's metrics."""
    import torch
    run_script(script, args + ["--out", str(cut), "--stop-after", str(stop)], torchrun=True)
    # what a save killed before its ckpt.pt leaves (--fsdp: a sharded folder ckpt.pt does not name)
    (cut / "ckpt.pt.0badc0de.dcp").mkdir()
    (cut / "ckpt.pt.0badc0de.dcp" / "__0_0.distcp").write_bytes(b"torn")
    run_script(script, args + ["--out", str(cut), "--resume"], torchrun=True)
    a, b = student_weights(full), student_weights(cut)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the next save removed it: the sharded folder ckpt.pt names is the only one (--fsdp)
    named = torch.load(cut / "ckpt.pt", weights_only=False).get("dcp")
    assert sorted(p.name for p in cut.glob("ckpt.pt.*.dcp")) == ([named] if named else [])
    return metrics(cut)


def sharded_checkpoint(out, path):
    """A --fsdp run's checkpoint, its sharded folder made one torch.save file at `path` (no process
    group needed) -> the whole state: {"G": {name: tensor}, ...}."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(out / torch.load(out / "ckpt.pt", weights_only=False)["dcp"], path)
    return torch.load(path, weights_only=False)


def reference_run(script, args):
    """A module fixture: one uninterrupted single-process run of `script args`, the reference of
    both a trainer's resume test and its torchrun test (each makes only its own stopped, resumed or
    two-rank runs). Read only."""
    @pytest.fixture(scope="module")
    def one_process(tmp_path_factory):
        out = tmp_path_factory.mktemp("one_process") / "run"
        run_here(script, args + ["--out", str(out)])
        return out
    return one_process


KILL_AT = """import os, signal, sys
sys.path.insert(0, {root!r})
import teacher
write, left = teacher.RowWriter.write, [{rows}]
def write_or_die(self, row):
    if not left[0]:
        os.kill(os.getpid(), signal.SIGKILL)
    left[0] -= 1
    write(self, row)
teacher.RowWriter.write = write_or_die
sys.exit(teacher.main(sys.argv[1:]))
"""


def sample_killed_after(rows, cmd):
    """`cmd` (python teacher.py ...) made to SIGKILL itself when it is about to write its row
    rows + 1: a kill mid-run at a known point, however fast or loaded the machine, where a kill
    after a clock can miss the run's end."""
    return [cmd[0], "-c", KILL_AT.format(root=ROOT, rows=rows)] + [str(a) for a in cmd[2:]]
