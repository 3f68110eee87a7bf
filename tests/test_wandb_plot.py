"""--wandb (files.wandb_log: the rows of metrics.jsonl, logged to wandb too) and dev/plot.py (a
run's metrics.jsonl as a PNG of training curves). wandb and matplotlib are optional: the tests that
need them are skipped where they are not installed."""

import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys
import types

import pytest

import amm
import files
import distillm2
import gad
from dev import plot as plot_lib
from scripts import ROOT, metrics, run_script

# ------------------------------------------------------------------------------------ wandb


def wandb_records(path):
    """The records of an offline run's .wandb file. wandb has no public reader of it (its Python
    DataStore is gone from 0.31): the file is LevelDB's log format (32 KiB blocks of records, each
    with a 7-byte header: crc, length, type FULL / FIRST / MIDDLE / LAST), after a 7-byte file
    header, and each record is a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:   # a block's tail too short for a header is zero padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):   # FULL, or the LAST piece of a record split over blocks
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def wandb_run(path):
    """(run id, display name, project, config, history rows) of one offline .wandb file."""
    run, history = None, []
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            config = {c.key: json.loads(c.value_json) for c in r.run.config.update}
            run = (r.run.run_id, r.run.display_name, r.run.project, config)
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in r.history.item})
    return run + (history,)


def test_wandb_logs_the_rows_of_metrics_jsonl_and_a_resume_appends_to_the_same_run(
        tmp_path, monkeypatch):
    """gad.py --wandb offline, stopped after 2 steps and resumed: both processes log to one wandb
    run (one id), and its history is metrics.jsonl row for row, at the step across stages."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    out = tmp_path / "run"
    args = ["--student", "tiny", "--warmup-steps", "1", "--gad-steps", "2", "--freeze-g-steps", "0",
            "--eval-prompts", "0", "--save-every", "1", "--out", str(out), "--wandb", "nanogad"]
    run_script("gad.py", args + ["--stop-after", "2"])   # warmup 0, gad 0
    run_script("gad.py", args + ["--resume"])            # gad 1
    rows = metrics(out)
    assert [(r["stage"], r["step"]) for r in rows] == [("warmup", 0), ("gad", 0), ("gad", 1)]
    files = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2, files   # one offline run directory per process
    runs = [wandb_run(f) for f in files]
    run_id = (out / "wandb_id").read_text()
    for rid, name, project, config, _ in runs:
        assert (rid, name, project) == (run_id, "run", "nanogad")
        assert config["out"] == str(out) and config["wandb"] == "nanogad"
    assert not runs[0][3]["resume"] and runs[1][3]["resume"]
    history = runs[0][4] + runs[1][4]
    # wandb's step is the row's index: gad.py's own `step` restarts at the GAD stage
    assert [h["_step"] for h in history] == [0, 1, 2]
    assert [{k: v for k, v in h.items() if not k.startswith("_")} for h in history] == rows


def test_wandb_run_ids_fresh_resumed_and_rerun(tmp_path, monkeypatch):
    """With a stand-in wandb module: a fresh run stores a new id, a resumed run (--resume with a
    checkpoint) reads it back and continues at the next row; a fresh run in the same folder gets a
    new id and starts at step 0. wandb.init gets the project, OUT, the flags and the folder's
    name; nothing is logged without --wandb."""
    runs = []

    class Run:
        def __init__(self, **kwargs):
            self.kwargs, self.logged, self.finished = kwargs, [], False
            runs.append(self)

        def log(self, row, step):
            self.logged.append((step, row))

        def finish(self):
            self.finished = True

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=Run))
    monkeypatch.setattr(files, "_wandb", {})
    out = tmp_path / "run"
    out.mkdir()
    log = str(out / "metrics.jsonl")

    def train(steps, resume=False, project="p"):
        args = types.SimpleNamespace(wandb=project, out=str(out), resume=resume, seed=0)
        for step in steps:
            files.log_metrics(log, {"step": step, "loss": 1.0 / (step + 1)})
            files.wandb_log(args, {"step": step, "loss": 1.0 / (step + 1)})
        return args

    args = train([0, 1])
    (out / "ckpt.pt").write_bytes(b"")   # what --resume resumes from
    train([2], resume=True)
    os.remove(log)                       # common.resume: a fresh run starts a fresh metrics.jsonl
    train([0])
    train([1], project=None)
    a, b, c = runs
    assert a.kwargs == dict(project="p", dir=str(out), config=vars(args), id=a.kwargs["id"],
                            resume="allow", name="run")
    assert [s for s, _ in a.logged] == [0, 1] and a.logged[1][1] == {"step": 1, "loss": 0.5}
    assert b.kwargs["id"] == a.kwargs["id"] and [s for s, _ in b.logged] == [2]
    assert c.kwargs["id"] != a.kwargs["id"] and [s for s, _ in c.logged] == [0]
    assert (out / "wandb_id").read_text() == c.kwargs["id"]
    assert a.finished and b.finished and not c.finished   # each finished when the next started
    assert len(runs) == 3 and len(c.logged) == 1          # project None: no wandb


