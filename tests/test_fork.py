"""The fork study (dev/fork.py, `dev/bench.py fork`): the tiny budget end to end and resumed, and
the fresh discriminator of its two-sample test."""

import json
import math
import shutil

import pytest
import torch

from dev import fork
from scripts import metrics, run_script


def test_tiny_fork_study_has_every_row_each_branch_starts_at_the_fork_and_resumes(tmp_path):
    """Why it exists: the study's bookkeeping end to end (the shared warmup and its D gate, the
    learning-rate sweep, three branches from the fork point, every row and metric, the claims); a
    killed study, continued, trains only what it lacked and reports the same. At the tiny budget
    the numbers are noise."""
    out = tmp_path / "f"
    # one seed here (the suite's time): the bootstrap's seeds are checked in test_quality
    run_script("dev/bench.py", ["fork", "--budget", "tiny", "--out", str(out), "--seeds", "1",
                                "--lr-sweep", "--sweep-factors", "1,2"])
    report = json.loads((out / "fork.json").read_text())
    b = fork.BUDGETS["tiny"]
    assert list(report["rows"]) == list(fork.ROWS)
    for key, row in report["rows"].items():
        assert all(math.isfinite(row["mean"][m]) for m in fork.METRICS), key
    for seed, w in report["warmups"].items():
        assert w["accuracy"] >= b["d_threshold"] and w["steps"] >= b["warmup_steps"], seed
    runs, dirs = out / "runs", {}
    for branch in fork.BRANCHES:
        # the sweep scored both rates on the dev prompts and the study kept the lower NLL's run
        values = {float(lr): v for lr, v in report["sweep"][branch]["values"].items()}
        rate = fork.branch_lr(b, branch)
        assert sorted(values) == [rate, 2 * rate], branch
        assert report["lr"][branch] == min(values, key=values.get), branch
        dirs[branch] = runs / f"{branch}_lr{report['lr'][branch]:g}_s0"
        dev = json.loads((dirs[branch] / "dev_scores.json").read_text())
        test = json.loads((dirs[branch] / "scores.json").read_text())
        assert len(dev["nll_sampled"]) == b["dev_prompts"] != len(test["nll_sampled"]), branch
        # K student updates each, on top of the warmup's
        assert report["rows"][branch]["cost"]["student_updates"] == b["fork_steps"], branch
        assert [r["stage"] for r in metrics(dirs[branch])] == [branch] * b["fork_steps"], branch
    # the sweep's run at the kept rate is the study's: two runs a branch, not three
    assert len([d for d in runs.iterdir() if d.name.split("_")[0] in fork.BRANCHES]) == 6
    # every branch starts at the fork point: SODA's reference is the warmup's student (log 2),
    # GAD's D the warmup's (its first rewards already separate samples)
    assert metrics(dirs["soda"])[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics(dirs["gad"])[0]["reward_std"] > 0
    assert len(report["verdicts"]) == 3 * len(fork.CLAIMS)
    assert "| SODA |" in (out / "fork.md").read_text()
    # killed before the last branch was scored: continued (without --lr-sweep, so the sweep's
    # rates are kept), it trains that branch only
    logs = lambda: {d.name: (d / "train.log").stat().st_mtime_ns for d in runs.iterdir()
                    if (d / "train.log").exists()}
    shutil.rmtree(dirs["soda"])
    (out / "fork.json").unlink()
    before = logs()
    run_script("dev/fork.py", ["--budget", "tiny", "--out", str(out), "--seeds", "1"])
    after = logs()
    assert [d for d in after if after[d] != before.get(d)] == [dirs["soda"].name]
    redo = json.loads((out / "fork.json").read_text())
    assert redo["lr"] == report["lr"]
    for key in fork.ROWS:
        assert redo["rows"][key]["mean"] == report["rows"][key]["mean"], key


def test_two_sample_test_is_chance_on_one_distribution_and_finds_a_shift():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(200, 16, generator=g, dtype=torch.float64) for _ in range(2))
    same = sum(fork.two_sample_test(a, b)) / 200
    assert 0.4 < same < 0.6
    shifted = b.clone()
    shifted[:, 3] += 1.5   # one feature moved by 1.5 standard deviations
    # a pair's difference in it is N(1.5, 2): no scorer ranks more than Phi(1.5 / sqrt 2) = 0.855
    # of the pairs right; one fitted on 100 pairs of 16 features gets most of the way
    assert 0.7 < sum(fork.two_sample_test(a, shifted)) / 200 < 0.9


@pytest.mark.parametrize("budget", list(fork.BUDGETS))
def test_every_budgets_commands_parse_and_run_its_steps(budget):
    """The cpu and gpu budgets do not run here: their gad.py commands are checked against its
    parser, stage lengths and rates."""
    import gad
    b = fork.BUDGETS[budget]
    b = dict(b, student_path="student-folder" if b["student"] == "tiny" else b["student"])
    rows, steps = b["train_prompts"], b["fork_steps"]
    for stage in ("warmup", *fork.BRANCHES):
        init = None if stage == "warmup" else "runs/warmup_s0"
        k = b["warmup_steps"] if stage == "warmup" else steps
        lr = b["sft_lr"] if stage in ("warmup", "seqkd") else b["rl_lr"]
        args = gad.parse_args(fork.gad_command(b, stage, "run", 3, lr, "train.jsonl", rows, None,
                                               init_from=init, steps=k)[1:])
        assert args.stages == [stage] and gad.stage_steps(stage, args, rows) == k, stage
        assert (args.lr, args.temperature, args.max_new_tokens, args.seed) == (
            lr, b["temperature"], b["max_new_tokens"], 3), stage
        assert args.teacher_responses == "data" and args.init_from == init, stage
        # the warmup cuts the student, SODA's rejected responses are the raw cut student's (the
        # branches' G is the warmup's, already cut: gad.load_student ignores the flag then)
        assert args.student_layers == b["student_layers"], stage
    # the RL and DPO rate a fifth of the SFT rate, as the reference's 1e-6 : 5e-6
    assert b["rl_lr"] == pytest.approx(b["sft_lr"] / 5)
