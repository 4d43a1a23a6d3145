"""Where an engine's device memory goes while it is built: the suite's engine built as ``build_engine`` builds it,
stage by stage, with the device's memory stats after each (JAX's ``memory_stats``: in use, peak, limit).

    python -m benchmarks.gpu.memory_probe [--model llama-3.1-8b] [--engine JSON] [--quant fp8]

``--engine``: EngineConfig fields over the GPU suite's ``ENGINE`` (``{"num_pages": null}``: the pages sized from
free memory, as ``jaxdyn serve`` sizes them). The stages: JAX's backend started under the engine's memory share
(``xla_options.gpu_memory_fraction``); the engine built on the weights' shapes (its KV pages sized); the weights
loaded while every step compiles (and what XLA's buffer assignment of the compiled steps needs besides their
arguments); the pages allocated; the warm-up (every step run once, the step costs measured). A stage
that fails prints its error and the stats at that moment, and the probe exits 1. Session 46: with default pages
the 8B bf16 engine ran out of memory on an H100 at 0.75 and at 0.9 of it, where 20,480 explicit pages (40 GiB)
built at 0.9.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

GIB = 2 ** 30


def describe(stats: dict | None) -> str:
    """One line of a device's memory stats in GiB (``n/a`` where the platform keeps none, as the CPU)."""
    if not stats:
        return "n/a"
    labels = {"bytes_in_use": "in use", "peak_bytes_in_use": "peak", "bytes_limit": "limit",
              "largest_free_block_bytes": "largest free block"}
    return ", ".join(f"{label} {stats[k] / GIB:.2f} GiB" for k, label in labels.items() if k in stats)


def compiled_needs(runner) -> str:
    """What a runner's compiled steps need besides their arguments: ``step_memory_need`` (XLA's buffer assignment,
    what ``check_step_room`` holds against the memory left beside the pages) and their code; "n/a" where no
    executable reports it."""
    need = runner.step_memory_need()
    if need is None:
        return "n/a"
    code = 0
    for compiled in runner._parts.values():
        try:
            code += compiled.memory_analysis().generated_code_size_in_bytes
        except Exception:  # noqa: BLE001 -- an executable that keeps no analysis
            pass
    return (f"{len(runner._compiled)} steps: the largest allocates {need / GIB:.3f} GiB as it runs, "
            f"code {code / GIB:.3f} GiB in all")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.memory_probe")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--engine", default=None, help="JSON of EngineConfig fields over the GPU suite's ENGINE")
    from benchmarks.gpu import suite
    suite.add_quant_arguments(ap)
    args = ap.parse_args(argv)
    suite.check_quant_arguments(ap, args)
    from benchmarks.gpu.gpu import ENGINE, engine_with
    try:
        engine_cfg = engine_with(ENGINE, json.loads(args.engine) if args.engine else {})
        config = suite._engine_config(engine_cfg)
    except (ValueError, TypeError) as e:
        ap.error(f"--engine: {e}")

    from jaxdyn.engine.xla_options import command_buffer_update_mode, gpu_memory_fraction
    command_buffer_update_mode()                     # build_engine's order: these before JAX's backend starts
    gpu_memory_fraction(config.gpu_memory_utilization)
    import jax

    from checkpoints.loader import load_weights, plan_model
    from jaxdyn.engine.core import EngineCore

    device = jax.devices()[0]
    t0 = time.perf_counter()

    def stage(name: str) -> None:
        print(f"{time.perf_counter() - t0:7.1f} s  {name}: {describe(device.memory_stats())}", flush=True)

    stage(f"backend started ({device.device_kind})")
    step = "plan"
    try:
        path = suite.model_dir(args.model, tempfile.mkdtemp(), **suite.quant_overrides(vars(args)))
        plan = plan_model(path, load_format="dummy")
        step = "engine on the weights' shapes"
        engine = EngineCore(plan.graphdef, plan.abstract, plan.mesh, plan.config, plan.tokenizer, config)
        stage(f"{step} ({engine.runner.config.num_pages} KV pages sized)")
        step = "weights loaded, steps compiled"
        runner = engine.runner
        allocate = runner.allocate_kv

        def allocate_kv():           # load_weights allocates the pages last: the stage before them reported
            nonlocal step
            stage(step)
            print(f"          compiled steps: {compiled_needs(runner)}", flush=True)
            step = "KV pages allocated"
            allocate()

        runner.allocate_kv = allocate_kv
        engine.load_weights(lambda: load_weights(plan), compile_steps=True)
        stage(step)
        step = "warm-up"
        engine.warmup()
        stage(step)
    except Exception as e:  # noqa: BLE001 -- the probe reports any stage's failure with the memory at that moment
        first = str(e).strip().splitlines()[0][:400] if str(e).strip() else ""
        print(f"FAILED at {step}: {type(e).__name__}: {first}", flush=True)
        stage("at the failure")
        return 1
    print(f"built: {engine.runner.config.num_pages} pages of {config.page_size} tokens", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
