"""The shipped demo model: small enough to ship, loads like any Hugging Face checkpoint, writes English."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
import torch
import transformers

from jaxdyn import LLM, SamplingParams
from serving.cli import DEMO_MODEL
from tests.support import hf_greedy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Frequent words of English and of Shakespeare's English. About 60-65% of the running words of a
# Shakespeare speech are in this set; byte-pair fragments glued together at random are not.
COMMON = set("""
the and i to of a you my that in is not it me with for be his your this but he have as thou so him will what
thy all by do no shall if are we our on now or lord good o sir come well from they her more at let thee was here
would there how which she then am them like hath say know man than an when make may should yet one must us upon
go why king did can too see give these were where such some speak tell doth time heart art nor own out very made
hear up who their had done day been life first old noble great night true sweet never away fair hand mine before
men eyes itself else most even sure much nothing dead blood name world look god think friend still heaven
""".split())

# Held out of training (Julius Caesar, III.ii; public domain).
HELD_OUT = """Friends, Romans, countrymen, lend me your ears;
I come to bury Caesar, not to praise him.
The evil that men do lives after them;
The good is oft interred with their bones:
So let it be with Caesar. The noble Brutus
Hath told you Caesar was ambitious:
If it were so, it was a grievous fault;
And grievously hath Caesar answer'd it."""


def common_fraction(text: str) -> float:
    # Speaker names are written in capitals: leave them out.
    words = [w.lower() for w in re.findall(r"[A-Za-z']+", text) if len(w) == 1 or not w.isupper()]
    assert len(words) >= 20, text
    return sum(w in COMMON for w in words) / len(words)


def test_the_demo_is_a_small_hugging_face_llama_with_a_chat_template():
    files = sorted(os.listdir(DEMO_MODEL))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(files)
    size = sum(os.path.getsize(os.path.join(DEMO_MODEL, f)) for f in files)
    assert size < 12 * 2 ** 20, f"demo model is {size} bytes"
    cfg = json.load(open(os.path.join(DEMO_MODEL, "config.json")))
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    tok = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>hi<|end|><|assistant|>"
    info = json.load(open(os.path.join(DEMO_MODEL, "training.json")))
    model = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]


def test_held_out_text_is_far_more_likely_than_chance():
    tok = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    ids = tok(HELD_OUT, return_tensors="pt").input_ids
    with torch.no_grad():
        ppl = float(model(ids, labels=ids).loss.exp())
    # Uniform guessing over the 2048-token vocabulary is perplexity 2048; untrained weights are worse.
    assert ppl < 1024, ppl


@pytest.fixture(scope="module")
def llm():
    # A small engine: few buckets to compile on the CPU.
    return LLM(DEMO_MODEL, dtype="float32", max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)


def test_jaxdyn_greedy_equals_transformers_on_the_demo(llm):
    tok = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL)
    prompt = tok("ROMEO:").input_ids
    want, _ = hf_greedy(transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32),
                        prompt, 24)
    got = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert list(got) == list(want)


