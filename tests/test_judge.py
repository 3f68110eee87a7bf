"""The LLM judge (judge.py, eval.py --judge) against a real HTTP server on 127.0.0.1: a stdlib
OpenAI-compatible endpoint whose replies are scripted by the answers it is shown."""

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import files
import judge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSWER = re.compile(r"\[The Start of Assistant (\w)'s Answer\]\n(.*?)\n\[The End of Assistant",
                    re.S)


class Judge:
    """A fake judge: reply(protocol, answers) -> the text it returns, where answers maps the
    assistant's label ('1', '2', 'A', 'B') to its answer. Requests are logged; `faults` is a list of
    HTTP codes answered (with Retry-After: 0) before the next real replies (not logged); `delay`
    slows each reply."""

    def __init__(self, reply, delay=0.0):
        self.reply, self.delay = reply, delay
        self.requests, self.faults, self.lock = [], [], threading.Lock()

    def handle(self, body):
        text = body["messages"][-1]["content"]
        answers = dict(ANSWER.findall(text))
        protocol = "score" if "1" in answers else "pairwise"
        with self.lock:
            if self.faults:
                return self.faults.pop(0), None
            self.requests.append((protocol, text, body["temperature"]))
        time.sleep(self.delay)
        return 200, self.reply(protocol, answers)


def serve(fake):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            code, text = fake.handle(body)
            reply = (json.dumps({"choices": [{"index": 0, "message": {"role": "assistant",
                                                                       "content": text}}]})
                     if code == 200 else json.dumps({"error": "slow down"}))
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            if code != 200:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(reply.encode())

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # a client killed mid-request (the kill test) breaks its pipe: expected

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture
def endpoint_for():
    servers = []

    def start(fake):
        server, url = serve(fake)
        servers.append(server)
        return url
    yield start
    for s in servers:
        s.shutdown()


def test_replies_parse_as_the_protocols_say():
    assert judge.parse_scores("7 9\nbecause...") == (7.0, 9.0)
    assert judge.parse_scores("\n**8, 10**\nwhy") == (8.0, 10.0)
    assert judge.parse_scores("Assistant 1: 7\nAssistant 2: 9") is None  # not the first line
    assert judge.parse_scores("11 3") is None and judge.parse_scores("7") is None
    assert judge.parse_verdict("A is fine... [[B]] no wait, final: [[A]]") == "A"
    assert judge.parse_verdict("both good") is None
    # the model's outcome depends on which side it was shown on
    assert judge.outcome("pairwise", "model_first", "A") == 1.0
    assert judge.outcome("pairwise", "reference_first", "A") == 0.0
    assert judge.outcome("pairwise", "reference_first", "C") == 0.5
    assert judge.outcome("score", "reference_first", (6.0, 9.0)) == [6.0, 9.0]
    assert judge.parse_spec("api:http://127.0.0.1:8080/v1:gpt-4o") == (
        "http://127.0.0.1:8080/v1", "gpt-4o")
    with pytest.raises(ValueError, match="api:URL:MODEL"):
        judge.parse_spec("http://x:1/v1")
    with pytest.raises(ValueError, match="--teacher 'api:x'"):   # gad.py's --teacher, same rule
        judge.parse_spec("api:x", "--teacher")


# Three model answers, each with a scripted fate:
#   "good": rated 9 against the reference's 6; preferred in pairwise whichever side it is on.
#   "meh":  first score reply unparseable, the retry says 5 vs 7; pairwise ties.
#   "junk": never gives parseable scores (invalid after 1 + 2 asks); pairwise always says [[B]].
SCRIPT_SCORES = {"good": ["6 9"], "meh": ["I'd say seven and five", "7 5"], "junk": ["no idea"] * 3}


def scripted(protocol, answers):
    if protocol == "score":
        model = answers["2"]
        return SCRIPT_SCORES[model].pop(0) + "\nexplanation"
    model_letter = "A" if answers["A"] != "REF" else "B"
    model = answers[model_letter]
    if model == "good":
        return f"The better one: [[{model_letter}]]"
    return "A tie: [[C]]" if model == "meh" else "Verdict: [[B]]"


