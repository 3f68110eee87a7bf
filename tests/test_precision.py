"""--dtype bfloat16 on CPU (autocast runs there too): trainable models keep fp32 weights and AdamW
state that move at lr 1e-6, and the losses under bf16 autocast equal the fp32 ones within bf16
error (fault 2 of issue 9)."""

import json

import pytest
import torch

import amm
import discriminator
import distillm2
import fast_losses
import losses
import models
import sample
from scripts import run_here, run_script

# a weight every step moves (init std 0.5: a bf16 ulp is 0.002)
TRAINED = "model.layers.0.mlp.up_proj.weight"
# script -> (arguments of a two-step bf16 run at lr 1e-6, the checkpoint's {weights: optimizer}
# keys)
RUNS = {
    "gad.py": (["--student", "tiny", "--stage", "warmup", "--warmup-steps", "2",
                "--freeze-g-steps", "0", "--lr", "1e-6", "--d-lr", "1e-6"],
               {"G": "opt_g", "D": "opt_d"}),
    "distillm2.py": (["--student", "tiny", "--limit", "40", "--epochs", "1", "--lr", "1e-6",
                      "--stop-after", "2"],
                     {"student": "opt"}),
    "amm.py": (["--student", "tiny", "--limit", "40", "--epochs", "1", "--lr", "1e-6",
                "--stop-after", "2"],
               {"student": "opt"}),
}


@pytest.mark.parametrize("script", list(RUNS))
def test_bf16_runs_train_fp32_master_weights_that_move_at_lr_1e_6(tmp_path, script):
    """With bf16 weights and a bf16 AdamW, a 1e-6 step is far below a weight's resolution and rounds
    away (the backbone never moves); with fp32 master weights under autocast, two steps move nearly
    every element."""
    args, keys = RUNS[script]
    run_here(script, args + ["--dtype", "bfloat16", "--save-every", "1", "--out", str(tmp_path)])
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    initial = models.tiny_model(seed=0).state_dict()[TRAINED]
    for weights, opt in keys.items():
        assert all(v.dtype == torch.float32
                   for v in ck[weights].values() if v.is_floating_point()), weights
        state = ck[opt]["state"].values()
        assert state and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32
                             for s in state), opt
        moved = (ck[weights][TRAINED] != initial).float().mean().item()
        assert moved > 0.9, (weights, moved)
    if script == "gad.py":   # the finished stage exports its models in the dtype asked for
        for folder in ("student", "discriminator"):
            assert (json.loads((tmp_path / folder / "config.json").read_text())["dtype"]
                    == "bfloat16")


# --------------------------------------------------------------------------------------------------
# each trainer's loss on fixed rows: bf16 autocast against fp32

@pytest.fixture(scope="module")
def rows():
    student, teacher = models.tiny_model(seed=0), models.load_model("tiny-teacher")
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    ro = sample.generate(teacher, prompts, n=2, max_new_tokens=10, temperature=1.0, eos_ids=[258],
                         pad_id=256, seed=0)
    return (student, teacher,
            sample.pack(prompts * 2, [[20, 21, 258], [22, 258], [23, 24, 25, 258]] * 2, 256), ro)


# each returns (the loss, the trainable module it trains)

def sft_loss(student, teacher, fixed, ro):
    lp = sample.sequence_logprobs(student, ro, 0.8)
    return -(lp * ro.response_mask).sum() / ro.response_mask.sum(), student


def d_loss(student, teacher, fixed, ro):
    torch.manual_seed(0)
    d = discriminator.from_student(student)
    torch.nn.init.normal_(d.score.weight, std=0.5)
    t = discriminator.score(d, fixed.prompt_ids, fixed.prompt_mask, fixed.response_ids,
                            fixed.response_mask)
    s = discriminator.score(d, ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask)
    return losses.bt_loss(t, s), d


def distillm2_loss(student, teacher, fixed, ro):
    weight = lambda r: distillm2.token_weights(r, "sequence", 6, None)
    skl, _ = distillm2.divergence(losses.skl, student, teacher, fixed, weight(fixed),
                                  chunk_size=4, alpha=0.1)
    srkl, _ = distillm2.divergence(losses.srkl, student, teacher, ro, weight(ro), chunk_size=4,
                                   alpha=0.1, stop_grad=True)
    return skl + srkl, student


