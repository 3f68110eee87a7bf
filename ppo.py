"""GRPO advantages (group baseline) and the PPO update over one rollout batch: the G step of GAD.

The update is cleanrl's ppo.py loop (epochs x shuffled mini-batches, clipped surrogate, grad-norm
clip) with what an LLM needs on top:
  - per-token losses over response tokens only, reduced as a token-mean over the whole mini-batch:
    the sum of per-token losses divided by the mini-batch's response-token count, whatever the
    micro-batching (gradient accumulation) and the number of ranks;
  - logprobs from logits / temperature, the distribution the rollout was sampled from (GAD; verl);
  - the KL to the reference as a loss term, k3 per token (GAD, as verl's `use_kl_loss` with
    `low_var_kl`), not as a reward penalty;
  - dual clip, c = 3 (Ye et al. 2020; verl's default `clip_ratio_c`);
  - a non-finite loss or gradient norm skips the optimizer step instead of writing NaN into the
    weights.
With GAD's defaults (one epoch, one mini-batch) the ratio is 1 and the update is REINFORCE with a
group baseline; epochs / mini-batches are arguments so that real PPO is one flag away.
"""
import contextlib

import torch

import common
import losses
from sample import LOGIT_CHUNK, sequence_logprobs


# --------------------------------------------------------------------------------------------------
# advantages

