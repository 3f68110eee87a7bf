"""Shared plumbing: one code path for `python` and `torchrun`, seeding, atomic writes, checkpoints,
metrics log.

nanochat-style: `compute_init()` reads the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE) and
starts a process group whenever torchrun launched the process, even a single one, so
`torchrun --nproc_per_node=1` runs every collective exactly as a full node does (NCCL on CUDA, gloo
on CPU, so DDP is testable on a laptop). Every collective goes through the helpers here, and each
puts its tensors on `comm_device()`: NCCL takes CUDA tensors only, and a Python number turned into a
CPU tensor would crash the first step on a GPU node.
"""

import contextlib
import datetime
import importlib
import json
import os
import random
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist


def is_ddp():
    """Launched by torchrun (it sets RANK), whatever the number of processes."""
    return "RANK" in os.environ


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if is_initialized() else 1


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
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        # torch.distributed.nn first, while there is no group: its functions take
        # group=group.WORLD as a default argument, evaluated at import, and transformers imports it
        # lazily (when a model class loads), so the defaults would hold our group for good and
        # destroy_process_group could not free it (see compute_cleanup).
        importlib.import_module("torch.distributed.nn")
        # A long timeout: ranks wait at the final barrier while rank 0 alone evaluates (minutes on
        # real models).
        # device_id binds NCCL to this rank's GPU (barriers then know which one to use).
        dist.init_process_group(backend="nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(hours=2),
                                device_id=torch.device(device) if cuda else None)
    return ddp, rank, local_rank, world_size, torch.device(device)


def compute_cleanup():
    """Wait for every rank (rank 0 may still be evaluating or saving), then tear the process group
    down: a rank that leaves first kills gloo's connections under the others (SIGABRT).

    destroy_process_group frees the group only if nothing else holds it (compute_init sees to
    that), and freeing it joins the backend's threads. Left alive, a gloo worker thread can drop
    the last collective's Work, and with it a tensor's Python object, after the interpreter has
    begun finalizing: taking the GIL then kills the thread inside a C++ destructor, and the rank
    dies with SIGABRT ("terminate called without an active exception")."""
    if is_initialized():
        barrier()
        dist.destroy_process_group()


def barrier():
    if is_initialized():
        dist.barrier()


def comm_device():
    """Where a collective's tensors must live: the current CUDA device under NCCL (it takes nothing
    else), the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_everything(seed, rank=0):
    """Seed python, numpy and torch; each rank gets its own stream (seed + rank) so samples differ
    by rank."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s


class OutputLocked(RuntimeError):
    """Another live run writes this output (the message names it): the entry points exit 2."""


def lock_output(path):
    """Take the one-writer lock of an output (a jsonl file, or a run's --out folder) -> the open
    lock file: hold it while writing, close it (or exit) to release. A second run on the same output
    gets OutputLocked naming the run that holds it. An OS lock (flock on PATH.lock, or PATH/.lock
    for a folder): the kernel drops it when the holder dies, so a kill -9 leaves no stale lock."""
    import fcntl
    import socket
    import sys

    path = os.fspath(path)
    lock_path = os.path.join(path, ".lock") if os.path.isdir(path) else path + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    f = open(lock_path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = ""
        for _ in range(50):   # the holder writes its name just after it locks: give it a moment
            f.seek(0)
            holder = f.read().strip()
            if holder:
                break
            time.sleep(0.01)
        f.close()
        holder = holder or "a process that has not written its name yet"
        raise OutputLocked(f"{path} is being written by another run ({holder}); wait for it to "
                           "finish, or give this run another output") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}")
    f.flush()
    return f


_run_lock = None   # rank 0's lock on the running trainer's --out, held until the process exits


def lock_run_output(out, rank):
    """A trainer's one-writer lock on OUT (an existing folder: OUT/.lock), taken by rank 0, the
    only rank that writes there, and held until the process exits (or the next run in this process
    starts). One collective tells every rank the outcome, so no rank waits for a rank 0 that gave
    up: on a refusal the process group is torn down and every rank raises OutputLocked."""
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
    if all_reduce_sum(float(error is not None)):
        compute_cleanup()
        raise error or OutputLocked(f"{out} is being written by another run (see rank 0)")


