"""Advantages (GRPO group baseline; GAE) and the PPO update over one rollout batch: the G step of GAD.

The update is cleanrl's ppo.py loop (epochs x shuffled mini-batches, clipped surrogate, grad-norm clip) with
what an LLM needs on top:
  - per-token losses over response tokens only, reduced as a token-mean over the whole mini-batch: the sum of
    per-token losses divided by the mini-batch's response-token count, whatever the micro-batching (gradient
    accumulation) and, through `token_count_fn`, whatever the number of ranks;
  - logprobs from logits / temperature, the distribution the rollout was sampled from (GAD; verl);
  - the KL to the reference as a loss term, k3 per token (GAD, as verl's `use_kl_loss` with `low_var_kl`),
    not as a reward penalty;
  - dual clip, c = 3 (Ye et al. 2020; verl's default `clip_ratio_c`);
  - a non-finite loss or gradient norm skips the optimizer step instead of writing NaN into the weights.
With GAD's defaults (one epoch, one mini-batch) the ratio is 1 and the update is REINFORCE with a group baseline;
epochs / mini-batches are arguments so that real PPO is one flag away.
"""

import contextlib

import torch

import common
import losses
from sample import LOGIT_CHUNK, sequence_logprobs


# ----------------------------------------------------------------------------------------------------------
# advantages

def grpo_advantages(rewards, group_size, eps=1e-6):
    """GRPO (Shao et al. 2024, DeepSeekMath) advantage of each sample against the other samples of its prompt:
    A_i = (r_i - mean_group) / (std_group + eps), std unbiased (n - 1) as in GAD's reference and verl's GRPO.
    eps = 1e-6 is theirs too; a group with equal rewards gets A = 0 (no signal), not 0/0.

    rewards: [num_prompts * group_size], the samples of one prompt contiguous (sample.generate's row order).
    group_size 1 returns zeros: with one sample per prompt there is no baseline to compare against (and the
    unbiased std of one value is NaN), so no sample is pushed up or down.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be flat with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    r = rewards.float().view(-1, group_size)             # [num_prompts, G]
    mean = r.mean(dim=-1, keepdim=True)                  # [num_prompts, 1]
    std = r.std(dim=-1, keepdim=True)                    # unbiased
    return ((r - mean) / (std + eps)).view(-1)           # [num_prompts * G]


def gae_advantages(token_rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized advantage estimation (Schulman et al. 2016), the reversed loop of cleanrl's ppo.py.

    token_rewards, values, mask: [B, T] over response positions; each row's mask is one contiguous run of
    response tokens and the sequence-level reward sits on its last token. After the last unmasked token the
    episode is over: the bootstrap value is 0. Returns (advantages, returns) [B, T], returns = advantages +
    values, both 0 on masked positions. Values are treated as constants (detached).
    gamma = 1 (no discount inside a response) and lam = 0.95 are the usual LLM-PPO defaults (TRL, OpenRLHF).
    """
    mask = mask.bool()
    rewards = torch.where(mask, token_rewards.float(), 0.0)            # [B, T]
    values = torch.where(mask, values.detach().float(), 0.0)           # [B, T] masked: V = 0 (the bootstrap)
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])                       # [B]
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        # a masked position stops the recursion: nothing after the response flows back into it
        lastgaelam = torch.where(mask[:, t], delta + gamma * lam * lastgaelam, 0.0)
        advantages[:, t] = lastgaelam
    returns = advantages + values
    return advantages, returns


# ----------------------------------------------------------------------------------------------------------
# the PPO update

