"""data.py: each source into one record shape, bad rows named by file/line/field, tokens, splits."""

import io
import json
import random
import sys
import time

import pytest

import data
import models
from scripts import metrics, run_here


def write_jsonl(path, rows):
    """rows: dicts (dumped), str (written as is) or bytes (raw, for bad encodings)."""
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, dict):
                row = json.dumps(row)
            f.write((row.encode("utf-8") if isinstance(row, str) else row) + b"\n")
    return str(path)


def user(text):
    return {"role": "user", "content": text}


GOOD = {"id": "g", "messages": [user("hi")], "teacher_response": "hello"}


@pytest.fixture(scope="module")
def tok():
    return models.tiny_tokenizer()


# --------------------------------------------------------------------------------------------------
# validation errors

BAD_ROWS = [  # (line 3 of the file, expected field)
    ('{"prompt": "hi"', "<json>"),
    ("[1, 2]", "<row>"),
    ('{"id": "x"}', "messages"),
    ('{"prompt": "   "}', "prompt"),
    ('{"prompt": 3}', "prompt"),
    ('{"messages": "hi"}', "messages"),
    ('{"messages": []}', "messages"),
    ('{"messages": ["hi"]}', "messages[0]"),
    ('{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "messages[1].role"),
    ('{"messages": [{"role": "user", "content": ""}]}', "messages[0].content"),
    ('{"messages": [{"role": "user", "content": "a"}], "teacher_response": 7}', "teacher_response"),
    ('{"prompt": "a", "response": ["b"]}', "response"),
    ('{"id": [1], "prompt": "a"}', "id"),
    ('{"id": true, "prompt": "a"}', "id"),
    ('{"conversation": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
     "conversation[1].role"),
    ('{"conversation": [{"role": "assistant", "content": "a"}]}', "conversation"),
    ('{"conversations": [{"role": "user", "content": null}]}', "conversations[0].content"),
    ('{"id": "x", "content": "hi", "teacher_response": "a"}', "content"),
    ('{"content": [{"content": "hi"}], "teacher_response": "a"}', "content[0].role"),
    (b'{"prompt": "caf\xe9"}', "<line>"),  # latin-1 bytes, not UTF-8
]


@pytest.mark.parametrize("bad,field", BAD_ROWS, ids=[f for _, f in BAD_ROWS])
def test_bad_row_names_line_and_field(tmp_path, bad, field):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, "", bad, {"prompt": "after"}])
    with pytest.raises(data.DataError) as info:
        data.read_records(path)
    e = info.value
    assert (e.path, e.line, e.field, e.unit) == (path, 3, field, "line")
    assert str(e).startswith(f"{path}, line 3, field '{field}': ")


def test_error_message_is_readable(tmp_path):
    row = {"messages": [{"role": "system", "content": "s"}, user("a"),
                        {"role": "robot", "content": "b"}]}
    path = write_jsonl(tmp_path / "x.jsonl",
                       [GOOD, GOOD | {"id": "h"}, {"prompt": "p"}, "", "", "", row])
    with pytest.raises(data.DataError) as info:
        data.read_records(path)
    assert str(info.value) == (f"{path}, line 7, field 'messages[2].role': unknown role 'robot' "
                               "(expected system, user or assistant)")
    assert isinstance(info.value, ValueError)


def test_skip_bad_returns_good_records_and_errors(tmp_path):
    rows = [GOOD, b'{"prompt": "\xff"}', "", {"prompt": "b"}, "not json",
            {"messages": [user("c")], "id": 3}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    records, errors = data.read_records(path, skip_bad=True)
    assert (len(records) == 3 and records[0]["id"] == "g"
            and records[2]["id"] == "3")  # int ids become strings
    assert [(e.line, e.field) for e in errors] == [(2, "<line>"), (5, "<json>")]


def test_duplicate_id_names_first_line(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, {"prompt": "x"}, GOOD])
    with pytest.raises(data.DataError) as info:
        data.read_records(path)
    assert (info.value.line, info.value.field) == (3, "id") and "line 1" in info.value.reason
    records, errors = data.read_records(path, skip_bad=True)
    assert len(records) == 2 and [e.line for e in errors] == [3]


def test_same_prompt_without_ids_is_a_duplicate(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl",
                       [{"prompt": "same", "response": "a"}, {"prompt": "same"}])
    with pytest.raises(data.DataError, match="duplicate id"):
        data.read_records(path)


