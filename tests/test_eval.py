"""eval.py: the text metrics against brute force, the NLLs and discriminator metrics against
independent unbatched forward passes on a tiny model, and the CLI as a subprocess on tiny
checkpoints saved to disk."""

import itertools
import json
import os
import random
import subprocess
import sys

import pytest
import torch

import common
import data as data_lib
import discriminator
import eval as ev
import models
import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD = 256


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP threads spinning on a busy machine
    make each matmul milliseconds instead of microseconds. Restored afterwards for the other test
    files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# text metrics

def brute_lcs(a, b):
    """The longest subsequence of the shorter list that is also a subsequence of the other, by
    trying them all."""
    if len(a) > len(b):
        a, b = b, a

    def is_subsequence(sub, seq):
        it = iter(seq)
        return all(tok in it for tok in sub)

    for k in range(len(a), 0, -1):
        if any(is_subsequence(sub, b) for sub in itertools.combinations(a, k)):
            return k
    return 0


def table_lcs(a, b):
    """The textbook O(m n) DP table."""
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            t[i + 1][j + 1] = t[i][j] + 1 if a[i] == b[j] else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


def test_rouge_l_hand_worked():
    # LCS "the cat on the mat" = 5 of 6 words on both sides: P = R = F = 5/6
    assert ev.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS 3: precision 3/3, recall 3/6, F1 = 2 * 1 * 0.5 / 1.5
    assert ev.rouge_l("a b c", "a x b y c z") == pytest.approx(2 / 3)
    assert ev.rouge_l("x y", "a b") == 0.0


def test_rouge_l_tokenizer_as_rouge_score():
    assert ev.rouge_l("The cat!", "the CAT") == 1.0
    assert ev.words("Don't stop -- it's 3.14, OK?") == [
        "don", "t", "stop", "it", "s", "3", "14", "ok"]
    # non-ASCII letters are separators, as in rouge-score
    assert ev.words("café naïve") == ["caf", "na", "ve"]
    assert ev.rouge_l("日本語", "日本語") == 0.0  # no [a-z0-9] tokens at all
    for empty in ["", "   ", "!!! ..."]:
        assert ev.rouge_l(empty, "the cat") == 0.0
        assert ev.rouge_l("the cat", empty) == 0.0


def test_lcs_against_brute_force_and_dp():
    rng = random.Random(0)
    for _ in range(300):  # short: every subsequence can be tried
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 8))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 8))]
        assert ev.lcs_length(a, b) == brute_lcs(a, b), (a, b)
    for _ in range(100):  # long: past 64 bits, so the big-int arithmetic is exercised
        a = [rng.choice("abcdefg") for _ in range(rng.randint(1, 150))]
        b = [rng.choice("abcdefg") for _ in range(rng.randint(1, 150))]
        assert ev.lcs_length(a, b) == table_lcs(a, b)


def test_rouge_l_f1_properties():
    rng = random.Random(1)
    vocab = ["the", "cat", "Dog", "sat", "on", "mat", "a", "ran"]
    for _ in range(200):
        p = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12)))
        r = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12)))
        f = ev.rouge_l(p, r)
        assert 0.0 < f <= 1.0 or table_lcs(ev.words(p), ev.words(r)) == 0
        assert f == pytest.approx(ev.rouge_l(r, p))  # F1 is symmetric in prediction and reference
        lcs = table_lcs(ev.words(p), ev.words(r))
        if lcs:
            prec, rec = lcs / len(ev.words(p)), lcs / len(ev.words(r))
            assert f == pytest.approx(2 * prec * rec / (prec + rec))
        assert ev.rouge_l(p, p.upper() + "!") == 1.0


def test_distinct_n():
    assert ev.distinct_n(["a b c", "a b"]) == pytest.approx(2 / 3)  # (a b), (b c), (a b)
    assert ev.distinct_n(["a b", "c d"]) == 1.0  # no "b c": n-grams never cross texts
    assert ev.distinct_n(["A a, a!"], n=1) == pytest.approx(1 / 3)
    assert ev.distinct_n(["the cat the cat the cat"], n=2) == pytest.approx(2 / 5)
    assert ev.distinct_n(["one", ""]) == 0.0
    assert ev.distinct_n([]) == 0.0