def run_main(main):
    """An entry point's `__main__`: main(), a refused output (OutputLocked) turned into `error: ...`
    on stderr (printed by rank 0 alone) and exit status 2 on every rank."""
    import sys

    try:
        main()
    except OutputLocked as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path in the same directory; on success rename it over `path`, on failure delete
    it. Readers see the old file or the new one, never half of one (a kill mid-write leaves the
    previous version intact)."""
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
    """torch.save through a temp file, fsync'd, then renamed (checkpoints survive a kill during the
    save, and a crash of the machine after it: without the fsync the rename can reach the disk
    before the data, leaving an empty or torn checkpoint where the previous one was)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


def log_metrics(path, metrics):
    """Append one json line of metrics (rank 0 only). Python floats so the file is plain json."""
    if get_rank() != 0 or path is None:
        return
    row = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def wandb_project(project):
    """--wandb's argparse type: checks that wandb is installed without importing it, so a missing
    package stops the run at startup (exit 2), not at its first logged step minutes later."""
    import argparse
    import importlib.util
    if importlib.util.find_spec("wandb") is None:
        raise argparse.ArgumentTypeError("needs the wandb package: pip install wandb")
    return project


_wandb = {}   # rank 0's live wandb run: the args it logs for, the run, its next step


def wandb_log(args, metrics):
    """With --wandb PROJECT: the metrics row, as written to metrics.jsonl (the source of truth),
    logged to wandb too (rank 0). The run starts at the first row, wandb imported only then;
    WANDB_MODE=offline keeps it in OUT/wandb/ for a later `wandb sync`. wandb's step is the row's
    index in metrics.jsonl, the step across stages: gad.py's `step` restarts at each stage, and
    wandb drops a step lower than one it has seen."""
    if getattr(args, "wandb", None) is None or get_rank() != 0:
        return
    if _wandb.get("args") is not args:
        import atexit
        import uuid
        import wandb
        if _wandb:   # an earlier run in this process (tests call main() more than once)
            _wandb["run"].finish()
        # The run id is stored in OUT/wandb_id: a fresh run writes a new one, a resumed run reads
        # it back and appends to the same wandb run (resume="allow"). Not derived from the path:
        # a fresh run in the same folder restarts at step 0, and wandb would drop its rows.
        id_path = os.path.join(args.out, "wandb_id")
        resumed = args.resume and os.path.exists(os.path.join(args.out, "ckpt.pt"))
        if resumed and os.path.exists(id_path):
            with open(id_path, encoding="utf-8") as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            atomic_write_text(id_path, run_id)
        run = wandb.init(project=args.wandb, dir=args.out, config=vars(args), id=run_id,
                         resume="allow", name=os.path.basename(os.path.abspath(args.out)))
        # The trainers end in several places (done, --stop-after, an error): finish at exit, with
        # the exit code wandb's own hooks saw.
        atexit.register(run.finish)
        with open(os.path.join(args.out, "metrics.jsonl"), encoding="utf-8") as f:
            rows = sum(1 for _ in f)
        _wandb.update(args=args, run=run, step=rows - 1)   # this row is already in the file
    row = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
    _wandb["run"].log(row, step=_wandb["step"])
    _wandb["step"] += 1