def ppo_update(model, optimizer, rollout, advantages, old_logprobs, ref_logprobs=None, *, kl_coef=0.0,
               clip_eps=0.2, dual_clip=3.0, ppo_epochs=1, mini_batches=1, micro_batch_size=None,
               micro_batch_tokens=None, max_grad_norm=1.0, temperature=1.0, generator=None, value_head=None,
               returns=None, old_values=None, vf_coef=0.1, vf_clip=0.2, token_count_fn=None, grad_sync_fn=None,
               amp=None, chunk_size=LOGIT_CHUNK):
    """PPO epochs over one rollout batch; returns a dict of float stats.

    rollout: input_ids / attention_mask [N, P+T] (left-padded prompt + response), response_mask [N, T].
    advantages: [N] (GRPO, put on every response token) or [N, T] (GAE). old_logprobs, ref_logprobs: [N, T] at
    the same temperature (e.g. rollout.logprobs and the reference model's sequence_logprobs). old_logprobs None
    (one epoch, one mini-batch only): the policy that sampled is the one being updated, and each micro-batch's own
    logprobs, detached, are the old ones. The ratio is then exactly 1, as it is in exact arithmetic, and no
    separate pass over the rollout is needed (a pass with other micro-batches would differ by bf16 rounding).

    For each epoch the N rows are shuffled (`generator`) and split into `mini_batches` equal mini-batches; each
    mini-batch is one optimizer step, accumulated over micro-batches of at most `micro_batch_size` rows (default:
    the whole mini-batch) and `micro_batch_tokens` padded tokens (sample.split_by_budget), each trimmed to its own
    longest row. Forward passes run inside `amp` (models.autocast; backward outside it), the LM head
    `chunk_size` positions at a time (sample.sequence_logprobs).
    Per token: loss = clipped surrogate + kl_coef * k3(pi || ref) (+ vf_coef * clipped value loss).
    The step minimises sum(per-token loss over the mini-batch's response tokens) / token_count_fn(n_local), with
    n_local the mini-batch's response-token count on this rank. token_count_fn defaults to the identity: the
    token-mean over the mini-batch. Under torchrun the trainers pass
        token_count_fn = common.all_reduce_sum,  grad_sync_fn = common.all_reduce_grads
    (the global token count, and gradients SUMMED over ranks before clipping), which makes the update exactly the
    token-mean over the global mini-batch: every token weighs the same, whichever rank it is on, and the step
    equals a single-process step on all ranks' rows.

    A step whose gradient norm is not finite (a NaN or inf loss makes it so) is skipped (grads zeroed, optimizer
    untouched) and counted in skipped_steps. The norm is taken after grad_sync_fn, so every rank sees the same
    value and all skip or none does.

    Stats, each a local (this rank's) token-mean per mini-batch averaged over the steps taken (NaN if none):
    pg_loss, kl (k3 to the reference; 0 without one), approx_kl (k2 between the current and the rollout policy,
    cleanrl/TRL), clipfrac (fraction of response tokens where a clip was active), entropy, vf_loss (with a value
    head), grad_norm (before clipping); skipped_steps is a count.

    The model's dropout should be off (HF's Qwen2/Llama configs have 0): the ratio is only 1 at the first step
    when the forward pass is deterministic.
    """
    response_mask = rollout.response_mask.bool()                            # [N, T]
    N, T = response_mask.shape
    if N % mini_batches:
        raise ValueError(f"{N} rows do not split into {mini_batches} equal mini-batches")
    if value_head is not None and (returns is None or old_values is None):
        raise ValueError("a value head needs returns and old_values")
    mini_batch_size = N // mini_batches
    micro_batch_size = micro_batch_size or mini_batch_size
    amp = amp or contextlib.nullcontext()
    token_count_fn = token_count_fn or (lambda n: n)

    # Padding positions get A = 0 and logprobs 0 (as sequence_logprobs returns them): ratio 1 and k3 0 there, so
    # nothing from a padding position, not even a NaN (NaN * 0 = NaN in a backward), reaches the gradient.
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(N, T)                       # GRPO: one per sequence, every token
    advantages = advantages.float().masked_fill(~response_mask, 0.0)       # [N, T]
    if old_logprobs is None and (ppo_epochs, mini_batches) != (1, 1):
        raise ValueError("old_logprobs=None (on-policy) needs ppo_epochs=1 and mini_batches=1")
    if old_logprobs is not None:
        old_logprobs = old_logprobs.detach().float().masked_fill(~response_mask, 0.0)
    if ref_logprobs is not None:
        ref_logprobs = ref_logprobs.detach().float().masked_fill(~response_mask, 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    if value_head is not None:
        params += [p for p in value_head.parameters() if p.requires_grad]

    taken, skipped_steps = [], 0
    for epoch in range(ppo_epochs):
        perm = torch.randperm(N, generator=generator,
                              device=generator.device if generator is not None else "cpu").to(response_mask.device)
        for mb_rows in perm.split(mini_batch_size):
            optimizer.zero_grad(set_to_none=True)
            n_local = response_mask[mb_rows].sum()
            n_tokens = float(token_count_fn(n_local.clone())) or 1.0        # every micro-batch's denominator
            sums = {}                                                        # stat -> sum over this rank's tokens
            for rows, r in rollout.micro_batches(micro_batch_size, micro_batch_tokens, mb_rows):
                t = r.response_ids.shape[1]                              # this micro-batch's own width
                mask = response_mask[rows, :t]                           # [n, t]
                with amp:
                    out = sequence_logprobs(model, r, temperature, return_entropy=True, value_head=value_head,
                                            chunk_size=chunk_size)
                    logprobs, entropy = out[0], out[1]                   # [n, t]
                    # With one epoch and one mini-batch the old logprobs are these same weights': the ratio is 1,
                    # nothing is clipped, and the gradient is -A * grad log pi: REINFORCE with the group mean as
                    # baseline (GAD's reference setting). The clip only acts from the second optimizer step on a batch.
                    old = logprobs.detach() if old_logprobs is None else old_logprobs[rows, :t]   # [n, t]
                    pg_losses, clipped = losses.ppo_policy_loss(logprobs, old, advantages[rows, :t], clip_eps,
                                                                dual_clip)
                    per_token = pg_losses                                # [n, t]
                    stats = {"pg_loss": pg_losses, "clipfrac": clipped.float(), "entropy": entropy,
                             "approx_kl": losses.kl_k2(logprobs, old)}
                    if ref_logprobs is not None:
                        stats["kl"] = losses.kl_k3(logprobs, ref_logprobs[rows, :t])
                        per_token = per_token + kl_coef * stats["kl"]
                    if value_head is not None:
                        stats["vf_loss"] = losses.ppo_value_loss(out[2], old_values[rows, :t].float(),
                                                                 returns[rows, :t].float(), vf_clip)
                        per_token = per_token + vf_coef * stats["vf_loss"]
                    loss = losses.masked_sum(per_token, mask) / n_tokens
                loss.backward()
                stats["loss"] = per_token
                for key, x in stats.items():
                    sums[key] = sums.get(key, 0.0) + losses.masked_sum(x.detach(), mask)

            grad_norm, skipped = common.clip_and_step(params, optimizer, max_grad_norm, sync=grad_sync_fn)
            sums = {key: x.item() for key, x in sums.items()}
            if skipped:
                skipped_steps += 1
                continue
            count = max(n_local.item(), 1)
            taken.append({key: x / count for key, x in sums.items()} | {"grad_norm": grad_norm})

    keys = ["pg_loss", "kl", "approx_kl", "clipfrac", "entropy", "grad_norm"]
    keys += ["vf_loss"] if value_head is not None else []
    result = {key: sum(s.get(key, 0.0) for s in taken) / len(taken) if taken else float("nan") for key in keys}
    result["skipped_steps"] = skipped_steps
    return result