def test_format_table():
    rows = {"before": {"rouge_l": 0.123456, "num_prompts": 3, "samples": ["x"]},
            "after": {"rouge_l": 0.5, "teacher_nll": 2.0, "num_prompts": 3, "samples": ["y"]}}
    lines = ev.format_table(rows).splitlines()
    assert lines[0] == "| metric | before | after |"
    assert lines[1] == "|---|---:|---:|"
    assert lines[2:] == ["| rouge_l | 0.1235 | 0.5000 |", "| num_prompts | 3 | 3 |",
                         "| teacher_nll | - | 2.0000 |"]
    assert ev.format_table(rows, keys=["teacher_nll"]).splitlines()[2:] == [
        "| teacher_nll | - | 2.0000 |"]


# --------------------------------------------------------------------------------------------------
# model metrics on a tiny model

@pytest.fixture(scope="module")
def tiny():
    model = models.tiny_model(seed=0).eval()
    tok = models.tiny_tokenizer()
    records = [
        {"id": "a", "messages": [{"role": "user", "content": "hi"}], "teacher_response": "ok"},
        {"id": "b", "messages": [{"role": "system", "content": "be brief"},
                                 {"role": "user",
                                  "content": "a longer prompt, so batches need left padding"}],
         "teacher_response": "a long teacher answer that is longer than any sample"},
        {"id": "c", "messages": [{"role": "user", "content": "no reference"}],
         "teacher_response": None},
        {"id": "d", "messages": [{"role": "user", "content": "third"}], "teacher_response": "yes"},
    ]
    return model, tok, records