def test_limit_stops_reading_early(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": f"p{i}"} for i in range(3)] + ["broken {"])
    records, errors = data.read_records(path, limit=3)  # the broken 4th line is never reached
    assert len(records) == 3 and errors == []
    records, errors = data.read_records(path, skip_bad=True, limit=2)
    assert len(records) == 2
    with pytest.raises(data.DataError):
        data.read_records(path, limit=4)


# --------------------------------------------------------------------------------------------------
# source shapes

def test_native_shape(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, user("a"),
            {"role": "assistant", "content": "b"}, user("c")]
    path = write_jsonl(tmp_path / "x.jsonl",
                       [{"id": "n1", "messages": msgs, "teacher_response": "d", "extra": 1},
                        {"id": "n2", "messages": [user("q")], "teacher_response": None}])
    records, _ = data.read_records(path)
    assert records == [{"id": "n1", "messages": msgs, "teacher_response": "d"},
                       {"id": "n2", "messages": [user("q")], "teacher_response": None}]


def test_prompt_response_shape_and_hashed_id(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl",
                       [{"prompt": "What is 2+2?", "response": "4"}, {"prompt": "why"},
                        {"prompt": "empty reply", "response": "  "}])
    records, _ = data.read_records(path)
    assert (records[0]["messages"] == [user("What is 2+2?")]
            and records[0]["teacher_response"] == "4")
    assert records[1]["teacher_response"] is None and records[2]["teacher_response"] is None
    assert len(records[0]["id"]) == 16 and int(records[0]["id"], 16) >= 0
    # the hash depends on the prompt only: the same row in another file gets the same id
    again, _ = data.read_records(write_jsonl(tmp_path / "y.jsonl", [{"prompt": "What is 2+2?"}]))
    assert again[0]["id"] == records[0]["id"]


def test_lmsys_conversation_shape(tmp_path):
    conv = [{"role": "system", "content": "s"}, user("first"),
            {"role": "assistant", "content": "reply"}, user("second"),
            {"role": "assistant", "content": "reply 2"}]
    rows = [{"conversation_id": "c1", "conversation": conv},
            {"question_id": 81, "conversations": [user("only")]},
            {"conversation_id": "c3", "conversation": [user("a"), user("b")]}]
    records, _ = data.read_records(write_jsonl(tmp_path / "x.jsonl", rows))
    assert records[0] == {"id": "c1", "messages": conv[:2], "teacher_response": "reply"}
    assert records[1] == {"id": "81", "messages": [user("only")], "teacher_response": None}
    assert records[2]["teacher_response"] is None  # the next turn is not the assistant's


SHAREGPT = [
    {"id": "s1", "conversations": [{"from": "human", "value": "hi"},
                                   {"from": "gpt", "value": "hello"},
                                   {"from": "human", "value": "more"},
                                   {"from": "gpt", "value": "sure"}]},
    {"id": "s2", "conversations": [{"from": "gpt", "value": "orphan reply"},
                                   {"from": "human", "value": "q"},
                                   {"from": "chatgpt", "value": "a"}]},
    {"id": "s3", "conversations": [{"from": "system", "value": "sys"},
                                   {"from": "bing", "value": "x"},
                                   {"from": "user", "value": "q"}]},
    {"id": "s4", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 5}]},
    {"id": "s5", "conversations": []},
    {"id": "s6", "conversations": [{"from": "human", "value": ""},
                                   {"from": "human", "value": "q"}]},
    {"id": "s7", "conversations": [{"from": "human", "value": "q"},
                                   {"from": "robot", "value": "a"}]},
    {"id": "s8", "conversations": [{"from": "weird", "value": 1}, {"from": "human", "value": "q"}]},
]


def write_sharegpt(path, rows,
                   tail='{"id": "torn", "conversations": [{"from": "human", "value": "cut he'):
    text = ("[\n" + ",\n".join(json.dumps(r, indent=2) for r in rows)
            + (",\n" + tail if tail else "\n]"))
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_sharegpt_array_with_truncated_tail(tmp_path):
    path = write_sharegpt(tmp_path / "share.json", SHAREGPT)
    records, errors = data.read_records(path, skip_bad=True)  # auto: .json starting with '['
    assert records == [
        {"id": "s1", "messages": [user("hi")], "teacher_response": "hello"},
        {"id": "s2", "messages": [user("q")], "teacher_response": "a"},  # leading gpt turn dropped
        {"id": "s3", "messages": [{"role": "system", "content": "sys"}, user("q")],
         "teacher_response": None},
        {"id": "s8", "messages": [user("q")],
         "teacher_response": None},  # dropped turns are not checked
    ]
    assert [(e.line, e.field, e.unit) for e in errors] == [
        (4, "conversations[1].value", "record"), (5, "conversations", "record"),
        (6, "conversations[0].value", "record"), (7, "conversations[1].from", "record")]
    assert str(errors[0]).startswith(f"{path}, record 4, field 'conversations[1].value': ")


