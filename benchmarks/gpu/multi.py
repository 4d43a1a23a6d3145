"""Several GPUs of one host (issue 11): KV handoff, disaggregated vs aggregated serving, TP 2.

One call on a 2-GPU machine, each section a subprocess with its own time limit, logs and a
report written as it goes:

1. ``transfer``: ``benchmarks.disagg_transfer`` on the Llama-3.1-8B shape, prefill GPU 0 ->
   decode GPU 1: single process (gather, ``device_put``, scatter) against a plain copy of the
   same bytes between the two GPUs (the NVLink / PCIe ceiling as JAX sees it), and cross
   process (a prefill worker on GPU 0, gRPC bytes and ``jax.experimental.transfer``).
2. ``tp2``: ``benchmarks.gpu.step --tp 2 --quick`` (decode step against its floor over two GPUs).
3. ``goodput``: the same load on three set-ups of the 8B shape with random weights --
   ``disagg`` (``jaxdyn serve --disagg``, prefill GPU 0, decode GPU 1), ``replicas`` (two
   ``jaxdyn worker --role both``, one per GPU, behind ``jaxdyn serve --workers``) and ``tp2``
   (``jaxdyn serve --tp 2``) -- ``jaxdyn bench serve`` random 2048-in / 256-out over a rate
   sweep, goodput under TTFT <= 500 ms and TPOT <= 50 ms (DistServe's measure), JSON and plots.

    python -m benchmarks.gpu.multi --out DIR [--sections transfer,tp2,goodput] [--rates 2,4,8]
        [--num-prompts 40] [--budget-s 560]

On the device machine (wheels carried for what it lacks):

    pip install --no-index --no-deps .gpu_wheels/*.whl .gpu_wheels_extra/*.whl -t /tmp/pydeps && \\
      PYTHONPATH=$PWD:/tmp/pydeps python -m benchmarks.gpu.multi --out $OUT/multi
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx

MODEL = "llama-3.1-8b"
ENGINE_FLAGS = ["--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "2560",
                "--max-num-seqs", "64", "--max-num-batched-tokens", "2048",
                "--token-buckets", "64,512,2048", "--page-buckets", "160"]
SERVE_FLAGS = ENGINE_FLAGS + ["--log-level", "warning"]
# The set-ups compile the same step shapes: later ones load them from JAX's persistent cache.
CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": "/tmp/jaxdyn-multi-cache",
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Section:
    def __init__(self, out_dir: str, deadline: float):
        self.out_dir, self.deadline = out_dir, deadline
        self.procs: list[subprocess.Popen] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def start(self, name: str, cmd: list[str], env=None) -> subprocess.Popen:
        log = open(os.path.join(self.out_dir, f"{name}.log"), "w")
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, **CACHE_ENV, **(env or {})},
                             start_new_session=True)
        self.procs.append(p)
        return p

    def run(self, name: str, cmd: list[str], env=None, limit: float | None = None) -> int:
        p = self.start(name, cmd, env)
        try:
            return p.wait(max(1.0, min(limit or 1e9, self.left())))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return 124

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(10)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        self.procs.clear()


def _wait_healthy(url: str, procs, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a server process exited while starting")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f} s")


def _wait_line(path: str, pattern: str, proc, timeout: float) -> re.Match:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with open(path) as f:
            m = re.search(pattern, f.read())
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"{path}: the process exited")
        time.sleep(0.5)
    raise TimeoutError(f"{path}: no {pattern!r} after {timeout:.0f} s")


def goodput(out_dir: str, setup: str, rates: str, num_prompts: int, deadline: float, *, model: str = MODEL,
            input_len: int = 2048, output_len: int = 256) -> dict:
    from benchmarks.gpu.suite import model_dir
    sec = Section(out_dir, deadline)
    py = sys.executable
    port = _port()
    model = model_dir(model, "/tmp/jaxdyn-multi-scratch")   # the preset's shapes + a word-level tokenizer
    url = f"http://127.0.0.1:{port}"
    noalloc = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    try:
        if setup == "disagg":
            procs = [sec.start(f"{setup}-server", [py, "-m", "serving.cli", "serve", "--model", model, "--port",
                                                   str(port), *SERVE_FLAGS, "--disagg", "--prefill-devices", "0",
                                                   "--decode-devices", "1", "--disagg-min-remote-tokens", "256"])]
        elif setup == "tp2":
            procs = [sec.start(f"{setup}-server", [py, "-m", "serving.cli", "serve", "--model", model, "--port",
                                                   str(port), *SERVE_FLAGS, "--tp", "2"])]
        else:
            procs, addrs = [], []
            for gpu in (0, 1):
                name = f"{setup}-worker{gpu}"
                w = sec.start(name, [py, "-m", "serving.cli", "worker", "--role", "both", "--model", model,
                                     "--port", "0", *ENGINE_FLAGS],
                              env={"CUDA_VISIBLE_DEVICES": str(gpu), **noalloc})
                procs.append(w)
            for gpu, w in zip((0, 1), procs):
                m = _wait_line(os.path.join(out_dir, f"{setup}-worker{gpu}.log"), r"listening on ([\d.]+:\d+)",
                               w, sec.left() - 60)
                addrs.append(m.group(1))
            procs.append(sec.start(f"{setup}-server", [py, "-m", "serving.cli", "serve", "--model", model,
                                                       "--load-format", "dummy", "--port", str(port),
                                                       "--workers", ",".join(addrs)],
                                   env={"JAX_PLATFORMS": "cpu"}))
        ready_s = _wait_healthy(url, procs, sec.left() - 40)
        js = os.path.join(out_dir, f"goodput-{setup}.json")
        rc = sec.run(f"{setup}-bench", [py, "-m", "serving.cli", "bench", "serve", "--url", url,
                                        "--tokenizer", model,
                                        "--dataset", "random", "--random-input-len", str(input_len),
                                        "--random-output-len", str(output_len), "--num-prompts", str(num_prompts),
                                        "--request-rate", rates, "--slo-ttft-ms", "500", "--slo-tpot-ms", "50",
                                        "--num-warmups", "2", "--seed", "0", "--out", js,
                                        "--plot", os.path.join(out_dir, f"plots-{setup}"), "--disable-tqdm"])
        result = {"setup": setup, "ready_s": ready_s, "bench_rc": rc}
        if os.path.exists(js):
            with open(js) as f:
                result["bench"] = json.load(f)
        return result
    finally:
        sec.stop_all()


def _goodput_table(results: list[dict]) -> str:
    rows = ["| set-up | ready s | rate req/s | goodput req/s | output tok/s | median TTFT ms | p99 TTFT ms | "
            "median TPOT ms | p99 TPOT ms | failed |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        runs = (r.get("bench") or {}).get("runs") or []
        if not runs:
            rows.append(f"| {r['setup']} | {r.get('ready_s', float('nan')):.0f} | — | — | — | — | — | — | — | "
                        f"{r.get('error', 'no result')} |")
        for run in runs:
            g = run["summary"].get

            def f(key, spec):
                v = g(key)
                return "—" if not isinstance(v, (int, float)) or v != v else format(v, spec)
            rows.append(f"| {r['setup']} | {r['ready_s']:.0f} | {run['request_rate']} | {f('goodput', '.2f')} | "
                        f"{f('output_throughput', '.0f')} | {f('median_ttft_ms', '.0f')} | {f('p99_ttft_ms', '.0f')} | "
                        f"{f('median_tpot_ms', '.1f')} | {f('p99_tpot_ms', '.1f')} | {g('failed', 0)} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sections", default="transfer,tp2,goodput")
    ap.add_argument("--setups", default="disagg,replicas,tp2")
    ap.add_argument("--rates", default="2,4,8")
    ap.add_argument("--num-prompts", type=int, default=40)
    ap.add_argument("--budget-s", type=float, default=560)
    ap.add_argument("--model", default=MODEL, help="a preset (random weights)")
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--lengths", default="128,512,2048,8192", help="transfer: prompt lengths")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t_end = time.monotonic() + args.budget_s
    sections = args.sections.split(",")
    report = [f"# Two GPUs: KV handoff, disaggregated vs aggregated, TP 2 — {datetime.date.today()}", "",
              f"Command: `python -m benchmarks.gpu.multi {' '.join(argv if argv is not None else sys.argv[1:])}`",
              ""]
    path = os.path.join(args.out, "report.md")

    def save():
        with open(path, "w") as f:
            f.write("\n".join(report) + "\n")

    py = sys.executable
    sec = Section(args.out, t_end)
    if "transfer" in sections:
        md = os.path.join(args.out, "transfer.md")
        rc = sec.run("transfer", [py, "-m", "benchmarks.disagg_transfer", "--preset", args.model,
                                  "--prefill-devices", "0", "--decode-devices", "1",
                                  "--lengths", args.lengths, "--cross-process", "--cross-devices", "0",
                                  "--out", md], env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, limit=170)
        report += ["## KV handoff", "", open(md).read() if os.path.exists(md) else f"(failed, rc {rc}: see transfer.log)", ""]
        save()
    if "tp2" in sections:
        md = os.path.join(args.out, "tp2.md")
        rc = sec.run("tp2", [py, "-m", "benchmarks.gpu.step", "--models", args.model, "--quick", "--tp", "2",
                             "--out", md], limit=110)
        report += ["## TP 2 decode step", "", open(md).read() if os.path.exists(md) else f"(failed, rc {rc}: see tp2.log)", ""]
        save()
    if "goodput" in sections:
        results = []
        setups = args.setups.split(",")
        for i, setup in enumerate(setups):
            share = (t_end - time.monotonic()) / (len(setups) - i)
            try:
                results.append(goodput(args.out, setup, args.rates, args.num_prompts, time.monotonic() + share,
                                       model=args.model, input_len=args.input_len, output_len=args.output_len))
            except Exception as e:          # a set-up that fails leaves its logs; the next one runs
                results.append({"setup": setup, "error": repr(e)[:200]})
            report_now = report + [f"## Goodput (random {args.input_len} in / {args.output_len} out)", "",
                                   _goodput_table(results), ""]
            with open(path, "w") as f:
                f.write("\n".join(report_now) + "\n")
        report += [f"## Goodput (random {args.input_len} in / {args.output_len} out, SLO TTFT <= 500 ms, "
                   "TPOT <= 50 ms)", "",
                   _goodput_table(results), ""]
        save()
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
