"""Shared plumbing: one code path for `python` and `torchrun` (NCCL on CUDA, gloo on CPU), seeding,
checkpoints, a run's life (start, resume, log a step, stop). Why: docs/implementation-notes.md."""

import argparse
import contextlib
import datetime
import glob
import importlib
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from files import (OutputLocked, atomic_torch_save, atomic_write_text, lock_output, log_metrics,
                   wandb_log, wandb_project)


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if is_initialized() else 1


def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def compute_init(device=None):
    """Start DDP if launched by torchrun. Returns (ddp, rank, local_rank, world_size, device)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ddp = "RANK" in os.environ   # launched by torchrun, whatever the number of processes
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        world_size = int(os.environ["WORLD_SIZE"])
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        # Imported before the group exists, else its defaults (group=WORLD, bound at import) would
        # hold the group and destroy_process_group could not free it.
        importlib.import_module("torch.distributed.nn")
        # 2 hours: ranks wait at the final barrier while rank 0 alone evaluates. device_id binds
        # NCCL to this rank's GPU (barriers then know which one to use).
        dist.init_process_group(backend="nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(hours=2),
                                device_id=torch.device(device) if cuda else None)
    return ddp, rank, local_rank, world_size, torch.device(device)


def compute_cleanup():
    """Wait for every rank (one leaving first kills gloo under the others), then free the group."""
    if is_initialized():
        barrier()
        dist.destroy_process_group()   # joins gloo's threads: else one can SIGABRT at exit


def barrier():
    if is_initialized():
        dist.barrier()


def comm_device():
    """Where a collective's tensors must live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":   # NCCL takes CUDA tensors only
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_everything(seed, rank=0):
    """Seed python, numpy and torch with seed + rank (returned)."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s


_run_lock = None   # rank 0's lock on the running trainer's --out, held until the process exits


def lock_run_output(out, rank):
    """Rank 0 locks the folder OUT until exit; if refused, every rank raises OutputLocked."""
    global _run_lock
    if _run_lock is not None:   # an earlier run in this process (tests call main() in turn)
        _run_lock.close()
        _run_lock = None
    error = None
    if rank == 0:
        try:
            _run_lock = lock_output(out)
        except OutputLocked as e:
            error = e
    if all_reduce_sum(float(error is not None)):   # no rank waits for a rank 0 that gave up
        compute_cleanup()
        raise error or OutputLocked(f"{out} is being written by another run (see rank 0)")


def run_main(main):
    """Run an entry point's main(); OutputLocked -> `error: ...` (rank 0) and exit 2 (all ranks)."""
    try:
        main()
    except OutputLocked as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def all_reduce_sum(x):
    """Sum over ranks: a number -> float (summed in float64), a tensor -> fp32 on comm_device()."""
    if not is_initialized():
        return x
    if torch.is_tensor(x):
        t = x.detach().to(device=comm_device(), dtype=torch.float32, copy=True)
        dist.all_reduce(t)
        return t
    t = torch.tensor(float(x), dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return t.item()


def all_reduce_max(x):
    """The largest of a number over ranks (e.g. a micro-batch count that every rank must run)."""
    if not is_initialized():
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return type(x)(t.item())


def shard_map(fn, items, desc=None):
    """[fn(x) for x in items], rank r computing items[r::world], gathered in order on every rank.
    fn returns picklable CPU values, never CUDA tensors; `desc`: rank 0's progress bar."""
    from tqdm import tqdm

    rank, world = get_rank(), get_world_size()
    mine = [fn(x) for x in tqdm(items[rank::world], desc=desc, unit="item",
                                disable=desc is None or rank != 0)]
    if not is_initialized():
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return [parts[i % world][i // world] for i in range(len(items))]


def all_reduce_grads(params, bucket_numel=2**24):
    """Sum gradients over ranks, one collective per flat bucket of ~bucket_numel numbers."""
    if not is_initialized():
        return
    # a sharded (FSDP) parameter's gradient is already the sum, reduce-scattered by its layer
    grads = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel()
        if bucket and (g is None or size >= bucket_numel):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            # a sum: every loss is divided by a global count, so this is the one-process step
            dist.all_reduce(flat)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def clip_and_step(params, optimizer, max_grad_norm, sync=all_reduce_grads):
    """Sync, clip, step unless the norm is not finite, free grads -> (norm before clip, skipped)."""
    params = [p for p in params if p.requires_grad]
    if sync is not None:
        sync(params)
    max_norm = float("inf") if max_grad_norm is None else max_grad_norm
    if any(isinstance(p, DTensor) for p in params):   # --fsdp: clip_grad_norm_ refuses the mix
        grads = [[p.grad for p in params if isinstance(p, DTensor) == s and p.grad is not None]
                 for s in (True, False)]
        grad_norm = torch.linalg.vector_norm(torch.stack(
            [torch.nn.utils.get_total_norm(grads[0]).full_tensor(),
             torch.nn.utils.get_total_norm(grads[1])]))
        coef = min(1.0, max_norm / (grad_norm.item() + 1e-6))   # clip_grad_norm_'s rule
        for g in grads[0] + grads[1]:
            g.mul_(coef)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    skipped = not torch.isfinite(grad_norm).item()   # the same norm on every rank after the sum
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)   # at 1.5B a 6 GB fp32 gradient, not kept for the rollout
    return grad_norm.item(), skipped


def shard(model, dtype):
    """--fsdp (FSDP2): the weights, gradients and AdamW state of each decoder layer, and of the
    embedding unless the LM head shares it, split over the ranks; the final norm and heads stay
    whole on every rank, their gradients summed by all_reduce_grads (the trainers call model.model
    and the head apart: a sharded root's hooks would never gather them, nor a tied head's)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not is_initialized():
        raise ValueError("--fsdp shards over the ranks of a process group: launch with torchrun")
    bf16 = torch.bfloat16 if dtype in ("bfloat16", "bf16") else None
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    for unit in list(model.model.layers) + ([] if tied else [embedding]):
        # reshard_after_forward given: left unset, a unit that runs as FSDP's root (each one
        # here) would keep its weights gathered from forward to backward
        fully_shard(unit, reshard_after_forward=True,
                    mp_policy=MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=torch.float32))
        # a sum over ranks, as all_reduce_grads (losses are divided by global counts); plain SUM
        # collectives: gloo has no PREMUL_SUM
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return model


@contextlib.contextmanager
def gathered(model):
    """Passes without grad over a sharded model (generate, scoring, evaluation): every layer
    gathered once for the whole context, and no collective inside it, so the ranks may run
    different numbers of forwards (rows end at different steps). A plain model: nothing."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)] if model is not None else []
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True)


def reduce_metrics(metrics):
    """Mean of every metric over ranks, but the largest of the memory peaks (mem_*)."""
    if not is_initialized():
        return metrics
    peaks = sorted(k for k in metrics if k.startswith("mem_"))
    means = sorted(k for k in metrics if not k.startswith("mem_"))
    out = {}
    for keys, op, scale in ((means, dist.ReduceOp.SUM, 1 / get_world_size()),
                            (peaks, dist.ReduceOp.MAX, 1.0)):
        if keys:   # the same keys on every rank (mem_* on CUDA only, where every rank has them)
            t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64,
                             device=comm_device())
            dist.all_reduce(t, op=op)
            out.update({k: v * scale for k, v in zip(keys, t.tolist())})
    return out