def test_sharegpt_complete_array_and_broken_json(tmp_path):
    records, _ = data.read_records(write_sharegpt(tmp_path / "a.json", SHAREGPT[:3], tail=None))
    assert [r["id"] for r in records] == ["s1", "s2", "s3"]
    broken = tmp_path / "b.json"
    broken.write_text('[{"id": "a", "conversations": [{"from": "human", "value": "q"}]}, '
                      '{"id": oops}, ' + json.dumps(SHAREGPT[0]) + "]")
    records, errors = data.read_records(str(broken), skip_bad=True)
    assert [r["id"] for r in records] == ["a"]  # nothing after broken JSON can be trusted
    assert [(e.line, e.field) for e in errors] == [(2, "<json>")]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_json_array_stream_matches_json_load(chunk):
    items = [{"id": i, "text": "naïve ✓ \\ \" " * i, "n": [1.5, -2e3, None, True]}
             for i in range(20)] + [12345, "s"]
    # multi-byte chars get cut between chunks
    blob = json.dumps(items, ensure_ascii=False).encode("utf-8")
    assert list(data._iter_json_array(io.BytesIO(blob), chunk=chunk)) == items
    torn = blob[: blob.index(b'"id": 19') + 12]
    assert list(data._iter_json_array(io.BytesIO(torn), chunk=chunk)) == items[:19]
    # broken, not torn, even right before the end
    with pytest.raises(data._Bad, match="invalid JSON"):
        list(data._iter_json_array(io.BytesIO(b'[{"a": 1} {"b" 2}, {"c": "more text after it"}]'),
                                   chunk=chunk))


def test_parquet_shapes_and_bad_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"id": "p1", "messages": [user("a")], "teacher_response": "b"},
            {"id": "p2", "messages": [user("c")], "teacher_response": None},
            {"id": "p3", "messages": [{"role": "robot", "content": "d"}], "teacher_response": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    records, errors = data.read_records(str(tmp_path / "x.parquet"), skip_bad=True)
    assert records == rows[:2]
    assert [(e.line, e.field, e.unit) for e in errors] == [(3, "messages[0].role", "row")]
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "response": "r"}]), tmp_path / "y.parquet")
    records, _ = data.read_records(str(tmp_path / "y.parquet"))
    assert records[0]["messages"] == [user("q")] and records[0]["teacher_response"] == "r"


# LMSYS-Chat-GPT-5-Chat-Response, the GAD paper's data: prompt conversation + GPT-5-Chat's reply
GAD_ROWS = [
    {"id": "g1", "content": [user("What is 2+2?")], "teacher_response": "4", "category": "math",
     "grounded": True, "flaw": "normal", "agreement": True},
    {"id": "g2", "content": [{"role": "system", "content": "Be brief."}, user("Name a color."),
                             {"role": "assistant", "content": "Red."}, user("Another?")],
     "teacher_response": "Blue.", "category": None, "grounded": False, "flaw": None,
     "agreement": None},
    {"id": "g3", "content": [user("Say hi in French.")], "teacher_response": "Bonjour !",
     "category": "language", "grounded": None, "flaw": "normal", "agreement": False},
    {"id": "g4", "content": [user("Name a dog breed.")], "teacher_response": "Beagle.",
     "category": "animals", "grounded": True, "flaw": "normal", "agreement": True},
]


