"""bench.py gpu on the CPU (tiny models, gloo): the command a GPU session runs, kept from rotting;
its memory arithmetic against what the tensors it counts really take."""

import json

import torch

import bench
import models
import sample
from scripts import run_script


def test_bench_gpu_runs_every_trainer_under_torchrun_and_resumes(tmp_path):
    out = run_script("bench.py", ["gpu", "--device", "cpu", "--out", str(tmp_path)]).stdout
    results = json.loads((tmp_path / "bench_gpu.json").read_text())
    for script, phases in bench.PHASES.items():
        assert f"{script}: " in out and "stopped after" in out
        table = {phase: seconds for phase, seconds, _ in results["trainers"][script]["phases"]}
        # every phase ran and was timed
        assert set(table) == set(phases) | {"step"}, (script, table)
        assert all(seconds > 0 for seconds in table.values())
    assert set(results["gad_peak"]) == {"AdamW", "8-bit AdamW"}  # bitsandbytes runs on CPU too
    assert "= peak while sampling" in out and "= peak while updating G" in out
    # sampling: every engine timed at every batch, ours on the static path against HF and plain
    for prompts in bench.GPU_SIZES["tiny"]["sample_prompts"]:
        res = results["sampling"][str(prompts)]
        assert set(res) == {"static", "plain", "hf"}, res
        assert res["static"]["tokens"] == res["hf"]["tokens"] == prompts * 2 * 8   # no early stop
        assert 0 < res["static"]["roofline"] and res["static"]["vs_plain"] > 0
    for step in ("PPO update", "DistiLLM-2 step"):
        assert 0 < results["train"][step]["mfu"] < 1, results["train"]


def test_memory_arithmetic_counts_what_the_tensors_take():
    """Parameters and the KV cache, the two terms that scale with the model and the rollout, against
    the tiny model's own tensors."""
    model = models.load_model("tiny")
    P = models.num_params(model)
    held, sampling, update, _ = bench.gad_step_memory("tiny", rows=6, prompt_len=5, new_tokens=7,
                                                      micro_batch_tokens=64, adam8bit=False)
    assert (held["G: fp32 weights + optimizer state"] == 12 * P
            and update["G gradients (fp32)"] == 4 * P)
    ref = models.frozen_copy(model, "bfloat16")
    ref_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    assert held["reference (bf16 linear, fp32 embeddings)"] == ref_bytes
    model = models.cast_parameters(model, "bfloat16")
    from transformers import DynamicCache
    cache = DynamicCache()
    sample.with_cache(model, cache, input_ids=torch.randint(0, 256, (6, 12)))
    kv_bytes = sum(t.numel() * t.element_size()
                   for layer in cache.layers for t in (layer.keys, layer.values))
    assert sampling["KV cache"] == kv_bytes


def test_bench_gpu_arguments_parse_at_every_size():
    """The GPU sizes run only on a GPU: their arguments are checked here, against each trainer's own
    parser and presets (a preset change once made the qwen-size DistiLLM-2 run refuse its lengths
    and ask for peft)."""
    import amm
    import distillm2
    import gad
    for name, size in bench.GPU_SIZES.items():
        for script, args, _ in bench.gpu_runs(size, "cuda", "data.jsonl"):
            parsed = {"gad.py": gad, "distillm2.py": distillm2,
                      "amm.py": amm}[script].parse_args(args)
            assert parsed.dtype == "bfloat16" and parsed.student == size["student"], (name, script)
            if script == "distillm2.py":
                assert parsed.lora_r == 0 and parsed.max_len > parsed.max_prompt_len, name