_phase_stats = {}   # this step's t_<phase> (s) and mem_<phase> (GiB at the peak, CUDA only)


@contextlib.contextmanager
def phase(name):
    """Time a named phase of the running step (and its CUDA memory peak) into step_stats()."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:   # the GPU's work, not its launch; the peak of this phase alone
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
        _phase_stats[f"mem_{name}"] = max(peak, _phase_stats.get(f"mem_{name}", 0.0))
    _phase_stats[f"t_{name}"] = _phase_stats.get(f"t_{name}", 0.0) + time.perf_counter() - t0


def step_stats():
    stats = dict(_phase_stats)
    _phase_stats.clear()
    return stats


class Compute:
    """Cumulative counters of each pass a trainer makes (docs/pipeline.md, "Compute accounting")."""

    KEYS = ("student_tokens", "teacher_tokens", "teacher_calls", "train_tokens", "flops")

    def __init__(self):
        self.totals = dict.fromkeys(self.KEYS, 0)
        self.pending = dict.fromkeys(self.KEYS, 0)   # this rank's counts since the last log()

    @staticmethod
    def params(model):   # N: every parameter (embeddings included, a tied head once)
        return model if isinstance(model, int) else sum(p.numel() for p in model.parameters())

    @staticmethod
    def tokens(x):
        if hasattr(x, "prompt_mask"):   # a Rollout: its real tokens, not padding
            return int(x.prompt_mask.sum()) + int(x.response_mask.sum())
        return int(x)

    def add(self, **counts):
        for key, value in counts.items():
            self.pending[key] += value

    def generate(self, model, ro, n=1, teacher=False, calls=0):
        """Sampling `ro`, n samples a prompt: 2N a new token and a prompt token (prefilled once)."""
        prompt, new = int(ro.prompt_mask.sum()) // n, int(ro.response_mask.sum())
        self.add(flops=2 * self.params(model) * (prompt + new))
        if teacher:
            self.add(teacher_tokens=prompt + new, teacher_calls=calls)
        else:
            self.add(student_tokens=new)

    def forward(self, model, tokens, passes=1, teacher=False, calls=0):
        tokens = self.tokens(tokens) * passes
        self.add(flops=2 * self.params(model) * tokens)
        if teacher:
            self.add(teacher_tokens=tokens, teacher_calls=calls)

    def train(self, model, tokens, passes=1):
        tokens = self.tokens(tokens) * passes
        self.add(flops=6 * self.params(model) * tokens, train_tokens=tokens)

    def log(self):
        """A collective, once a step: add the step's counts to the totals -> the row's counters."""
        step = {key: all_reduce_sum(value) for key, value in self.pending.items()}
        self.pending = dict.fromkeys(self.KEYS, 0)
        for key, value in step.items():
            self.totals[key] += value if key == "flops" else round(value)
        return ({key: self.totals[key] for key in self.KEYS if key != "flops"}
                | {"flops": float(step["flops"]), "flops_total": float(self.totals["flops"])})

    def state_dict(self):
        return dict(self.totals)

    def resume(self, state):
        """Totals from common.resume's values (None: fresh run); 0 where an old checkpoint lacks."""
        saved = (state or {}).get("compute") or {}
        self.totals = {key: saved.get(key, 0) for key in self.KEYS}


