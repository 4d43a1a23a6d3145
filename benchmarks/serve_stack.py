"""What the HTTP stack carries, apart from the model: the real server (``serving.app`` on uvicorn) over an
engine that costs nothing on a device, driven by a raw socket client and by ``jaxdyn bench serve`` with one or
more client processes (CPU, no model).

The engine (``SyntheticCore`` on ``AsyncEngine``'s thread) emits one token (the word ``w5``) to every running
request each step and sleeps ``--step-ms`` between steps; the raw client reads bytes and counts tokens, so its
figure is the server's. ``bench serve``'s figures against it show how much of a served measurement the client
process itself sets.

    python -m benchmarks.serve_stack [--streams 300] [--tokens 200] [--step-ms 4] [--clients 1,2]

prints output tok/s of each client against the raw client's, and the command that reproduces it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time


class SyntheticCore:
    """EngineCore's face for ``AsyncEngine``: every running request gets the token ``w5`` each step."""

    def __init__(self, tokenizer, step_s: float, max_num_seqs: int = 1024):
        from jaxdyn import EngineConfig
        from jaxdyn.engine.metrics import EngineMetrics
        self.config = EngineConfig(max_num_seqs=max_num_seqs)
        self.tokenizer, self.max_model_len, self.metrics, self.load_info = tokenizer, 1 << 16, EngineMetrics(), {}
        self.step_s = step_s
        self.requests: dict[str, list] = {}

    def check_request(self, prompt_ids, params) -> None:
        pass

    def add_request(self, rid, prompt_ids, params, priority=0, arrival_time=None):
        self.requests[rid] = [list(prompt_ids), params.max_tokens or 16, [], ""]

    def abort(self, rid):
        self.requests.pop(rid, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self):
        from jaxdyn.engine.request import CompletionOutput, RequestOutput, TokenPrefix
        time.sleep(self.step_s)
        outs = []
        for rid, r in list(self.requests.items())[:self.config.max_num_seqs]:
            r[2].append(5)
            r[3] += "w5 "
            done = len(r[2]) >= r[1]
            outs.append(RequestOutput(rid, r[0], [CompletionOutput(
                0, r[3], TokenPrefix(r[2], len(r[2])), "w5 ", [5], None, None, None, "length" if done else None)],
                done))
            if done:
                del self.requests[rid]
        return outs


def serve(port: int, model_dir: str, step_ms: float) -> None:
    import uvicorn

    from jaxdyn import AsyncEngine
    from jaxdyn.engine.tokenizer import Tokenizer
    from serving.app import ServerState, build_app
    state = ServerState("synthetic")
    state.engine = AsyncEngine(SyntheticCore(Tokenizer.from_pretrained(model_dir), step_ms / 1e3))
    uvicorn.run(build_app(state), host="127.0.0.1", port=port, log_level="warning")


async def raw_client(port: int, streams: int, tokens: int) -> float:
    """Output tok/s read straight off the sockets (no SSE or JSON parsing)."""
    counted = [0]

    async def one(i: int) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        body = json.dumps({"model": "synthetic", "prompt": f"w1 w2 w{i % 100}", "max_tokens": tokens,
                           "stream": True, "ignore_eos": True}).encode()
        w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await w.drain()
        buf = b""
        while b"[DONE]" not in buf[-64:]:
            d = await r.read(1 << 16)
            if not d:
                break
            buf += d
        counted[0] += buf.count(b"w5 ")
        w.close()

    t = time.perf_counter()
    await asyncio.gather(*[one(i) for i in range(streams)])
    return counted[0] / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve_stack")
    ap.add_argument("--streams", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--step-ms", type=float, default=4.0)
    ap.add_argument("--clients", default="1,2", help="bench serve client processes to try")
    args = ap.parse_args(argv)
    from benchmarks.gpu.suite import _free_port, _healthy, model_dir
    d = model_dir("tiny", tempfile.mkdtemp())
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    code = f"from benchmarks.serve_stack import serve; serve({port}, {d!r}, {args.step_ms})"
    server = subprocess.Popen([sys.executable, "-c", code], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if _healthy(url):
                break
            time.sleep(0.1)
        else:
            raise SystemExit("the server did not start")
        rows = [("raw socket client", asyncio.run(raw_client(port, args.streams, args.tokens)))]
        for n in [int(x) for x in args.clients.split(",")]:
            out = os.path.join(tempfile.mkdtemp(), "run.json")
            subprocess.run([sys.executable, "-m", "serving.cli", "bench", "serve", "--url", url, "--model",
                            "synthetic", "--tokenizer", d, "--dataset", "random", "--random-input-len", "16",
                            "--random-output-len", str(args.tokens), "--num-prompts", str(args.streams),
                            "--request-rate", "inf", "--disable-tqdm", "--num-clients", str(n), "--out", out],
                           env=env, check=True, stdout=subprocess.DEVNULL)
            with open(out) as f:
                rows.append((f"jaxdyn bench serve, {n} client process{'es' if n > 1 else ''}",
                             json.load(f)["runs"][0]["summary"]["output_throughput"]))
    finally:
        server.terminate()
        server.wait(10)
    print(f"{args.streams} streams x {args.tokens} tokens, a step every {args.step_ms:g} ms, "
          f"{os.cpu_count()} CPUs:")
    print("| client | output tok/s | x raw client |\n|---|---:|---:|")
    for name, v in rows:
        print(f"| {name} | {v:,.0f} | {v / rows[0][1]:.2f} |")
    print(f"reproduce: python -m benchmarks.serve_stack --streams {args.streams} --tokens {args.tokens} "
          f"--step-ms {args.step_ms:g} --clients {args.clients}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