def items():
    msgs = [{"role": "user", "content": "What is distillation?"}]
    return [(f"p{i}", msgs, "REF", answer) for i, answer in enumerate(["good", "meh", "junk"])]


def test_scores_win_rate_invalid_and_cache_match_a_hand_count(tmp_path, endpoint_for):
    fake = Judge(scripted)
    url = endpoint_for(fake)
    fake.faults = [429, 503]  # retried by the endpoint, invisible in the numbers
    ep = judge.teacher.Endpoint(url, "judge-m", retry_base=0.01)
    cache = str(tmp_path / "judge.jsonl")
    rows, counts = judge.run(ep, items(), judge.PROTOCOLS, cache, concurrency=2, retries=2)
    m = judge.aggregate(rows)
    # score: valid pairs (6, 9) and (7, 5); "junk" is invalid and left out of both means
    assert m["judge_score"] == pytest.approx(100 * (9 + 5) / (6 + 7))
    assert m["judge_rating"] == pytest.approx((9 + 5) / 2)
    # pairwise, model first / reference first: good 1, 1; meh 0.5, 0.5; junk ([[B]]) 0, 1
    assert m["judge_winrate"] == pytest.approx(100 * (1 + 1 + 0.5 + 0.5 + 0 + 1) / 6)
    assert m["judge_invalid"] == 1
    assert counts == {"asked": 9, "cached": 0, "failed": 0}
    assert fake.faults == []
    # good once, meh twice, junk three times; first asks greedy, retries at 0.7
    assert sorted(t for p, _, t in fake.requests if p == "score") == [0.0] * 3 + [0.7] * 3
    assert [t for p, _, t in fake.requests if p == "pairwise"] == [0.0] * 6
    answer_of = {judge.sha(a): a for *_, a in items()}
    by_answer = {answer_of[r["id"].split("|")[3]]: r for r in rows if r["protocol"] == "score"}
    assert by_answer["junk"]["valid"] is False and by_answer["junk"]["attempts"] == 3
    assert by_answer["meh"]["attempts"] == 2 and by_answer["meh"]["outcome"] == [7.0, 5.0]

    # a rerun asks nothing (the invalid judgement is recorded, not asked again) and agrees
    asked = len(fake.requests)
    rows2, counts2 = judge.run(ep, items(), judge.PROTOCOLS, cache, concurrency=2, retries=2)
    assert counts2 == {"asked": 0, "cached": 9, "failed": 0} and len(fake.requests) == asked
    assert judge.aggregate(rows2) == m
    # one writer per cache: while another run holds it, a judge run refuses and asks nothing
    with files.lock_output(cache):
        with pytest.raises(files.OutputLocked, match=str(os.getpid())):
            judge.run(ep, items(), judge.PROTOCOLS, cache)
    assert len(fake.requests) == asked
    # another judge model is another key: asked again
    other = judge.teacher.Endpoint(url, "judge-other", retry_base=0.01)
    SCRIPT_SCORES.update({"good": ["6 9"], "meh": ["7 5"], "junk": ["x"] * 3})
    _, counts3 = judge.run(other, items(), ("score",), cache, retries=2)
    assert counts3["asked"] == 3


def test_a_request_that_keeps_failing_is_counted_not_cached(tmp_path, endpoint_for):
    fake = Judge(lambda protocol, answers: "8 8")
    url = endpoint_for(fake)
    fake.faults = [503] * 3  # more than max_retries=1 allows: the first judgement fails
    ep = judge.teacher.Endpoint(url, "judge-m", max_retries=1, retry_base=0.01)
    cache = str(tmp_path / "judge.jsonl")
    rows, counts = judge.run(ep, items()[:2], ("score",), cache, concurrency=1)
    assert counts["failed"] == 1 and len(rows) == 1
    rows, counts = judge.run(ep, items()[:2], ("score",), cache, concurrency=1)
    assert counts == {"asked": 1, "cached": 1, "failed": 0} and len(rows) == 2
    assert judge.aggregate(rows)["judge_score"] == pytest.approx(100.0)


