"""The distillation benchmark (dev/quality.py, `dev/bench.py quality`): the tiny budget end to end,
a rerun that trains nothing, and the pieces that decide what it reports (the claims' verdicts,
which checkpoints the curve scores, the trainers' flags at every budget)."""

import json
import math

import numpy as np
import pytest

import data as data_lib
import models
from dev import quality
from scripts import run_script

WALL = {"wall_s", "eval_s", "train_s"}   # the only numbers two runs of one seed may differ in


def without_wall(x):
    if isinstance(x, dict):
        return {k: without_wall(v) for k, v in x.items() if k not in WALL}
    if isinstance(x, list):
        return [without_wall(v) for v in x]
    return x


def test_tiny_budget_has_every_row_metric_and_seed_and_a_rerun_trains_nothing(tmp_path):
    """Why it exists: the benchmark's bookkeeping end to end (every row and metric, one budget for
    every trained row, summaries of the seeds, verdicts, the table, a rerun that trains nothing and
    reports the same). The numbers themselves come from the trainers and eval, checked in their
    own tests; at the tiny budget they are noise."""
    out = tmp_path / "q"
    # one seed a row here (the suite's time): the seed bookkeeping is the same for 1 or 3
    cmd = ["--budget", "tiny", "--out", str(out), "--jobs", "2", "--seeds", "1"]
    run_script("dev/bench.py", ["quality"] + cmd)
    report = json.loads((out / "quality.json").read_text())
    budget = quality.BUDGETS["tiny"]
    assert list(report["rows"]) == list(quality.METHODS)
    metrics = ["teacher_nll", "heldout_fkl", "heldout_rkl", "student_nll", "rouge_l", "length",
               "end_of_turn"]
    for method, row in report["rows"].items():
        label, script, _, _ = quality.METHODS[method]
        seeds = [r.get("seed") for r in row["seeds"]]
        assert len(seeds) == 1, method
        if script:
            assert seeds == list(range(len(seeds))), method
        for r in row["seeds"]:
            assert all(math.isfinite(r["metrics"][k]) for k in metrics), (method, r["metrics"])
            if script:   # the same budget for every trained row
                assert r["train"]["student_updates"] == budget["updates"], method
                assert r["train"]["wall_s"] > 0 and r["train"]["train_tokens"] > 0, method
        for k in metrics:   # one seed: its summary is that seed's value
            assert row["summary"][k]["min"] == row["summary"][k]["mean"] == \
                row["seeds"][0]["metrics"][k], (method, k)
    assert report["rows"]["teacher"]["seeds"][0]["metrics"]["heldout_fkl"] == pytest.approx(0)
    assert len(report["verdicts"]) == len(quality.CLAIMS)
    assert {v["verdict"] for v in report["verdicts"]} <= {"holds", "does not hold",
                                                          "inconclusive at this power"}
    for v in report["verdicts"]:   # the interval holds the observed difference
        assert v["interval"][0] <= v["difference"] <= v["interval"][1], v
    # each run's folder is keyed by its rate, so a rerun at a swept rate cannot reuse another's
    trained = {f"{m}_lr{report['lr'][m]:g}_s0" for m, (_, s, _, _) in quality.METHODS.items() if s}
    assert {p.name for p in (out / "runs").iterdir()} == trained | {"student", "teacher"}
    md = (out / "quality.md").read_text()
    for label, *_ in quality.METHODS.values():
        assert f"| {label} |" in md, label
    # a rerun (a killed benchmark continued) trains nothing and gives the same numbers
    again = run_script("dev/quality.py", cmd)
    assert "quality: " + str(out / "runs") not in again.stdout   # no run was trained or scored
    assert without_wall(json.loads((out / "quality.json").read_text())) == without_wall(report)


def test_paired_bootstrap_pairs_seeds_and_prompts_and_verdicts_follow_the_interval():
    rng = np.random.default_rng(0)
    # per-prompt NLL sums that vary a lot between prompts, the same prompts for both rows: a row
    # lower by exactly 0.1 a token everywhere gives [0.1, 0.1] paired (unpaired: ~+-0.5 wide)
    tokens = rng.integers(5, 30, size=(3, 64)).astype(float)
    other = np.stack([rng.gamma(2.0, 1.0, size=(3, 64)) * tokens, tokens], -1)   # [S, N, 2]
    better = other.copy()
    better[..., 0] -= 0.1 * tokens
    d, (lo, hi), v = quality.verdict(better, other)
    assert d == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    assert v == "holds"
    assert quality.verdict(other, better)[2] == "does not hold"
    # noise per prompt around the same mean: inconclusive, the interval around the difference
    noisy = other.copy()
    noisy[..., 0] = rng.permuted(other[..., 0] / tokens, axis=1) * tokens
    d, (lo, hi), v = quality.verdict(noisy, other)
    assert v == "inconclusive at this power" and lo < d < hi and lo < 0 < hi
    # the statistic is the token-pooled mean, as eval.pooled: long responses weigh more (the mean
    # of the per-prompt means would be (2 + 1) / 2)
    assert quality.ratio(np.array([[[10.0, 5], [1.0, 1]]])) == pytest.approx(11 / 6)


