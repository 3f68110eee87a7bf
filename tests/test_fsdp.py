"""--fsdp (FSDP2 over the decoder layers): gad.py's three training steps on two gloo ranks whose
rows need different numbers of micro-batches give one process's loss and gradient norm."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# rank 0: three short rows (one micro-batch: 3 x 10 padded tokens), rank 1: three long ones (three:
# 32 tokens each, over the budget of 40 in twos); one process: all six, in the tiny byte vocabulary
STEPS = """
import argparse, contextlib, json, sys
sys.path.insert(0, ROOT)
import torch
import common, discriminator, gad, models, ppo, sample

fsdp = common.compute_init()[0]
rank = common.get_rank()
short = [([5 + i] * 6, [40 + i] * 4, 0.5 * i) for i in range(3)]        # (prompt, response, A)
long = [([9 + i] * 20, [60 + i] * 12, -0.4 * i) for i in range(3)]
rows = (short, long)[rank] if fsdp else short + long
ro = sample.pack([p for p, _, _ in rows], [r for _, r, _ in rows], pad_id=0)
other = sample.pack([p for p, _, _ in rows], [[t + 100 for t in r] for _, r, _ in rows], pad_id=0)
args = argparse.Namespace(fsdp=fsdp, micro_batch_size=8, micro_batch_tokens=40, chunk_size=4,
                          amp=contextlib.nullcontext(), dtype="float32", grad_clip=1.0,
                          samples_per_prompt=1)
G = models.load_model("tiny", seed=0)
D = discriminator.from_student(G)
if fsdp:
    G, D = common.shard(G, "float32"), common.shard(D, "float32")
out = {}
opt = common.make_optimizer(G.parameters(), 1e-3, 0.0)
out["sft"] = gad.sft_step(G, opt, ro, args)
# D: the rows as the teacher's responses, other tokens as the student's, one sample a prompt
opt_d = common.make_optimizer(D.parameters(), 1e-3, 0.0)
m = discriminator.update(D, opt_d, ro, other, args)
out["d"] = {k: m[k] for k in ("d_loss", "d_grad_norm")}
cfg = ppo.PPOConfig(micro_batch_size=8, micro_batch_tokens=40, chunk_size=4, fsdp=fsdp)
adv = torch.tensor([a for _, _, a in rows])
out["ppo"] = {"grad_norm": ppo.ppo_update(G, opt, ro, adv, None, cfg=cfg)["grad_norm"]}
common.print0("RESULT " + json.dumps(out))
common.compute_cleanup()
"""


def run_steps(tmp_path, torchrun):
    script = tmp_path / "steps.py"
    script.write_text(textwrap.dedent(STEPS).replace("ROOT", repr(ROOT)))
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=2"] if torchrun else []) + [str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_uneven_micro_batches_on_two_sharded_ranks_match_one_process(tmp_path):
    """Each pass over a sharded layer is a collective: a rank with one micro-batch against one with
    three would pair the wrong collectives (gloo: a reset connection; NCCL: a hang). With --fsdp
    every rank splits its micro-batches up to the largest count, and the sums over ranks are one
    process's (PPO's grad_norm: the first mini-batch's, before any weight has moved apart)."""
    one, two = run_steps(tmp_path, torchrun=False), run_steps(tmp_path, torchrun=True)
    for step, keys in (("sft", ("sft_loss", "g_grad_norm")), ("d", ("d_loss", "d_grad_norm")),
                       ("ppo", ("grad_norm",))):
        for key in keys:
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5), (step, key)
