"""models.resolve for hub models: a snapshot with the tokenizer files alone (what AutoTokenizer
caches) is not a model; it is completed from the hub, or is a clear error offline."""

import contextlib
import hashlib
import json
import os
import pathlib
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from huggingface_hub import constants

import models

SHA = hashlib.sha1(b"fake commit").hexdigest()


@contextlib.contextmanager
def fake_hub(repo, folder, requests=None):
    """A hub on 127.0.0.1 serving the files of `folder` as the model repo `repo` at commit SHA,
    with what huggingface_hub 2.4 reads: the repo info (GET /api/models/{repo}/revision/{rev}), the
    file listing (GET /api/models/{repo}/tree/{rev}) and the files (HEAD or GET
    /{repo}/resolve/{rev}/{file}) with X-Repo-Commit, ETag and Content-Length. No X-Xet-* header
    and no xetHash, so files come over plain HTTP; anything else is the hub's EntryNotFound 404.
    Each request is appended to `requests` as (method, path). Yields the endpoint URL."""
    files = {name: pathlib.Path(folder, name).read_bytes() for name in os.listdir(folder)}
    oid = {name: hashlib.sha1(data).hexdigest() for name, data in files.items()}
    api, resolve = f"/api/models/{repo}/", f"/{repo}/resolve/"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet test output
            pass

        def do_GET(self):
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            if requests is not None:
                requests.append((self.command, path))
            if path.startswith(api + "revision/"):
                siblings = [{"rfilename": name} for name in files]
                return self.reply({"id": repo, "sha": SHA, "siblings": siblings})
            if path == api + f"tree/{SHA}":
                return self.reply([{"type": "file", "path": name, "size": len(data),
                                    "oid": oid[name]} for name, data in files.items()])
            name = path[len(resolve):].partition("/")[2] if path.startswith(resolve) else None
            if name not in files:
                return self.send(404, b"", {"X-Error-Code": "EntryNotFound"})
            self.send(200, files[name], {"ETag": f'"{oid[name]}"'})

        do_HEAD = do_GET  # send() leaves the body out

        def reply(self, obj):
            self.send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def send(self, status, body, headers):
            self.send_response(status)
            for key, value in {**headers, "X-Repo-Commit": SHA,
                               "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF cache (huggingface_hub reads HF_HUB_CACHE at import: its constant too)."""
    cache = str(tmp_path / "hf-cache")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    return cache


def save_tiny(folder, tokenizer=True, model=True):
    if tokenizer:
        models.tiny_tokenizer().save_pretrained(folder)
    if model:
        models.tiny_model(seed=0).save_pretrained(folder)
    return folder


def assert_tiny_weights(model):
    expected = models.tiny_model(seed=0).state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_offline_tokenizer_only_snapshot_is_a_clear_error_and_a_complete_one_loads(
        hf_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo_dir = os.path.join(hf_cache, "models--Qwen--Qwen2.5-1.5B-Instruct")
    os.makedirs(os.path.join(repo_dir, "refs"))
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(SHA)
    snapshot = save_tiny(os.path.join(repo_dir, "snapshots", SHA), model=False)
    with pytest.raises(RuntimeError, match=r"qwen2\.5-1\.5b.*Qwen/Qwen2\.5-1\.5B-Instruct"
                       r"(.|\n)*`hf download Qwen/Qwen2\.5-1\.5B-Instruct`"):
        models.resolve("qwen2.5-1.5b")
    save_tiny(snapshot, tokenizer=False)
    assert models.resolve("qwen2.5-1.5b") == snapshot
    assert_tiny_weights(models.load_model("qwen2.5-1.5b"))


def test_hub_reachable_uses_the_endpoint_port_and_the_offline_flag(monkeypatch, tmp_path):
    with fake_hub("Org/Name", tmp_path) as endpoint:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.delenv("NANOGAD_OFFLINE", raising=False)
        assert models._hub_reachable()
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        assert not models._hub_reachable()


def test_first_run_on_an_empty_cache_downloads_the_model_after_its_tokenizer(
        hf_cache, tmp_path, monkeypatch):
    """A user's first run: the trainers load the tokenizer, then the model. The snapshot starts as
    AutoTokenizer leaves it (the tokenizer files alone), as a run of the code before the fix did."""
    from transformers import AutoTokenizer

    with fake_hub("Org/Name", save_tiny(str(tmp_path / "repo"))) as endpoint:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.delenv("NANOGAD_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        AutoTokenizer.from_pretrained("Org/Name")
        tok = models.load_tokenizer("Org/Name")
        assert tok.decode(tok.encode("héllo")) == "héllo"
        assert_tiny_weights(models.load_model("Org/Name"))


def test_under_torchrun_one_rank_a_node_downloads_and_the_others_load_from_the_cache(
        hf_cache, tmp_path):
    """Two ranks of one node on an empty cache: local rank 0 fetches the weights once while rank 1
    waits (models.prefetch), then both load the model from the cache."""
    import subprocess
    import sys
    import textwrap

    from scripts import ROOT

    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        import common, models
        _, rank, _, _, _ = common.compute_init()
        models.prefetch("Org/Name", None, "api:http://x:MODEL")
        model = models.load_model("Org/Name")
        print(f"rank {{rank}} loaded {{models.num_params(model)}}", flush=True)
        common.compute_cleanup()
    """))
    requests = []
    with fake_hub("Org/Name", save_tiny(str(tmp_path / "repo")), requests) as endpoint:
        env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0",
               "HF_HUB_CACHE": hf_cache, "OMP_NUM_THREADS": "1"}
        env.pop("NANOGAD_OFFLINE", None)
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2", str(probe)], env=env, capture_output=True,
                             text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    params = models.num_params(models.tiny_model(seed=0))
    # two ranks on one pipe: their lines can interleave (unbuffered), so found anywhere in it
    assert sorted(re.findall(r"rank \d loaded \d+", out.stdout)) == [
        f"rank {r} loaded {params}" for r in (0, 1)]
    weights = [r for r in requests if r == ("GET", f"/Org/Name/resolve/{SHA}/model.safetensors")]
    assert len(weights) == 1, requests