def write_records(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "messages": [{"role": "user",
                                                             "content": f"Question {i}?"}],
                                "teacher_response": f"Answer {i}."}) + "\n")


def eval_cmd(data, url, out, *extra):
    return [sys.executable, os.path.join(ROOT, "eval.py"), "--model", "tiny", "--data", data,
            "--split", "all", "--max-new-tokens", "4", "--out", out,
            "--judge", f"api:{url}:judge-m", "--judge-protocol", "pairwise", *extra]


def test_eval_cli_killed_mid_judging_resumes_without_asking_twice(tmp_path, endpoint_for):
    # pairwise verdict: always [[A]], so the model wins when shown first and loses when second:
    # a win rate of exactly 50 needs every judgement once, mapped to the right side
    fake = Judge(lambda protocol, answers: "[[A]]", delay=0.3)
    url = endpoint_for(fake)
    data, out = str(tmp_path / "d.jsonl"), str(tmp_path / "res.json")
    cache = str(tmp_path / "res.judge.jsonl")
    write_records(data, 6)
    env = {**os.environ, "OPENAI_API_KEY": "sk-test"}
    cmd = eval_cmd(data, url, out, "--judge-concurrency", "1")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (os.path.exists(cache) and len(open(cache).readlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    recorded, first = len(open(cache).readlines()), len(fake.requests)
    assert 3 <= recorded <= first < 12
    fake.delay = 0.0
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # the rerun asks exactly what was not recorded (a request in flight at the kill had no
    # answer written, so it is asked again; nothing recorded is)
    assert len(fake.requests) - first == 12 - recorded
    assert len({r[1] for r in fake.requests}) == 12  # 6 prompts x 2 orders, each judgement
    assert len(open(cache).readlines()) == 12
    assert json.load(open(out))["tiny"]["judge_winrate"] == pytest.approx(50.0)
    assert re.search(r"\| judge_winrate \| 50\.0000 \|", done.stdout)


TRAINERS = {  # the cheapest runs that end with a before/after table on 2 held-out prompts
    "gad": ["--limit", "40", "--warmup-steps", "1", "--gad-steps", "1", "--freeze-g-steps", "0"],
    "distillm2": ["--limit", "20", "--epochs", "1", "--prompts-per-step", "16"],
}


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_a_trainers_before_after_table_has_the_judges_rows(tmp_path, endpoint_for, capsys,
                                                           trainer):
    """--judge on a trainer: both columns of OUT/eval.json and of the printed table carry the
    judge's numbers, from judgements cached in OUT/judge.jsonl (score + both orders). gad.py and
    the white-box trainers (distillm2.py, amm.py: eval.white_box_final) build the table apart."""
    import importlib
    main = importlib.import_module(trainer).main

    # the scripted judge rates the reference 4 and the model 8, and always says [[A]]: the model
    # wins when shown first, loses when second (50 needs both orders, mapped to the right side)
    def reply(protocol, answers):
        return "4 8" if protocol == "score" else "[[A]]"
    url = endpoint_for(Judge(reply))
    out = tmp_path / trainer
    main(["--student", "tiny", *TRAINERS[trainer], "--eval-prompts", "2", "--out", str(out),
          "--judge", f"api:{url}:judge-m"])
    table = json.load(open(out / "eval.json"))
    cached = [json.loads(line) for line in open(out / "judge.jsonl")]
    assert {r["protocol"] for r in cached} == {"score", "pairwise"}
    for col in ("before", "after"):
        m = table[col]
        assert m["judge_score"] == pytest.approx(200.0) and m["judge_rating"] == 8.0
        assert m["judge_winrate"] == pytest.approx(50.0) and m["judge_invalid"] == 0
    assert "| judge_winrate | 50.0000 | 50.0000 |" in capsys.readouterr().out