@pytest.mark.parametrize("trainer", [gad, distillm2, amm])
def test_wandb_flag_is_shared_and_fails_at_startup_without_wandb(trainer, monkeypatch, capsys):
    assert trainer.parse_args(["--student", "tiny"]).wandb is None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        trainer.parse_args(["--student", "tiny", "--wandb", "proj"])
    assert e.value.code == 2 and "pip install wandb" in capsys.readouterr().err


# -------------------------------------------------------------------------------- dev/plot.py

def gad_rows(warmup=True):
    """Rows as gad.py logs them: the warmup has sft_loss (after G's frozen step) and no rewards,
    the GAD stage rewards and kl and no sft_loss; step restarts at each stage."""
    rows = []
    for i in range(3 if warmup else 0):
        rows.append({"d_loss": 0.69, "d_acc": 0.5, "d_score_teacher": 0.0, "response_len": 30.0,
                     "stage": "warmup", "step": i, "tokens": 64, "s_per_step": 1.0}
                    | ({"sft_loss": 2.0 - i / 10} if i else {}))
    for i in range(4):
        rows.append({"d_loss": 0.6, "d_acc": 0.7, "reward_mean": 0.1 * i, "reward_std": 0.2,
                     "pg_loss": 0.0, "kl": 0.01 * i, "clipfrac": 0.0, "response_len": 31.0,
                     "stage": "gad", "step": i, "tokens": 64, "s_per_step": 1.0})
    return rows


def distillm2_rows(loss="distillm2"):
    terms = {"skl": 1.0, "srkl": 1.5} if loss == "distillm2" else {}
    return [{"epoch": s // 2, "lr": 1e-3, "loss": 2.0 - s / 10, "skipped": 0, "step": s,
             "grad_norm": 1.0, "beta": 0.5 + s / 10, "on_policy": 0, "tokens": 40,
             "alpha_skl": [0.1, 0.2], "alpha_srkl": [0.1, 0.1], "alpha_skl_mean": 0.15,
             "alpha_srkl_mean": 0.1, "s_per_step": 1.0} | terms for s in range(4)]


def amm_rows():
    return [{"lr": 1e-3, "d_on": 0.4, "d_off": 0.3, "d_on_gain": 0.1, "d_off_gain": 0.1,
             "d_on_student": -0.01, "d_off_student": -0.02, "l1_on": 1.0 - s / 10, "l1_off": 0.9,
             "response_len": 10.0, "skipped": 0, "step": s, "loss": 0.7, "grad_norm": 1.0,
             "tokens": 40, "s_per_step": 1.0} for s in range(3)]


GAD = ["d_loss", "d_acc", "reward_mean", "reward_std", "kl", "response_len"]


@pytest.mark.parametrize("rows, drawn", [
    (gad_rows(), GAD + ["sft_loss"]),
    (gad_rows(warmup=False), GAD),   # `--stage gad`: no sft_loss anywhere, no panel
    (distillm2_rows(), ["loss", "skl", "srkl", "beta", "alpha_skl_mean", "alpha_srkl_mean"]),
    (distillm2_rows("fkl"), ["loss", "beta", "alpha_skl_mean", "alpha_srkl_mean"]),
    (amm_rows(), ["d_on", "d_off", "l1_on", "l1_off"]),
], ids=["gad", "gad-stage-only", "distillm2", "distillm2-fkl", "amm"])
def test_plot_draws_the_trainers_metrics_that_are_present(rows, drawn, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_lib.main([str(tmp_path)]) == drawn
    png = (tmp_path / "metrics.png").read_bytes()   # the default: beside metrics.jsonl
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert capsys.readouterr().out.strip() == f"{tmp_path / 'metrics.png'}: {', '.join(drawn)}"
    assert plot_lib.main([str(path), "-o", str(tmp_path / "x.png")]) == drawn
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_x_is_the_step_across_stages():
    """x is the row's index; a metric of one stage is drawn at that stage's steps; the stage
    changes (the dashed lines) are found from the rows."""
    rows = gad_rows()
    assert plot_lib.series(rows, "kl") == ([3, 4, 5, 6], [0.0, 0.01, 0.02, 0.03])
    assert plot_lib.series(rows, "sft_loss")[0] == [1, 2]
    assert plot_lib.segments(rows, "stage") == [["warmup", 0, 2], ["gad", 3, 6]]
    assert plot_lib.segments(distillm2_rows(), "epoch") == [[0, 0, 1], [1, 2, 3]]
    assert [plot_lib.trainer_of(r) for r in (gad_rows(), distillm2_rows(), amm_rows())] == [
        "gad", "distillm2", "amm"]


def test_plot_cli_errors(tmp_path):
    missing = tmp_path / "nope"
    r = subprocess.run([sys.executable, "dev/plot.py", str(missing)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and f"error: {missing}: no such file" in r.stderr
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"step": 0, "accuracy": 1.0}) + "\n")
    r = subprocess.run([sys.executable, "dev/plot.py", str(other)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "neither gad.py, distillm2.py nor amm.py" in r.stderr


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib raises ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_lib.plot(amm_rows(), str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()
    # the CLI says it in one line, exit 2, no traceback
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in amm_rows()))
    with pytest.raises(SystemExit) as exit_info:
        plot_lib.main([str(metrics)])
    assert exit_info.value.code == 2
    assert "pip install matplotlib" in capsys.readouterr().err
