"""One writer per output: a second run on the same teacher.py --out or trainer --out is refused
with exit 2 and an error naming the run that holds it; the lock is the kernel's (flock), so a run
killed with SIGKILL leaves none behind. Runs are real subprocesses; the sampler talks to the fake
endpoint of test_sample_cli.py behind a gate, so a run stops mid-way, holding its output, for as
long as a test needs."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types

import pytest
import torch

import common
import files
from scripts import ROOT
from test_sample_cli import (ChatHandler, FakeChat, QuietServer, assert_each_once, describe,
                             env_with_key, read_rows, run_sample, sample_cmd, serve_chat,
                             summary, write_prompts)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def wait_for_lines(path, n, proc, deadline_s=60):
    """Poll until the output has at least n newline-terminated lines (the run is then mid-way)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"teacher.py ended (exit {proc.returncode}) before writing {n} rows\n"
                        f"{out}\n{err}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no {n} rows within {deadline_s}s")


def holder_of(proc):
    """How lock_output names a run: its pid, then the host."""
    return f"pid {proc.pid} on {socket.gethostname()}"


def error_line(proc):
    """The `error: ...` line of a refused run's stderr (exactly one)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, describe(proc)
    return lines[0]


def wait_for_holder(lock_path, proc, deadline_s=60):
    """Poll until the lock file names proc (it then holds the lock)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if os.path.exists(lock_path) and holder_of(proc) in open(lock_path).read():
            return
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before taking the lock: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"{lock_path} did not name pid {proc.pid} within {deadline_s}s")


def kill9(proc):
    assert proc.poll() is None, "the run ended before the kill: nothing left to test"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


# --------------------------------------------------------------------------------------------------
# lock_output itself, in this process against another one

PROBE = textwrap.dedent(f"""
    import sys, time
    sys.path.insert(0, {ROOT!r})
    import common
    import files
    try:
        lock = files.lock_output(sys.argv[2])
    except files.OutputLocked as e:
        print("refused:", e, flush=True)
        sys.exit(3)
    print("locked", flush=True)
    if sys.argv[1] == "hold":
        time.sleep(600)
""")


