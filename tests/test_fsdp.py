"""--fsdp (FSDP2 over the decoder layers): GAD's three updates, DistiLLM-2's and AMM's on two gloo
ranks whose rows need different numbers of micro-batches give one process's losses, gradient norms
and weights; dev/bench.py's arithmetic of what a rank holds against the sharded tensors."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# rank 0: three short rows (one micro-batch: 3 x 10 padded tokens), rank 1: three long ones (three:
# 32 tokens each, over the budget of 40 in twos); one process: all six, in the tiny byte vocabulary
STEPS = """
import argparse, contextlib, json, sys
sys.path.insert(0, ROOT)
import torch
import amm, common, data, discriminator, distillm2, gad, models, ppo, sample

fsdp = common.compute_init()[0]
rank = common.get_rank()
short = [([5 + i] * 6, [40 + i] * 4, 0.5 * i) for i in range(3)]        # (prompt, response, A)
long = [([9 + i] * 20, [60 + i] * 12, -0.4 * i) for i in range(3)]
rows = (short, long)[rank] if fsdp else short + long
ro = sample.pack([p for p, _, _ in rows], [r for _, r, _ in rows], pad_id=0)
other = sample.pack([p for p, _, _ in rows], [[t + 100 for t in r] for _, r, _ in rows], pad_id=0)
args = argparse.Namespace(fsdp=fsdp, micro_batch_size=8, micro_batch_tokens=40, chunk_size=4,
                          amp=contextlib.nullcontext(), dtype="float32", grad_clip=1.0,
                          samples_per_prompt=1, temperature=0.8)
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
# DistiLLM-2's step (distillm2.accumulate, then the clipped AdamW step) with an untied student: the
# rows as the teacher's responses, the other tokens as the student's, SKL and SRKL at fixed alphas
from transformers import AutoModelForCausalLM
untied = models.tiny_config()
untied.tie_word_embeddings = False   # (as 7B and 14B): the embedding sharded, the head whole
torch.manual_seed(1)
S = AutoModelForCausalLM.from_config(untied)
S = common.shard(S, "float32") if fsdp else S
opt_s = common.make_optimizer(S.parameters(), 1e-3, 0.0)
kd = argparse.Namespace(**vars(args), loss="distillm2", released=False)
alpha = torch.full((len(rows),), 0.1)
terms = distillm2.loss_terms(kd, 0.5, alpha, alpha, [distillm2.token_weights(r, "sequence", 6, 0)
                                                     for r in (ro, other)])
loss, _ = distillm2.accumulate(S, models.load_model("tiny-teacher"), [ro, other], terms, kd)
out["kd"] = {"loss": common.all_reduce_sum(loss),
             "grad_norm": common.clip_and_step(list(S.parameters()), opt_s, 1.0)[0]}
# AMM's step (main's loop body: both sides, the adversaries' ascent, the student's clipped step)
# on the tiny data's first 4 prompts x 2 samples, each rank its 2 prompts
A = amm.parse_args(["--student", "tiny", "--prompts-per-step", "4", "--samples-per-prompt", "2",
                    "--micro-batch-size", "3", "--fsdp" if fsdp else "--no-fsdp"])
A.device, A.amp = torch.device("cpu"), contextlib.nullcontext()
tok, T, teacher, adv_off, adv_on = amm.load_models(A)
T = common.shard(T, "float32") if fsdp else T
A.eos_ids, A.pad_id = sample.stop_ids(tok, T, teacher), tok.pad_token_id
heads = (T.get_output_embeddings(), teacher.get_output_embeddings())
train = data.white_box_prompts(tok, A)[0]
batch, _ = data.batch_at_step(train, 0, 4, A.seed, "amm", rank, 2 if fsdp else 1)
sides = amm.make_sides(T, teacher, batch, 0, {"on": adv_on, "off": adv_off}, A)
adv_opt = common.make_optimizer(list(adv_off.parameters()) + list(adv_on.parameters()), 1e-3, 0.0)
m = {}
g = amm.adversary_steps(sides, heads, adv_opt, A, m)
on = sides["on"]
advantages = amm.on_policy_advantages(g["on"], on["mask"], on["norm"], A.token_mean, 2, A.baseline)
loss = amm.student_backward(T, sides, advantages, heads, A)
opt_t = common.make_optimizer(T.parameters(), 1e-3, 0.0)
out["amm"] = {"d_on": m["d_on"], "loss": common.all_reduce_sum(loss),
              "grad_norm": common.clip_and_step(list(T.parameters()), opt_t, 1.0)[0]}
weights = {f"{name}.{k}": v for name, m in (("G", G), ("D", D), ("S", S), ("T", T))
           for k, v in (common.whole_state_dict(m) or m.state_dict()).items()}
if common.get_rank() == 0:
    torch.save(weights, sys.argv[1])