compute = Compute()   # the run's counters: the trainers count into it, log() once a step


def micro_batch_count(ro, max_rows, max_tokens=None):
    """The forward passes Rollout.map makes over `ro`, one a micro-batch (a teacher's calls)."""
    return sum(1 for _ in ro.micro_batches(max_rows, max_tokens))


def fill_preset(args, presets, default):
    """--student's preset (else `default`, the paper's) fills every flag left None; prints what."""
    preset = presets.get(args.student, default)
    filled = []
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
            filled.append(f"{key}={value}")
    print0(f"preset {args.student if args.student in presets else 'paper'}: " + " ".join(filled))


def make_optimizer(params, lr, weight_decay, adam8bit=False):
    """AdamW (fused on CUDA), or bitsandbytes' 8-bit AdamW with adam8bit."""
    params = list(params)
    if adam8bit:
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    # fused: one launch, none of foreach's full-size temporaries (4 bytes a parameter each)
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def _sharded(obj):
    return (isinstance(obj, torch.nn.Module)
            and any(isinstance(p, DTensor) for p in obj.parameters()))


def sharded_state_dicts(objects, load=False):
    """--fsdp: {name: state dict} of the sharded models among `objects` and of their optimizers,
    each rank's shards (DTensors) for torch.distributed.checkpoint. Saving (not `load`), an
    optimizer that has not stepped is left out (kept whole): reading its state first makes it, by a
    step on zero gradients, and a resumed first step's bias correction would be off."""
    from torch.distributed.checkpoint import state_dict as sd

    sharded = [m for m in objects.values() if _sharded(m)]
    out = {}
    for name, obj in objects.items():
        if obj in sharded:
            out[name] = sd.get_model_state_dict(obj)
        elif isinstance(obj, torch.optim.Optimizer) and (obj.state or load):
            model = _owner(obj, sharded)
            if model is not None:
                out[name] = sd.get_optimizer_state_dict(model, obj)
    return out


def _owner(optimizer, models):
    """The model among `models` whose parameters `optimizer` steps (None: none of them)."""
    first = optimizer.param_groups[0]["params"][0]
    return next((m for m in models if any(p is first for p in m.parameters())), None)


