"""teacher.py run as a user runs it: a subprocess against a real chat-completions server on loopback
that injects faults on a fixed schedule (429, 5xx, a slow answer past --timeout, a dropped
connection), kill-and-resume with the tiny local model and with the endpoint, and bad input rows.
Every expected count below is derived from the schedule, so a retry that is miscounted, a row
written twice or a row lost shows up as a number that differs."""

import contextlib
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from scripts import sample_killed_after

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "teacher.py")

# client --timeout: generous for a loopback answer on a busy 2-core CI box (a few ms; kept under
# a second with a second suite beside it), short for the test; the slow answer is 3x past it
TIMEOUT_S = 1.0
SLOW_S = 3 * TIMEOUT_S  # a "slow" answer arrives well after the client gave up on it
SUMMARY_RE = re.compile(
    r"summary: written=(?P<written>\d+) already_done=(?P<already_done>\d+) "
    r"bad_skipped=(?P<bad_skipped>\d+) failed=(?P<failed>\d+) retries=(?P<retries>\d+) "
    r"\(http_429=(?P<http_429>\d+) http_5xx=(?P<http_5xx>\d+) timeout=(?P<timeout>\d+) "
    r"connection=(?P<connection>\d+)\) elapsed_s=(?P<elapsed_s>\d+(\.\d+)?) "
    r"rows_per_s=(?P<rows_per_s>\d+(\.\d+)?)"
)


# --------------------------------------------------------------------------------------------------
# a fake OpenAI-compatible endpoint

def prompt_for(pid):
    # The id is inside the text so the server can find its schedule and the test can tie a
    # response to its prompt.
    return f"[{pid}] write one sentence about {pid}"


def answer_for(prompt, k):
    """The k-th choice the server ever gave for this prompt: deterministic, distinct per choice."""
    return f"answer {k} to: {prompt}"


class FakeChat:
    """State shared by the handler threads: what to do with each prompt id, and a log of every
    request."""

    def __init__(self):
        self.lock = threading.Lock()
        self.faults = {}  # prompt id -> list of faults, one consumed per request, then it answers
        self.always = {}  # prompt id -> fault returned on every request (a persistent error)
        # prompt id -> at most this many choices per answer (the client must ask again)
        self.max_choices = {}
        self.delay_s = 0.0  # before every answer
        self.requests = []  # one dict per request, in arrival order
        self.served = {}  # prompt id -> choices delivered so far (numbers the answers)
        self.inflight = 0
        self.max_inflight = 0
        self.errors = []  # exceptions raised in the handler itself
        # requests whose client went away before sending all of it (killed mid-request)
        self.hangups = 0
        self.base = None  # http://127.0.0.1:PORT/v1, set by the fixture

    def for_pid(self, pid):
        return [r for r in self.requests if r["pid"] == pid]


class ChatHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet: pytest shows our own diagnostics on failure
        pass

    def do_POST(self):
        chat = self.server.chat
        body = self.read_body()
        # the client hung up mid-request (a test killed it): drop it, as real servers do
        if body is None:
            with chat.lock:
                chat.hangups += 1
            self.close_connection = True
            return
        prompt = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        pid = re.match(r"\[(\w+)\]", prompt).group(1)
        with chat.lock:
            queue = chat.faults.get(pid, [])
            fault = chat.always.get(pid) or (queue.pop(0) if queue else None)
            chat.requests.append({"path": self.path, "pid": pid, "body": body,
                                  "headers": dict(self.headers), "time": time.monotonic(),
                                  "fault": fault})
            chat.inflight += 1
            chat.max_inflight = max(chat.max_inflight, chat.inflight)
        self.open_request = True
        try:
            time.sleep(chat.delay_s)
            self.respond(chat, pid, prompt, body, fault)
        except OSError:
            pass  # the client hung up (after its timeout, or it was killed): nothing to answer
        finally:
            self.close_request()

    def close_request(self):
        """The request stops counting as in flight once its answer starts: the client may send
        its next request as soon as the answer arrives, before this handler thread returns (a
        busy machine once made that count 3 requests in flight at --concurrency 2)."""
        if getattr(self, "open_request", False):
            self.open_request = False
            with self.server.chat.lock:
                self.server.chat.inflight -= 1

    def read_body(self):
        """The request's JSON body, or None if the client went away before sending all of it:
        headers cut before Content-Length, a body shorter than Content-Length (empty included), or
        a reset. A SIGKILL mid-request leaves exactly these. A body of full length that is not JSON
        cannot come from a kill: json.loads raises, handle_error records it and the test fails (the
        client sent garbage, or this fake misread it)."""
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            return None
        try:
            raw = self.rfile.read(int(length))
        except OSError:
            return None
        if len(raw) < int(length):
            return None
        return json.loads(raw)

    def respond(self, chat, pid, prompt, body, fault):
        if fault == "drop":
            # Close without a status line: the client sees a reset / "closed without response".
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and fault != "slow":
            code, _, retry_after = fault.partition("+ra")  # "429+ra0" = 429 with Retry-After: 0
            self.send_json(int(code),
                           {"error": {"message": f"injected {fault}", "type": "injected"}},
                           {"Retry-After": retry_after} if retry_after else {})
            return
        if fault == "slow":
            # then answer a client that has gone; these choices never count as delivered
            time.sleep(SLOW_S)
        with chat.lock:
            k0 = chat.served.get(pid, 0)
            count = min(body.get("n", 1), chat.max_choices.get(pid, 10**9))
            if fault is None:
                chat.served[pid] = k0 + count
        choices = [{"index": i,
                    "message": {"role": "assistant", "content": answer_for(prompt, k0 + i)},
                    "finish_reason": "stop"} for i in range(count)]
        self.send_json(200, {"id": f"chatcmpl-{pid}-{k0}", "object": "chat.completion",
                             "created": 0, "model": body["model"], "choices": choices,
                             "usage": {"prompt_tokens": len(prompt.split()),
                                       "completion_tokens": 6 * count,
                                       "total_tokens": len(prompt.split()) + 6 * count}})

    def send_json(self, code, obj, headers=None):
        data = json.dumps(obj).encode()
        self.close_request()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # slow answers still sleeping at teardown must not block it

    def handle_error(self, request, client_address):
        # Hang-ups by clients that timed out are expected; anything else is a bug in this fake,
        # which would otherwise pass for a dropped connection, so the fixture fails the test on it.
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            self.chat.errors.append(repr(exc))


@contextlib.contextmanager
def serve_chat(check=True):
    """A fake endpoint on a free loopback port for the duration; with check, its own errors fail the
    test."""
    server = QuietServer(("127.0.0.1", 0), ChatHandler)
    server.chat = FakeChat()
    server.chat.base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server.chat
    finally:
        server.shutdown()
        server.server_close()
    if check:
        assert server.chat.errors == []


@pytest.fixture
def chat_server():
    with serve_chat() as chat:
        yield chat


# --------------------------------------------------------------------------------------------------
# helpers

