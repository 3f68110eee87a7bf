"""Memory by construction (faults 4 and 5 of issue 9): the paper presets recompute activations and
bound micro-batches by tokens; no step of any trainer, and no held-out evaluation, ever makes a
tensor larger than [chunk, V]."""

import contextlib
import io
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import amm
import distillm2
import gad
import models
from scripts import metrics, run_here

# a Qwen-sized vocabulary on a 16-wide model: [CHUNK, V] is 4.8M numbers
V, H, CHUNK = 150_000, 16, 32


@pytest.mark.parametrize("trainer", [gad, distillm2, amm])
def test_paper_presets_recompute_activations_and_bound_micro_batches_by_tokens(trainer):
    """Fault 4: LMOps' GAD recipe turns on gradient checkpointing and sizes micro-batches by tokens
    (12288 per GPU); the GPU presets of all three trainers do the same, and both are flags."""
    args = trainer.parse_args(["--student", "qwen2.5-1.5b"])
    assert args.gradient_checkpointing is True and args.micro_batch_tokens == 12288
    args = trainer.parse_args(["--student", "qwen2.5-1.5b", "--no-gradient-checkpointing",
                               "--micro-batch-tokens", "4096"])
    assert args.gradient_checkpointing is False and args.micro_batch_tokens == 4096


@pytest.mark.parametrize("script", ["distillm2.py", "amm.py"])
def test_gradient_checkpointing_and_a_token_budget_change_no_result(tmp_path, script):
    base = ["--student", "tiny", "--limit", "40", "--epochs", "1", "--stop-after", "1",
            "--save-every", "1"]
    run_here(script, base + ["--out", str(tmp_path / "plain")])
    run_here(script, base + ["--gradient-checkpointing", "--micro-batch-tokens", "64",
                             "--out", str(tmp_path / "ckpt")])
    # The first step's loss and global gradient norm: the same weights and samples, computed in
    # other micro-batches, with or without recomputation. Not later steps, nor the weights: AdamW
    # moves an element by about lr (1e-2) whatever its gradient's size, so float-reordering noise
    # in a near-zero gradient moved one embedding element 2.4e-4 apart in one run of this test
    # (AMM), and the second step's samples and gradient norm (7e-5) with it.
    rows = [metrics(tmp_path / "plain"), metrics(tmp_path / "ckpt")]
    assert len(rows[0]) == len(rows[1]) == 1
    for key in ("loss", "grad_norm"):
        assert rows[1][0][key] == pytest.approx(rows[0][0][key], rel=1e-5, abs=1e-7), key


# --------------------------------------------------------------------------------------------------
# fault 5: the largest tensor of whole runs, step and evaluation included

class Largest(TorchDispatchMode):
    """The largest tensor any op returns while active (numel and shape)."""
    numel, shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t) and t.numel() > self.numel:
                self.numel, self.shape = t.numel(), tuple(t.shape)
        return out


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    """A student and a teacher with V = 150000 (the tiny byte tokenizer uses 259 of the ids; samples
    use them all)."""
    folder = tmp_path_factory.mktemp("big_vocab")
    for name, seed in (("student", 0), ("teacher", 5)):
        models.tiny_model(seed=seed, vocab_size=V, hidden_size=H).save_pretrained(folder / name)
        models.tiny_tokenizer().save_pretrained(folder / name)
    # GAD's black-box teacher text (a sample of the big-vocabulary teacher would decode to almost
    # nothing)
    rows = [{"id": f"r{i}", "prompt": f"question {i} about the {i % 5} cats",
             "response": f"answer {i} is {i * 7}"}
            for i in range(24)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


COMMON = ["--prompts-per-step", "4", "--micro-batch-size", "8", "--max-new-tokens", "8",
          "--max-prompt-len", "64", "--dtype", "float32", "--chunk-size", str(CHUNK),
          "--eval-prompts", "2"]
# one or two steps of each trainer and its held-out evaluation; at most 8 rows decode at once
RUNS = {
    "gad": (gad, ["--stage", "all", "--samples-per-prompt", "2", "--warmup-steps", "1",
                  "--gad-steps", "1", "--freeze-g-steps", "0",
                  "--max-response-len", "8", "--eval-max-new-tokens", "8",
                  "--val-fraction", "0.3"]),
    "distillm2": (distillm2, ["--data", "tiny", "--epochs", "2", "--limit", "24",
                              "--prompts-per-step", "8", "--gen-batch-size", "8",
                              "--val-fraction", "0.2"]),   # epoch 2: the alpha curriculum
    "amm": (amm, ["--data", "tiny", "--epochs", "1", "--limit", "12", "--samples-per-prompt", "2",
                  "--gen-batch-size", "4", "--val-fraction", "0.2"]),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_no_tensor_larger_than_a_chunk_of_full_vocabulary_logits(tmp_path, big_vocab, name):
    """A step's [micro-batch, T, V] logits (and their fp32 log-softmax, entropy, moment temporaries)
    are 5 GB each at Qwen's V for 8 x 1024 tokens. Here no op of a whole run (teacher sampling,
    rollouts, every loss and gradient, the evaluation table) returns more than [CHUNK, V] numbers;
    each run's responses span 8 x 8 = 64 positions or more, so any [rows, T, V] tensor would be
    caught."""
    trainer, args = RUNS[name]
    args = args + (["--data", str(big_vocab / "data.jsonl")] if name == "gad" else [])
    out = tmp_path / name
    with Largest() as largest, contextlib.redirect_stdout(io.StringIO()):
        trainer.main(COMMON + args + ["--student", str(big_vocab / "student"), "--teacher",
                                      str(big_vocab / "teacher"), "--out", str(out)])
    assert metrics(out) and (out / "eval.json").exists()            # it trained and evaluated
    assert "after" in json.loads((out / "eval.json").read_text())
    # decode steps are [8, V]
    assert V * 8 <= largest.numel <= CHUNK * V, (largest.numel, largest.shape)
