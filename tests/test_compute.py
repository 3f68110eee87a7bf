"""Compute accounting (common.Compute): the counters each trainer logs, against a hand count of the
passes a tiny run really makes. The passes are recorded where the models run (sample.generate,
sample.response_hidden, discriminator.score), not where the trainers count them, so a pass the
trainer forgets to count, or counts twice, shows. Runs in process (no interpreter start-up)."""

import contextlib
import io
import json

import pytest
import torch

import amm
import common
import data
import discriminator
import distillm2
import gad
import models
import sample
from scripts import metrics, run_script

TOKENS = ("student_tokens", "teacher_tokens", "teacher_calls", "train_tokens")


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def real_tokens(prompt_mask, response_mask):
    return int(prompt_mask.sum()) + int(response_mask.sum())


class Trace:
    """Every model pass of a run in process, grouped by the logged step it belongs to (a step's
    passes come before its row; passes before the first step count in it)."""

    def __init__(self, monkeypatch):
        self.steps, self.current, self.models = [], [], {}
        generate, hidden, score = sample.generate, sample.response_hidden, discriminator.score
        log_step = common.log_step

        def traced_generate(model, prompts, *args, **kwargs):
            ro = generate(model, prompts, *args, **kwargs)
            self.current.append(dict(kind="generate", model=model, prompt=sum(map(len, prompts)),
                                     new=int(ro.response_mask.sum()),
                                     keys=list(kwargs.get("prompt_keys") or [])))
            return ro

        def traced_hidden(model, ro):
            self.current.append(dict(kind="pass", model=model, grad=torch.is_grad_enabled(),
                                     tokens=real_tokens(ro.prompt_mask, ro.response_mask),
                                     response=int(ro.response_mask.sum())))
            return hidden(model, ro)

        def traced_score(d, prompt_ids, prompt_mask, response_ids, response_mask):
            self.current.append(dict(kind="pass", model=d, grad=torch.is_grad_enabled(),
                                     tokens=real_tokens(prompt_mask, response_mask),
                                     response=int(response_mask.sum())))
            return score(d, prompt_ids, prompt_mask, response_ids, response_mask)

        def traced_log_step(*args, **kwargs):
            self.steps.append(self.current)
            self.current = []
            return log_step(*args, **kwargs)

        monkeypatch.setattr(sample, "generate", traced_generate)
        monkeypatch.setattr(sample, "response_hidden", traced_hidden)
        monkeypatch.setattr(discriminator, "score", traced_score)
        monkeypatch.setattr(common, "log_step", traced_log_step)

    def capture(self, monkeypatch, module, name, loader="load_models"):
        """Keep what module.<loader> returns, and its arguments, in self.models[name]."""
        load = getattr(module, loader)

        def traced(*args, **kwargs):
            out = load(*args, **kwargs)
            self.models[name] = (out, args)
            return out
        monkeypatch.setattr(module, loader, traced)


def hand_count(passes, is_teacher, teacher_flops=True):
    """A step's counts from its recorded passes: generation 2 N per prompt token (each prompt once)
    and per new token; a pass 2 N a token, 6 N with a backward (a pass under grad is trained on)."""
    c = dict.fromkeys(TOKENS + ("flops",), 0)
    for p in passes:
        n, teacher = n_params(p["model"]), is_teacher(p["model"])
        if p["kind"] == "generate":
            if any(k.startswith("val|") for k in p["keys"]):
                continue   # the held-out yardstick: evaluation, not counted
            tokens, flops = p["prompt"] + p["new"], 2 * n * (p["prompt"] + p["new"])
            if not teacher:
                c["student_tokens"] += p["new"]
        else:
            tokens, flops = p["tokens"], (6 if p["grad"] else 2) * n * p["tokens"]
            c["train_tokens"] += tokens if p["grad"] else 0
        if teacher:
            c["teacher_tokens"] += tokens
            c["teacher_calls"] += 1
        c["flops"] += flops if teacher_flops or not teacher else 0
    return c


def check_rows(rows, expected):
    """Each row's counters: cumulative, monotone, and the step's increments equal to the hand
    count; flops the step's and flops_total their running sum."""
    assert len(rows) == len(expected) >= 2
    before = dict.fromkeys(TOKENS, 0)
    flops_total = 0.0
    for i, (row, want) in enumerate(zip(rows, expected)):
        for key in TOKENS:
            assert row[key] >= before[key], (i, key)
            assert row[key] - before[key] == want[key], (i, key, row[key] - before[key], want[key])
        assert row["flops"] == pytest.approx(want["flops"], rel=1e-12), i
        flops_total += row["flops"]
        assert row["flops_total"] == pytest.approx(flops_total, rel=1e-12), i
        before = {key: row[key] for key in TOKENS}
    assert all(rows[-1][key] > 0 for key in TOKENS), rows[-1]


def run(main, args):
    with contextlib.redirect_stdout(io.StringIO()):
        main(args)