def trainer_saves(stages, save_every, epoch_len=None):
    """The steps after which the trainers write ckpt.pt, by their own rule (common.end_step):
    every --save-every steps of a stage, its last step, and distillm2.py's epoch ends."""
    saves, offset = set(), 0
    for _, total in stages:
        for step in range(total):
            g = offset + step + 1
            if ((step + 1) % save_every == 0 or step + 1 == total
                    or (epoch_len and g % epoch_len == 0)):
                saves.add(g)
        offset += total
    return saves


@pytest.mark.parametrize("budget", list(quality.BUDGETS))
def test_curve_scores_only_checkpoints_the_trainers_write(budget):
    b = quality.BUDGETS[budget]
    for method in ("seqkd", "gad", "soda", "distillm2", "amm"):
        stages, epoch_len = quality.stage_plan(method, b)
        total = sum(steps for _, steps in stages)
        assert quality.student_updates(method, b, total) == b["updates"], method
        for k in (0, 1, 3, 4, 5):
            every, points = quality.curve_steps(stages, k, epoch_len)
            assert points[-1] == total and points == sorted(set(points)), (method, k)
            assert len(points) <= max(k, 1)
            assert set(points) <= trainer_saves(stages, every, epoch_len), (method, k, points)


@pytest.mark.parametrize("budget", list(quality.BUDGETS))
def test_trainer_flags_parse_and_give_every_row_the_budget(budget):
    """The cpu and gpu budgets do not run here: their commands are checked against each trainer's
    own parser and step counts."""
    import amm
    import distillm2
    import gad
    b = quality.BUDGETS[budget]   # the student as main() passes it: a saved folder for tiny
    b = dict(b, student_path="student-folder" if b["student"] == "tiny" else b["student"])
    n = b["updates"] * b["prompts_per_step"] // quality.EPOCHS
    data = {"path": "train.jsonl", "rows": n}
    for method, (_, script, _, _) in quality.METHODS.items():
        if not script:
            continue
        cmd = quality.trainer_args(method, b, 3, 1e-4, "run", data, None, 5)
        assert cmd[0] == script
        args = {"gad.py": gad, "distillm2.py": distillm2, "amm.py": amm}[script].parse_args(cmd[1:])
        assert (args.dtype, args.prompts_per_step, args.max_new_tokens, args.seed) == (
            b["dtype"], b["prompts_per_step"], b["max_new_tokens"], 3), method
        if script == "gad.py":
            steps = [gad.stage_steps(s, args, n) for s in args.stages]
            assert steps == [s for _, s in quality.stage_plan(method, b)[0]], method
            # the black-box rows train on the benchmark's teacher samples, never sample their own
            # (the smollm2-135m preset of gad.py would)
            assert args.teacher_responses == "data", method
        else:
            assert args.epochs * (n // b["prompts_per_step"]) == b["updates"], method
            assert args.lr == 1e-4 and args.limit >= n
        if script == "distillm2.py":
            assert args.lora_r == 0 and args.max_len > args.max_prompt_len, method
        # nothing held out by the trainers: the benchmark scores every student itself
        assert args.val_fraction == 0 and args.eval_prompts == 0, method


def test_trainer_cpu_defaults_are_the_cpu_budgets_rows():
    """`python gad.py` (no arguments) runs the benchmark's GAD row on its pair, `python
    distillm2.py` and `python amm.py` theirs: the same student cut, teacher, student updates,
    lengths and rates (only the data file, what is held out and where it is written differ); a
    change to one side must be made on the other."""
    import amm
    import distillm2
    import gad
    b = dict(quality.BUDGETS["cpu"], student_path=quality.BUDGETS["cpu"]["student"])
    own = {"data", "limit", "val_fraction", "eval_prompts", "out", "save_every", "max_len",
           "eval_max_new_tokens", "teacher_responses", "gen_batch_size"}
    defaults, rows = {}, {}
    for method, module in (("gad", gad), ("distillm2", distillm2), ("amm", amm)):
        default = defaults[method] = module.parse_args([])
        cmd = quality.trainer_args(method, b, 0, b["lr"][method], "run",
                                   {"path": "train.jsonl", "rows": 48}, None, 5)
        row = rows[method] = module.parse_args(cmd[1:] + quality.METHODS[method][2])
        differ = {k for k in vars(row) if getattr(row, k) != getattr(default, k)}
        assert differ <= own, (method, differ - own)
    # gad.py: the teacher's samples, not ShareGPT's; the benchmark's rows: its own, sampled once
    assert (defaults["gad"].teacher_responses, rows["gad"].teacher_responses) == ("teacher", "data")
    # the white-box defaults read the same prompts: 48 to train on, 2 epochs of 12 steps
    d2, split_keys = defaults["distillm2"], ("data", "limit", "val_fraction", "eval_prompts")
    assert all(getattr(defaults["amm"], k) == getattr(d2, k) for k in split_keys)
    _, val, _, per_epoch = data_lib.white_box_prompts(models.load_tokenizer(b["student"]), d2)
    assert len(val) == d2.eval_prompts
    for method in ("distillm2", "amm"):
        assert defaults[method].epochs * per_epoch == b["updates"], method