def all_reduce_sum(x):
    """Sum a number or tensor over ranks (x itself without a process group): global token / pair
    counts. A number comes back a float (summed in float64: exact for counts), a tensor a float32
    tensor on comm_device()."""
    if not is_initialized():
        return x
    if torch.is_tensor(x):
        t = x.detach().to(device=comm_device(), dtype=torch.float32, copy=True)
        dist.all_reduce(t)
        return t
    t = torch.tensor(float(x), dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return t.item()


def shard_map(fn, items, desc=None):
    """[fn(x) for x in items], the items dealt round-robin over the ranks (rank r computes items
    r::world) and the results gathered on every rank, in the items' order: work that takes minutes
    (sampling, evaluation) shared by the ranks, each of which returns what one process would. fn's
    results are pickled across ranks: plain CPU values (lists, numbers), never CUDA tensors. With
    `desc`, rank 0 shows a progress bar of its share."""
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
    """Sum gradients over ranks, in flat buckets (one collective per ~16M numbers, not one per
    tensor).

    We sum rather than average, and every loss here is divided by a GLOBAL count (tokens or pairs
    summed over ranks), so a DDP step equals the single-process step on the concatenated batch. Done
    by hand instead of wrapping in DistributedDataParallel because the trainers call submodules (the
    discriminator's backbone and head) and accumulate micro-batches, both of which DDP's hooks make
    awkward. The gradients live with the trainable (fp32) parameters on the GPU, which is where NCCL
    wants them."""
    if not is_initialized():
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


def clip_and_step(params, optimizer, max_grad_norm, sync=all_reduce_grads):
    """The end of every optimizer step here: gradients summed over ranks (`sync`), their norm
    clipped, the step taken unless the norm is not finite (a NaN or inf anywhere; every rank sees
    the same norm after the sum, so all skip together), then the gradients freed (set to None: at
    1.5B an fp32 gradient is 6 GB that would sit through the next rollout). Returns (grad norm
    before clipping as a float, skipped)."""
    params = [p for p in params if p.requires_grad]
    if sync is not None:
        sync(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        params, float("inf") if max_grad_norm is None else max_grad_norm)
    skipped = not torch.isfinite(grad_norm).item()
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.item(), skipped


def reduce_metrics(metrics):
    """Mean of every metric over ranks, but the largest of the peaks (mem_*: the rank nearest to
    running out of memory is the one that matters). Ranks hold equal numbers of prompts and samples,
    so for per-row means (losses per sequence, accuracies, reward means, lengths) the mean is the
    global value; for token-means (pg_loss, kl, clipfrac) and standard deviations it is the mean of
    the per-rank values, close to the global one."""
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


class Phases:
    """Seconds and peak CUDA memory of the named phases of one step, for its metrics row:

        phases = common.Phases(device)
        with phases("sampling"):
            ...
        m.update(phases.stats)      # t_sampling (s), mem_sampling
                                    # (GiB allocated at the peak; CUDA only)

    On CUDA each boundary synchronises (the time is the GPU's work, not its launch) and resets the
    peak counter; a phase entered twice in a step adds its times and keeps its larger peak."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.stats = {}

    @contextlib.contextmanager
    def __call__(self, name):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**30
            self.stats[f"mem_{name}"] = max(peak, self.stats.get(f"mem_{name}", 0.0))
        self.stats[f"t_{name}"] = self.stats.get(f"t_{name}", 0.0) + time.perf_counter() - t0


class Compute:
    """Compute accounting: cumulative counters in every metrics row, to plot quality against
    compute (README, "Compute accounting"). A trainer counts each pass where it makes it, and once
    a step `log()` sums the step's counts over ranks into the totals:

        compute = common.Compute()
        compute.generate(G, ro, n=8)       # sampling: 2 N per prompt token (one prefill a prompt)
                                           # and per generated token
        compute.forward(D, ro)             # a pass without gradient: 2 N a token
        compute.train(G, ro, passes=2)     # forward + backward: 6 N a token (train_tokens)
        m.update(compute.log())            # every rank, once a step: the row's counters

    N is every parameter of the module making the pass (embeddings included, a tied head once).
    Tokens are real ones, read from the masks: padding is not counted. `model` is a module or a
    parameter count; `tokens` a count or a Rollout (its prompt + response tokens). teacher=True
    marks the teacher's passes, `calls` its forward passes or generate() batches."""

    KEYS = ("student_tokens", "teacher_tokens", "teacher_calls", "train_tokens", "flops")

    def __init__(self):
        self.totals = dict.fromkeys(self.KEYS, 0)
        self.pending = dict.fromkeys(self.KEYS, 0)   # this rank's counts since the last log()

    @staticmethod
    def params(model):
        return model if isinstance(model, int) else sum(p.numel() for p in model.parameters())

    @staticmethod
    def tokens(x):
        if hasattr(x, "prompt_mask"):
            return int(x.prompt_mask.sum()) + int(x.response_mask.sum())
        return int(x)

    def add(self, **counts):
        for key, value in counts.items():
            self.pending[key] += value

    def generate(self, model, ro, n=1, teacher=False, calls=0):
        """Sampling of the Rollout `ro`, n samples a prompt: each prompt prefilled once (its rows
        repeat it n times), each new token a decode step. A student's new tokens are
        student_tokens; a teacher's prompt and new tokens are teacher_tokens."""
        prompt, new = int(ro.prompt_mask.sum()) // n, int(ro.response_mask.sum())
        self.add(flops=2 * self.params(model) * (prompt + new))
        if teacher:
            self.add(teacher_tokens=prompt + new, teacher_calls=calls)
        else:
            self.add(student_tokens=new)

    def forward(self, model, tokens, passes=1, teacher=False, calls=0):
        """`passes` forward passes without gradient over `tokens`."""
        tokens = self.tokens(tokens) * passes
        self.add(flops=2 * self.params(model) * tokens)
        if teacher:
            self.add(teacher_tokens=tokens, teacher_calls=calls)

    def train(self, model, tokens, passes=1):
        """`passes` forward and backward passes over `tokens`."""
        tokens = self.tokens(tokens) * passes
        self.add(flops=6 * self.params(model) * tokens, train_tokens=tokens)

    def log(self):
        """The step's counts summed over ranks (float64: exact for counts) and added to the totals,
        a collective every rank calls once a step. Returns the metrics row's counters: the
        cumulative ones, the step's `flops` and `flops_total`."""
        step = {key: all_reduce_sum(value) for key, value in self.pending.items()}
        self.pending = dict.fromkeys(self.KEYS, 0)
        for key, value in step.items():
            self.totals[key] += value if key == "flops" else round(value)
        return ({key: self.totals[key] for key in self.KEYS if key != "flops"}
                | {"flops": float(step["flops"]), "flops_total": float(self.totals["flops"])})

    def state_dict(self):
        """The totals, for the checkpoint (save_checkpoint stores what state_dict() returns)."""
        return dict(self.totals)

    def resume(self, state):
        """The totals of the values common.resume returned (None: a fresh run, all 0); 0 for a
        counter an older checkpoint lacks."""
        saved = (state or {}).get("compute") or {}
        self.totals = {key: saved.get(key, 0) for key in self.KEYS}


def micro_batch_count(ro, max_rows, max_tokens=None):
    """The forward passes Rollout.map makes over `ro`, one a micro-batch (a teacher's calls)."""
    return sum(1 for _ in ro.micro_batches(max_rows, max_tokens))


def fill_preset(args, presets, default):
    """The one main dial: --student picks a preset (else `default`, the paper's recipe), which fills
    every flag left unset (None). What was filled is printed, so a run's log says what it actually
    ran with."""
    preset = presets.get(args.student, default)
    filled = []
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
            filled.append(f"{key}={value}")
    print0(f"preset {args.student if args.student in presets else 'paper'}: " + " ".join(filled))


def make_optimizer(params, lr, weight_decay, adam8bit=False):
    """AdamW, or bitsandbytes' 8-bit AdamW (--adam8bit: optimizer state in 8 bits, a memory flag).
    On CUDA the fused AdamW kernel: one launch for all tensors, and none of the foreach path's
    full-size temporaries (its sqrt(exp_avg_sq) alone is 4 bytes a parameter)."""
    params = list(params)
    if adam8bit:
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def rng_state():
    """Every RNG a run draws from, as CPU tensors and Python objects (CUDA's state is a CPU
    ByteTensor too)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path, **state):
    """Rank 0 writes one atomic file: each named object's state_dict() (models, optimizers,
    schedulers), every other value as is (step, stage, ...), the RNG states, and how many rows
    OUT/metrics.jsonl (beside it) holds. Collective-free: ranks hold the same weights."""
    if get_rank() != 0:
        return
    log = os.path.join(os.path.dirname(os.path.abspath(path)), "metrics.jsonl")
    rows = sum(1 for _ in open(log, encoding="utf-8")) if os.path.exists(log) else 0
    payload = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
    atomic_torch_save(payload | {"rng": rng_state(), "log_rows": rows}, path)


def load_checkpoint(path, **objects):
    """Load `path` onto the CPU, copy each named state into its object (load_state_dict moves it to
    the object's device and dtype), restore the RNG states, and return the other values of the file
    (step, stage, ...).

    On the CPU first: map_location=<the GPU> would put the RNG ByteTensor on the GPU, where
    torch.set_rng_state refuses it, and would hold a second copy of every weight and optimizer state
    on the GPU. The loaded tensors are dropped as soon as they are copied in: only the returned
    values stay referenced. mmap: the file's pages are shared by every rank reading it (eight ranks
    of a 1.5B GAD run would otherwise each hold its ~40 GB)."""
    ck = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    for name, obj in objects.items():
        obj.load_state_dict(ck.pop(name))
    set_rng_state(ck.pop("rng"))
    return ck


# --------------------------------------------------------------------------------------------------
# one run's life, the same in every trainer: start, resume, log a step, checkpoint, stop

def add_run_flags(group, out):
    """The flags of a run's life, the same in every trainer."""
    group.add_argument("--out", default=out,
                       help="checkpoints, metrics.jsonl, the final Hugging Face folders")
    group.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    group.add_argument("--save-every", type=int, default=10,
                       help="checkpoint every k steps (and at each stage or epoch end)")
    group.add_argument("--stop-after", type=int, default=None,
                       help="stop after this many steps (tests of resume)")
    group.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and init")
    group.add_argument("--wandb", type=wandb_project, default=None, metavar="PROJECT",
                       help="also log metrics.jsonl's rows to this wandb project (needs wandb; "
                            "WANDB_MODE=offline: to OUT/wandb/ only, no network)")


