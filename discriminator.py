"""The GAD discriminator D: the student's backbone with a linear head to one scalar, read at the
last response token (GAD; LMOps `gad/`: a reward model read at the final token), found from the
response mask, never from pad ids. An HF AutoModelForSequenceClassification (num_labels=1):
from_pretrained loads it. The head starts at zero: D begins indifferent (every pair at loss log 2).
"""

import copy

import torch
import torch.nn.functional as F

from common import all_reduce_max, all_reduce_sum, clip_and_step, gathered
import losses
import models
from sample import position_ids_from_mask, split_to


def from_student(student):
    """A new D whose backbone is a copy of the student's (same size as G: the paper's best)."""
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
    """D(x, y) per row [N] float32: the head at the last response token, rows laid out as
    generate() returns them (prompt-only rows: the last prompt token)."""
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


def score_rollout(d, ro, args=None):
    """Rewards of a Rollout [N], no grad, in eval mode, in args' micro-batches and --dtype (a
    sharded D gathered once for the pass)."""
    d.eval()
    amp = models.autocast(ro.prompt_ids.device, getattr(args, "dtype", "float32"))
    with torch.no_grad(), amp, gathered(d):
        return ro.map(lambda r: score(d, r.prompt_ids, r.prompt_mask, r.response_ids,
                                      r.response_mask),
                      getattr(args, "micro_batch_size", None) or ro.prompt_ids.shape[0],
                      getattr(args, "micro_batch_tokens", None))


def pair_batches(t_prompt, t_resp, s_resp, n, max_rows, max_tokens=None):
    """Micro-batches of D's pairs: runs of student rows, each with the teacher rows of its prompts,
    at most max_rows rows and max_tokens padded tokens (a single pair over a bound goes alone)."""
    # a prompt's samples split over two batches: its teacher row is scored (and its gradient
    # summed) in both, as one big batch would
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


def update(d, optimizer, teacher, student, args):
    """One Bradley-Terry step, L_D = mean_i -log sigmoid(D(x, y_t) - D(x, y_s^i)) (no regulariser,
    as the reference): teacher [B rows], student [B*n rows, prompt-major], n =
    args.samples_per_prompt. Returns this rank's floats, and d_tokens (the tokens it ran)."""
    d.train()   # from_pretrained gives eval mode, where HF skips activation checkpointing
    B, n = teacher.prompt_ids.shape[0], args.samples_per_prompt
    amp = models.autocast(teacher.prompt_ids.device, args.dtype)   # forward only
    # the loss is a sum over pairs over the global pair count: micro-batches and ranks add up to
    # one big batch's gradient
    pairs = all_reduce_sum(B * n)
    t_prompt, t_resp = teacher.prompt_mask.sum(1).tolist(), teacher.response_mask.sum(1).tolist()
    s_resp = student.response_mask.sum(1).tolist()
    batches = pair_batches(t_prompt, t_resp, s_resp, n, args.micro_batch_size or B * (n + 1),
                           args.micro_batch_tokens)
    if getattr(args, "fsdp", False):   # as many passes on every rank: each one is a collective
        batches = split_to(batches, all_reduce_max(len(batches)))
    optimizer.zero_grad(set_to_none=True)
    total, t_sum, s_sum, t_all, s_all, tokens = 0.0, 0.0, 0.0, [], [], 0
    for rows in batches:
        prompts = sorted({j // n for j in rows})
        t_ro = teacher.rows(torch.tensor(prompts)).trim()
        s_ro = student.rows(torch.tensor(rows)).trim()
        pair_of = torch.tensor([prompts.index(j // n) for j in rows])    # each sample's teacher row
        # the tokens this micro-batch runs, from the lengths already read (no device sync)
        tokens += sum(t_prompt[b] + t_resp[b] for b in prompts)
        tokens += sum(t_prompt[j // n] + s_resp[j] for j in rows)
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
    grad_norm, skipped = clip_and_step(d.parameters(), optimizer, args.grad_clip)
    d_acc = losses.bt_accuracy(torch.cat(t_all), torch.cat(s_all)).item()
    return {"d_loss": total * pairs / (B * n), "d_acc": d_acc, "d_score_teacher": t_sum / B,
            "d_score_student": s_sum / (B * n), "d_grad_norm": grad_norm, "d_skipped": int(skipped),
            "d_tokens": tokens}
