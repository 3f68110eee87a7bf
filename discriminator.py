"""The GAD discriminator: a causal-LM backbone initialised from the student plus a linear head to
one scalar.

D(x, y) is the head applied to the backbone's last hidden state at the LAST RESPONSE TOKEN, the
end-of-turn token that closes the response (GAD, arXiv 2511.10643; LMOps `gad/`: a reward model read
at the final token). It is found from the response mask, never from pad ids (several tokenizers pad
with their end-of-turn id).

Stored as a Hugging Face `AutoModelForSequenceClassification` with num_labels=1 (backbone `.model`,
head `.score`), so `from_pretrained` loads it and eval.py scores it with `score` below. The head
starts at zero: D begins indifferent (every pair at loss log 2) rather than with a random
preference.
"""

import contextlib
import copy

import torch
import torch.nn.functional as F

from common import all_reduce_sum, clip_and_step
import losses
from sample import position_ids_from_mask


def from_student(student):
    """A new discriminator whose backbone is a copy of the student's (same size as G: the paper's
    best)."""
    from transformers import AutoModelForSequenceClassification

    cfg = copy.deepcopy(student.config)
    cfg.num_labels = 1
    cfg.architectures = None
    weight = next(student.parameters())
    # built where the student lives (a 1.5B random init on a CPU takes long)
    with torch.device(weight.device):
        d = AutoModelForSequenceClassification.from_config(cfg, dtype=weight.dtype)
    d.model.load_state_dict(student.model.state_dict())
    torch.nn.init.zeros_(d.score.weight)
    return d


def score(d, prompt_ids, prompt_mask, response_ids, response_mask):
    """D(x, y) per row, [N] float32: the head at the last response token (prompt-only rows: the last
    prompt token). Rows are laid out as generate() returns them: prompts left-padded to P, responses
    after them."""
    ids = torch.cat([prompt_ids, response_ids], dim=1)                  # [N, P+T]
    mask = torch.cat([prompt_mask, response_mask], dim=1)               # [N, P+T]
    h = d.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                use_cache=False).last_hidden_state                      # [N, P+T, H]
    last = prompt_ids.shape[1] + response_mask.sum(-1) - 1              # [N]
    h_last = h[torch.arange(h.shape[0], device=h.device), last]         # [N, H]
    # The head in fp32, outside autocast: under bf16 autocast it would round each reward to 8
    # mantissa bits (spacing 0.016 at |r| ~ 3) before GRPO's within-group normalisation, which
    # divides by a spread that can be that small. One [N, H] x [H, 1] product: free.
    with torch.autocast(h.device.type, enabled=False):
        return F.linear(h_last.float(), d.score.weight.float(),
                        None if d.score.bias is None else d.score.bias.float()).squeeze(-1)


def score_rollout(d, ro, micro_batch_size=None, micro_batch_tokens=None, amp=None):
    """Scores of a Rollout without grad [N], in micro-batches (sample.Rollout.micro_batches), inside
    `amp`, with D in eval mode (a scoring pass; update() puts it back in training mode)."""
    d.eval()
    with torch.no_grad(), amp or contextlib.nullcontext():
        return ro.map(lambda r: score(d, r.prompt_ids, r.prompt_mask, r.response_ids,
                                      r.response_mask),
                      micro_batch_size or ro.prompt_ids.shape[0], micro_batch_tokens)


def pair_batches(t_prompt, t_resp, s_resp, n, max_rows, max_tokens=None):
    """Micro-batches of D's pairs: lists of consecutive student rows, each batch also holding the
    teacher row of every prompt it touches, together at most max_rows rows and max_tokens tokens
    once padded to the batch's longest prompt and response (a single pair over a bound goes alone).
    A prompt's n samples may be split over two batches: its teacher row is then scored in both, and
    its gradient summed, as one big batch would."""
    batches, rows, prompts, p_max, r_max = [], [], set(), 0, 0
    for j, r in enumerate(s_resp):
        b = j // n
        size = len(rows) + 1 + len(prompts | {b})
        p2, r2 = max(p_max, t_prompt[b]), max(r_max, r, t_resp[b])
        if rows and (size > max_rows or (max_tokens is not None and size * (p2 + r2) > max_tokens)):
            batches.append(rows)
            rows, prompts, p2, r2 = [], set(), t_prompt[b], max(r, t_resp[b])
        rows.append(j)
        prompts.add(b)
        p_max, r_max = p2, r2
    return batches + ([rows] if rows else [])


def update(d, optimizer, teacher, student, n, max_grad_norm=1.0, micro_batch_size=None,
           micro_batch_tokens=None, amp=None):
    """One Bradley-Terry step: each of the n student samples of a prompt paired with that prompt's
    teacher response, L_D = mean_i -log sigmoid(D(x, y_t) - D(x, y_s^i)) (no regulariser, as in the
    reference).

    teacher: Rollout of B rows; student: Rollout of B*n rows (prompt-major). Micro-batches
    (pair_batches) hold at most micro_batch_size rows and micro_batch_tokens padded tokens; the loss
    is a sum over pairs divided by the pair count of the whole batch, so accumulation gives the same
    gradient as one big batch. Under DDP the count is summed over ranks and so are the gradients
    (common.all_reduce_grads): the step equals a single-process step on all ranks' pairs. Forward
    passes run inside `amp` (models.autocast), backward outside it.
    Returns floats over this rank's pairs (d_loss is its own mean, so a mean over ranks is the
    global one); a non-finite gradient norm skips the step on every rank (the norm is computed after
    the all-reduce, so all ranks see the same value and agree). D is put in training mode (from
    from_pretrained it is in eval mode, where HF layers skip activation checkpointing)."""
    d.train()
    B = teacher.prompt_ids.shape[0]
    amp = amp or contextlib.nullcontext()
    pairs = all_reduce_sum(B * n)
    batches = pair_batches(teacher.prompt_mask.sum(1).tolist(),
                           teacher.response_mask.sum(1).tolist(),
                           student.response_mask.sum(1).tolist(), n,
                           micro_batch_size or B * (n + 1), micro_batch_tokens)
    optimizer.zero_grad(set_to_none=True)
    total, t_sum, s_sum, t_all, s_all = 0.0, 0.0, 0.0, [], []
    for rows in batches:
        prompts = sorted({j // n for j in rows})
        t_ro = teacher.rows(torch.tensor(prompts)).trim()
        s_ro = student.rows(torch.tensor(rows)).trim()
        pair_of = torch.tensor([prompts.index(j // n) for j in rows])    # each sample's teacher row
        with amp:
            t = score(d, t_ro.prompt_ids, t_ro.prompt_mask, t_ro.response_ids,
                      t_ro.response_mask)                                # [p]
            s = score(d, s_ro.prompt_ids, s_ro.prompt_mask, s_ro.response_ids,
                      s_ro.response_mask)                                # [b]
            t = t[pair_of.to(t.device)]                                  # [b] each sample's y_t
            loss = losses.bt_loss(t, s) * (t.numel() / pairs)            # its share of the mean
        loss.backward()
        total += loss.item()
        t_all.append(t.detach())
        s_all.append(s.detach())
        t_sum += t.detach().sum().item() / n
        s_sum += s.detach().sum().item()
    grad_norm, skipped = clip_and_step(d.parameters(), optimizer, max_grad_norm)
    d_acc = losses.bt_accuracy(torch.cat(t_all), torch.cat(s_all)).item()
    return {"d_loss": total * pairs / (B * n), "d_acc": d_acc, "d_score_teacher": t_sum / B,
            "d_score_student": s_sum / (B * n), "d_grad_norm": grad_norm, "d_skipped": int(skipped)}
