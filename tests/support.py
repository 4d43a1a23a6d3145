"""Tiny random Hugging Face checkpoints, made with transformers itself, one per supported family."""

from __future__ import annotations

import math
import os

import numpy as np

BASE = dict(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-6)

# name -> (config class name, overrides)
FAMILIES = {
    "llama3.1": ("LlamaConfig", dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, rope_theta=500000.0)),
    "llama3.2-tied": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=500000.0)),
    "llama2-mha": ("LlamaConfig", dict(num_key_value_heads=4)),
    "llama-mqa-bias": ("LlamaConfig", dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
    "mistral-swa": ("MistralConfig", dict(sliding_window=24, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
}


def make_hf_checkpoint(family: str, directory: str, *, seed: int = 0, dtype: str = "float32",
                       max_shard_size: str | None = None) -> str:
    """Save a randomly initialised HF model of ``family`` to ``directory`` (safetensors)."""
    import torch
    import transformers

    cls_name, overrides = FAMILIES[family]
    config_cls = getattr(transformers, cls_name)
    cfg = config_cls(**{**BASE, **overrides})
    cfg._attn_implementation = "eager"
    model_cls = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))
    torch.manual_seed(seed)
    model = model_cls(cfg)
    # Default init leaves biases at 0 and norms at 1, which would hide a wrongly
    # mapped bias or norm; give every tensor distinct random values instead.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
            else:
                p.copy_(torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def hf_model(directory: str):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_greedy(model, prompt: list[int], num_new: int) -> tuple[list[int], np.ndarray]:
    """HF's greedy continuation and the f32 logits at every position of prompt + continuation."""
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(num_new):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
        all_logits = model(torch.tensor([ids])).logits[0].float().numpy()
    return ids[len(prompt):], all_logits


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| over max |b|."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def make_byte_tokenizer(directory: str, *, chat_template: str | None = None) -> str:
    """A byte-level tokenizer: ids 0-255 are bytes (so any non-ASCII character spans
    several tokens), 256 is <s> and 257 is </s>. Written as tokenizer.json (+ config)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_to_char = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template:
        cfg["chat_template"] = chat_template
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return directory


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in character for each byte, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def constant_filled_buffers(jaxpr) -> list[str]:
    """Where a traced program materializes a buffer filled with a constant, which XLA's GPU backend emits as a memset
    thunk (not a command of its CUDA graphs): a ``broadcast_in_dim`` of a literal that is a ``cond`` branch's output,
    a scatter's operand or a ``pallas_call``'s operand (an output buffer it aliases). Walks nested jaxprs (``pjit``,
    ``cond`` branches, ...; a constant passed to a nested jit is one inside it), not a kernel's body. Returns one
    description a place; [] when there is none."""
    from jax.extend import core as jcore

    found: list[str] = []

    def literal_broadcasts(jx) -> dict:
        return {e.outvars[0]: e for e in jx.eqns
                if e.primitive.name == "broadcast_in_dim" and isinstance(e.invars[0], jcore.Literal)}

    def walk(jx, where: str, inherited: dict | None = None) -> None:
        consts = {**literal_broadcasts(jx), **(inherited or {})}
        for e in jx.eqns:
            name = e.primitive.name
            if name.startswith("scatter") and e.invars[0] in consts:
                found.append(f"{where}: a {name}'s operand {consts[e.invars[0]].outvars[0].aval.str_short()}")
            if name == "pallas_call":
                found.extend(f"{where}: pallas_call {e.params.get('name_and_src_info', '')} operand "
                             f"{v.aval.str_short()}" for v in e.invars if v in consts)
            if name == "cond":
                for i, br in enumerate(e.params["branches"]):
                    inner = literal_broadcasts(br.jaxpr)
                    found.extend(f"{where}: branch {i}'s output {v.aval.str_short()}" for v in br.jaxpr.outvars
                                 if v in inner)
            if name == "pallas_call":     # a kernel's body is the kernel's own code (registers), not XLA buffers
                continue
            for p in e.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    inner = getattr(sub, "jaxpr", sub)
                    if isinstance(inner, jcore.Jaxpr):
                        # a nested jit's parameters that are constants outside are constants inside
                        passed = None
                        if name in ("pjit", "jit", "closed_call"):
                            passed = {iv: consts[ov] for iv, ov in zip(inner.invars, e.invars)
                                      if not isinstance(ov, jcore.Literal) and ov in consts}
                        walk(inner, f"{where}/{name}", passed)

    walk(getattr(jaxpr, "jaxpr", jaxpr), "step")
    return found


def lowered_count(text: str, needle: str) -> int:
    """How many times ``needle`` runs in a lowered program's text (``Lowered.as_text()``): its occurrences in each
    function, each function counted as often as ``@main`` reaches it through calls (a nested jit, such as the
    model's layers, is one private function called once a layer)."""
    import re

    bodies: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*func\.func (?:public |private )?@([\w$.\-]+)\(", line)
        if m:
            name = m.group(1)
            bodies[name] = []
        elif name is not None:
            bodies[name].append(line)
    if "main" not in bodies:
        raise ValueError("no @main function in the lowered text")
    calls = re.compile(r"\bcall @([\w$.\-]+)\(")
    memo: dict[str, int] = {}

    def count(fn: str) -> int:
        if fn not in memo:
            body = bodies[fn]
            memo[fn] = sum(line.count(needle) for line in body) + sum(
                count(callee) for line in body for callee in calls.findall(line) if callee in bodies)
        return memo[fn]

    return count("main")


def one_chunk(n: int, padding: int = 0):
    """(AttentionMetadata, token ids) of one forward over a fresh sequence in an 8-page cache of 16-token pages: its
    first ``n - padding`` tokens written at pages 5 and 2, the last ``padding`` rows padding (page 8: out of range)."""
    from jaxdyn.kv.cache import AttentionMetadata
    pages, pos = np.array([5, 2], np.int32), np.arange(n, dtype=np.int32)
    real = n - padding
    slot_page = np.where(pos < real, pages[pos // 16], 8).astype(np.int32)
    md = AttentionMetadata(positions=pos, slot_page=slot_page, slot_offset=pos % 16, page_table=pages[None],
                           kv_lens=np.array([real], np.int32), cu_q_lens=np.array([0, real], np.int32))
    return md, np.arange(3, 3 + n, dtype=np.int32) * 7