def grpo_advantages(rewards, group_size, eps=1e-6):
    """GRPO (Shao et al. 2024, DeepSeekMath) advantage of each sample against the other samples of
    its prompt: A_i = (r_i - mean_group) / (std_group + eps), std unbiased (n - 1) as in GAD's
    reference and verl's GRPO. eps = 1e-6 is theirs too; a group with equal rewards gets A = 0 (no
    signal), not 0/0.

    rewards: [num_prompts * group_size], the samples of one prompt contiguous (sample.generate's row
    order). group_size 1 returns zeros: with one sample per prompt there is no baseline to compare
    against (and the unbiased std of one value is NaN), so no sample is pushed up or down.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be flat with a multiple of group_size={group_size} "
                         f"entries, got shape {tuple(rewards.shape)}")
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    r = rewards.float().view(-1, group_size)             # [num_prompts, G]
    mean = r.mean(dim=-1, keepdim=True)                  # [num_prompts, 1]
    std = r.std(dim=-1, keepdim=True)                    # unbiased
    return ((r - mean) / (std + eps)).view(-1)           # [num_prompts * G]


# --------------------------------------------------------------------------------------------------
# the PPO update

def ppo_update(model, optimizer, rollout, advantages, old_logprobs, ref_logprobs=None, *,
               kl_coef=0.0, clip_eps=0.2, dual_clip=3.0, ppo_epochs=1, mini_batches=1,
               micro_batch_size=None, micro_batch_tokens=None, max_grad_norm=1.0, temperature=1.0,
               generator=None, amp=None, chunk_size=LOGIT_CHUNK):
    """PPO epochs over one rollout batch; returns a dict of float stats.

    rollout: a sample.Rollout, response_mask [N, T]. advantages: [N] (GRPO), one per sequence,
    put on each of its response tokens (padding positions get A = 0). old_logprobs,
    ref_logprobs: [N, T] at `temperature`.
    old_logprobs None (one epoch, one mini-batch only): each micro-batch's own logprobs, detached,
    are the old ones, so the ratio is exactly 1 (a separate pass would differ by bf16 rounding).

    Each epoch shuffles the rows (`generator`) into `mini_batches` equal mini-batches, one optimizer
    step each, accumulated over micro-batches of at most micro_batch_size rows and
    micro_batch_tokens padded tokens. Forward passes run inside `amp`, backward outside it.
    Per token: loss = clipped surrogate + kl_coef * k3(pi || ref), summed over the mini-batch's
    response tokens and divided by their count over all ranks, gradients summed over ranks: the
    token-mean over the global mini-batch, the same step as one process on all ranks' rows.
    A step whose gradient norm is not finite is skipped (optimizer untouched) and counted.
    The model is put in training mode: a model from from_pretrained (a resumed run, --init-from)
    is in eval mode, where HF layers skip activation checkpointing.

    Stats, this rank's token-means per mini-batch averaged over the steps taken (NaN if none):
    pg_loss, kl (k3 to the reference, 0 without one), approx_kl (k2 to the rollout policy),
    clipfrac, entropy, grad_norm (before clipping); and skipped_steps. The model's dropout should
    be 0 (the ratio is 1 at the first step only if the forward pass is deterministic).
    """
    response_mask = rollout.response_mask.bool()                            # [N, T]
    N, T = response_mask.shape
    if N % mini_batches:
        raise ValueError(f"{N} rows do not split into {mini_batches} equal mini-batches")
    if old_logprobs is None and (ppo_epochs, mini_batches) != (1, 1):
        raise ValueError("old_logprobs=None (on-policy) needs ppo_epochs=1 and mini_batches=1")
    mini_batch_size = N // mini_batches
    micro_batch_size = micro_batch_size or mini_batch_size
    amp = amp or contextlib.nullcontext()
    # Padding positions get A = 0 and logprobs 0 (as sequence_logprobs returns them): ratio 1 and
    # k3 0 there, so nothing from padding, not even a NaN (NaN * 0 = NaN in a backward), reaches
    # the gradient.
    advantages = advantages.float()[:, None].expand(N, T).masked_fill(~response_mask, 0.0)  # [N, T]
    if old_logprobs is not None:
        old_logprobs = old_logprobs.detach().float().masked_fill(~response_mask, 0.0)  # [N, T]
    if ref_logprobs is not None:
        ref_logprobs = ref_logprobs.detach().float().masked_fill(~response_mask, 0.0)  # [N, T]
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    perm_device = generator.device if generator is not None else "cpu"

    taken, skipped_steps = [], 0
    for _ in range(ppo_epochs):
        perm = torch.randperm(N, generator=generator, device=perm_device).to(response_mask.device)
        for mb_rows in perm.split(mini_batch_size):
            optimizer.zero_grad(set_to_none=True)
            n_local = response_mask[mb_rows].sum()
            # every micro-batch's denominator: the mini-batch's token count summed over ranks
            n_tokens = float(common.all_reduce_sum(n_local)) or 1.0
            sums = {}                                          # stat -> sum over this rank's tokens
            for rows, r in rollout.micro_batches(micro_batch_size, micro_batch_tokens, mb_rows):
                t = r.response_ids.shape[1]                        # this micro-batch's own width
                mask = response_mask[rows, :t]                     # [n, t]
                with amp:
                    logprobs, entropy = sequence_logprobs(                          # [n, t]
                        model, r, temperature, return_entropy=True, chunk_size=chunk_size)
                    # old None: these same weights, so the ratio is 1, nothing is clipped and the
                    # gradient is -A grad log pi (REINFORCE with the group mean as baseline: GAD)
                    old = logprobs.detach() if old_logprobs is None else old_logprobs[rows, :t]
                    pg_loss, clipped = losses.ppo_policy_loss(logprobs, old, advantages[rows, :t],
                                                              clip_eps, dual_clip)      # [n, t]
                    stats = {"pg_loss": pg_loss, "clipfrac": clipped.float(), "entropy": entropy,
                             "approx_kl": losses.kl_k2(logprobs, old)}
                    per_token = pg_loss                                                 # [n, t]
                    if ref_logprobs is not None:
                        stats["kl"] = losses.kl_k3(logprobs, ref_logprobs[rows, :t])
                        per_token = per_token + kl_coef * stats["kl"]
                    loss = losses.masked_sum(per_token, mask) / n_tokens
                loss.backward()
                for key, x in stats.items():
                    sums[key] = sums.get(key, 0.0) + losses.masked_sum(x.detach(), mask)

            # gradients summed over ranks before the norm, so every rank skips or none does
            grad_norm, skipped = common.clip_and_step(params, optimizer, max_grad_norm)
            sums = {key: x.item() for key, x in sums.items()}
            if skipped:
                skipped_steps += 1
                continue
            count = max(n_local.item(), 1)
            taken.append({key: x / count for key, x in sums.items()} | {"grad_norm": grad_norm})

    keys = ["pg_loss", "kl", "approx_kl", "clipfrac", "entropy", "grad_norm"]
    result = {key: sum(s.get(key, 0.0) for s in taken) / len(taken) if taken else float("nan")
              for key in keys}
    result["skipped_steps"] = skipped_steps
    return result