def unbatched_nll_sum(model, prompt, response):
    """-sum log p(response | prompt) from one unpadded forward pass: no padding, no position ids, no
    batching."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()  # [T, V]
    return -torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).sum().item()


def greedy_unbatched(model, tok, prompt, max_new_tokens):
    """HF generate on one unpadded prompt, cut after the first stop token (kept, as the response
    mask keeps it)."""
    stops = sample.stop_ids(tok)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stops, pad_token_id=PAD)[0, len(prompt):].tolist()
    for i, t in enumerate(out):
        if t in stops:
            return out[:i + 1]
    return out


def test_response_nll_equals_unbatched(tiny):
    model, tok, _ = tiny
    prompts = [tok.encode(s, add_special_tokens=False)
               for s in ["x", "a much longer prompt here", "mid size", "q"]]
    responses = [tok.encode(s, add_special_tokens=False)
                 for s in ["short", "a somewhat longer response", "", "r"]]
    responses[0].append(258)  # an end-of-turn token inside the scored tokens
    total = sum(unbatched_nll_sum(model, p, r) for p, r in zip(prompts, responses) if r)
    count = sum(len(r) for r in responses)
    for batch_size in (1, 2, 8):
        nll, n = ev.response_nll(model, prompts, responses, batch_size=batch_size)
        assert n == count
        assert nll == pytest.approx(total / count, rel=1e-5)
    assert ev.response_nll(model, prompts[:1], [[]])[1] == 0


def test_evaluate_teacher_nll_and_samples(tiny):
    model, tok, records = tiny
    # the same weights: teacher_nll is the student's NLL of its samples
    teacher = models.tiny_model(seed=0).eval()
    m = ev.evaluate(model, tok, records, teacher=teacher, max_new_tokens=12, batch_size=3)
    prompts = [data_lib.encode_prompt(tok, r["messages"]) for r in records]
    greedy = [greedy_unbatched(model, tok, p, 12) for p in prompts]
    # exact: greedy on the same weights; another batch layout changes the logits' last bits only,
    # which can flip a token only at a near tie of the top two (~1e-7 apart)
    assert m["samples"] == [tok.decode(g, skip_special_tokens=True) for g in greedy]
    assert m["length"] == pytest.approx(sum(map(len, greedy)) / len(greedy))
    want = (sum(unbatched_nll_sum(model, p, g) for p, g in zip(prompts, greedy))
            / sum(map(len, greedy)))
    assert m["teacher_nll"] == pytest.approx(want, rel=1e-5)

    refs = [(p, r["teacher_response"]) for p, r in zip(prompts, records) if r["teacher_response"]]
    ref_ids = [data_lib.encode_response(tok, text)[0] for _, text in refs]
    assert all(ids[-1] == data_lib.end_of_turn_id(tok) for ids in ref_ids)
    want = (sum(unbatched_nll_sum(model, p, r) for (p, _), r in zip(refs, ref_ids))
            / sum(map(len, ref_ids)))
    assert m["student_nll"] == pytest.approx(want, rel=1e-5)
    want = [ev.rouge_l(s, r["teacher_response"])
            for s, r in zip(m["samples"], records) if r["teacher_response"]]
    assert m["rouge_l"] == pytest.approx(sum(want) / len(want))
    assert m["num_prompts"] == 4 and "disc_score" not in m

    # deterministic
    assert ev.evaluate(model, tok, records, teacher=teacher, max_new_tokens=12, batch_size=3) == m
    other = ev.evaluate(model, tok, records, teacher=teacher, max_new_tokens=12, batch_size=2)
    # another batching: the same samples (exact, as above), the NLLs up to float noise
    assert other["samples"] == m["samples"]
    assert other["teacher_nll"] == pytest.approx(m["teacher_nll"], rel=1e-5)


def test_evaluate_discriminator_metrics(tiny):
    model, tok, records = tiny
    calls = []

    def length_score(prompt_ids, prompt_mask, response_ids, response_mask):
        # the layout generate() returns: every prompt ends at the last prompt column, responses are
        # a mask prefix
        assert prompt_mask[:, -1].all()
        lengths = response_mask.sum(-1)
        assert torch.equal(response_mask,
                           (torch.arange(response_mask.shape[1]) < lengths[:, None]).long())
        calls.append(len(lengths))
        return lengths.float()

    m = ev.evaluate(model, tok, records, score_fn=length_score, max_new_tokens=8, batch_size=3)
    prompts = [data_lib.encode_prompt(tok, r["messages"]) for r in records]
    sample_len = [len(greedy_unbatched(model, tok, p, 8)) for p in prompts]
    teacher_len = {i: len(data_lib.encode_response(tok, r["teacher_response"])[0])
                   for i, r in enumerate(records) if r["teacher_response"]}
    assert m["disc_score"] == pytest.approx(sum(sample_len) / 4)
    assert m["disc_score_teacher"] == pytest.approx(sum(teacher_len.values()) / 3)
    wins = [teacher_len[i] > sample_len[i] for i in teacher_len]
    assert m["disc_acc"] == pytest.approx(sum(wins) / 3)
    assert 0 < sum(wins) < 3, "the crafted records should give both outcomes"
    assert sum(calls) == 4 + 3  # every sample once, every teacher response once


def test_metrics_without_references_are_left_out(tiny):
    model, tok, records = tiny
    m = ev.evaluate(model, tok, [records[2]], score_fn=lambda *a: torch.zeros(a[0].shape[0]),
                    max_new_tokens=4)
    assert ("rouge_l" not in m and "student_nll" not in m and "disc_acc" not in m
            and "disc_score_teacher" not in m)
    assert m["disc_score"] == 0.0 and m["num_prompts"] == 1


def test_long_prompts_skipped_and_training_mode_restored(tiny):
    model, tok, records = tiny
    limit = max(len(data_lib.encode_prompt(tok, r["messages"]))
                for r in records if r["id"] != "b")  # b is longer
    model.train()
    try:
        m = ev.evaluate(model, tok, records, max_new_tokens=2, max_prompt_len=limit)
        assert model.training
    finally:
        model.eval()
    assert m["num_prompts"] == 3 and len(m["samples"]) == 3


def test_discriminator_score_reads_the_last_response_token(tiny):
    """The padded, batched score equals HF's own forward on one unpadded sequence (which, without
    pad tokens in it, pools at the last token), including a response that ends in the pad id
    itself."""
    from transformers import AutoModelForSequenceClassification

    cfg = models.tiny_config()
    cfg.num_labels = 1
    torch.manual_seed(0)
    d = AutoModelForSequenceClassification.from_config(cfg).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    responses = [[11, 12, 258], [13], [14, 15, 16, 17, PAD]]
    batch = sample.pack(prompts, responses, pad_id=PAD)
    with torch.no_grad():
        got = discriminator.score(d, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                  batch.response_mask)
        d.config.pad_token_id = None  # HF would otherwise skip back over the trailing PAD of row 2
        want = torch.stack([d(input_ids=torch.tensor([p + r])).logits[0, 0]
                            for p, r in zip(prompts, responses)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# CLI

def test_cli_end_to_end(tmp_path):
    from transformers import AutoModelForSequenceClassification

    tok = models.tiny_tokenizer()
    for name, seed in [("student", 0), ("before", 1)]:
        models.tiny_model(seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    cfg = models.tiny_config()
    cfg.num_labels, cfg.pad_token_id = 1, PAD
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "disc")
    with open(tmp_path / "data.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({
                "id": str(i), "messages": [{"role": "user", "content": f"question {i}?" * (i + 1)}],
                "teacher_response": f"the answer is {i}"}) + "\n")
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--model", str(tmp_path / "student"),
           "--compare", str(tmp_path / "before"), "--teacher", str(tmp_path / "student"),
           "--discriminator", str(tmp_path / "disc"), "--data", str(tmp_path / "data.jsonl"),
           "--split", "all", "--max-new-tokens", "6", "--batch-size", "4",
           "--out", str(tmp_path / "metrics.json")]
    # one thread: a tiny model gains nothing from more, and OpenMP threads spinning against a busy
    # machine are slow
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in r.stdout.splitlines() if line.startswith("| ")}
    assert table["metric"] == [str(tmp_path / "student"), str(tmp_path / "before")]
    assert table["num_prompts"] == ["6", "6"]
    saved = json.load(open(tmp_path / "metrics.json"))
    # each column is evaluate() on its own folder, with the teacher and discriminator given, on
    # every row (--split all): the CLI wires the right model to the right column
    tok = models.load_tokenizer(str(tmp_path / "student"))
    records = data_lib.read_records(str(tmp_path / "data.jsonl"))[0]
    teacher = models.load_model(str(tmp_path / "student")).eval()
    d = ev.load_discriminator(str(tmp_path / "disc"), torch.float32, "cpu")
    for name, column in (("student", 0), ("before", 1)):
        want = ev.evaluate(models.load_model(str(tmp_path / name)).eval(), tok, records,
                           teacher=teacher, score_fn=lambda *t: discriminator.score(d, *t),
                           max_new_tokens=6, batch_size=4)
        got = saved[str(tmp_path / name)]
        assert got["samples"] == want["samples"] and len(got["samples"]) == 6
        for key in ["rouge_l", "student_nll", "teacher_nll", "disc_score", "disc_score_teacher",
                    "disc_acc", "length"]:
            assert got[key] == pytest.approx(want[key], rel=1e-5), (name, key)
            assert table[key][column] != "-"
    # the teacher is the student's own folder: its greedy samples are what it finds likeliest
    assert saved[str(tmp_path / "student")]["teacher_nll"] < \
        saved[str(tmp_path / "before")]["teacher_nll"]


def test_same_vocabulary_allows_appended_tokens_only():
    base = {"a": 0, "b": 1, "c": 2}
    assert ev.same_vocabulary(base, dict(base))
    assert ev.same_vocabulary(base | {"<|endoftext|>": 3}, base)     # appended past the other's ids
    assert ev.same_vocabulary(base, base | {"<|endoftext|>": 3})
    assert not ev.same_vocabulary(base, {"a": 0, "b": 2, "c": 1})    # the same tokens, other ids
    assert not ev.same_vocabulary(base | {"x": 1}, {"a": 0, "x": 1, "b": 3})


# --------------------------------------------------------------------------------------------------
# under torchrun: the white-box trainers' held-out work shared by the ranks

def held_out_work(out):
    """The white-box trainers' held-out work on the tiny pair: the teacher's responses to 20
    prompts (eval.held_out_responses) and the held-out KLs on them, written to OUT.rank<r> with the
    sizes of this rank's sample.rollout calls."""
    tok = models.tiny_tokenizer()
    teacher, student = models.load_model("tiny-teacher").eval(), models.load_model("tiny").eval()
    val = [{"id": r["id"], "prompt": data_lib.encode_prompt(tok, r["messages"])}
           for r in data_lib.tiny_prompts(20, seed=3)]
    gen = dict(max_new_tokens=8, eos_ids=sample.stop_ids(tok, teacher), pad_id=PAD, seed=0)
    calls, rollout = [], sample.rollout

    def counted(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return rollout(model, prompts, *args, **kwargs)
    sample.rollout = counted
    try:
        held = ev.held_out_responses(teacher, val, gen)
    finally:
        sample.rollout = rollout
    for r, y in zip(val, held):
        r["y_t"] = y
    kl = ev.heldout_divergence(student, teacher, val, PAD)
    with open(f"{out}.rank{common.get_rank()}", "w") as f:
        json.dump({"held": held, "kl": kl, "calls": calls}, f)


def test_held_out_responses_and_divergence_are_shared_by_the_ranks(tmp_path):
    """Fault 6 (issue 22): distillm2.py and amm.py had every rank sample all the held-out teacher
    responses (256 on the GPU preset) that only rank 0 used, then rank 0 alone measured them while
    the others waited. Chunks of 8 prompts are now spread over the ranks: two gloo ranks sample 8
    and 12 of 20, and every rank gets the responses and held-out KLs of one process (this one, on
    one thread as the ranks are)."""
    script = tmp_path / "probe.py"
    script.write_text(f"import sys\nsys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]\n"
                      "import common, test_eval\ncommon.compute_init()\n"
                      f"test_eval.held_out_work({str(tmp_path / 'two')!r})\n"
                      "common.compute_cleanup()\n")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    held_out_work(tmp_path / "one")
    one, two = ([json.loads((tmp_path / f"{name}.rank{r}").read_text()) for r in ranks]
                for name, ranks in (("one", [0]), ("two", [0, 1])))
    assert [r["calls"] for r in two] == [[8, 4], [8]] and one[0]["calls"] == [8, 8, 4]
    for r in two:
        assert r["held"] == one[0]["held"]
        assert r["kl"] == pytest.approx(one[0]["kl"], rel=1e-6)


def test_heldout_divergence_is_the_token_mean_kl_of_full_logits():
    """heldout_fkl = sum over every response token of KL(p || q), divided by the number of tokens
    (one mean over all rows, not a mean of row means), heldout_rkl the same with KL(q || p):
    brute force in float64 from full logits, rows of unequal lengths across batches of 2 and
    chunks of 3 positions."""
    student, teacher = models.tiny_model(seed=0).eval(), models.tiny_model(seed=3).eval()
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": torch.randint(3, 250, (n,), generator=g).tolist(),
             "y_t": torch.randint(3, 250, (k,), generator=g).tolist()}
            for n, k in ((5, 7), (9, 2), (3, 11), (4, 1), (6, 5))]
    got = ev.heldout_divergence(student, teacher, rows, PAD, chunk_size=3, batch_size=2)
    fkl = rkl = 0.0
    for r in rows:
        ro = sample.pack([r["prompt"]], [r["y_t"]], PAD)
        log_q, log_p = (head(h)[0].double().log_softmax(-1) for h, head in
                        (sample.response_hidden(m.double(), ro) for m in (student, teacher)))
        fkl += (log_p.exp() * (log_p - log_q)).sum().item()
        rkl += (log_q.exp() * (log_q - log_p)).sum().item()
    n = sum(len(r["y_t"]) for r in rows)
    assert got["heldout_fkl"] == pytest.approx(fkl / n, rel=1e-5)
    assert got["heldout_rkl"] == pytest.approx(rkl / n, rel=1e-5)