def whole_state_dict(model):
    """A sharded model's state dict gathered whole on rank 0's CPU (a collective); None when the
    model is not sharded."""
    from torch.distributed.checkpoint import state_dict as sd

    if not _sharded(model):
        return None
    return sd.get_model_state_dict(
        model, options=sd.StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(path, **state):
    """Rank 0 writes one file: state_dict()s, other values as is, the RNGs, metrics.jsonl's rows.
    --fsdp: the sharded models and optimizers go to a folder beside it (each rank writes its shards
    by torch.distributed.checkpoint) that the file, written last, names; a kill mid-save leaves
    the previous pair whole. Every rank calls it."""
    import torch.distributed.checkpoint as dcp

    shards, folder = sharded_state_dicts(state), None
    if shards:   # a new name each save (rank 0's, broadcast): the previous folder stays intact
        token = [os.urandom(4).hex()]
        dist.broadcast_object_list(token, src=0)
        folder = f"{os.path.basename(path)}.{token[0]}.dcp"
        dcp.save(shards, checkpoint_id=os.path.join(os.path.dirname(path), folder))
    if get_rank() != 0:
        return
    log = os.path.join(os.path.dirname(os.path.abspath(path)), "metrics.jsonl")
    rows = sum(1 for _ in open(log, encoding="utf-8")) if os.path.exists(log) else 0
    payload = {k: v.state_dict() if hasattr(v, "state_dict") else v
               for k, v in state.items() if k not in shards}
    rng = {"python": random.getstate(), "numpy": np.random.get_state(),
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    atomic_torch_save(payload | {"rng": rng, "log_rows": rows, "dcp": folder}, path)
    for old in glob.glob(glob.escape(path) + ".*.dcp"):   # killed saves' and the previous one
        if os.path.basename(old) != folder:
            shutil.rmtree(old)


def load_checkpoint(path, **objects):
    """Copy each named state into its object, restore the RNGs; returns the file's other values."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    # CPU: set_rng_state refuses a GPU tensor, and no second copy of the weights on the GPU;
    # mmap: every rank reading the file shares its pages
    ck = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    folder, sharded = ck.pop("dcp", None), [v for v in objects.values() if _sharded(v)]
    if bool(folder) != bool(sharded):
        how = "with" if folder else "without"
        raise ValueError(f"{path} was written {how} --fsdp: resume it {how} --fsdp (or start "
                         f"over without --resume)")
    if folder:   # the sharded ones: this run's shards as templates, filled in place
        shards = sharded_state_dicts({k: v for k, v in objects.items() if k not in ck}, load=True)
        dcp.load(shards, checkpoint_id=os.path.join(os.path.dirname(path), folder))
        for name, state in shards.items():
            obj = objects[name]
            if obj in sharded:
                sd.set_model_state_dict(obj, state)
            else:
                sd.set_optimizer_state_dict(_owner(obj, sharded), obj, state)
    for name, obj in objects.items():   # a None is not saved (GAD's reference in its warmup)
        if name in ck and (value := ck.pop(name)) is not None and obj is not None:
            obj.load_state_dict(value)
    rng = ck.pop("rng")
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return ck


# --------------------------------------------------------------------------------------------------
# one run's life, the same in every trainer: start, resume, log a step, checkpoint, stop

def add_generate_flags(g):
    """The flags of every sampler: the decode loop and a generate() call's KV-cache bound."""
    g.add_argument("--decode", choices=("static", "plain", "compiled"), default="static",
                   help="static KV cache, plain (HF DynamicCache) or compiled: the same samples")
    g.add_argument("--gen-batch-tokens", type=int, default=None,
                   help="KV-cache tokens per generate() call (rows x (prompt + new tokens))")


def arg_parser(description, out, student="smollm2-135m"):
    """The flags every trainer shares; None means "from the --student preset"."""
    p = argparse.ArgumentParser(description=description)
    g = p.add_argument_group("models")
    g.add_argument("--student", default=student, help="student alias/folder; picks the preset")
    g.add_argument("--student-layers", default=None, help="keep only these layers: '0-5', 'every2'")
    g.add_argument("--teacher", default=None, help="alias/folder (gad.py: or api:URL:MODEL)")
    g.add_argument("--dtype", default=None, help="compute dtype under autocast: float32 | bfloat16 "
                   "(trainable weights and AdamW state stay fp32)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="jsonl/parquet/ShareGPT file, 'sharegpt', 'tiny'")
    g.add_argument("--limit", type=int, default=None, help="read at most this many rows")
    g.add_argument("--max-prompt-len", type=int, default=None, help="drop longer prompts (tokens)")
    g.add_argument("--val-fraction", type=float, default=None, help="held-out share of prompts")
    g.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts in the table")
    g = p.add_argument_group("training")
    g.add_argument("--prompts-per-step", type=int, default=None, help="global prompts per step")
    g.add_argument("--max-new-tokens", type=int, default=None, help="sampled response length")
    g.add_argument("--lr", type=float, default=None, help="student learning rate")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=None, help="max gradient norm")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=out, help="checkpoints, metrics.jsonl, the final HF folders")
    g.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    g.add_argument("--save-every", type=int, default=10,
                   help="checkpoint every k steps (and at each stage or epoch end)")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps (tests of resume)")
    g.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and init")
    g.add_argument("--wandb", type=wandb_project, default=None, metavar="PROJECT",
                   help="also log metrics.jsonl's rows to wandb (WANDB_MODE=offline: no network)")
    g = p.add_argument_group("advanced: speed and memory (the same results)")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   default=None, help="recompute activations in backward (paper presets: on)")
    g.add_argument("--adam8bit", action="store_true", help="bitsandbytes 8-bit AdamW")
    g.add_argument("--micro-batch-size", type=int, default=None, help="rows per forward/backward")
    g.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="padded tokens per forward/backward (reference: 12288 per GPU)")
    g.add_argument("--chunk-size", type=int, default=128, help="positions per full-vocab chunk")
    g.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="shard the trained models' decoder layers (and untied embeddings) over "
                   "the ranks (FSDP2)")
    add_generate_flags(g)
    return p