if fsdp:   # a rank's share of a bf16 run's states against dev/bench.py's arithmetic (rank 0's)
    sys.path.insert(0, ROOT + "/tests")
    from torch.distributed.tensor import DTensor
    from dev import bench
    from live_bytes import LiveBytes
    cfg = models.tiny_config()
    cfg.intermediate_size = 75   # odd rows: rank 0 holds 38 of the MLP's, rank 1 37 (padded to 38)
    cfg.tie_word_embeddings = False   # (as 7B and 14B): the embedding is sharded too, 259 rows
    M = AutoModelForCausalLM.from_config(cfg)
    a, R = bench.Arch.of(M), models.frozen_copy(M, "bfloat16")   # R: GAD's reference, as gad.py
    M, R = common.shard(M, "bfloat16"), common.shard(R, "bfloat16")
    opt = common.make_optimizer(M.parameters(), 1e-3, 0.0)
    with models.autocast("cpu", "bfloat16"):
        M(input_ids=torch.arange(12)[None]).logits.float().mean().backward()
    opt.step()
    size = lambda ts: sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size()
                          for t in ts)
    with LiveBytes() as live, common.gathered(M):   # (the gathered parameters are M's meanwhile)
        gathered = sum(p.untyped_storage().nbytes() for m in (M.model.layers, M.model.embed_tokens)
                       for p in m.parameters())
    state = [t for s in opt.state.values() for t in s.values()]
    predicted, layers = bench.rank_share(a, 2), bench.gathered_layers(a, 2, 2, "G")
    out["mem"] = {"weights": [size(M.parameters()), 4 * predicted.params],
                  "grads": [size(p.grad for p in M.parameters()), 4 * predicted.params],
                  "adamw": [size(state), sum(bench.trained(predicted, "G").values())
                            - 4 * predicted.params],
                  "reference": [size(R.parameters()), bench.reference_bytes(a, 2)],
                  "gathered": [gathered, layers["G: layers gathered"]],
                  "gathering": [live.peak, sum(layers.values())]}
common.print0("RESULT " + json.dumps(out))
common.compute_cleanup()
"""


def run_steps(tmp_path, torchrun):
    """-> (the steps' numbers, G's and D's weights after them)."""
    script, weights = tmp_path / "steps.py", tmp_path / f"weights{int(torchrun)}.pt"
    script.write_text(textwrap.dedent(STEPS).replace("ROOT", repr(ROOT)))
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=2"] if torchrun else []) + [str(script),
                                                                             str(weights)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), torch.load(weights)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The steps in one process and on two ranks: ((numbers, weights), (numbers, weights))."""
    tmp_path = tmp_path_factory.mktemp("steps")
    return run_steps(tmp_path, torchrun=False), run_steps(tmp_path, torchrun=True)


def test_uneven_micro_batches_on_two_sharded_ranks_match_one_process(runs):
    """Each pass over a sharded layer is a collective: a rank with one micro-batch against one with
    three would pair the wrong collectives (gloo: a reset connection; NCCL: a hang). With --fsdp
    every rank splits its micro-batches up to the largest count, and the sums over ranks are one
    process's (PPO's grad_norm: the first mini-batch's, before any weight has moved apart)."""
    (one, w1), (two, w2) = runs
    for step, keys in (("sft", ("sft_loss", "g_grad_norm")), ("d", ("d_loss", "d_grad_norm")),
                       ("ppo", ("grad_norm",)), ("kd", ("loss", "grad_norm")),
                       ("amm", ("d_on", "loss", "grad_norm"))):
        for key in keys:
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5), (step, key)
    # and the weights after them (G: two AdamW steps at lr 1e-3; D, DistiLLM-2's student S and AMM's
    # T: one), gathered whole. Float reordering moves them ~1e-7; an element whose gradient is at
    # that noise level can move by up to AdamW's whole step (lr, either sign): here three of T's
    # 27k numbers by 1.4e-6 to 5.5e-6. A rank's share of a gradient missing moves most
    # elements (a halved sum, which AdamW's first step does not see, the gradient norms above catch)
    assert w1.keys() == w2.keys()
    for model in "GDST":
        diff = torch.cat([(w2[k] - w1[k]).abs().flatten() for k in w1 if k[0] == model])
        assert diff.max() <= 2e-3 and (diff > 1e-6).float().mean() <= 1e-3, (model, diff.max())


def test_memory_arithmetic_of_a_ranks_share_is_the_sharded_tensors_size(runs):
    """dev/bench.py's --fsdp states on a rank, against rank 0's sharded tensors in a bf16 run (MLP
    rows split 38 + 37: FSDP2 pads rank 1's; the reference's matmul weights bf16, its norms fp32),
    and the layers gathered in bf16: [measured bytes, predicted bytes]. While gathering, gloo frees
    the last layer's flat all-gather buffers sooner or later: the peak is at most the count that
    keeps both, and above the gathered layers by at least the output buffer."""
    mem = runs[1][0]["mem"]
    for term in ("weights", "grads", "adamw", "reference", "gathered"):
        assert mem[term][0] == mem[term][1], (term, mem[term])
    measured, predicted = mem["gathering"]
    assert mem["gathered"][0] + 2 / 3 * (predicted - mem["gathered"][0]) <= measured <= predicted
