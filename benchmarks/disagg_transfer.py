"""KV handoff between a prefill mesh and a decode mesh: bandwidth and latency by prompt length.

Single process (``DisaggEngine``'s path): the pages of a prompt of L tokens are gathered
into a KV block on the prefill mesh, ``jax.device_put`` onto the decode mesh, scattered into
pages there (``jaxdyn.kv.transfer``). Reported per L: the block's bytes (the model's own kv
heads), the median time of each stage, the transfer's GB/s, and its ratio to a plain
``device_put`` of an array of the same bytes between the same two devices, measured in the
same run (the link's ceiling as JAX sees it: NVLink or PCIe on GPUs, memcpy on CPU).

Cross process (``--cross-process``): a real prefill worker (``jaxdyn worker --role prefill``,
random weights in the preset's shapes) in a child process; this process sends it prompts of L
tokens through ``RemotePrefillRole`` with each KV transport (``grpc``: bytes in the stream;
``jax``: ``jax.experimental.transfer`` pull). Reported per L and transport: the handoff latency
(prompt sent -> KV block on this process's device; includes the prefill itself), the transfer
part (header received -> block on the device) and its GB/s.

    python -m benchmarks.disagg_transfer [--preset llama-3.1-8b] [--prefill-devices 0] \\
        [--decode-devices 1] [--lengths 128,512,2048,8192] [--cross-process] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import queue
import re
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import _table
from jaxdyn.config import ModelConfig
from jaxdyn.kv.cache import KVCacheSpec
from jaxdyn.kv.transfer import KVGather, KVScatter, PagedKV, block_nbytes, measure_handoff
from jaxdyn.models.presets import preset_config
from jaxdyn.parallel.sharding import make_mesh, stored_kv_heads

PAGE = 16


def _plain_copy_seconds(nbytes: int, src, dst, repeats: int = 5) -> float:
    x = jax.device_put(np.ones(max(nbytes // 2, 1), np.uint16).view(jnp.bfloat16), src)
    jax.block_until_ready(x)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        y = jax.device_put(x, dst)
        jax.block_until_ready(y)
        times.append(time.perf_counter() - t0)
        del y
    return float(np.median(times[1:]))


def single_process(cfg: ModelConfig, pre_devs, dec_devs, lengths, repeats=5) -> list[dict]:
    dtype = jnp.bfloat16
    max_pages = max(math.ceil(n / PAGE) for n in lengths)
    sides = []
    for devs in (pre_devs, dec_devs):
        mesh = make_mesh(len(devs), devs)
        spec = KVCacheSpec(cfg.num_layers, stored_kv_heads(cfg.num_kv_heads, len(devs)), 2 * max_pages + 1,
                           PAGE, cfg.head_dim, dtype)
        sides.append(PagedKV(spec, mesh))
    src, dst = sides
    rng = np.random.default_rng(0)
    src.kv_cache = [tuple(jax.device_put(rng.standard_normal(k.shape, np.float32).astype(jnp.bfloat16),
                                         k.sharding) for k in pair) for pair in src.kv_cache]
    gather = KVGather(src, cfg.num_kv_heads, max_pages)
    scatter = KVScatter(dst, cfg.num_kv_heads, max_pages)
    gather.warmup()
    scatter.warmup()
    rows = []
    for n in lengths:
        pages = math.ceil(n / PAGE)
        src_pages = rng.permutation(src.kv_spec.num_pages - 1)[:pages].tolist()
        dst_pages = rng.permutation(dst.kv_spec.num_pages - 1)[:pages].tolist()
        t = measure_handoff(gather, scatter, src_pages, dst_pages, list(range(n)), repeats=repeats)
        moved = gather.block_shape(gather.buckets[np.searchsorted(gather.buckets, pages)])
        wire = int(np.prod(moved)) * 2                        # the bucket's block crosses the link
        useful = block_nbytes(cfg.num_layers, cfg.num_kv_heads, pages, PAGE, cfg.head_dim, 2)
        plain = _plain_copy_seconds(wire, pre_devs[0], dec_devs[0])
        rows.append({"tokens": n, "pages": pages, "kv_mb": useful / 1e6, "wire_mb": wire / 1e6,
                     "gather_ms": t["gather"] * 1e3, "transfer_ms": t["transfer"] * 1e3,
                     "scatter_ms": t["scatter"] * 1e3, "total_ms": t["total"] * 1e3,
                     "gbps": wire / t["transfer"] / 1e9, "plain_gbps": wire / plain / 1e9,
                     "of_plain": plain / t["transfer"]})
    return rows


def cross_process(preset: str, lengths, worker_devices: str, device, transports=("grpc", "jax"),
                  repeats=3) -> list[dict]:
    from jaxdyn.engine.sampling_params import SamplingParams
    from serving.workers.remote_prefill import RemotePrefillRole

    max_len = max(lengths) + PAGE
    budget = min(max(lengths), 2048)
    env = {**os.environ}
    n_dev = len(worker_devices.split(","))
    if jax.devices()[0].platform == "cpu":
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_dev}"
    cmd = [sys.executable, "-m", "serving.cli", "worker", "--role", "prefill", "--model", preset,
           "--load-format", "dummy", "--dtype", "bfloat16", "--port", "0", "--devices", worker_devices,
           "--max-model-len", str(max_len), "--max-num-seqs", "1", "--max-num-batched-tokens", str(budget),
           "--token-buckets", str(budget), "--page-buckets", str(math.ceil(max_len / PAGE)),
           "--num-pages", str(2 * math.ceil(max_len / PAGE) + 8), "--no-prefix-cache"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    port, lines = queue.Queue(), []

    def read():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"listening on [\d.]+:(\d+)", line)
            if m:
                port.put(int(m.group(1)))
    threading.Thread(target=read, daemon=True).start()
    rows = []
    try:
        try:
            address = f"127.0.0.1:{port.get(timeout=400)}"
        except queue.Empty:
            raise RuntimeError("prefill worker did not start:\n" + "".join(lines[-20:])) from None
        params = SamplingParams(temperature=0.0, max_tokens=1, seed=0)
        rng = np.random.default_rng(0)
        cfg = ModelConfig.from_dict(preset_config(preset))
        for transport in transports:
            role = RemotePrefillRole([address], transport=transport, device=device, timeout_s=300)
            done: queue.Queue = queue.Queue()
            role.set_sink(done.put)
            role.timings = {}
            role.warmup()
            try:
                for n in lengths:
                    lat, xfer = [], []
                    for r in range(repeats + 1):
                        prompt = rng.integers(0, cfg.vocab_size, n).tolist()
                        t0 = time.perf_counter()
                        role.submit(f"{transport}-{n}-{r}", prompt, params)
                        item = done.get(timeout=300)
                        if not hasattr(item, "block"):
                            raise RuntimeError(f"prefill failed: {item}")
                        block = jax.device_put(item.block, device)
                        jax.block_until_ready(block)
                        t1 = time.perf_counter()
                        if r:                                  # the first is a warm-up
                            lat.append(t1 - t0)
                            xfer.append(role.timings.pop(item.request_id, (np.nan, np.nan)))
                            xfer[-1] = t1 - xfer[-1][0]       # header -> block on this device
                    nbytes = int(np.prod(item.block.shape)) * item.block.dtype.itemsize
                    rows.append({"transport": transport, "tokens": n, "wire_mb": nbytes / 1e6,
                                 "handoff_ms": float(np.median(lat)) * 1e3,
                                 "transfer_ms": float(np.median(xfer)) * 1e3,
                                 "gbps": nbytes / float(np.median(xfer)) / 1e9})
            finally:
                role.shutdown()
    finally:
        proc.kill()
        proc.wait(10)
    return rows


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--prefill-devices", default="0")
    ap.add_argument("--decode-devices", default="1")
    ap.add_argument("--lengths", default="128,512,2048,8192")
    ap.add_argument("--cross-process", action="store_true")
    ap.add_argument("--cross-devices", default=None,
                    help="the prefill worker's devices (in its own process; default: --prefill-devices)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    devs = jax.devices()
    pre = [devs[int(i)] for i in args.prefill_devices.split(",")]
    dec = [devs[int(i)] for i in args.decode_devices.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    cfg = ModelConfig.from_dict(preset_config(args.preset))
    cmd = "python -m benchmarks.disagg_transfer " + " ".join(argv if argv is not None else sys.argv[1:])
    out = [f"# KV handoff: {args.preset}, prefill devices {args.prefill_devices} -> decode devices "
           f"{args.decode_devices}", "",
           f"{datetime.date.today()}, {devs[0].device_kind} x{len(devs)} ({platform.node()}), "
           f"jax {jax.__version__}. Command: `{cmd}`", "",
           "## Single process (gather -> device_put -> scatter)", "",
           "Block = the model's own kv heads, all layers, K and V, bf16, padded to a power-of-two page "
           "count (wire MB). `of plain`: a plain device_put of the same bytes between the same devices "
           "over the handoff's transfer time.", ""]
    rows = single_process(cfg, pre, dec, lengths)
    out.append(_table(rows, [("tokens", "prompt tokens", ""), ("kv_mb", "KV MB", ".1f"),
                             ("wire_mb", "wire MB", ".1f"), ("gather_ms", "gather ms", ".3f"),
                             ("transfer_ms", "transfer ms", ".3f"), ("scatter_ms", "scatter ms", ".3f"),
                             ("total_ms", "handoff ms", ".3f"), ("gbps", "transfer GB/s", ".1f"),
                             ("plain_gbps", "plain copy GB/s", ".1f"), ("of_plain", "of plain", ".2f")]))
    print("\n".join(out), flush=True)
    if args.cross_process:
        xs = cross_process(args.preset, lengths, args.cross_devices or args.prefill_devices, dec[0])
        out += ["", "## Cross process (prefill worker over gRPC)", "",
                "handoff: prompt sent -> KV block on this process's device (includes the prefill); "
                "transfer: reply header received -> block on the device.", "",
                _table(xs, [("transport", "transport", ""), ("tokens", "prompt tokens", ""),
                            ("wire_mb", "wire MB", ".1f"), ("handoff_ms", "handoff ms", ".2f"),
                            ("transfer_ms", "transfer ms", ".2f"), ("gbps", "GB/s", ".2f")])]
        print("\n".join(out[-3:]), flush=True)
    text = "\n".join(out) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
