"""The GAD discriminator: a causal-LM backbone initialised from the student plus a linear head to one scalar.

D(x, y) is the head applied to the backbone's last hidden state at the LAST RESPONSE TOKEN, the end-of-turn
token that closes the response (GAD, arXiv 2511.10643; LMOps `gad/`: a reward model read at the final token).
It is found from the response mask, never from pad ids (several tokenizers pad with their end-of-turn id).

Stored as a Hugging Face `AutoModelForSequenceClassification` with num_labels=1 (backbone `.model`, head
`.score`), so `from_pretrained` loads it and eval.py can score with it without importing this file.
The head starts at zero: D begins indifferent (every pair at loss log 2) rather than with a random preference.
"""

import contextlib
import copy

import torch

from common import all_reduce_sum, clip_and_step
import losses
from sample import position_ids_from_mask, split_by_budget


def from_student(student):
    """A new discriminator whose backbone is a copy of the student's (same size as G: the paper's best)."""
    from transformers import AutoModelForSequenceClassification

    cfg = copy.deepcopy(student.config)
    cfg.num_labels = 1
    cfg.architectures = None
    weight = next(student.parameters())
    with torch.device(weight.device):   # built where the student lives (a 1.5B random init on a CPU takes long)
        d = AutoModelForSequenceClassification.from_config(cfg, dtype=weight.dtype)
    d.model.load_state_dict(student.model.state_dict())
    torch.nn.init.zeros_(d.score.weight)
    return d


def score(d, prompt_ids, prompt_mask, response_ids, response_mask):
    """D(x, y) per row, [N] float32: the head at the last response token (prompt-only rows: the last prompt
    token). Rows are laid out as generate() returns them: prompts left-padded to P, responses after them."""
    ids = torch.cat([prompt_ids, response_ids], dim=1)                  # [N, P+T]
    mask = torch.cat([prompt_mask, response_mask], dim=1)               # [N, P+T]
    h = d.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).last_hidden_state
    last = prompt_ids.shape[1] + response_mask.sum(-1) - 1              # [N]
    h_last = h[torch.arange(h.shape[0], device=h.device), last]         # [N, H]
    return d.score(h_last).squeeze(-1).float()


def score_rollout(d, ro, micro_batch_size=None, micro_batch_tokens=None, amp=None):
    """Scores of a Rollout without grad [N], in micro-batches (sample.Rollout.micro_batches), inside `amp`."""
    scores = torch.zeros(ro.prompt_ids.shape[0], device=ro.prompt_ids.device)
    with torch.no_grad(), amp or contextlib.nullcontext():
        for index, r in ro.micro_batches(micro_batch_size or ro.prompt_ids.shape[0], micro_batch_tokens):
            scores[index] = score(d, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)
    return scores


def update(d, optimizer, teacher, student, n, max_grad_norm=1.0, micro_batch_size=None, micro_batch_tokens=None,
           amp=None):
    """One Bradley-Terry step: each of the n student samples of a prompt paired with that prompt's teacher
    response, L_D = mean_i -log sigmoid(D(x, y_t) - D(x, y_s^i)) (no regulariser, as in the reference).

    teacher: Rollout of B rows; student: Rollout of B*n rows (prompt-major). Micro-batches hold whole prompts
    (1 teacher row + its n samples), at most micro_batch_size rows and micro_batch_tokens padded tokens
    (sample.split_by_budget; a prompt over a bound goes alone); the loss is a sum over pairs divided by the pair
    count of the whole batch, so accumulation gives the same gradient as one big batch. Under DDP the count is
    summed over ranks and so are the gradients (common.all_reduce_grads): the step equals a single-process step
    on all ranks' pairs. Forward passes run inside `amp` (models.autocast), backward outside it.
    Returns floats over this rank's pairs (d_loss is its own mean, so a mean over ranks is the global one);
    a non-finite gradient norm skips the step on every rank (the norm is computed after the
    all-reduce, so all ranks see the same value and agree)."""
    B = teacher.prompt_ids.shape[0]
    amp = amp or contextlib.nullcontext()
    pairs = all_reduce_sum(B * n)
    t_prompt, t_resp = teacher.prompt_mask.sum(1).tolist(), teacher.response_mask.sum(1).tolist()
    s_resp = student.response_mask.sum(1).tolist()
    sizes = [(n + 1, t_prompt[b], max([t_resp[b]] + s_resp[b * n:(b + 1) * n])) for b in range(B)]
    optimizer.zero_grad(set_to_none=True)
    total, correct, t_sum, s_sum = 0.0, 0, 0.0, 0.0
    for a, b in split_by_budget(sizes, micro_batch_size or B * (n + 1), micro_batch_tokens):
        t_ro, s_ro = teacher.rows(slice(a, b)).trim(), student.rows(slice(a * n, b * n)).trim()
        with amp:
            t = score(d, t_ro.prompt_ids, t_ro.prompt_mask, t_ro.response_ids, t_ro.response_mask)  # [b]
            s = score(d, s_ro.prompt_ids, s_ro.prompt_mask, s_ro.response_ids, s_ro.response_mask)  # [b*n]
            t = t.repeat_interleave(n)                                       # [b*n] pair each sample with y_t
            loss = losses.bt_loss(t, s) * (t.numel() / pairs)                # this micro-batch's share of the mean
        loss.backward()
        total += loss.item()
        correct += (t > s).sum().item()
        t_sum += t.detach().sum().item() / n
        s_sum += s.detach().sum().item()
    grad_norm, skipped = clip_and_step(d.parameters(), optimizer, max_grad_norm)
    return {"d_loss": total * pairs / (B * n), "d_acc": correct / (B * n), "d_score_teacher": t_sum / B,
            "d_score_student": s_sum / (B * n), "d_grad_norm": grad_norm, "d_skipped": int(skipped)}