def setup(args):
    """Start a run: torchrun's process group if launched by it, the seeds (the same on every rank:
    the models start equal; sampling is keyed per prompt, not per rank), OUT/ and its one-writer
    lock (OutputLocked on every rank if another run holds it). Returns (rank, world size,
    device)."""
    _, rank, _, world, device = compute_init(args.device)
    seed_everything(args.seed)
    os.makedirs(args.out, exist_ok=True)
    lock_run_output(args.out, rank)   # the folder first, so the lock is OUT/.lock
    if args.prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {args.prompts_per_step} "
                         f"must divide by the world size {world}")
    return rank, world, device


def resume(args, **objects):
    """With --resume and OUT/ckpt.pt: the checkpoint's states copied into `objects`, the metrics
    rows logged after it dropped (the resumed run logs them again), and its other values returned
    (step, stage, ...). Otherwise a fresh OUT/metrics.jsonl, and None."""
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
    """One step's metrics row (OUT/metrics.jsonl) and its line, in the one format of every trainer:
        <label> <step>/<total> | key value | ... | <tokens/s> tok/s | <s> s/step
    m holds the step's global values (reduced over ranks), with `tokens` (the response tokens the
    step sampled or trained on) and `s_per_step`; tokens_per_s is added."""
    m["tokens_per_s"] = m["tokens"] / max(m["s_per_step"], 1e-9)
    log_metrics(os.path.join(args.out, "metrics.jsonl"), m)
    wandb_log(args, m)
    fields = "".join(f" | {k} {m[k]:.4g}" for k in keys if k in m)
    print0(f"{label} {step + 1}/{total}{fields} | {m['tokens_per_s']:.0f} tok/s | "
           f"{m['s_per_step']:.2f} s/step")


def end_step(args, step, total, steps_done, save=False, **state):
    """After step `step` (0-based) of `total`: checkpoint (OUT/ckpt.pt, rank 0) every --save-every
    steps, at the last step, and when `save`; then True if --stop-after says this process stops now
    (tests of resume)."""
    if (step + 1) % args.save_every == 0 or step + 1 == total or save:
        save_checkpoint(os.path.join(args.out, "ckpt.pt"), step=step, **state)
    if args.stop_after is not None and steps_done >= args.stop_after:
        print0(f"--stop-after {args.stop_after}: stopping")
        return True
    return False