def test_cli_errors_name_the_flag_the_file_or_the_models(tmp_path, capsys):
    """--val-fraction out of [0, 1] is a usage error; a discriminator folder with two labels is
    refused by name; a teacher whose tokenizer maps tokens to other ids exits 2 and says so."""
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

    with pytest.raises(SystemExit) as e:
        ev.parse_args(["--model", "tiny", "--data", "x.jsonl", "--val-fraction", "1.5"])
    assert e.value.code == 2 and "--val-fraction must be in [0, 1]" in capsys.readouterr().err
    cfg = models.tiny_config()
    cfg.num_labels, cfg.pad_token_id = 2, PAD
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "two_labels")
    with pytest.raises(ValueError, match="two_labels: expected a sequence-classification model "
                                         "with num_labels=1"):
        ev.load_discriminator(str(tmp_path / "two_labels"), torch.float32, "cpu")
    # the tiny tokenizer with its special tokens in another order: <|pad|> gets another id
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    other = Tokenizer(tmodels.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    other.add_special_tokens(["<|im_start|>", "<|pad|>", "<|im_end|>"])
    other = PreTrainedTokenizerFast(tokenizer_object=other, pad_token="<|pad|>",
                                    eos_token="<|im_end|>")
    for name, tok in (("student", models.tiny_tokenizer()), ("teacher", other)):
        models.tiny_model(seed=0).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "data.jsonl").write_text(json.dumps(
        {"id": "0", "messages": [{"role": "user", "content": "hi"}],
         "teacher_response": "hello"}) + "\n")
    code = ev.main(["--model", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                    "--data", str(tmp_path / "data.jsonl"), "--split", "all"])
    assert code == 2
    assert (f"{tmp_path / 'student'} and the teacher {tmp_path / 'teacher'} have different "
            "tokenizers" in capsys.readouterr().err)