def amm_loss(student, teacher, fixed, ro):
    torch.manual_seed(0)
    adversary = amm.Adversary(teacher.config.hidden_size, 259, init_std=0.5)
    h, head = sample.response_hidden(student, ro)
    with torch.no_grad():
        t_h, t_head = sample.response_hidden(teacher, ro)
    mask = ro.response_mask.float()
    score_weight = torch.linspace(-1, 1, mask.numel()).view_as(mask)
    loss, _ = fast_losses.kd_loss_chunked(amm.student_values, h, head, t_h, t_head,
                                          mask / mask.sum(), chunk_size=4, adversary=adversary,
                                          adv_in=t_h, tokens=ro.response_ids,
                                          score_weight=score_weight)
    return loss, student


@pytest.mark.parametrize("loss_fn", [sft_loss, d_loss, distillm2_loss, amm_loss])
def test_losses_and_gradients_under_bf16_autocast_equal_fp32_within_bf16_error(rows, loss_fn):
    student, teacher, fixed, ro = rows
    results = {}
    for dtype in ("float32", "bfloat16"):
        student.zero_grad(set_to_none=True)
        with models.autocast("cpu", dtype):
            loss, trained = loss_fn(student, teacher, fixed, ro)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in trained.parameters() if p.grad is not None])
        results[dtype] = loss.item(), grads
    (loss32, g32), (loss16, g16) = results["float32"], results["bfloat16"]
    assert g16.dtype == torch.float32                       # fp32 weights get fp32 gradients
    assert loss16 == pytest.approx(loss32, rel=2e-2, abs=1e-3)
    cosine = (g16 @ g32 / (g16.norm() * g32.norm())).item()
    # measured: cosines 0.987 (D: one score per row, the least averaging) to 0.997, norms within 8%
    assert cosine > 0.98 and g16.norm().item() == pytest.approx(g32.norm().item(), rel=0.1)
    assert loss16 != loss32, "autocast did not change the arithmetic: the test would not see bf16"


def test_a_bf16_runs_evaluation_is_that_of_its_exported_student(tmp_path):
    """The table a bf16 run prints is measured on the model it exports: eval.py on OUT/student in
    bf16 gives the same numbers. (Casting the trained model with .to(bf16) also rounded its rotary
    frequencies, which the exported folder, reloaded, keeps in fp32: the two then disagreed.)"""
    rows = [{"id": f"r{i}", "prompt": f"tell me about the number {i} and its friends",
             "response": f"the number {i} is a fine number"} for i in range(60)]
    data_file = tmp_path / "data.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    run_here("gad.py", ["--student", "tiny", "--warmup-steps", "2", "--gad-steps", "2",
                        "--dtype", "bfloat16", "--data", str(data_file), "--val-fraction", "0.2",
                        "--eval-prompts", "6", "--out", str(out)])
    table = json.loads((out / "eval.json").read_text())["after"]
    run_script("eval.py", ["--model", str(out / "student"), "--data", str(data_file),
                           "--teacher", "tiny-teacher", "--dtype", "bfloat16",
                           "--val-fraction", "0.2", "--limit", "6", "--max-prompt-len", "64",
                           "--max-response-len", "16", "--max-new-tokens", "16",
                           "--out", str(tmp_path / "e.json")])
    by_cli = json.loads((tmp_path / "e.json").read_text())[str(out / "student")]
    # the same weights, batches and thread count (one): the same kernels on any CPU, so the
    # same greedy tokens and sums
    for key in ("student_nll", "teacher_nll", "rouge_l", "length"):
        assert table[key] == pytest.approx(by_cli[key], rel=1e-6), key


def test_the_bf16_reference_computes_what_the_policy_computed_when_copied(rows):
    """GAD's reference: its linear weights in bf16, the rest in fp32, so under bf16 autocast its
    logprobs are bit for bit those of the fp32 policy it was copied from (the k3 KL starts at 0), at
    half the matmul memory."""
    student, _, _, ro = rows
    ref = models.frozen_copy(student, "bfloat16")
    assert ref.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert (ref.model.embed_tokens.weight.dtype == torch.float32
            and ref.lm_head.weight is ref.model.embed_tokens.weight)
    assert not any(p.requires_grad for p in ref.parameters())
    with torch.no_grad(), models.autocast("cpu", "bfloat16"):
        assert torch.equal(sample.sequence_logprobs(ref, ro, 0.8),
                           sample.sequence_logprobs(student, ro, 0.8))