def write_gad_parquet(path, rows):
    """rows in the parquet schema LMOps gad/tools/export_lmsys_parquet.py writes
    (`ds["train"].to_parquet`)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    message = pa.struct([("content", pa.string()), ("role", pa.string())])
    schema = pa.schema([("id", pa.string()), ("content", pa.list_(message)),
                        ("teacher_response", pa.string()), ("category", pa.string()),
                        ("grounded", pa.bool_()), ("flaw", pa.string()),
                        ("agreement", pa.bool_())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def test_gad_reference_schema_parquet_and_jsonl(tmp_path):
    records, _ = data.read_records(write_gad_parquet(tmp_path / "train.parquet", GAD_ROWS))
    # the whole content list is the prompt; the extra columns are dropped
    assert records == [{"id": r["id"], "messages": r["content"],
                        "teacher_response": r["teacher_response"]} for r in GAD_ROWS]
    assert data.read_records(write_jsonl(tmp_path / "train.jsonl", GAD_ROWS)) == (records, [])


def test_gad_reference_schema_bad_rows_name_row_and_field(tmp_path):
    bad = [GAD_ROWS[0] | {"content": [{"role": None, "content": "hi"}]},  # a message without a role
           GAD_ROWS[1] | {"content": GAD_ROWS[1]["content"][:3]},  # ends with the assistant's turn
           GAD_ROWS[2] | {"content": None}]
    path = write_gad_parquet(tmp_path / "bad.parquet", [GAD_ROWS[3]] + bad)
    records, errors = data.read_records(path, skip_bad=True)
    assert [r["id"] for r in records] == ["g4"]
    assert [(e.path, e.line, e.field, e.unit) for e in errors] == [
        (path, 2, "content[0].role", "row"), (path, 3, "content[2].role", "row"),
        (path, 4, "content", "row")]
    assert str(errors[0]).startswith(f"{path}, row 2, field 'content[0].role': unknown role None")
    path = write_jsonl(tmp_path / "bad.jsonl",
                       [GAD_ROWS[3], GAD_ROWS[0] | {"content": "What is 2+2?"}])
    with pytest.raises(data.DataError) as info:
        data.read_records(path)
    assert str(info.value) == (f"{path}, line 2, field 'content': expected a list of "
                               "{role, content} messages, got str")


def test_gad_trains_on_the_reference_parquet(tmp_path):
    """Acceptance: `gad.py --data FILE` reads the paper's parquet as exported, no conversion step.
    One SeqKD step (SFT on the file's teacher responses) is the cheapest training step; the
    multi-turn prompt is 84 tiny-tokenizer tokens, over the tiny preset's --max-prompt-len 64."""
    path = write_gad_parquet(tmp_path / "lmsys_gpt5_chat_filtered_train.parquet", GAD_ROWS)
    out = tmp_path / "run"
    printed = run_here("gad.py", ["--student", "tiny", "--data", path, "--stage", "seqkd",
                                  "--stop-after", "1", "--max-prompt-len", "128",
                                  "--val-fraction", "0", "--out", str(out)])
    assert "data: 4 train prompts (0 over --max-prompt-len dropped)" in printed
    assert ([(m["stage"], m["step"]) for m in metrics(out)] == [("seqkd", 0)]
            and metrics(out)[0]["sft_loss"] > 0)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        data.read_records(str(tmp_path / "x.parquet"))


def test_format_detection_and_resolve(tmp_path):
    # object per line
    assert data._format(write_jsonl(tmp_path / "x.json", [GOOD]), "auto") == "jsonl"
    assert data._format(write_sharegpt(tmp_path / "y.json", SHAREGPT[:1]), "auto") == "sharegpt"
    assert data._format("z.PARQUET", "auto") == "parquet"
    assert data.resolve_data_path("some/file.jsonl") == "some/file.jsonl"
    with pytest.raises(ValueError, match="unknown data format"):
        data.read_records(str(tmp_path / "x.json"), fmt="csv")


# --------------------------------------------------------------------------------------------------
# tokenization

def text_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_response_ends_with_end_of_turn(tok):
    eot = data.end_of_turn_id(tok)
    assert eot == tok.convert_tokens_to_ids("<|im_end|>") == 258
    ids, truncated = data.encode_response(tok, "hello")
    assert ids == text_ids(tok, "hello") + [eot] and len(ids) == 6 and not truncated
    # exactly fits with the end-of-turn token
    ids, truncated = data.encode_response(tok, "hello", max_len=6)
    assert ids[-1] == eot and not truncated


def test_truncated_response_has_no_end_of_turn(tok):
    ids, truncated = data.encode_response(tok, "hello world", max_len=4)
    assert ids == text_ids(tok, "hell") and truncated
    # text fits, the end-of-turn token does not
    ids, truncated = data.encode_response(tok, "hello", max_len=5)
    assert ids == text_ids(tok, "hello") and truncated


def test_end_of_turn_falls_back_to_eos():
    class Tok:
        unk_token_id, eos_token_id = 0, 7

        def convert_tokens_to_ids(self, token):
            return self.unk_token_id

    assert data.end_of_turn_id(Tok()) == 7


def test_prompt_then_response_is_the_chat_template_of_the_conversation(tok):
    """encode_prompt + encode_response, as the trainers concatenate them, decode to the chat
    template of the whole conversation (less the trailing newline)."""
    messages = [{"role": "system", "content": "sys"}, user("question?")]
    ids = data.encode_prompt(tok, messages) + data.encode_response(tok, "answer.")[0]
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": "answer."}],
                                   tokenize=False)
    assert tok.decode(ids) == full.rstrip("\n")