def probe(mode, path):
    return subprocess.Popen([sys.executable, "-c", PROBE, mode, str(path)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_lock_output_names_the_holder_and_dies_with_it(tmp_path):
    out = tmp_path / "rows.jsonl"
    lock = files.lock_output(out)
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    assert me in (tmp_path / "rows.jsonl.lock").read_text()
    # flock is per open file: a second open in this same process is refused too
    with pytest.raises(files.OutputLocked, match=me):
        files.lock_output(out)
    other = probe("try", out)
    stdout, stderr = other.communicate(timeout=60)
    assert other.returncode == 3, stdout + stderr
    assert stdout.startswith(f"refused: {out} is being written by another run ({me}, started ")
    lock.close()  # released on close
    other = probe("try", out)
    stdout, stderr = other.communicate(timeout=60)
    assert (other.returncode, stdout) == (0, "locked\n"), stderr

    # now the other process holds it, and is killed with SIGKILL
    holder = probe("hold", out)
    assert holder.stdout.readline() == "locked\n", holder.communicate()
    with pytest.raises(files.OutputLocked, match=f"{holder_of(holder)}, started .*-c hold"):
        files.lock_output(out)
    kill9(holder)
    assert holder_of(holder) in (tmp_path / "rows.jsonl.lock").read_text()  # the file stays ...
    files.lock_output(out).close()  # ... but not its lock

    # an existing folder (a trainer's --out) is locked by the .lock inside it
    (tmp_path / "run").mkdir()
    with files.lock_output(tmp_path / "run"):
        assert me in (tmp_path / "run" / ".lock").read_text()
        with pytest.raises(files.OutputLocked):
            files.lock_output(tmp_path / "run")


def test_setup_locks_out_and_a_new_run_in_the_process_takes_it_over(tmp_path):
    """Tests call a trainer's main() several times in one process: each setup() drops the lock of
    the previous run (over by then) before taking its own; the lock is held after setup returns."""
    args = types.SimpleNamespace(device="cpu", seed=0, out=str(tmp_path / "run"),
                                 prompts_per_step=1)
    try:
        common.setup(args)
        assert (tmp_path / "run" / ".lock").exists()
        with pytest.raises(files.OutputLocked):
            files.lock_output(args.out)
        common.setup(args)  # the same --out again: not refused by this process's own lock
        with pytest.raises(files.OutputLocked):
            files.lock_output(args.out)
    finally:
        if common._run_lock is not None:
            common._run_lock.close()
            common._run_lock = None


def test_rank_agreement_goes_through_the_collective_device(tmp_path, monkeypatch):
    """Ranks learn rank 0's outcome from one all_reduce on comm_device() (NCCL takes CUDA tensors
    only): with 'meta' standing in for the collective device, the flag is handed over there. Then,
    told by the stand-in all_reduce that rank 0 failed, rank 1, which locks nothing itself, raises
    too, after tearing the process group down."""
    class HandedOver(Exception):
        pass

    seen, cleaned = [], []

    def all_reduce(t, *args, **kwargs):
        seen.append(t.device)
        if t.device.type == "meta":
            raise HandedOver
        t.fill_(1)  # rank 0 could not lock

    monkeypatch.setattr(common, "is_initialized", lambda: True)
    monkeypatch.setattr(common, "comm_device", lambda: torch.device("meta"))
    monkeypatch.setattr(common.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(common, "compute_cleanup", lambda: cleaned.append(True))
    with pytest.raises(HandedOver):
        common.lock_run_output(str(tmp_path), rank=1)
    assert seen == [torch.device("meta")]
    monkeypatch.setattr(common, "comm_device", lambda: torch.device("cpu"))
    with pytest.raises(files.OutputLocked, match="see rank 0"):
        common.lock_run_output(str(tmp_path), rank=1)
    assert cleaned == [True]
    assert not (tmp_path / ".lock").exists()  # only rank 0 touches the lock


# --------------------------------------------------------------------------------------------------
# teacher.py

class GatedHandler(ChatHandler):
    """The fake endpoint, answering only while chat.gate has permits."""

    def respond(self, chat, pid, prompt, body, fault):
        chat.gate.acquire(timeout=120)
        super().respond(chat, pid, prompt, body, fault)


@contextlib.contextmanager
def gated_chat(permits):
    """The fake endpoint giving `permits` answers, then holding every request until the test calls
    chat.gate.release(n)."""
    server = QuietServer(("127.0.0.1", 0), GatedHandler)
    server.chat = chat = FakeChat()
    chat.gate = threading.Semaphore(permits)
    chat.base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield chat
    finally:
        chat.gate.release(10_000)
        server.shutdown()
        server.server_close()
    assert chat.errors == []


def api(chat):
    # a long --timeout: requests wait at the gate for as long as the test needs
    return ["--api-base", chat.base, "--api-model", "teacher-x", "--timeout", 120,
            "--retry-base", 0.01, "--max-retries", 2, "--concurrency", 2, "--max-new-tokens", 8]


def start_sample(data, out, chat):
    return subprocess.Popen(sample_cmd(data, out, *api(chat)), cwd=ROOT, text=True,
                            env=env_with_key(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sample_second_writer_is_refused_and_the_first_finishes_alone(tmp_path):
    ids = [f"w{i:02d}" for i in range(10)]
    write_prompts(tmp_path / "in.jsonl", ids)
    out = tmp_path / "out.jsonl"
    with gated_chat(3) as chat:
        first = start_sample(tmp_path / "in.jsonl", out, chat)
        wait_for_lines(out, 3, first)  # 3 rows written, the rest waiting at the gate
        # the second talks to an open endpoint: were it let in, it would write the 7 other rows
        # at once, and the first would then append them again
        with serve_chat() as open_chat:
            second = run_sample(tmp_path / "in.jsonl", out, *api(open_chat))
        assert second.returncode == 2, describe(second)
        assert open_chat.requests == []
        assert error_line(second).startswith(
            f"error: {out} is being written by another run ({holder_of(first)}, started ")
        assert "teacher.py" in error_line(second) and "summary:" not in second.stdout
        assert first.poll() is None  # refused while the first held the file
        assert out.read_bytes().count(b"\n") == 3  # and it wrote nothing
        chat.gate.release(10_000)
        stdout, stderr = first.communicate(timeout=60)
    assert first.returncode == 0, stdout + stderr
    assert_each_once(read_rows(out), ids)


def test_sample_killed_mid_run_leaves_no_stale_lock(tmp_path):
    ids = [f"k{i:02d}" for i in range(10)]
    write_prompts(tmp_path / "in.jsonl", ids)
    out = tmp_path / "out.jsonl"
    with gated_chat(4) as chat:
        first = start_sample(tmp_path / "in.jsonl", out, chat)
        wait_for_lines(out, 4, first)
        kill9(first)
        assert holder_of(first) in (tmp_path / "out.jsonl.lock").read_text()
        chat.gate.release(10_000)
        rerun = run_sample(tmp_path / "in.jsonl", out, *api(chat))
    assert rerun.returncode == 0, describe(rerun)
    assert_each_once(read_rows(out), ids)
    s = summary(rerun)
    assert (s["already_done"], s["written"], s["failed"]) == (4, 6, 0)


# --------------------------------------------------------------------------------------------------
# a trainer's --out

def gad(out, *args):
    return [sys.executable, os.path.join(ROOT, "gad.py"), "--student", "tiny", "--out", str(out),
            *args]


def test_trainer_out_has_one_writer_and_survives_a_kill(tmp_path):
    out = tmp_path / "run"
    # far more warmup steps than the test lives: the run holds --out until it is killed
    first = subprocess.Popen(gad(out, "--warmup-steps", "100000"), cwd=ROOT, env=ENV, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_holder(out / ".lock", first)
    second = subprocess.run(gad(out, "--stop-after", "1"), cwd=ROOT, env=ENV, text=True,
                            capture_output=True, timeout=120)
    assert second.returncode == 2, describe(second)
    assert error_line(second).startswith(
        f"error: {out} is being written by another run ({holder_of(first)}, started ")
    assert "Traceback" not in second.stderr
    assert "student tiny:" not in second.stdout  # refused before loading anything
    assert first.poll() is None
    kill9(first)

    third = subprocess.Popen(gad(out, "--stop-after", "1"), cwd=ROOT, env=ENV, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = third.communicate(timeout=120)
    assert third.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "--stop-after 1: stopping" in stdout
    assert holder_of(third) in (out / ".lock").read_text()
    # the first may have died mid-way through sampling the teacher: its lock on that file went too,
    # and the third run completed it without duplicates
    teacher_ids = [r["id"] for r in read_rows(out / "teacher.jsonl")]
    assert len(teacher_ids) == len(set(teacher_ids)) == 160


def test_torchrun_second_run_exits_2_on_every_rank(tmp_path):
    """Rank 0 is refused; rank 1, which takes no lock, learns it from the collective: both exit 2
    (each rank's exit status is recorded by a wrapper before torchrun can stop it), the error is
    printed once, nothing hangs."""
    out = tmp_path / "run"
    out.mkdir()
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(textwrap.dedent(f"""
        import os, runpy, sys
        sys.path.insert(0, {ROOT!r})
        code = None
        try:
            runpy.run_path({os.path.join(ROOT, "gad.py")!r}, run_name="__main__")
        except SystemExit as e:
            code = e.code
            raise
        finally:
            open(os.path.join({str(tmp_path)!r}, "exit." + os.environ["RANK"]), "w").write(
                repr(code))
    """))
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    with files.lock_output(out):   # this process holds the run's folder
        # a slow monitor: torchrun must not stop one rank before it has exited on its own
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=2", "--monitor-interval=2", str(wrapper),
                               "--student", "tiny", "--out", str(out)],
                              cwd=ROOT, env=ENV, text=True, capture_output=True, timeout=120)
    assert proc.returncode != 0
    assert error_line(proc).startswith(f"error: {out} is being written by another run ({me}, ")
    codes = [(tmp_path / f"exit.{r}").read_text() if (tmp_path / f"exit.{r}").exists()
             else "not recorded" for r in (0, 1)]
    assert codes == ["2", "2"], describe(proc)
    assert not (out / "metrics.jsonl").exists()
