"""dev/bench.py gpu on the CPU (tiny models, gloo): the command a GPU session runs, kept from
rotting; its memory arithmetic against what the tensors it counts really take."""

import itertools
import json

import pytest
import torch

import fast_decode
import models
from dev import bench
from scripts import run_script


def test_bench_gpu_runs_every_trainer_under_torchrun_and_resumes(tmp_path):
    """Why it exists: `dev/bench.py gpu` is the one command a GPU session runs, in minutes it cannot
    spend on a crash; its times mean nothing on a CPU. What it can get wrong here is checked:
    every phase of every trainer timed, every sampling engine at every batch with its full token
    count, and MFU and tok/s by their formulas from the model's parameter count."""
    out = run_script("dev/bench.py", ["gpu", "--device", "cpu", "--out", str(tmp_path)]).stdout
    results = json.loads((tmp_path / "bench_gpu.json").read_text())
    for script, phases in bench.PHASES.items():
        assert f"{script}: " in out and "stopped after" in out
        table = {phase: seconds for phase, seconds, _ in results["trainers"][script]["phases"]}
        # every phase ran and was timed
        assert set(table) == set(phases) | {"step"}, (script, table)
        assert all(seconds > 0 for seconds in table.values())
    assert set(results["gad_peak"]) == {"AdamW"}   # the 8-bit variant on CUDA only
    # the memory arithmetic of the GAD peak runs, phase by phase, next to the measured peaks
    assert "the memory arithmetic" in out and "predicted (* the peak)" in out
    assert set(results["gad_peak"]["AdamW"]) == set(bench.PHASES["gad.py"])
    # sampling: every engine timed at every batch, ours on the static path against HF and plain
    for prompts in bench.GPU_SIZES["tiny"]["sample_prompts"]:
        res = results["sampling"][str(prompts)]
        assert set(res) == {"static", "plain", "hf"}, res
        assert res["static"]["tokens"] == res["hf"]["tokens"] == prompts * 2 * 8   # no early stop
        assert 0 < res["static"]["roofline"] and res["static"]["vs_plain"] > 0
    size, train = bench.GPU_SIZES["tiny"], results["train"]
    N = models.num_params(models.load_model(size["big"]))
    tokens = size["train_rows"] * size["train_seq_len"]
    # 6 N a trained token; DistiLLM-2 trains on two responses a row and runs the teacher (the same
    # tiny model) forward on both: 2 (6 N + 2 N) a token
    for step, flops, n_tokens in (("PPO update", 6 * N * tokens, tokens),
                                  ("DistiLLM-2 step", 2 * 8 * N * tokens, 2 * tokens)):
        seconds = train[step]["seconds"]
        assert train[step]["mfu"] == pytest.approx(flops / seconds / train["peak_flops"])
        assert train[step]["tok_s"] == pytest.approx(n_tokens / seconds)
        assert 0 < train[step]["mfu"] < 1, train


def test_memory_arithmetic_counts_what_the_tensors_take():
    """The model states and the KV caches, the terms that scale with the model and the rollout,
    against the tiny model's own tensors (tests/test_memory_model.py checks whole phases)."""
    model = models.load_model("tiny")
    a = bench.Arch.of(model)
    P = models.num_params(model)
    assert bench.trained(a, "G") == {"G: fp32 weights": 4 * P,
                                     "G: AdamW state": 8 * P + 4 * len(list(model.parameters()))}
    ref = models.frozen_copy(model, "bfloat16")
    assert bench.reference_bytes(a) == sum(p.numel() * p.element_size() for p in ref.parameters())
    model = models.cast_parameters(model, "bfloat16")
    from transformers import DynamicCache
    cache = DynamicCache()
    models.with_cache(model, cache, input_ids=torch.randint(0, 256, (6, 12)))
    kv_bytes = sum(t.numel() * t.element_size()
                   for layer in cache.layers for t in (layer.keys, layer.values))
    peak = bench.generate_peak(bench.Net(a, 2, 2, 2), 6, 1, 12, 0)
    assert peak["prefill: DynamicCache"] == kv_bytes
    kv = fast_decode.StaticKV(cache, 2, torch.ones(6, 12, dtype=torch.long), 5)
    assert bench.kv_bytes(bench.Net(a, 2, 2, 2), 12, 12 + 5) == sum(
        t.numel() * t.element_size() for t in kv.keys + kv.values)


def test_bench_gpu_arguments_parse_at_every_size():
    """The GPU sizes run only on a GPU: their arguments are checked here, against each trainer's own
    parser and presets (a preset change once made the qwen-size DistiLLM-2 run refuse its lengths
    and ask for peft)."""
    import amm
    import distillm2
    import gad
    for (name, size), fsdp in itertools.product(bench.GPU_SIZES.items(), (False, True)):
        for script, args, _ in bench.gpu_runs(size, "cuda", "data.jsonl", fsdp):
            parsed = {"gad.py": gad, "distillm2.py": distillm2,
                      "amm.py": amm}[script].parse_args(args)
            assert parsed.dtype == "bfloat16" and parsed.student == size["student"], (name, script)
            assert parsed.fsdp is fsdp, (name, script)   # `gpu --fsdp`: every run sharded
            if script == "distillm2.py":
                assert parsed.lora_r == 0 and parsed.max_len > parsed.max_prompt_len, name
