"""Shared plumbing: one code path for `python` and `torchrun`, seeding, atomic writes, metrics log.

nanochat-style: `compute_init()` reads the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE) and starts a
process group only when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU, so DDP is testable on a laptop).
"""

import contextlib
import datetime
import json
import os
import random
import tempfile

import numpy as np
import torch
import torch.distributed as dist


def is_ddp():
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def print0(*args, **kwargs):
    """Print on rank 0 only; every rank runs the same code, one of them talks."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def compute_init(device=None):
    """Start DDP if launched by torchrun. Returns (ddp, rank, local_rank, world_size, device)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ddp = is_ddp()
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        world_size = int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        # A long timeout: ranks wait at the final barrier while rank 0 alone evaluates (minutes on real models).
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(hours=2))
    return ddp, rank, local_rank, world_size, torch.device(device)


def compute_cleanup():
    """Wait for every rank (rank 0 may still be evaluating or saving), then tear the process group down: a rank
    that leaves first kills gloo's connections under the others (SIGABRT)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed, rank=0):
    """Seed python, numpy and torch; each rank gets its own stream (seed + rank) so samples differ by rank."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path in the same directory; on success rename it over `path`, on failure delete it. Readers
    see the old file or the new one, never half of one (a kill mid-write leaves the previous version intact)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-" + os.path.basename(path) + ".")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path, data):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path):
    """torch.save through a temp file + rename (checkpoints survive a kill during the save)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def log_metrics(path, metrics):
    """Append one json line of metrics (rank 0 only). Python floats so the file is plain json."""
    if get_rank() != 0 or path is None:
        return
    row = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def all_reduce_sum(x):
    """Sum a number or tensor over ranks (identity without DDP). Used for global token / pair counts."""
    if get_world_size() == 1:
        return x
    t = x.detach().clone().float() if torch.is_tensor(x) else torch.tensor(float(x))
    dist.all_reduce(t)
    return t if torch.is_tensor(x) else t.item()


def all_reduce_grads(params, bucket_numel=2**24):
    """Sum gradients over ranks, in flat buckets (one collective per ~16M numbers, not one per tensor).

    We sum rather than average, and every loss here is divided by a GLOBAL count (tokens or pairs summed over
    ranks), so a DDP step equals the single-process step on the concatenated batch. Done by hand instead of
    wrapping in DistributedDataParallel because the trainers call submodules (the discriminator's backbone and
    head) and accumulate micro-batches, both of which DDP's hooks make awkward."""
    if get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel()
        if bucket and (g is None or size >= bucket_numel):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def reduce_metrics(metrics):
    """Mean of every metric over ranks. Ranks hold equal numbers of prompts and samples, so for per-row means
    (losses per sequence, accuracies, reward means, lengths) this is the global value; for token-means (pg_loss,
    kl, clipfrac) and standard deviations it is the mean of the per-rank values, close to the global one."""
    world = get_world_size()
    if world == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys])
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def fill_preset(args, presets, default):
    """STYLE's one main dial: --student picks a preset (else `default`, the paper's recipe), which fills every
    flag left unset (None). What was filled is printed, so a run's log says what it actually ran with."""
    preset = presets.get(args.student, default)
    filled = []
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
            filled.append(f"{key}={value}")
    print0(f"preset {args.student if args.student in presets else 'paper'}: " + " ".join(filled))


def drop_metrics_after(path, keep):
    """On resume: keep only the metrics rows for which keep(row) is true (those up to the checkpoint); the rows
    logged after it are redone by the resumed run and would otherwise appear twice."""
    if get_rank() != 0 or not os.path.exists(path):
        return
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows if keep(r)))


def make_optimizer(params, lr, weight_decay, adam8bit=False):
    """AdamW, or bitsandbytes' 8-bit AdamW (--adam8bit: optimizer state in 8 bits, a memory flag)."""
    if adam8bit:
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])