# ----------------------------------------------------------------------------------------- units

def test_compute_counts_sums_and_resumes_from_older_checkpoints():
    ro = sample.pack([[1, 2, 3], [4, 5]], [[6, 7], [8]], pad_id=0)   # 5 prompt, 3 response tokens
    c = common.Compute()
    c.generate(10, sample.pack([[1, 2, 3]] * 2, [[6, 7], [8]], 0), n=2)   # 3 prefilled, 3 new
    c.forward(10, ro, passes=2, teacher=True, calls=3)
    c.train(10, ro)
    c.add(teacher_tokens=4, teacher_calls=1)
    row = c.log()
    assert row == dict(student_tokens=3, teacher_tokens=16 + 4, teacher_calls=3 + 1,
                       train_tokens=8, flops=2 * 10 * 6 + 2 * 10 * 16 + 6 * 10 * 8,
                       flops_total=920.0)
    c.train(1, 5)
    assert c.log()["flops_total"] == 950.0
    assert c.log() == {**row, "train_tokens": 13, "flops": 0.0, "flops_total": 950.0}   # no pass
    # a checkpoint keeps the totals; an older one without them resumes from 0
    resumed = common.Compute()
    resumed.resume({"step": 3, "compute": c.state_dict()})
    assert resumed.totals == c.totals
    for state in ({"step": 3}, None, {"step": 3, "compute": {"flops": 7}}):
        old = common.Compute()
        old.resume(state)
        assert old.totals == {**dict.fromkeys(common.Compute.KEYS, 0),
                              **(state or {}).get("compute", {})}


# ------------------------------------------------------------------------------------- trainers

@pytest.mark.parametrize("ppo", [2, 1])
def test_gad_counts_every_pass(tmp_path, monkeypatch, ppo):
    """Warmup (sampling, a D step, G's SFT) then GAD (D's scores, the reference's logprobs; with 2
    PPO epochs x 2 mini-batches the old logprobs' pass, with 1 x 1 none: the update's own). 8
    prompts x (4 samples + 1 teacher row) do not fit D's micro-batches of 32 rows: one teacher row
    is scored in two, and counted twice. The teacher (black-box) samples the 40 tiny rows before
    step 1: its tokens, in the student's tokenizer, and generate() batches, not its FLOPs."""
    trace = Trace(monkeypatch)
    trace.capture(monkeypatch, gad, "gad", "load_discriminator")
    out = tmp_path / "gad"
    run(gad.main, ["--student", "tiny", "--limit", "40", "--warmup-steps", "1", "--gad-steps",
                   "1", "--freeze-g-steps", "0", "--ppo-epochs", str(ppo), "--mini-batches",
                   str(ppo), "--eval-prompts", "0", "--out", str(out)])
    D, (_, G) = trace.models["gad"]
    tok = models.load_tokenizer("tiny")
    teachers = {id(p["model"]) for step in trace.steps for p in step
                if p["kind"] == "generate" and p["model"] is not G}
    expected = [hand_count(step, lambda model: id(model) in teachers, teacher_flops=False)
                for step in trace.steps]
    sampled = [json.loads(line)["teacher_response"] for line in open(out / "teacher.jsonl")]
    assert len(sampled) == 40 and expected[0]["teacher_calls"] == 5   # 40 prompts, 8 a batch
    expected[0]["teacher_tokens"] = sum(len(data.encode_response(tok, y)[0]) for y in sampled)
    check_rows(metrics(out), expected)
    warmup, gad_step = trace.steps
    # what the count is made of: D's step in two micro-batches (teacher rows and samples scored
    # apart in each), and the gad step's passes of G and pi_ref: old (PPO) and reference logprobs,
    # then epochs x mini-batches
    assert sum(p["model"] is D for p in warmup) == 4
    assert [p["grad"] for p in gad_step if p["kind"] == "pass" and p["model"] is not D] == \
        {2: [False, False, True, True, True, True], 1: [False, True]}[ppo]


@pytest.fixture(scope="module")
def amm_run(tmp_path_factory):
    """AMM on the tiny pair, 2 steps of 8 prompts x 4 samples, 2 adversary steps each, generate()
    batches of 3 prompts and micro-batches of 12 rows (several of each)."""
    out = tmp_path_factory.mktemp("amm") / "run"
    args = ["--student", "tiny", "--limit", "20", "--epochs", "1", "--prompts-per-step", "8",
            "--adv-steps", "2", "--gen-batch-size", "3", "--micro-batch-size", "12",
            "--eval-prompts", "1", "--save-every", "1"]
    with pytest.MonkeyPatch.context() as monkeypatch:
        trace = Trace(monkeypatch)
        trace.capture(monkeypatch, amm, "amm")
        run(amm.main, args + ["--out", str(out)])
    return args, out, trace