def write_prompts(path, ids):
    """One messages-style row per id (a system turn on every third, so the client must send the
    whole list)."""
    rows = []
    for i, pid in enumerate(ids):
        messages = [{"role": "user", "content": prompt_for(pid)}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You are terse."})
        rows.append({"id": pid, "messages": messages})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {r["id"]: r["messages"] for r in rows}


def sample_cmd(data, out, *args):
    return [sys.executable, SAMPLE, "--data", str(data), "--out", str(out), *map(str, args)]


def api_args(chat, *extra, max_retries=4, concurrency=4):
    return ["--api-base", chat.base, "--api-model", "teacher-x", "--timeout", TIMEOUT_S,
            "--retry-base", 0.01, "--max-retries", max_retries, "--concurrency", concurrency,
            "--max-new-tokens", 32, *extra]


def env_with_key(key="sk-test-123"):
    env = dict(os.environ)
    env.pop("OPENAI_API_KEY", None)
    if key is not None:
        env["OPENAI_API_KEY"] = key
    return env


def run_sample(data, out, *args, env=None, timeout=60):
    return subprocess.run(sample_cmd(data, out, *args), cwd=ROOT, capture_output=True, text=True,
                          env=env if env is not None else env_with_key(), timeout=timeout)


def describe(proc):
    return (f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
            f"--- stderr\n{proc.stderr[-3000:]}")


def last_line(proc):
    lines = proc.stdout.strip().splitlines()
    return lines[-1].strip() if lines else ""


def summary(proc):
    """The counters of the last stdout line, which must be the summary. Its exact format is checked
    once, in test_api_faults_are_retried_and_counted, so a format slip fails one test, not every
    test."""
    m = SUMMARY_RE.match(last_line(proc))
    assert m, "last stdout line is not the summary\n" + describe(proc)
    return {k: float(v) if "." in v else int(v) for k, v in m.groupdict().items()}


def read_rows(path):
    """Every line of the output, each of which must be complete json ending in a newline."""
    text = path.read_bytes().decode("utf-8")
    assert text == "" or text.endswith("\n"), f"output ends with a torn line: {text[-200:]!r}"
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pytest.fail(f"output line {n} is not json: {line[:200]!r}")
    return rows


def complete_rows(path):
    """What a reader keeps of a killed run: the newline-terminated lines that parse (a torn tail is
    dropped)."""
    rows = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def ids_of(rows):
    return [r["id"] for r in rows]


def assert_each_once(rows, ids):
    got = ids_of(rows)
    assert sorted(got) == sorted(ids), (f"missing {set(ids) - set(got)}, "
                                        f"extra/duplicated {sorted(got)}")


# --------------------------------------------------------------------------------------------------
# the fake endpoint itself: a killed client's torn request is a hang-up, a bug of the fake is
# still an error

def raw_request(chat, head, body=b""):
    """Send bytes to the fake as a client killed mid-request would (or a whole request), then hang
    up."""
    port = int(chat.base.split(":")[-1].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head + body)
        s.shutdown(socket.SHUT_WR)
        return s.recv(65536)  # the status line if the fake answered, b"" if it dropped the request


def post_head(length):
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_fake_endpoint_drops_torn_requests_but_reports_its_own_bugs():
    body = json.dumps({"model": "m", "n": 1,
                       "messages": [{"role": "user", "content": prompt_for("t0")}]}).encode()
    with serve_chat(check=False) as chat:
        # killed after the headers, mid-body, and mid-headers (no Content-Length yet): three
        # hang-ups, no error
        assert raw_request(chat, post_head(len(body))) == b""
        assert raw_request(chat, post_head(len(body)), body[:len(body) // 2]) == b""
        assert raw_request(chat, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n") == b""
        # a whole request is answered ...
        assert raw_request(chat, post_head(len(body)), body).startswith(b"HTTP/1.0 200")
        # ... and whole requests the fake cannot handle are its bugs (or the client's), never taken
        # for a hang-up
        raw_request(chat, post_head(9), b"not json!")
        raw_request(chat, post_head(2), b"{}")
    assert chat.hangups == 3
    assert [r["pid"] for r in chat.requests] == ["t0"]
    assert (len(chat.errors) == 2 and "JSONDecodeError" in chat.errors[0]
            and "KeyError" in chat.errors[1])


# --------------------------------------------------------------------------------------------------
# endpoint: retries, counters, request format

def test_api_faults_are_retried_and_counted(tmp_path, chat_server):
    ids = [f"p{i}" for i in range(12)]
    prompts = write_prompts(tmp_path / "in.jsonl", ids)
    # Each fault is consumed by one request, so every fault is exactly one retry of its kind. p7
    # takes --max-retries (4) faults of all four kinds and must still succeed on its 5th attempt.
    chat_server.faults = {
        "p0": ["429"],
        "p1": ["429+ra0", "429"],
        "p2": ["500"],
        "p3": ["503", "500"],
        "p4": ["slow"],
        "p5": ["drop"],
        "p6": ["502", "drop"],
        "p7": ["drop", "slow", "503", "429"],
        "p8": ["429+ra1"],
    }
    # the server consumes the lists
    n_faults = {pid: len(f) for pid, f in chat_server.faults.items()}
    expected = {"http_429": 5, "http_5xx": 5, "timeout": 2, "connection": 3}
    out = tmp_path / "out.jsonl"
    proc = run_sample(tmp_path / "in.jsonl", out,
                      *api_args(chat_server, "--temperature", 0.7, "--top-p", 0.9))
    assert proc.returncode == 0, describe(proc)

    rows = read_rows(out)
    assert_each_once(rows, ids)
    for row in rows:
        assert row["messages"] == prompts[row["id"]]
        assert row["teacher_response"] == answer_for(prompt_for(row["id"]), 0)
        assert "teacher_responses" not in row  # only when n > 1

    s = summary(proc)
    assert {k: s[k] for k in expected} == expected, proc.stdout
    assert s["retries"] == sum(expected.values())
    assert (s["written"], s["already_done"], s["bad_skipped"], s["failed"]) == (12, 0, 0, 0)
    # One request per row plus one per retry: nothing was asked again after it succeeded.
    assert ({pid: len(chat_server.for_pid(pid)) for pid in ids}
            == {pid: 1 + n_faults.get(pid, 0) for pid in ids})

    # The request format of the contract, on every request.
    for r in chat_server.requests:
        assert r["path"] == "/v1/chat/completions"
        assert r["headers"].get("Authorization") == "Bearer sk-test-123"
        assert r["body"]["model"] == "teacher-x"
        assert r["body"]["messages"] == prompts[r["pid"]]
        assert r["body"]["max_tokens"] == 32
        assert r["body"]["temperature"] == pytest.approx(0.7)
        assert r["body"]["top_p"] == pytest.approx(0.9)
        assert r["body"]["n"] == 1

    # Retry-After: 1 is honoured even though --retry-base asks for 0.01 s. A lower bound on a
    # wait: load only lengthens it.
    first, second = chat_server.for_pid("p8")
    assert second["time"] - first["time"] >= 0.9

    # Exactly the documented line, nothing before or after on it: scripts parse it.
    assert SUMMARY_RE.fullmatch(last_line(proc)), last_line(proc)


def test_api_n3_asks_again_for_missing_choices(tmp_path, chat_server):
    ids = [f"q{i}" for i in range(6)]
    prompts = write_prompts(tmp_path / "in.jsonl", ids)
    # answers with fewer than n choices: ask for the rest
    chat_server.max_choices = {"q0": 2, "q3": 1}
    chat_server.delay_s = 0.1  # so that two workers are in flight together
    out = tmp_path / "out.jsonl"
    proc = run_sample(tmp_path / "in.jsonl", out, "--n", 3, *api_args(chat_server, concurrency=2),
                      env=env_with_key(None))
    assert proc.returncode == 0, describe(proc)

    rows = read_rows(out)
    assert_each_once(rows, ids)
    for row in rows:
        expected = [answer_for(prompt_for(row["id"]), k) for k in range(3)]
        assert row["messages"] == prompts[row["id"]]
        # 3 distinct server choices, none lost or repeated
        assert sorted(row["teacher_responses"]) == expected
        assert row["teacher_response"] in row["teacher_responses"]

    s = summary(proc)
    assert (s["written"], s["failed"], s["retries"]) == (6, 0, 0)  # a short answer is not a fault
    # Rows answered in full take one request with n=3; q0 (2 per answer) then asks for 1, q3 (1 per
    # answer) for 2, 1.
    asked = {pid: [r["body"]["n"] for r in chat_server.for_pid(pid)] for pid in ids}
    assert asked == {"q0": [3, 1], "q1": [3], "q2": [3], "q3": [3, 2, 1], "q4": [3], "q5": [3]}
    # No OPENAI_API_KEY in the environment: no Authorization header at all (not "Bearer None").
    assert all("Authorization" not in r["headers"] for r in chat_server.requests)
    assert chat_server.max_inflight == 2  # bounded by --concurrency, and actually concurrent


def test_api_row_past_max_retries_fails_then_rerun_completes(tmp_path, chat_server):
    ids = [f"r{i}" for i in range(8)]
    write_prompts(tmp_path / "in.jsonl", ids)
    # r2 fails forever; r5 needs exactly --max-retries (2) retries, the most that still succeeds.
    chat_server.always = {"r2": "500"}
    chat_server.faults = {"r5": ["429", "503"]}
    out = tmp_path / "out.jsonl"
    args = api_args(chat_server, max_retries=2)
    proc = run_sample(tmp_path / "in.jsonl", out, *args)
    assert proc.returncode == 1, describe(proc)
    rows = read_rows(out)
    assert_each_once(rows, [i for i in ids if i != "r2"])
    # the first try and --max-retries retries, then it gives up
    assert len(chat_server.for_pid("r2")) == 3
    s = summary(proc)
    assert (s["written"], s["failed"]) == (7, 1)
    assert ((s["retries"], s["http_429"], s["http_5xx"], s["timeout"], s["connection"])
            == (4, 1, 3, 0, 0))

    chat_server.always = {}  # the endpoint recovers; the same command picks up the failed row
    before = len(chat_server.requests)
    proc = run_sample(tmp_path / "in.jsonl", out, *args)
    assert proc.returncode == 0, describe(proc)
    rows = read_rows(out)
    assert_each_once(rows, ids)
    # done rows are not asked again
    assert [r["pid"] for r in chat_server.requests[before:]] == ["r2"]
    assert rows[-1]["id"] == "r2"  # appended after the rows already there
    assert rows[-1]["teacher_response"] == answer_for(prompt_for("r2"), 0)
    s = summary(proc)
    assert (s["written"], s["already_done"], s["failed"], s["retries"]) == (1, 7, 0, 0)


def test_api_non_retryable_errors_fail_only_their_row(tmp_path, chat_server):
    ids = [f"s{i}" for i in range(6)]
    write_prompts(tmp_path / "in.jsonl", ids)
    chat_server.always = {"s1": "400", "s4": "401"}
    out = tmp_path / "out.jsonl"
    proc = run_sample(tmp_path / "in.jsonl", out, *api_args(chat_server))
    assert proc.returncode == 1, describe(proc)
    assert_each_once(read_rows(out), ["s0", "s2", "s3", "s5"])
    # Not retried: a 400 or 401 will not change on its own.
    assert len(chat_server.for_pid("s1")) == 1 and len(chat_server.for_pid("s4")) == 1
    s = summary(proc)
    assert (s["written"], s["failed"], s["retries"]) == (4, 2, 0)


# --------------------------------------------------------------------------------------------------
# kill and resume

def test_local_kill_and_resume(tmp_path):
    ids = [f"k{i:02d}" for i in range(36)]
    prompts = write_prompts(tmp_path / "in.jsonl", ids)
    out = tmp_path / "out.jsonl"
    args = ["--model", "tiny", "--batch-size", 4, "--max-new-tokens", 8, "--seed", 0]
    # One torch thread: on a busy 2-core box more threads made this run 3x slower, not faster.
    env = dict(env_with_key(None), OMP_NUM_THREADS="1")
    # killed (SIGKILL) as it writes the 6th row: mid-batch, whatever the machine's speed
    killed = subprocess.run(sample_killed_after(5, sample_cmd(tmp_path / "in.jsonl", out, *args)),
                            cwd=ROOT, text=True, env=env, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, describe(killed)
    survived = complete_rows(out)
    assert len(survived) == 5
    done = set(ids_of(survived))
    # A crash in the middle of a write: half a row of the next id, no newline.
    torn_id = next(i for i in ids if i not in done)
    with open(out, "ab") as f:
        f.write(json.dumps({"id": torn_id, "messages": prompts[torn_id]}).encode()[:25])

    proc = run_sample(tmp_path / "in.jsonl", out, *args, env=env)
    assert proc.returncode == 0, describe(proc)
    rows = read_rows(out)  # every line is valid json, the torn tail is gone
    assert_each_once(rows, ids)
    assert rows[:len(survived)] == survived  # the rows from before the kill are kept as they were
    for row in rows:
        assert row["messages"] == prompts[row["id"]]
        assert isinstance(row["teacher_response"], str)
    s = summary(proc)
    assert ((s["already_done"], s["written"], s["failed"])
            == (len(survived), len(ids) - len(survived), 0))


def test_api_kill_and_resume(tmp_path, chat_server):
    ids = [f"a{i:02d}" for i in range(20)]
    prompts = write_prompts(tmp_path / "in.jsonl", ids)
    out = tmp_path / "out.jsonl"
    args = api_args(chat_server, concurrency=2)
    # killed as it writes the 4th row, 2 requests possibly in flight
    killed = subprocess.run(sample_killed_after(3, sample_cmd(tmp_path / "in.jsonl", out, *args)),
                            cwd=ROOT, text=True, env=env_with_key(), capture_output=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, describe(killed)
    survived = complete_rows(out)
    assert len(survived) == 3
    done = set(ids_of(survived))
    # The worst torn tail: a whole, valid row without its newline. Its write did not finish, so it
    # is not done.
    torn_id = next(i for i in ids if i not in done)
    with open(out, "ab") as f:
        f.write(json.dumps({"id": torn_id, "messages": prompts[torn_id],
                            "teacher_response": "TORN"}).encode())

    # The rerun talks to a fresh endpoint: a request the killed run had sent may still be on its
    # way into the first one's log, and must not be counted as the rerun's.
    with serve_chat() as rerun_server:
        proc = run_sample(tmp_path / "in.jsonl", out, *api_args(rerun_server, concurrency=2))
    assert proc.returncode == 0, describe(proc)
    rows = read_rows(out)
    assert_each_once(rows, ids)
    assert rows[:len(survived)] == survived
    for row in rows:
        # Any choice number: rows in flight at the kill were answered but never written, and are
        # asked again.
        assert re.fullmatch(r"answer \d+ to: " + re.escape(prompt_for(row["id"])),
                            row["teacher_response"])
    assert torn_id in ids_of(rows[len(survived):])  # the torn "TORN" row was cut and redone
    # The rerun asks once for each row that was not complete, and never for one that was.
    asked = [r["pid"] for r in rerun_server.requests]
    assert sorted(asked) == sorted(set(ids) - done)
    s = summary(proc)
    assert ((s["already_done"], s["written"], s["failed"])
            == (len(survived), len(ids) - len(survived), 0))


# --------------------------------------------------------------------------------------------------
# bad input rows

def write_bad_rows(path):
    """Good and bad rows mixed; returns (good ids, {line number: field the error should name})."""
    good = lambda pid: json.dumps({"id": pid,
                                   "messages": [{"role": "user", "content": prompt_for(pid)}]})
    lines = [
        good("g1"),
        json.dumps({"id": "g2", "prompt": prompt_for("g2")}),
        json.dumps({"id": "b3", "messages": [{"role": "user", "content": 5}]}),  # content an int
        '{"id": "b4", "messages": [{"role": "user", "content": "x"}',  # invalid json
        good("g5"),
        json.dumps({"id": "b6"}),  # no prompt
        json.dumps({"id": "b7", "prompt": ""}),  # empty prompt
        json.dumps({"id": "b8", "messages": [{"role": "wizard", "content": "hi"}]}),  # unknown role
        None,  # non-UTF-8 bytes, written raw below
        json.dumps({"id": "b10", "messages": "hello"}),  # messages a string
        good("g11"),
    ]
    data = b"".join((line.encode() if line is not None
                     else b'{"id": "b9", "prompt": "caf\xe9 au lait"}') + b"\n"
                    for line in lines)
    path.write_bytes(data)
    return ["g1", "g2", "g5", "g11"], [3, 4, 6, 7, 8, 9, 10]


def test_bad_row_stops_the_run_with_its_location(tmp_path, chat_server):
    data = tmp_path / "bad.jsonl"
    good_ids, bad_lines = write_bad_rows(data)
    out = tmp_path / "out.jsonl"
    proc = run_sample(data, out, *api_args(chat_server))
    assert proc.returncode == 2, describe(proc)
    # The DataError text: file, first bad line, and the field at fault (the content of message 0).
    m = re.search(re.escape(str(data)) + r", line (\d+), field '([^']*)': (.+)", proc.stderr)
    assert m, describe(proc)
    assert int(m.group(1)) == bad_lines[0]
    assert "content" in m.group(2)
    # Nothing after the bad row is written.
    written = set(ids_of(read_rows(out))) if out.exists() else set()
    assert written <= {"g1", "g2"}


def test_skip_bad_reports_each_row_and_writes_the_good_ones(tmp_path, chat_server):
    data = tmp_path / "bad.jsonl"
    good_ids, bad_lines = write_bad_rows(data)
    out = tmp_path / "out.jsonl"
    proc = run_sample(data, out, "--skip-bad", *api_args(chat_server))
    assert proc.returncode == 0, describe(proc)
    reported = [int(n) for n in re.findall(r"skipped bad row: " + re.escape(str(data))
                                           + r", line (\d+), field '", proc.stderr)]
    assert reported == bad_lines, describe(proc)
    rows = read_rows(out)
    assert_each_once(rows, good_ids)
    by_id = {r["id"]: r for r in rows}
    # the prompt form
    assert by_id["g2"]["messages"] == [{"role": "user", "content": prompt_for("g2")}]
    for pid in good_ids:
        assert by_id[pid]["teacher_response"] == answer_for(prompt_for(pid), 0)
    s = summary(proc)
    assert (s["written"], s["bad_skipped"], s["failed"]) == (len(good_ids), len(bad_lines), 0)


# --------------------------------------------------------------------------------------------------
# under torchrun (gad.py's teacher): each rank samples its share

PROBE = """
import os, sys
sys.path.insert(0, {root!r})
import common, data, teacher
common.compute_init()
if os.environ.get("DIE_AFTER") and common.get_rank() == 1:   # a kill -9 of rank 1 mid-run
    write, left = teacher.RowWriter.write, [int(os.environ["DIE_AFTER"])]
    def dying(self, row):
        if not left[0]:
            self.f.write('{{"id": "' + str(row["id"]) + '", "mess')   # and a torn line
            self.f.flush()
            os._exit(9)
        left[0] -= 1
        write(self, row)
    teacher.RowWriter.write = dying
stats = teacher.sample_records(data.tiny_prompts(30, seed=0), teacher.settings(**{cfg}))
print(f"rank {{common.get_rank()}} wrote {{stats['written']}}", flush=True)
common.compute_cleanup()
"""
PROBE_SETTINGS = dict(model="tiny-teacher", batch_size=3, max_new_tokens=6, temperature=1.0,
                      top_p=1.0, seed=0)


def test_ranks_sample_their_share_into_one_file_and_a_killed_run_resumes(tmp_path):
    """Fault 4 (issue 22): gad.py's teacher was sampled by rank 0 alone while the other ranks
    waited at a barrier (thousands of prompts outlast its timeout). Two gloo ranks now sample every
    other generate() call each: the file equals one process's, row for row. Rank 1 killed after 3
    rows (rank 0 then stopped by torchrun) and the run redone by one process: every id once."""
    import torch

    import data
    import teacher

    def probe(name, **env):   # two gloo ranks
        script, out = tmp_path / f"{name}.py", tmp_path / f"{name}.jsonl"
        cfg = dict(PROBE_SETTINGS, out=str(out))
        script.write_text(PROBE.format(root=ROOT, cfg=cfg))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(script)]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env}), out

    def one_process(out):   # in this process, on one thread as the ranks are
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return teacher.sample_records(data.tiny_prompts(30, seed=0),
                                         teacher.settings(**PROBE_SETTINGS, out=str(out)))
        finally:
            torch.set_num_threads(threads)

    ids = [r["id"] for r in data.tiny_prompts(30, seed=0)]
    one_out = tmp_path / "one.jsonl"
    one_process(one_out)
    two, two_out = probe("two")
    assert two.returncode == 0, two.stderr[-3000:]
    # both ranks print to one pipe, unbuffered where PYTHONUNBUFFERED is set: their text and
    # newlines can interleave, so the counts are found anywhere in it, not a line each
    shares = sorted(int(n) for n in re.findall(r"rank \d wrote (\d+)", two.stdout))
    assert sum(shares) == 30 and shares[0] >= 12, shares          # 10 calls of 3, 5 each
    by_id = lambda rows: {r["id"]: r for r in rows}
    assert by_id(read_rows(two_out)) == by_id(read_rows(one_out))
    assert_each_once(read_rows(two_out), ids)
    assert not list(tmp_path.glob("two.jsonl.rank[0-9]"))          # the parts were merged

    killed, out = probe("cut", DIE_AFTER="3")
    assert killed.returncode != 0
    assert len(complete_rows(tmp_path / "cut.jsonl.rank1")) == 3   # and its torn 4th row
    redo = one_process(out)
    rows = read_rows(out)                                          # no torn line left
    assert_each_once(rows, ids)
    assert not list(tmp_path.glob("cut.jsonl.rank[0-9]"))
    # what the killed ranks wrote was kept, not sampled again
    assert redo["already_done"] >= 3 and redo["written"] == 30 - redo["already_done"]