# --------------------------------------------------------------------------------------------------
# splitting

def recs(n, start=0):
    return [{"id": f"r{i}", "messages": [user("q")], "teacher_response": None}
            for i in range(start, start + n)]


def test_train_val_split_is_stable():
    records = recs(1000)
    train, val = data.train_val_split(records, 0.1)
    assert len(train) + len(val) == 1000 and 60 <= len(val) <= 140
    assert data.train_val_split(records, 0.1) == (train, val)
    val_ids = {r["id"] for r in val}
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    assert {r["id"] for r in data.train_val_split(shuffled, 0.1)[1]} == val_ids
    _, val_more = data.train_val_split(records + recs(500, start=1000), 0.1)
    # adding data keeps old val
    assert {r["id"] for r in val_more} & {r["id"] for r in records} == val_ids
    assert {r["id"] for r in data.train_val_split(records, 0.1, seed=1)[1]} != val_ids
    assert (data.train_val_split(records, 0.0)[1] == []
            and data.train_val_split(records, 1.0)[0] == [])


def test_batch_at_step_walks_a_fresh_permutation_each_epoch_split_over_the_ranks():
    """Steps of 4 over 10 rows (batches straddle epochs): taken in step order, every epoch's 10
    rows are each row once, in another order each epoch; keys name the epoch the row came from;
    rank r of 3 gets rows r::3 of the global batch; the order depends on the seed and the tag."""
    rows = [{"id": f"r{i}"} for i in range(10)]
    seen, keys = [], []
    for step in range(10):                                    # 40 rows: 4 epochs
        batch, k = data.batch_at_step(rows, step, 4, 0, "g", 0, 1)
        assert len(batch) == len(k) == 4
        parts = [data.batch_at_step(rows, step, 4, 0, "g", r, 3) for r in range(3)]
        for r, (part, part_keys) in enumerate(parts):
            assert part == batch[r::3] and part_keys == k[r::3]
        seen += [x["id"] for x in batch]
        keys += k
    epochs = [seen[i:i + 10] for i in range(0, 40, 10)]
    assert all(sorted(e) == sorted(x["id"] for x in rows) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4
    assert keys == [f"g|{i // 10}|{x}" for i, x in enumerate(seen)]
    first = [x["id"] for x in data.batch_at_step(rows, 0, 10, 0, "g", 0, 1)[0]]
    assert first == epochs[0]
    assert first != [x["id"] for x in data.batch_at_step(rows, 0, 10, 1, "g", 0, 1)[0]]
    assert first != [x["id"] for x in data.batch_at_step(rows, 0, 10, 0, "d", 0, 1)[0]]


# --------------------------------------------------------------------------------------------------
# real data and a real tokenizer

@pytest.mark.slow
def test_real_sharegpt_limit_is_fast():
    t0 = time.time()
    records, errors = data.read_records("sharegpt", limit=16)
    assert time.time() - t0 < 5.0 and len(records) == 16 and errors == []
    for r in records:
        assert r["messages"][-1]["role"] == "user" and r["messages"][-1]["content"].strip()
        assert r["teacher_response"] is None or isinstance(r["teacher_response"], str)


@pytest.mark.slow
def test_smollm2_tokenizer_on_sharegpt():
    # on a new machine this converts the package's copy first (models.resolve)
    tokenizer = models.load_tokenizer("smollm2-135m")
    eot = data.end_of_turn_id(tokenizer)
    assert eot == tokenizer.convert_tokens_to_ids("<|im_end|>")
    records, _ = data.read_records("sharegpt", limit=8)
    records = [r for r in records if r["teacher_response"]]
    for r in records[:4]:
        assert data.encode_prompt(tokenizer, r["messages"])
        ids, _ = data.encode_response(tokenizer, r["teacher_response"], max_len=64)
        assert 0 < len(ids) <= 64
    ids, truncated = data.encode_response(tokenizer, "Hello!")
    assert ids[-1] == eot and not truncated
    assert tokenizer.decode(ids) == "Hello!<|im_end|>"