def test_the_demo_writes_english_words_and_the_measure_can_tell(llm):
    prompts = ["ROMEO:", "KING HENRY:", "Good morrow,", "HAMLET.\n", "<|user|>What is love?<|end|><|assistant|>"]
    greedy = llm.generate(prompts, SamplingParams(max_tokens=100, temperature=0), use_tqdm=False)
    sampled = llm.generate(prompts, SamplingParams(max_tokens=100, temperature=0.8, seed=0, ignore_eos=True),
                           use_tqdm=False)
    for outs in (greedy, sampled):
        text = "\n".join(o.outputs[0].text for o in outs)
        assert common_fraction(text) > 0.5, text
        # Sentences: capitalised starts and closing punctuation.
        assert re.search(r"[A-Z][a-z' ,;]+[a-z][.!?]", text), text
    # The same measure on the model's own vocabulary drawn at random stays far below.
    rng = np.random.default_rng(0)
    noise = llm.tokenizer.decode(rng.integers(6, 2048, 500).tolist())
    assert common_fraction(noise) < 0.25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_jaxdyn_serve_with_no_arguments_serves_the_demo_in_chat():
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen(
        # the demo's own dtype (bfloat16); one token and one page bucket, so the CPU compiles 3 steps, not 27
        [sys.executable, "-m", "serving.cli", "serve", "--port", str(port), "--max-num-seqs", "4",
         "--max-num-batched-tokens", "64", "--max-model-len", "256", "--token-buckets", "64",
         "--page-buckets", "16", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1800):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        else:
            raise AssertionError("server never became healthy")
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["demo"]
        answers = []
        for seed in range(4):
            r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Who art thou?"}],
                                               max_tokens=60, temperature=0.7, seed=seed)
            assert r.choices[0].finish_reason in ("stop", "length")
            answers.append(r.choices[0].message.content)
        text = "\n".join(answers)
        assert "<|" not in text and common_fraction(text) > 0.4, text
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_llm_chat_renders_as_the_server_and_generates(llm):
    """vLLM's ``LLM.chat``: a conversation rendered with the model's template (the server's /v1/chat/completions
    rendering), then generated; several at once; continue_final_message; a message it cannot render named."""
    from jaxdyn.engine.chat import ChatTemplateError, chat_prompt
    sp = SamplingParams(max_tokens=6, temperature=0.0)
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    text = chat_prompt(llm.tokenizer, conv)
    assert text == "<s><|user|>What is the capital of France?<|end|><|assistant|>"
    (out,) = llm.chat(conv, sp, use_tqdm=False)
    (want,) = llm.generate([llm.tokenizer.encode(text, add_special_tokens=False)], sp, use_tqdm=False)
    assert out.prompt == text and out.outputs[0].token_ids == want.outputs[0].token_ids
    cont = conv + [{"role": "assistant", "content": "The capital"}]
    (b,) = llm.chat(cont, sp, use_tqdm=False, continue_final_message=True, add_generation_prompt=False)
    assert b.prompt.endswith("<|assistant|>The capital")
    with pytest.raises(ChatTemplateError, match="add_generation_prompt") as e:     # as transformers and vLLM
        llm.chat(cont, sp, use_tqdm=False, continue_final_message=True)
    assert e.value.param == "continue_final_message"
    two = llm.chat([conv, conv], sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in two] == [out.outputs[0].token_ids] * 2
    with pytest.raises(ChatTemplateError, match="image_url") as e:
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], sp)
    assert e.value.param == "messages"
    with pytest.raises(ChatTemplateError, match="the assistant's") as e:
        llm.chat(conv, sp, continue_final_message=True, add_generation_prompt=False)
    assert e.value.param == "continue_final_message"
    # vLLM's LLM.chat renders a template given among chat_template_kwargs (the server refuses one)
    mine = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    (k,) = llm.chat(conv, SamplingParams(max_tokens=1), use_tqdm=False, chat_template_kwargs={"chat_template": mine})
    assert k.prompt == "[What is the capital of France?]"


def test_a_chat_turns_end_is_a_stop_token_and_the_tokenizers_eos_is_not(llm):
    """The demo's generation_config.json lists <|end|> (5) beside the tokenizer's </s> (1): ending on <|end|> is a
    stop token's end, stop_reason 5; on </s>, an EOS's, stop_reason None (vLLM's); ignore_eos ignores both."""
    prompt = llm.tokenizer.encode("ROMEO:")
    for eos, reason in ((5, 5), (1, None)):
        out = llm.generate([prompt], SamplingParams(max_tokens=4, allowed_token_ids=[eos]), use_tqdm=False)[0]
        c = out.outputs[0]
        assert (c.finish_reason, c.stop_reason, c.token_ids) == ("stop", reason, [eos]), eos
        out = llm.generate([prompt], SamplingParams(max_tokens=3, allowed_token_ids=[eos], ignore_eos=True),
                           use_tqdm=False)[0]
        assert out.outputs[0].finish_reason == "length" and out.outputs[0].token_ids == [eos] * 3