def test_amm_counts_every_pass(amm_run):
    """Model passes from the trace; the LM heads and adversaries, run alone on stored hidden states
    over each side's response tokens R, by hand: per side, the heads 3 + adv_steps times (moments
    before and after the ascent, l1, each ascent step), the adversary forward twice and trained
    adv_steps times; in the student's backward the teacher's head and the adversary (the student's
    head is in its pass); after its step the heads and the adversary once more."""
    _, out, trace = amm_run
    (_, student, teacher, adv_off, adv_on), _ = trace.models["amm"]
    heads = n_params(student.get_output_embeddings()) + n_params(teacher.get_output_embeddings())
    t_head, adv, steps = n_params(teacher.get_output_embeddings()), n_params(adv_on), 2
    assert n_params(adv_off) == adv
    expected = []
    for step in trace.steps:
        c = hand_count(step, lambda model: model is teacher)
        # R: the response tokens of the teacher's pass over each side (its only passes)
        r = sum(p["response"] for p in step if p["kind"] == "pass" and p["model"] is teacher)
        c["flops"] += r * (2 * heads * (3 + steps) + 2 * adv * 2 + 6 * adv * steps
                           + 2 * (t_head + adv) + 2 * (heads + adv))
        c["train_tokens"] += r * steps
        expected.append(c)
    # generate() batches of 3 of the 8 prompts: 3 a side, and the teacher's micro-batches of 12
    # rows: one for its 8 responses, three for the 32 samples
    assert [sum(p["kind"] == "generate" and p["model"] is m for p in trace.steps[1])
            for m in (student, teacher)] == [3, 3]
    assert expected[1]["teacher_calls"] == 3 + 1 + 3
    check_rows(metrics(out), expected)


def test_amm_counters_survive_resume(amm_run, tmp_path):
    """Stopped after step 1 and resumed: the same rows as the uninterrupted run; the checkpoint
    holds the totals."""
    args, full, _ = amm_run
    cut = tmp_path / "cut"
    run(amm.main, args + ["--out", str(cut), "--stop-after", "1"])
    ck = torch.load(cut / "ckpt.pt", weights_only=False)
    assert ck["compute"] == {k: metrics(cut)[0][k] for k in TOKENS} | \
        {"flops": metrics(cut)[0]["flops_total"]}
    run(amm.main, args + ["--out", str(cut), "--resume"])
    keys = TOKENS + ("flops", "flops_total")
    assert [{k: r[k] for k in keys} for r in metrics(cut)] == \
        [{k: r[k] for k in keys} for r in metrics(full)]


@pytest.mark.parametrize("variant", ["distillm2", "on-policy"])
def test_distillm2_counts_every_pass(tmp_path, monkeypatch, variant):
    """distillm2: one step an epoch, so each step samples the teacher and the student (generate()
    batches of 6 of 16 prompts) and the second runs the alpha curriculum's passes; micro-batches of
    6 rows. on-policy: GKD with lambda 1, a student sample every step."""
    args = {"distillm2": ["--epochs", "2", "--prompts-per-step", "16"],
            "on-policy": ["--loss", "jsd", "--on-policy-fraction", "1", "--epochs", "1",
                          "--prompts-per-step", "8"]}[variant]
    trace = Trace(monkeypatch)
    trace.capture(monkeypatch, distillm2, "d2")
    out = tmp_path / variant
    run(distillm2.main, ["--student", "tiny", "--limit", "20", "--gen-batch-size", "6",
                         "--micro-batch-size", "6", "--eval-prompts", "1", "--out", str(out)]
        + args)
    (_, student, teacher, _), _ = trace.models["d2"]
    expected = [hand_count(step, lambda model: model is teacher) for step in trace.steps]
    check_rows(metrics(out), expected)
    if variant == "distillm2":   # the curriculum: a teacher and a student pass over y_t and y_s
        assert [sum(p["kind"] == "pass" and not p["grad"] and p["model"] is student
                    for p in step) for step in trace.steps] == [0, 6]


def test_amm_counters_under_torchrun_equal_one_process(amm_run, tmp_path):
    """Two gloo ranks: every counter summed over the ranks equals the one process's, except
    teacher_calls, which counts real calls: each rank makes its own for its 4 prompts (generate()
    batches of 3: 2; micro-batches of 12 rows: 1 for the teacher's responses, 2 for the 16
    samples). The token and FLOP counts depend on the samples' lengths, the same at the first step
    only (the same weights); teacher_calls depend on the batch shapes alone."""
    args, one, _ = amm_run
    run_script("amm.py", args + ["--out", str(tmp_path / "two")], torchrun=True)
    keys = ("student_tokens", "teacher_tokens", "train_tokens", "flops", "flops_total")
    rows = metrics(tmp_path / "two")
    assert {k: rows[0][k] for k in keys} == {k: metrics(one)[0][k] for k in keys}
    assert [r["teacher_calls"] for r in rows] == [2 * 5, 2 * 2 * 5]
