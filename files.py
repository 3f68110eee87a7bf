"""Files a run writes: atomic writes, one-writer locks, the metrics log and its wandb mirror."""

import contextlib
import json
import os
import tempfile
import time

import torch


_UMASK = os.umask(0o022)   # read once, at import (os.umask sets it to read it), then put back
os.umask(_UMASK)


def get_rank():
    return int(os.environ.get("RANK", 0))   # torchrun's; common.py holds the collectives


class OutputLocked(RuntimeError):
    """Another live run writes this output (the message names it): the entry points exit 2."""


def lock_output(path):
    """Lock a file or folder output for one writer -> the open lock file (close it to release);
    a second run gets OutputLocked naming the holder."""
    import fcntl
    import socket
    import sys

    path = os.fspath(path)
    lock_path = os.path.join(path, ".lock") if os.path.isdir(path) else path + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    f = open(lock_path, "a+", encoding="utf-8")
    try:   # an OS lock: the kernel drops it when its holder dies, so a kill -9 leaves none stale
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


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temp file beside `path`, fsync'd, renamed over it on success: never half a file."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-" + os.path.basename(path) + ".")
    os.chmod(tmp, 0o666 & ~_UMASK)   # the mode open() gives (mkstemp's is 0600: owner only)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())   # else after a machine crash the rename can land before the data
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path, text):
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))


def atomic_torch_save(obj, path):
    with atomic_file(path) as f:
        torch.save(obj, f)


def log_metrics(path, metrics):
    """Append one json line of metrics (rank 0 only). Python floats so the file is plain json."""
    if get_rank() != 0 or path is None:
        return
    row = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def wandb_project(project):
    """--wandb's argparse type: a missing wandb stops the run at startup, not at its first step."""
    import argparse
    import importlib.util
    if importlib.util.find_spec("wandb") is None:
        raise argparse.ArgumentTypeError("needs the wandb package: pip install wandb")
    return project


_wandb = {}   # rank 0's live wandb run: the args it logs for, the run, its next step


def wandb_log(args, metrics):
    """With --wandb: log the metrics row to wandb too (rank 0), the run started at the first row."""
    if getattr(args, "wandb", None) is None or get_rank() != 0:
        return
    if _wandb.get("args") is not args:
        import atexit
        import uuid
        import wandb
        if _wandb:   # an earlier run in this process (tests call main() more than once)
            _wandb["run"].finish()
        # A resumed run reads its id back and appends to its wandb run; a fresh one, restarting
        # at step 0, needs a new id (not one from the path), else wandb would drop its rows.
        id_path = os.path.join(args.out, "wandb_id")
        resumed = args.resume and os.path.exists(os.path.join(args.out, "ckpt.pt"))
        if resumed and os.path.exists(id_path):
            with open(id_path, encoding="utf-8") as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            atomic_write_text(id_path, run_id)
        config = {k: v if isinstance(v, (int, float, str, list, tuple, type(None))) else str(v)
                  for k, v in vars(args).items()}   # args.device is a torch.device
        run = wandb.init(project=args.wandb, dir=args.out, config=config, id=run_id, resume="allow",
                         name=os.path.basename(os.path.abspath(args.out)))
        atexit.register(run.finish)   # the trainers end in several places (done, --stop-after, ...)
        with open(os.path.join(args.out, "metrics.jsonl"), encoding="utf-8") as f:
            rows = sum(1 for _ in f)
        # wandb's step is the row's index (this row is in the file): gad.py's step restarts each
        # stage, and wandb drops a step lower than one it has seen
        _wandb.update(args=args, run=run, step=rows - 1)
    row = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
    _wandb["run"].log(row, step=_wandb["step"])
    _wandb["step"] += 1


