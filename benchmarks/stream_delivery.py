"""Host cost of handing one engine step's outputs to the server's streams (CPU, no model).

``AsyncEngine`` runs the engine on a thread and the HTTP server on an asyncio loop. Each step's outputs
cross between them; this times the engine thread's side for N streams, delivered one thread-safe call per
request (as before) or one per step (``_post``), with the loop draining its queues as a server does:

    python -m benchmarks.stream_delivery [--streams 512] [--steps 50]

It prints ms of the engine thread per step for both and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

from jaxdyn.engine.async_engine import _post, _Stream


async def _measure(num_streams: int, steps: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    streams = [_Stream(loop) for _ in range(num_streams)]
    res: dict[str, float] = {}

    def producer(batched: bool) -> None:
        t0 = time.perf_counter()
        for step in range(steps):
            if batched:
                _post({loop: [(s, step) for s in streams]})
            else:
                for s in streams:
                    loop.call_soon_threadsafe(s.queue.put_nowait, step)
        res["per step" if batched else "per request"] = (time.perf_counter() - t0) / steps * 1e3

    for batched in (False, True):
        th = threading.Thread(target=producer, args=(batched,))
        th.start()
        got = 0
        while got < steps * num_streams:
            for s in streams:
                while not s.queue.empty():
                    s.queue.get_nowait()
                    got += 1
            await asyncio.sleep(0)
        th.join()
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stream_delivery")
    p.add_argument("--streams", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args(argv)
    res = asyncio.run(_measure(args.streams, args.steps))
    print(f"{args.streams} streams: one call per request {res['per request']:.2f} ms of the engine thread a step, "
          f"one call per step {res['per step']:.2f} ms: {res['per request'] / res['per step']:.1f}x")
    print(f"reproduce: python -m benchmarks.stream_delivery --streams {args.streams} --steps {args.steps}")


if __name__ == "__main__":
    main()
