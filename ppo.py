"""GRPO advantages and the PPO update over one rollout batch: GAD's G step.

cleanrl's ppo.py loop (epochs x shuffled mini-batches, clipped surrogate, grad-norm clip) with what
an LLM needs: per-token losses on response tokens, a token-mean over the global mini-batch; logprobs
at the rollout temperature; the KL to the reference as a k3 loss term (verl's `low_var_kl`); dual
clip; a non-finite step skipped. Details: docs/gad.md.
"""
from dataclasses import dataclass

import torch

import common
import losses
import models
from fast_losses import LOGIT_CHUNK
from sample import sequence_logprobs


# --------------------------------------------------------------------------------------------------
# advantages

def grpo_advantages(rewards, group_size, eps=1e-6):
    """GRPO (DeepSeekMath) advantages, A_i = (r_i - mean_group) / (std_group + eps), std unbiased
    and eps 1e-6 as GAD's reference and verl; rewards [B * group_size], each prompt's contiguous."""
    # equal rewards give A = 0, not 0/0; group_size 1 has no baseline (and a NaN std): zeros
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

@dataclass
class PPOConfig:
    """ppo_update's settings; a trainer passes its parsed args, which have the same names."""
    kl_coef: float = 0.0
    clip_eps: float = 0.2
    dual_clip: float = 3.0            # Ye et al. 2020; verl's clip_ratio_c
    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_size: int = None      # rows a forward/backward (None: the mini-batch)
    micro_batch_tokens: int = None    # padded tokens a forward/backward
    grad_clip: float = 1.0            # None: no clipping
    temperature: float = 1.0          # the rollout's: logprobs of what was sampled
    chunk_size: int = LOGIT_CHUNK
    dtype: str = "float32"            # autocast dtype of the forward passes
    fsdp: bool = False                # a sharded model: as many micro-batches on every rank


def ppo_update(model, optimizer, rollout, advantages, old_logprobs, ref_logprobs=None,
               cfg=PPOConfig(), generator=None):
    """PPO epochs over one Rollout; advantages [N] (one a sequence), old/ref logprobs [N, T].
    Returns this rank's stats averaged over the steps taken, and skipped_steps."""
    response_mask = rollout.response_mask.bool()                            # [N, T]
    N, T = response_mask.shape
    if N % cfg.mini_batches:
        raise ValueError(f"{N} rows do not split into {cfg.mini_batches} equal mini-batches")
    if old_logprobs is None and (cfg.ppo_epochs, cfg.mini_batches) != (1, 1):
        # old None: each micro-batch's own logprobs, detached, are the old ones (ratio exactly 1;
        # a separate pass would differ by bf16 rounding)
        raise ValueError("old_logprobs=None (on-policy) needs ppo_epochs=1 and mini_batches=1")
    mini_batch_size = N // cfg.mini_batches
    micro_batch_size = cfg.micro_batch_size or mini_batch_size
    amp = models.autocast(response_mask.device, cfg.dtype)   # forward inside, backward outside
    # Padding positions get A = 0 and logprobs 0 (as sequence_logprobs returns them): ratio 1 and
    # k3 0 there, so nothing from padding, not even a NaN (NaN * 0 = NaN in a backward), reaches
    # the gradient.
    advantages = advantages.float()[:, None].expand(N, T).masked_fill(~response_mask, 0.0)  # [N, T]
    if old_logprobs is not None:
        old_logprobs = old_logprobs.detach().float().masked_fill(~response_mask, 0.0)  # [N, T]
    if ref_logprobs is not None:
        ref_logprobs = ref_logprobs.detach().float().masked_fill(~response_mask, 0.0)  # [N, T]
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()   # from_pretrained gives eval mode, where HF skips activation checkpointing
    perm_device = generator.device if generator is not None else "cpu"

    taken, skipped_steps = [], 0
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(N, generator=generator, device=perm_device).to(response_mask.device)
        for mb_rows in perm.split(mini_batch_size):
            optimizer.zero_grad(set_to_none=True)
            n_local = response_mask[mb_rows].sum()
            # every micro-batch's denominator: the mini-batch's token count summed over ranks
            n_tokens = float(common.all_reduce_sum(n_local)) or 1.0
            sums = {}                                          # stat -> sum over this rank's tokens
            for rows, r in rollout.micro_batches(micro_batch_size, cfg.micro_batch_tokens, mb_rows,
                                                 equal=cfg.fsdp):
                t = r.response_ids.shape[1]                        # this micro-batch's own width
                mask = response_mask[rows, :t]                     # [n, t]
                with amp:
                    logprobs, entropy = sequence_logprobs(                          # [n, t]
                        model, r, cfg.temperature, return_entropy=True, chunk_size=cfg.chunk_size)
                    # old None: these same weights, so the ratio is 1, nothing is clipped and the
                    # gradient is -A grad log pi (REINFORCE with the group mean as baseline: GAD)
                    old = logprobs.detach() if old_logprobs is None else old_logprobs[rows, :t]
                    pg_loss, clipped = losses.ppo_policy_loss(logprobs, old, advantages[rows, :t],
                                                              cfg.clip_eps, cfg.dual_clip)  # [n, t]
                    stats = {"pg_loss": pg_loss, "clipfrac": clipped.float(), "entropy": entropy,
                             "approx_kl": losses.kl_k2(logprobs, old)}
                    per_token = pg_loss                                                 # [n, t]
                    if ref_logprobs is not None:
                        stats["kl"] = losses.kl_k3(logprobs, ref_logprobs[rows, :t])
                        per_token = per_token + cfg.kl_coef * stats["kl"]
                    loss = losses.masked_sum(per_token, mask) / n_tokens
                loss.backward()
                for key, x in stats.items():
                    sums[key] = sums.get(key, 0.0) + losses.masked_sum(x.detach(), mask)

            # gradients summed over ranks before the norm, so every rank skips or none does
            grad_norm, skipped = common.clip_and_step(params, optimizer, cfg.grad_clip)
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