def setup(args):
    """Start a run: process group, seeds, OUT/ and its lock -> (rank, world size, device)."""
    _, rank, _, world, device = compute_init(args.device)
    args.device = device   # the run's device, for every function that takes args
    compute.__init__()     # this run's counters (tests call main() in turn)
    _phase_stats.clear()
    seed_everything(args.seed)   # one seed on all ranks: models start equal; noise is per prompt
    os.makedirs(args.out, exist_ok=True)
    lock_run_output(args.out, rank)   # the folder first, so the lock is OUT/.lock
    if args.prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {args.prompts_per_step} "
                         f"must divide by the world size {world}")
    return rank, world, device


def resume(args, **objects):
    """--resume: load OUT/ckpt.pt, cut metrics.jsonl to it -> its values; else a new log, None."""
    path, log = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "metrics.jsonl")
    if not (args.resume and os.path.exists(path)):
        if get_rank() == 0 and os.path.exists(log):
            os.remove(log)
        return None
    state = load_checkpoint(path, **objects)
    rows = state.pop("log_rows")
    if get_rank() == 0 and os.path.exists(log):
        with open(log, encoding="utf-8") as f:
            kept = [line for _, line in zip(range(rows), f)]
        atomic_write_text(log, "".join(kept))
    print0(f"resumed from {path} after {state.get('stage', 'step')} {state['step'] + 1}")
    return state


def log_step(args, label, step, total, m, keys):
    """Write the step's global metrics `m` to metrics.jsonl (and wandb) and print its line."""
    m["tokens_per_s"] = m["tokens"] / max(m["s_per_step"], 1e-9)
    log_metrics(os.path.join(args.out, "metrics.jsonl"), m)
    wandb_log(args, m)
    fields = "".join(f" | {k} {m[k]:.4g}" for k in keys if k in m)
    print0(f"{label} {step + 1}/{total}{fields} | {m['tokens_per_s']:.0f} tok/s | "
           f"{m['s_per_step']:.2f} s/step")


def end_step(args, step, total, steps_done, save=False, **state):
    """Checkpoint every --save-every steps, at the last, and if `save`; True: --stop-after stops."""
    if (step + 1) % args.save_every == 0 or step + 1 == total or save:
        save_checkpoint(os.path.join(args.out, "ckpt.pt"), step=step, **state)
    if args.stop_after is not None and steps_done >= args.stop_after:
        print0(f"--stop-after {args.stop_after}: stopping")
        return True
    return False


def rollout_settings(args):
    """sample.rollout's keyword arguments fixed for a run (gad.py has no --gen-batch-size)."""
    return dict(max_new_tokens=args.max_new_tokens, eos_ids=args.eos_ids, pad_id=args.pad_id,
                seed=args.seed, amp=args.amp, batch_size=getattr(args, "gen_batch_size", None),
                max_tokens=args.gen_batch_tokens, decode=args.decode)
