"""The benchmark suite of one accelerator: sections in subprocesses with time budgets, one report.

An entry per accelerator kind (``benchmarks/gpu/gpu.py``, ``benchmarks/gpu/tpu.py``)
builds a ``Plan``: its sections, the sizes each runs at, a time budget per
subprocess, the environment. This module runs it, accelerator-independently:

1. ``probe``: a subprocess reads the device (kind, count, platform, jax version);
   the driver itself never initialises jax, so it holds no accelerator memory;
2. each section's steps run one at a time, each as
   ``python -m benchmarks.gpu.suite section NAME --result F --config JSON``
   in its own process group, killed when its budget runs out (SIGTERM, then
   SIGKILL); a crash, an OOM or a timeout ends that step only, and what it had
   recorded so far (it rewrites its result file as it goes) is kept;
3. a section whose Python modules are missing is reported as skipped;
4. after every step ``report.md`` and ``results.json`` are rewritten: date,
   device, jax version, the exact command of every step, every figure as a
   ratio to its floor or anchor. All subprocess output goes to ``suite.log``.

Those three files are all the output directory holds (a device call brings
back at most 8 files); intermediate files and the JAX compilation cache live
in ``--scratch`` (default: a new temporary directory).

Sections (bodies below): ``kernels`` (``python -m benchmarks.kernels``),
``ceilings`` (copy bandwidth, matmul rate and the jax.numpy decode attention
against them: the accelerator-neutral stand-in where there are no Pallas GPU
kernels), ``step`` (``benchmarks.gpu.step.bench_model``), ``host`` (GPU idle
share between engine steps), ``offline`` (``jaxdyn bench offline``'s
``benchmark``), ``serve`` (``jaxdyn serve`` cold and warm start, then
``jaxdyn bench serve`` against it).

    python -m benchmarks.gpu.suite --dry-run --out /tmp/suite [--sections host,offline] [--budget-s N] [--list]

``--dry-run`` runs every section on the CPU with the ``tiny`` preset and toy
sizes (the plumbing, in about three minutes); the GPU and TPU entries take the
same flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import inspect
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback

# Only the standard library at module level: the driver must not import jax.

# ----------------------------------------------------------------------------- anchors

@dataclasses.dataclass(frozen=True)
class Anchor:
    what: str          # the system and setup the figure is from
    value: float
    unit: str
    source: str


_AIMULTIPLE = ("AIMultiple, 'LLM inference engines' benchmark (third-party, 2025): 1,000 ShareGPT prompts, "
               "Llama-3.1-8B-Instruct bf16, one H100 80GB, offline batch, "
               "https://research.aimultiple.com/inference-engines")
_SGLANG_030 = ("SGLang v0.3.0 vs vLLM v0.6.0 reproduction (2024): github.com/sgl-project/sglang "
               "benchmark/benchmark_vllm_060/README.md, Llama-3.1-8B-Instruct, one A100 80G, ShareGPT")

# Published figures for Llama-3.1-8B. Their datasets are ShareGPT (short prompts, long replies); ours are
# random 1024-in / 128-out and shared-prefix prompts, so the ratios say where we stand, not who wins.
ANCHORS = {
    "vllm_h100_offline": Anchor("vLLM, 1×H100, ShareGPT, offline", 12_553, "output tok/s", _AIMULTIPLE),
    "sglang_h100_offline": Anchor("SGLang, 1×H100, ShareGPT, offline", 16_215, "output tok/s", _AIMULTIPLE),
    "sglang030_a100_rate_inf": Anchor("SGLang 0.3, 1×A100, 5,000 ShareGPT prompts at rate inf", 4_281.51,
                                      "output tok/s", _SGLANG_030),
    "sglang030_a100_rate4_itl": Anchor("SGLang 0.3, 1×A100, 4 req/s: median ITL", 11.93, "ms", _SGLANG_030),
    "sglang030_a100_rate4_ttft": Anchor("SGLang 0.3, 1×A100, 4 req/s: median TTFT", 31.98, "ms", _SGLANG_030),
    "sglang030_a100_rate4_tpot": Anchor("SGLang 0.3, 1×A100, 4 req/s: median TPOT", 13.17, "ms", _SGLANG_030),
}
COLD_START_TARGET_S = 60.0      # process start -> /health 200, empty compilation cache
WARM_START_TARGET_S = 15.0      # the same with the compilation cache warm


# ----------------------------------------------------------------------------- plans

@dataclasses.dataclass(frozen=True)
class Step:
    """One subprocess of a section: a body and its configuration (JSON), with a time budget."""
    label: str
    budget_s: float
    config: dict


@dataclasses.dataclass(frozen=True)
class Section:
    name: str                          # the body: kernels, ceilings, step, host, offline, serve
    title: str
    steps: tuple[Step, ...]
    requires: tuple[str, ...] = ()     # Python modules the section cannot run without
    body: str = ""                     # the body when it is not ``name`` (a second serve section)


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str                          # "gpu", "tpu", "dry run (CPU)"
    entry: str                         # the module a person runs: python -m ENTRY
    sections: tuple[Section, ...]
    env: dict = dataclasses.field(default_factory=dict)   # every subprocess; "{scratch}" is replaced
    expect_platform: str | None = None  # "gpu" / "tpu": stop after the probe when the device differs
    datasheets: tuple = ()             # ((device-kind substring, bytes/s, bf16 FLOP/s, source), ...)
    probe_budget_s: float = 60.0
    notes: tuple[str, ...] = ()
    # the device calls the plan is run in (``--sections`` of each, in order); empty: one call
    calls: tuple[tuple[str, ...], ...] = ()

    def budget(self, only: list[str] | None = None) -> float:
        return sum(st.budget_s for s in self.sections if only is None or s.name in only for st in s.steps)

    def call_groups(self) -> tuple[tuple[str, ...], ...]:
        return self.calls or (tuple(s.name for s in self.sections),)


SERVE_MODULES = ("starlette", "uvicorn", "pydantic", "httpx", "jinja2", "prometheus_client", "tokenizers")
ENGINE_MODULES = ("jax", "flax", "numpy", "tqdm", "tokenizers", "safetensors")


def kernels_section(argv: list[str], budget_s: float) -> Section:
    """``python -m benchmarks.kernels ARGV``: the Pallas GPU kernels vs copy bandwidth and matmul rate."""
    return Section("kernels", "Pallas kernels vs HBM bandwidth and matmul rate",
                   (Step("kernels", budget_s, {"argv": list(argv)}),), ENGINE_MODULES)


def ceilings_section(budget_s: float, *, bandwidth_gib: float, matmul_n: int,
                     points: list[tuple[int, int]]) -> Section:
    return Section("ceilings", "Copy bandwidth, matmul rate, reference decode attention",
                   (Step("ceilings", budget_s, {"bandwidth_gib": bandwidth_gib, "matmul_n": matmul_n,
                                                "points": [list(p) for p in points]}),), ENGINE_MODULES)


def step_section(models: list[dict], *, bandwidth_gib: float, matmul_n: int, prefill: int | None = None
                 ) -> Section:
    """``models``: [{"name", "batches", "contexts", "budget_s"}]; one subprocess per model."""
    steps = tuple(Step(f"step {m['name']}", m["budget_s"],
                       {"model": m["name"], "batches": list(m["batches"]), "contexts": list(m["contexts"]),
                        "bandwidth_gib": bandwidth_gib, "matmul_n": matmul_n, "prefill": prefill})
                  for m in models)
    return Section("step", "Model step vs its memory floor, prefill vs the matmul rate", steps, ENGINE_MODULES)


def host_section(budget_s: float, *, model: str, engine: dict, batches: list[int], prompt_len: int,
                 max_tokens: int, steps: int, dtype: str = "bfloat16", quant: str | None = None,
                 quantize_lm_head: bool = False) -> Section:
    return Section("host", "Device idle share between engine steps (host time per step)",
                   (Step("host", budget_s, {"model": model, "engine": engine, "batches": list(batches),
                                            "prompt_len": prompt_len, "max_tokens": max_tokens, "steps": steps,
                                            "dtype": dtype, "quant": quant,
                                            "quantize_lm_head": quantize_lm_head}),), ENGINE_MODULES)


def offline_section(budget_s: float, *, model: str, engine: dict, datasets: list[dict],
                    dtype: str = "bfloat16", matmul_n: int = 8192, quant: str | None = None,
                    quantize_lm_head: bool = False) -> Section:
    """``datasets``: [{"dataset": "random"|"prefix"|"sharegpt-lengths", "num_prompts", ...lengths}];
    ``matmul_n``: the size of the matmul whose rate the runs' matmul FLOP/s are set against."""
    return Section("offline", "Offline throughput (jaxdyn bench offline)",
                   (Step("offline", budget_s, {"model": model, "engine": engine, "datasets": datasets,
                                               "dtype": dtype, "matmul_n": matmul_n, "quant": quant,
                                               "quantize_lm_head": quantize_lm_head}),),
                   ENGINE_MODULES)


def serve_section(budget_s: float, *, model: str, engine: dict, runs: list[dict], ready_timeout_s: float,
                  warm_reserve_s: float, server_env: dict, dtype: str = "bfloat16", warm_start: bool = True,
                  compare: dict | None = None, ceiling: bool = False, quant: str | None = None,
                  quantize_lm_head: bool = False) -> Section:
    """``runs``: [{"label", "dataset", "num_prompts", "request_rate", ...lengths}] of ``jaxdyn bench serve``.
    ``compare``: {"label", "args", "runs", "reserve_s"}: after the warm start, a third server with ``args``
    added to the command line runs ``runs`` (the same load against a variant of the server, in the same
    call); ``reserve_s`` of the budget is kept for it.
    ``ceiling``: the section named ``ceiling``: the same server and client on a model whose steps cost next to
    nothing (the ``tiny`` preset), so its output tok/s is what the HTTP process, the engine loop's host work and
    the ``bench serve`` client can carry; no anchors, no start targets."""
    config = {"model": model, "engine": engine, "runs": runs, "dtype": dtype, "ready_timeout_s": ready_timeout_s,
              "warm_reserve_s": warm_reserve_s, "server_env": server_env, "warm_start": warm_start,
              "compare": compare, "ceiling": ceiling, "quant": quant, "quantize_lm_head": quantize_lm_head}
    if ceiling:
        return Section("ceiling", "Serving stack ceiling (jaxdyn serve on the tiny model + jaxdyn bench serve)",
                       (Step("serve", budget_s, config),), ENGINE_MODULES + SERVE_MODULES, body="serve")
    return Section("serve", "Server cold start and online serving (jaxdyn serve + jaxdyn bench serve)",
                   (Step("serve", budget_s, config),), ENGINE_MODULES + SERVE_MODULES)


def dry_run_plan(entry: str, first: str = "kernels") -> Plan:
    """Every section on the CPU with the ``tiny`` preset and toy sizes: the plumbing, in about three minutes.
    ``first``: the entry's hardware section (``kernels`` for a GPU, ``ceilings`` for a TPU)."""
    engine = dict(page_size=16, num_pages=512, max_num_seqs=16, max_num_batched_tokens=128, max_model_len=256,
                  token_buckets=[16, 128], page_buckets=[16])
    hw = (kernels_section(["--quick", "--sweep", "none"], 240) if first == "kernels" else
          ceilings_section(40, bandwidth_gib=0.05, matmul_n=256, points=[(2, 64), (8, 64)]))
    return Plan(
        name="dry run (CPU, tiny preset, toy sizes)", entry=entry, expect_platform=None,
        env={"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": "{scratch}/jax_cache",
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"},
        probe_budget_s=60,
        sections=(
            serve_section(160, model="tiny", engine=engine, ready_timeout_s=60, warm_reserve_s=20,
                          server_env={}, dtype="float32", runs=[
                              dict(label="random 64/16, rate inf", dataset="random", num_prompts=12,
                                   input_len=64, output_len=16, request_rate="inf", num_warmups=1, num_clients=2),
                              dict(label="random 64/16, 4 req/s", dataset="random", num_prompts=6,
                                   input_len=64, output_len=16, request_rate="4"),
                              dict(label="prefix 48+16/16, rate inf", dataset="prefix", num_prompts=12,
                                   prefix_len=48, suffix_len=16, num_prefixes=2, output_len=16,
                                   request_rate="inf")],
                          compare=dict(label="engine on a thread", args=["--no-engine-process"], reserve_s=40, runs=[
                              dict(label="random 64/16, rate inf", dataset="random", num_prompts=12,
                                   input_len=64, output_len=16, request_rate="inf", num_warmups=1)])),
            serve_section(90, model="tiny", engine=engine, ready_timeout_s=60, warm_reserve_s=0, server_env={},
                          dtype="float32", warm_start=False, ceiling=True, runs=[
                              dict(label="random 64/16, rate inf", dataset="random", num_prompts=24,
                                   input_len=64, output_len=16, request_rate="inf")]),
            # its engine takes ShareGPT-shaped requests (up to 2048 tokens) too
            # split steps on (off by default on the CPU), so that the whole-steps rerun runs too
            offline_section(90, model="tiny", dtype="float32", matmul_n=256,
                            engine=dict(engine, max_model_len=2048, page_buckets=[16, 128], split_steps=True),
                            datasets=[
                dict(dataset="random", num_prompts=24, input_len=64, output_len=16, num_warmups=2),
                dict(dataset="sharegpt-lengths", num_prompts=8, num_warmups=0, whole_steps=True),
                dict(dataset="prefix", num_prompts=24, prefix_len=48, suffix_len=16, num_prefixes=2,
                     output_len=16, num_warmups=2)]),
            host_section(60, model="tiny", engine=dict(engine, token_buckets=[4, 16, 128],
                                                       enable_prefix_caching=False),
                         batches=[4, 16], prompt_len=32, max_tokens=128, steps=8, dtype="float32"),
            step_section([dict(name="tiny", batches=[1, 4], contexts=[64], budget_s=60)],
                         bandwidth_gib=0.05, matmul_n=256, prefill=64),
            hw,
        ))


# ----------------------------------------------------------------------------- the driver

def _now() -> float:
    return time.monotonic()


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.{digits}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    return str(v)


def _shown(argv: list[str]) -> str:
    """The command as a person types it (the interpreter shown as ``python``)."""
    return shlex.join(["python" if a == sys.executable else a for a in argv])


class Driver:
    """Runs a plan's steps in subprocesses; rewrites report.md / results.json after each."""

    def __init__(self, plan: Plan, out_dir: str, *, scratch: str | None = None, only: list[str] | None = None,
                 budget_s: float | None = None, command: str = "", python: str = sys.executable):
        self.plan, self.out_dir, self.python, self.command = plan, out_dir, python, command
        os.makedirs(out_dir, exist_ok=True)
        self.scratch = scratch or tempfile.mkdtemp(prefix="jaxdyn-suite-")
        os.makedirs(self.scratch, exist_ok=True)
        unknown = [s for s in (only or []) if s not in {x.name for x in plan.sections}]
        if unknown:
            raise SystemExit(f"unknown section(s) {', '.join(unknown)}; this plan has "
                             f"{', '.join(s.name for s in plan.sections)}")
        self.sections = [s for s in plan.sections if only is None or s.name in only]
        planned = sum(st.budget_s for s in self.sections for st in s.steps)
        self.scale = (budget_s / planned) if budget_s and planned else 1.0
        self.total_budget = planned * self.scale
        self.log_path = os.path.join(out_dir, "suite.log")
        self.doc = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "plan": plan.name,
                    "command": command, "scratch": self.scratch, "budget_s": self.total_budget,
                    "device": None, "sections": []}

    # -- subprocesses ----------------------------------------------------------------------------

    def env(self) -> dict:
        env = dict(os.environ)
        env.update({k: v.replace("{scratch}", self.scratch) for k, v in self.plan.env.items()})
        env.setdefault("PYTHONUNBUFFERED", "1")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in paths:    # the sections import this repository (a checkout, not installed)
            env["PYTHONPATH"] = os.pathsep.join([root, *paths])
        return env

    def _run(self, body: str, label: str, config: dict, budget_s: float) -> dict:
        """Run one body in a subprocess within ``budget_s``; returns its record."""
        result = os.path.join(self.scratch, f"{label.replace(' ', '_').replace('/', '_')}.json")
        if os.path.exists(result):
            os.remove(result)
        config = dict(config, budget_s=round(budget_s, 1), scratch=self.scratch)
        argv = [self.python, "-m", "benchmarks.gpu.suite", "section", body, "--result", result,
                "--config", json.dumps(config, separators=(",", ":"))]
        rec = {"label": label, "command": _shown(argv), "budget_s": round(budget_s, 1)}
        print(f"[suite] {label}: start (budget {budget_s:.0f} s)", flush=True)
        t0 = _now()
        with open(self.log_path, "a") as log:
            log.write(f"\n===== {label} (budget {budget_s:.0f} s): {_shown(argv)}\n")
            log.flush()
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                    process_group=0, cwd=os.getcwd())
            try:
                rc = proc.wait(timeout=budget_s)
                rec["status"] = "ok" if rc == 0 else "failed"
                rec["rc"] = rc
            except subprocess.TimeoutExpired:
                rec["status"] = "timed out"
                _stop_group(proc)
            log.write(f"===== {label}: {rec['status']} after {_now() - t0:.1f} s\n")
        rec["seconds"] = round(_now() - t0, 1)
        try:
            with open(result) as f:
                rec.update(body=json.load(f))
        except (OSError, ValueError):
            rec["body"] = {}
        if rec["status"] == "failed":
            rec["reason"] = rec["body"].get("error") or f"exit status {rec.get('rc')}; see suite.log"
        elif rec["status"] == "timed out":
            rec["reason"] = f"budget of {budget_s:.0f} s ran out; what it recorded before is kept"
        print(f"[suite] {label}: {rec['status']} in {rec['seconds']:.0f} s"
              + (f" ({rec['reason']})" if rec.get("reason") else ""), flush=True)
        return rec

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> int:
        start = _now()
        deadline = start + self.total_budget + self.plan.probe_budget_s
        open(self.log_path, "w").close()
        probe = self._run("probe", "probe", {}, self.plan.probe_budget_s)
        self.doc["device"] = probe.get("body", {}).get("device")
        self.doc["probe"] = {k: probe.get(k) for k in ("status", "reason", "seconds")}
        dev = self.doc["device"] or {}
        self.write()
        if self.plan.expect_platform and dev.get("platform") != self.plan.expect_platform:
            why = (f"expected a {self.plan.expect_platform} device, the probe found "
                   f"{dev.get('platform', 'none')} ({probe.get('reason') or dev.get('device_kind', '?')})")
            self.doc["stopped"] = why
            self.write()
            print(f"[suite] stopped: {why}", file=sys.stderr)
            return 2
        for section in self.sections:
            srec = {"name": section.name, "title": section.title, "steps": []}
            self.doc["sections"].append(srec)
            missing = [m for m in section.requires if importlib.util.find_spec(m) is None]
            if missing:
                srec["status"] = "skipped"
                srec["reason"] = (f"missing Python module(s): {', '.join(missing)} (install the wheels: "
                                  "benchmarks/gpu/fetch_wheels.sh)")
                print(f"[suite] {section.name}: skipped: {srec['reason']}", flush=True)
                self.write()
                continue
            for step in section.steps:
                budget = min(step.budget_s * self.scale, deadline - _now())
                if budget < 5:
                    srec["steps"].append({"label": step.label, "status": "skipped",
                                          "reason": "no time left in the suite's budget", "seconds": 0,
                                          "budget_s": round(step.budget_s * self.scale, 1)})
                else:
                    srec["steps"].append(self._run(section.body or section.name, step.label, step.config,
                                                   budget))
                srec["status"] = _section_status(srec["steps"])
                self.write()
        self.doc["seconds"] = round(_now() - start, 1)
        self.write()
        print(self.summary(), flush=True)
        return 0

    # -- the report ------------------------------------------------------------------------------

    def datasheet(self):
        kind = (self.doc.get("device") or {}).get("device_kind", "")
        for sub, bw, flops, source in self.plan.datasheets:
            if sub.lower() in kind.lower():
                return bw, flops, source
        return None

    def figures(self, srec: dict) -> list[dict]:
        rows = []
        for st in srec.get("steps", []):
            body = st.get("body") or {}
            rows += body.get("figures", [])
            sheet = self.datasheet()
            meas = body.get("measured", {})
            tag = f" ({st['label']})" if len(srec["steps"]) > 1 else ""
            if "hbm_bandwidth" in meas:
                rows.append(figure(f"copy bandwidth{tag}", meas["hbm_bandwidth"] / 1e12, "TB/s",
                                   sheet and sheet[0] / 1e12, "datasheet", "higher"))
            if "matmul_rate" in meas:
                rows.append(figure(f"bf16 matmul rate{tag}", meas["matmul_rate"] / 1e12, "TFLOP/s",
                                   sheet and sheet[1] / 1e12, "datasheet", "higher"))
        return rows

    def report(self) -> str:
        d = self.doc
        dev = d.get("device") or {}
        lines = [f"# jaxdyn benchmark suite — {d['date'][:10]}", ""]
        if dev:
            lines.append(f"Device: **{dev.get('device_kind')}** × {dev.get('count')} ({dev.get('platform')}), "
                         f"jax {dev.get('jax')}, jaxlib {dev.get('jaxlib')}, Python {dev.get('python')}, "
                         f"host {dev.get('host_cpus')} CPUs.")
        else:
            lines.append(f"Device: unknown (probe {d.get('probe', {}).get('status')}: "
                         f"{d.get('probe', {}).get('reason')}).")
        lines += ["", f"Plan: {self.plan.name}. Command: `{d['command']}`. Budget {d['budget_s']:.0f} s"
                  + (f", whole run {d['seconds']:.0f} s." if "seconds" in d else " (running).")]
        for note in self.plan.notes:
            lines += ["", note]
        if d.get("stopped"):
            lines += ["", f"**Stopped:** {d['stopped']}."]
        sheet = self.datasheet()
        if sheet:
            lines += ["", f"Datasheet figures used as anchors: {sheet[0] / 1e12:.2f} TB/s, "
                          f"{sheet[1] / 1e12:.0f} TFLOP/s bf16 dense ({sheet[2]})."]
        lines += ["", "## Sections", "", "| section | status | seconds / budget | note |", "|---|---|---:|---|"]
        for s in d["sections"]:
            secs = sum(st.get("seconds", 0) for st in s["steps"])
            budget = sum(st.get("budget_s", 0) for st in s["steps"])
            note = s.get("reason") or "; ".join(f"{st['label']}: {st['reason']}" for st in s["steps"]
                                                if st.get("reason"))
            lines.append(f"| {s['name']} | {s.get('status', 'running')} | {secs:.0f} / {budget:.0f} | {note} |")
        lines += ["", "## Figures against their floors and anchors", "",
                  "ratio = value / anchor; the last column says which way is better.", "",
                  "| section | figure | value | anchor (floor, target or published) | ratio | better |",
                  "|---|---|---:|---|---:|---|"]
        for s in d["sections"]:
            for f in self.figures(s):
                anchor = f"{_fmt(f['anchor'])} {f['unit']} ({f['anchor_label']})" if f["anchor"] else "—"
                ratio = f"{f['ratio']:.2f}×" if f.get("ratio") is not None else "—"
                lines.append(f"| {s['name']} | {f['name']} | {_fmt(f['value'])} {f['unit']} | {anchor} | "
                             f"{ratio} | {f['better']} |")
        used = sorted({f["anchor_key"] for s in d["sections"] for f in self.figures(s) if f.get("anchor_key")})
        if used:
            lines += ["", "Published anchors:", ""]
            lines += [f"- {ANCHORS[k].what}: {ANCHORS[k].value:,} {ANCHORS[k].unit}. Source: {ANCHORS[k].source}."
                      for k in used]
        for s in d["sections"]:
            lines += ["", f"## {s['name']}: {s['title']}", "", f"Status: **{s.get('status', 'running')}**"
                      + (f" — {s['reason']}" if s.get("reason") else "") + "."]
            for st in s["steps"]:
                body = st.get("body") or {}
                lines += ["", f"### {st['label']}: {st['status']} in {st.get('seconds', 0):.0f} s "
                              f"(budget {st.get('budget_s', 0):.0f} s)"]
                if st.get("reason"):
                    lines += ["", f"Reason: {st['reason']}"]
                if st.get("command"):
                    lines += ["", "Command:", "", f"    {st['command']}"]
                if body.get("commands"):
                    lines += ["", "What it runs (reproducers):", ""] + [f"    {c}" for c in body["commands"]]
                for n in body.get("notes", []):
                    lines += ["", n]
                frag = body.get("fragment") or ""
                if body.get("fragment_file") and os.path.exists(body["fragment_file"]):
                    with open(body["fragment_file"]) as f:
                        frag = _demote(f.read()) + ("\n\n" + frag if frag else "")
                if frag.strip():
                    lines += ["", frag.strip()]
        return "\n".join(lines) + "\n"

    def summary(self) -> str:
        lines = ["", "| section | figure | value | ratio | better |", "|---|---|---:|---:|---|"]
        for s in self.doc["sections"]:
            figs = self.figures(s)
            if not figs:
                lines.append(f"| {s['name']} | ({s.get('status')}{': ' + s['reason'] if s.get('reason') else ''}) "
                             "| | | |")
            for f in figs:
                ratio = f"{f['ratio']:.2f}×" if f.get("ratio") is not None else "—"
                lines.append(f"| {s['name']} | {f['name']} | {_fmt(f['value'])} {f['unit']} | {ratio} | "
                             f"{f['better']} |")
        return "\n".join(lines)

    def write(self) -> None:
        doc = dict(self.doc, sections=[dict(s, figures=self.figures(s)) for s in self.doc["sections"]])
        _atomic_write(os.path.join(self.out_dir, "results.json"), json.dumps(doc, indent=1, default=str) + "\n")
        _atomic_write(os.path.join(self.out_dir, "report.md"), self.report())


def _section_status(steps: list[dict]) -> str:
    states = {st["status"] for st in steps}
    if states == {"ok"}:
        return "ok"
    if "ok" in states:
        return "partial"
    return steps[-1]["status"] if len(states) == 1 else "failed"


def _stop_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the step's process group (its server too), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            # the leader is gone; members may remain (a server): one more signal to the group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        except subprocess.TimeoutExpired:
            continue


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _demote(md: str) -> str:
    """A fragment's headings two levels down, under the report's ``### step`` heading."""
    return "\n".join("##" + line if line.startswith("#") else line for line in md.splitlines())


# ----------------------------------------------------------------------------- what bodies record

def figure(name: str, value, unit: str, anchor=None, anchor_label: str = "", better: str = "lower",
           anchor_key: str | None = None) -> dict:
    """A figure and its ratio to an anchor (a floor, a target, a published figure, another run)."""
    value = None if value is None else float(value)
    ratio = value / anchor if value is not None and anchor else None
    return {"name": name, "value": value, "unit": unit, "anchor": anchor, "anchor_label": anchor_label,
            "ratio": ratio, "better": f"{better} is better", "anchor_key": anchor_key}


def anchored(name: str, value, key: str, better: str) -> dict:
    a = ANCHORS[key]
    return figure(name, value, a.unit, a.value, a.what, better, key)


class Recorder:
    """A body's result file, rewritten on every change so a killed step keeps what it measured."""

    def __init__(self, path: str):
        self.path = path
        self.doc = {"figures": [], "fragment": "", "commands": [], "notes": [], "measured": {}}
        self.save()

    def add(self, *figures: dict) -> None:
        self.doc["figures"].extend(figures)
        self.save()

    def fragment(self, md: str) -> None:
        self.doc["fragment"] = md
        self.save()

    def command(self, cmd: str) -> None:
        self.doc["commands"].append(cmd)
        self.save()

    def note(self, text: str) -> None:
        self.doc["notes"].append(text)
        self.save()

    def save(self) -> None:
        _atomic_write(self.path, json.dumps(self.doc, indent=1, default=float) + "\n")


def md_tables(md: str) -> dict[str, list[dict]]:
    """{the ``###`` heading above it: rows as {column: cell}} of every markdown table in ``md``."""
    tables: dict[str, list[dict]] = {}
    lines, title, i = md.splitlines(), "", 0

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            title = line.lstrip("#").strip()
        elif (line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|")
              and set(lines[i + 1]) <= set("|-: ")):
            header, rows = cells(line), []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(header, cells(lines[i]))))
                i += 1
            tables[title] = rows
            continue
        i += 1
    return tables


def _num(text) -> float | None:
    try:
        return float(str(text).replace(",", "").replace("×", "").strip())
    except ValueError:
        return None


# ----------------------------------------------------------------------------- bodies

def body_probe(cfg: dict, rec: Recorder) -> None:
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"    # it only looks at the device
    import jax
    import jaxlib
    devs = jax.devices()
    rec.doc["device"] = {"platform": devs[0].platform, "device_kind": devs[0].device_kind, "count": len(devs),
                         "jax": jax.__version__, "jaxlib": getattr(jaxlib, "__version__", "?"),
                         "python": platform.python_version(), "host_cpus": os.cpu_count(),
                         "backend": jax.default_backend()}
    rec.save()
    print("probe:", rec.doc["device"], flush=True)


def kernels_figures(md: str) -> tuple[list[dict], dict]:
    """The kernels report as figures: each decode point's time against the time its KV read takes at the
    copy bandwidth of the same run, each prefill's FLOP rate against the matmul rate of the same run
    (recomputed from the µs column and the shapes the report states, not from its rounded ratios)."""
    import re
    figs, measured = [], {}
    m = re.search(r"HBM bandwidth \*\*([\d.]+) TB/s\*\*", md)
    if m:
        measured["hbm_bandwidth"] = float(m.group(1)) * 1e12
    m = re.search(r"bf16 matmul \*\*([\d.]+) TFLOP/s\*\*", md)
    if m:
        measured["matmul_rate"] = float(m.group(1)) * 1e12
    q_heads, kv_heads = 32, 8          # benchmarks.kernels.Q_HEADS, KV_HEADS (the report states them)
    tables = md_tables(md)
    bw, mm = measured.get("hbm_bandwidth"), measured.get("matmul_rate")
    for r in tables.get("Decode", []):
        b, c, d, us = (_num(r.get(k)) for k in ("batch", "context", "head_dim", "µs"))
        if None not in (b, c, d, us) and bw:
            kv_bytes = b * c * kv_heads * d * 2 * 2
            figs.append(figure(f"decode attention b{b:.0f} c{c:.0f} d{d:.0f}", us, "µs", kv_bytes / bw * 1e6,
                               "KV bytes / copy bandwidth", "lower"))
    for r in tables.get("Prefill (ragged kernel, causal)", []):
        d, n, prefix, chunk, us = (_num(r.get(k)) for k in ("head_dim", "sequences", "cached prefix", "chunk", "µs"))
        if None not in (d, n, prefix, chunk, us) and mm and us > 0:
            flops = 4 * q_heads * d * n * (chunk * prefix + chunk * (chunk + 1) / 2)
            figs.append(figure(f"prefill attention d{d:.0f} ×{n:.0f} chunk {chunk:.0f} prefix {prefix:.0f}",
                               flops / (us * 1e-6) / 1e12, "TFLOP/s", mm / 1e12, "bf16 matmul rate (same run)",
                               "higher"))
    return figs, measured


def body_kernels(cfg: dict, rec: Recorder) -> None:
    from benchmarks import kernels
    md = os.path.join(cfg["scratch"], "kernels.md")
    rec.doc["fragment_file"] = md
    rec.command(shlex.join(["python", "-m", "benchmarks.kernels", *cfg["argv"]]))
    kernels.main([*cfg["argv"], "--out", md])
    with open(md) as f:
        figs, measured = kernels_figures(f.read())
    rec.doc["measured"] = measured
    rec.add(*figs)


def body_ceilings(cfg: dict, rec: Recorder) -> None:
    """Copy bandwidth, matmul rate and the jax.numpy decode attention against them (any backend)."""
    import numpy as np

    from benchmarks import kernels as K
    bw, mm = K.measure_bandwidth(cfg["bandwidth_gib"]), K.measure_matmul(cfg["matmul_n"])
    rec.doc["measured"] = {"hbm_bandwidth": bw, "matmul_rate": mm}
    rec.save()
    rng = np.random.default_rng(0)
    rows = []
    for batch, context in cfg["points"]:
        inputs = K._decode_inputs(rng, batch, context, 128)
        t = K.time_per_call(K._reference, inputs)
        kv_bytes = batch * context * K.KV_HEADS * 128 * 2 * 2
        rows.append(dict(batch=batch, context=context, us=t * 1e6, kv_gbs=kv_bytes / t / 1e9, of_bw=kv_bytes / t / bw))
        rec.add(figure(f"reference decode attention b{batch} c{context}", t * 1e6, "µs",
                       kv_bytes / bw * 1e6, "KV bytes / copy bandwidth", "lower"))
        del inputs
    rec.fragment("\n".join([
        f"Measured: copy bandwidth **{bw / 1e12:.3f} TB/s** (donated in-place `x + 1` over "
        f"{cfg['bandwidth_gib']} GiB, read + write), bf16 matmul **{mm / 1e12:.1f} TFLOP/s** "
        f"({cfg['matmul_n']}³).", "",
        f"Decode attention through the jax.numpy reference (what the model runs where there is no Pallas "
        f"kernel): {K.Q_HEADS} query / {K.KV_HEADS} kv heads, head_dim 128, page {K.PAGE}, bf16.", "",
        K._table(rows, [("batch", "batch", "d"), ("context", "context", "d"), ("us", "µs", ".1f"),
                        ("kv_gbs", "KV GB/s", ".1f"), ("of_bw", "of copy bw", ".3f")])]))


def body_step(cfg: dict, rec: Recorder) -> None:
    import numpy as np

    from benchmarks import kernels as K
    from benchmarks.gpu import step as S
    if cfg.get("prefill"):
        S.PREFILL = int(cfg["prefill"])     # the dry run's toy prompt (the GPU plan keeps 2048)
    rec.command(f"python -m benchmarks.gpu.step --models {cfg['model']} (the same bench_model, at batches "
                f"{cfg['batches']} x contexts {cfg['contexts']}, prefill {S.PREFILL})")
    bw, mm = K.measure_bandwidth(cfg["bandwidth_gib"]), K.measure_matmul(cfg["matmul_n"])
    rec.doc["measured"] = {"hbm_bandwidth": bw, "matmul_rate": mm}
    rec.save()
    decode, prefill, skipped = S.bench_model(cfg["model"], bw, mm, cfg["batches"], cfg["contexts"],
                                             np.random.default_rng(0))
    for r in decode:
        rec.doc["figures"].append(figure(f"{r['model']} decode step b{r['batch']} c{r['context']}", r["step_ms"],
                                         "ms", r["floor_ms"], "(weights + KV bytes) / copy bandwidth", "lower"))
    for r in prefill:
        rec.doc["figures"].append(figure(f"{r['model']} prefill {r['tokens']} tokens", r["tflops"], "TFLOP/s",
                                         mm / 1e12, "bf16 matmul rate (measured): MFU", "higher"))
    rec.fragment("\n".join([
        f"Measured in this step: copy bandwidth **{bw / 1e12:.2f} TB/s**, bf16 matmul **{mm / 1e12:.0f} "
        f"TFLOP/s**. `step ms`: the compiled step back to back in steady state (the time of 10 steps taken from that of 30); `× floor`: over (weight + KV bytes) / "
        "bandwidth; `runner ms`: through `ModelRunner.step`.", "",
        K._table(decode, [("model", "model", ""), ("batch", "batch", "d"), ("context", "context", "d"),
                          ("step_ms", "step ms", ".2f"), ("floor_ms", "floor ms", ".2f"),
                          ("of_floor", "× floor", ".2f"), ("runner_ms", "runner ms", ".2f"),
                          ("tok_s", "tok/s (runner)", ".0f"), ("compile_s", "compile s", ".1f")]),
        K._table(prefill, [("model", "model", ""), ("tokens", "tokens", "d"), ("ms", "ms", ".1f"),
                           ("tflops", "TFLOP/s", ".0f"), ("mfu", "MFU", ".2f"),
                           ("attn_share", "attention share of FLOPs", ".2f"), ("compile_s", "compile s", ".1f")]),
        ("Skipped (KV does not fit beside the weights): "
         + ", ".join(f"b{r['batch']} c{r['context']}" for r in skipped) + "." if skipped else "")]))


def model_dir(preset: str, scratch: str, **overrides) -> str:
    """A checkpoint directory for ``--load-format dummy``: the preset's config.json and a word-level
    tokenizer over the whole vocabulary (token i is ``"w<i> "``, its trailing space included, and decoding
    concatenates), so random text has exact token lengths, two texts join without merging words (the
    prefix dataset), every output token is one streamed chunk, and detokenization runs as it does in serving.
    ``overrides`` replace config.json fields (a narrower model of the preset's depth and vocabulary, for
    the CPU's engine host-time benchmark)."""
    from jaxdyn.models.presets import preset_config
    tag = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    path = os.path.join(scratch, "models", f"{preset}-words{tag}")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    cfg = {**preset_config(preset), **overrides}
    tok = Tokenizer(models.WordLevel({f"w{i} ": i for i in range(cfg["vocab_size"])}, unk_token="w0 "))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\S+\s*"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tmp = path + ".partial"
    os.makedirs(tmp, exist_ok=True)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20}, f)
    os.replace(tmp, path)
    return path


def add_quant_arguments(ap: argparse.ArgumentParser, whose: str = "the model") -> None:
    """``--quant`` and ``--quantize-lm-head``: ``whose`` model quantized as ``quant_overrides`` lays it out
    (``check_quant_arguments`` after parsing)."""
    from jaxdyn.config import QUANTIZATIONS        # no JAX
    ap.add_argument("--quant", default=None, choices=QUANTIZATIONS,
                    help=f"{whose} quantized (random weights laid out as jaxdyn convert --quant lays them out)")
    ap.add_argument("--quantize-lm-head", action="store_true",
                    help=f"with --quant fp8: {whose}'s lm_head in fp8 too (jaxdyn serve --quantize-lm-head)")


def check_quant_arguments(ap: argparse.ArgumentParser, args) -> None:
    if args.quantize_lm_head and args.quant != "fp8":
        ap.error("--quantize-lm-head needs --quant fp8")


def quant_overrides(cfg: dict) -> dict:
    """config.json fields that quantize a section's model (``--quant``: random weights laid out as ``jaxdyn
    convert --quant`` lays them out; ``--quantize-lm-head``: the fp8 model's lm_head too)."""
    return ({"jaxdyn_quantization": cfg["quant"]} if cfg.get("quant") else {}) | (
        {"jaxdyn_quantize_lm_head": True} if cfg.get("quantize_lm_head") else {})


def _engine_config(engine: dict):
    """The plan's engine as an EngineConfig, with the executable cache ``jaxdyn serve`` would use (inside the
    plan's JAX compilation cache): a section after ``serve`` loads the server's compiled steps."""
    from jaxdyn import EngineConfig
    from jaxdyn.engine.executable_cache import default_directory
    kw = dict(engine)
    for k in ("token_buckets", "page_buckets"):
        if kw.get(k) is not None:
            kw[k] = tuple(kw[k])
    kw.setdefault("executable_cache_dir", default_directory())
    return EngineConfig(**kw)


def body_host(cfg: dict, rec: Recorder) -> None:
    """Wall time per engine step in steady decode vs device time of the same compiled step back to back."""
    import numpy as np

    from benchmarks.gpu.step import decode_work, steady_step_time
    from jaxdyn import SamplingParams
    from jaxdyn.engine.llm import build_engine

    path = model_dir(cfg["model"], cfg["scratch"], **quant_overrides(cfg))
    engine = build_engine(path, load_format="dummy", dtype=cfg["dtype"], config=_engine_config(cfg["engine"]),
                          warmup=False)
    rec.note(f"Model {cfg['model']} (random weights, word-level tokenizer: detokenization on), engine "
             f"{cfg['engine']}; greedy requests with ignore_eos, prompts of {cfg['prompt_len']} tokens; "
             f"{cfg['steps']} steady decode steps timed per point. `device ms`: the same compiled step "
             "(same bucket, greedy) called back to back via `ModelRunner.prepare`, in steady state "
             "(`benchmarks.gpu.step.steady_step_time`); idle share = 1 - device / wall; "
             "`host ms`: `EngineCore.host_time` per step less the wait for the device.")
    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(0)
    rows = []
    for batch in cfg["batches"]:
        ids = [f"h{batch}-{i}" for i in range(batch)]
        params = SamplingParams(max_tokens=cfg["max_tokens"], ignore_eos=True, temperature=0.0)
        for rid in ids:
            engine.add_request(rid, rng.integers(0, vocab, cfg["prompt_len"]).tolist(), params)
        sched = engine.scheduler
        while sched.waiting or any(s.num_computed < len(s.prompt_ids) for s in sched.running):
            engine.step()
        for _ in range(3):       # the decode bucket compiles here
            engine.step()
        h0, w0, t0 = engine.host_time, engine.wait_time, time.perf_counter()
        for _ in range(cfg["steps"]):
            engine.step()
        wall = (time.perf_counter() - t0) / cfg["steps"]
        wait = (engine.wait_time - w0) / cfg["steps"]
        host = (engine.host_time - h0) / cfg["steps"] - wait
        running = len(sched.running)
        context = int(np.mean([s.num_tokens for s in sched.running])) if running else cfg["prompt_len"]
        for rid in ids:
            engine.abort(rid)
        while engine.has_unfinished():
            engine.step()
        runner = engine.runner
        work = decode_work(rng, runner, vocab, batch, context)
        compiled, args, _ = runner.prepare(work)
        device = steady_step_time(runner, compiled, args, cfg["steps"])
        rows.append(dict(batch=batch, running=running, context=context, wall_ms=wall * 1e3,
                         device_ms=device * 1e3, idle=1 - device / wall, host_ms=host * 1e3, wait_ms=wait * 1e3,
                         host_share=host / wall))
        rec.add(figure(f"engine step, {batch} running", wall * 1e3, "ms", device * 1e3,
                       "the same step back to back (device time)", "lower"),
                figure(f"device idle share, {batch} running", 1 - device / wall, "", None, "", "lower"),
                figure(f"host time per step, {batch} running", host * 1e3, "ms", wall * 1e3, "wall time per step",
                       "lower"))
        from benchmarks.kernels import _table
        rec.fragment(_table(rows, [("batch", "requests", "d"), ("running", "running", "d"),
                                   ("context", "mean context", "d"), ("wall_ms", "wall ms / step", ".2f"),
                                   ("device_ms", "device ms / step", ".2f"), ("idle", "idle share", ".3f"),
                                   ("host_ms", "host ms / step", ".2f"), ("wait_ms", "wait ms / step", ".2f"),
                                   ("fill", "tokens / bucket rows", ".2f"), ("calls", "calls / step", ".2f"),
                                   ("host_share", "host / wall", ".2f")]))


def _dataset_args(ds: dict, seed: int = 0) -> argparse.Namespace:
    """The ``jaxdyn bench serve/offline`` dataset flags as a namespace (their defaults, then ``ds``)."""
    from serving.bench import datasets
    p = argparse.ArgumentParser()
    datasets.add_arguments(p)
    args = p.parse_args([])
    for k, v in ds.items():
        if hasattr(args, k):
            setattr(args, k, v)
    args.seed = seed
    return args


def body_offline(cfg: dict, rec: Recorder) -> None:
    """``jaxdyn bench offline``: the engine warmed up (every bucket compiled), then each dataset through
    ``LLM.generate`` (``serving.bench.offline.benchmark``)."""
    from jaxdyn import LLM
    from jaxdyn.engine.llm import build_engine
    from serving.bench import datasets, offline

    path = model_dir(cfg["model"], cfg["scratch"], **quant_overrides(cfg))
    t0 = time.perf_counter()
    engine = build_engine(path, load_format="dummy", dtype=cfg["dtype"], config=_engine_config(cfg["engine"]),
                          warmup=False)
    load_s = time.perf_counter() - t0
    warmup_s = engine.warmup()
    llm = LLM(engine=engine)
    rec.note(f"Model {cfg['model']} (random weights, word-level tokenizer), engine {cfg['engine']}; loaded in "
             f"{load_s:.1f} s, warm-up (every bucket, every sampler variant) {warmup_s:.1f} s.")
    costs = engine.runner.step_costs
    if costs:
        rec.note("Step costs measured at warm-up (ms a step of each token bucket, back to back; steps that would "
                 "mostly pad a bucket run as smaller buckets' calls where these add up to less): "
                 + ", ".join(f"{t}: {c * 1e3:.2f}" for t, c in sorted(costs.items())) + ".")
    rows, base, tflops_figs = [], None, []
    anchor_ds = anchor_dataset(cfg["datasets"])
    mc = engine.model_config
    # a dataset with "whole_steps": run again with every step one call (no splits), right after its own run
    runs = [(ds, whole) for ds in cfg["datasets"] for whole in ((False, True) if ds.get("whole_steps") and costs
                                                                 else (False,))]
    split_out = {}
    for ds, whole in runs:
        ds = {k: v for k, v in ds.items() if k != "whole_steps"}
        engine.runner.set_step_costs(None if whole else costs)
        args = _dataset_args(ds)
        datasets.check_arguments(args)
        source = datasets.PromptSource(datasets.seeded_rng(0, 1, 0), llm.tokenizer,
                                       None if llm.tokenizer is not None else engine.model_config.vocab_size)
        samples = datasets.load_samples(args, source)
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in ds.items() if k != "dataset")
        quant = (f" --quantization {cfg['quant']}" if cfg.get("quant") else "") + (
            " --quantize-lm-head" if cfg.get("quantize_lm_head") else "")
        rec.command(f"jaxdyn bench offline --model {cfg['model']} --load-format dummy{quant} --dataset "
                    f"{ds['dataset']} {flags}{' --no-split-steps' if whole else ''} (engine as above)")
        # each run starts from an empty prefix cache (a rerun of the same prompts would hit the first run's), and
        # its loop figures leave the warm-up requests out
        if engine.prefix_cache is not None:
            engine.prefix_cache.clear()
        m0 = {}
        s = offline.benchmark(llm, samples, num_warmups=ds.get("num_warmups", 0), progress=False,
                              on_start=lambda: m0.update(_loop_counters(engine.metrics)))
        s.pop("per_request")
        loop = _loop_figures(m0, _loop_counters(engine.metrics))
        label = dataset_label(ds) + (" (whole steps)" if whole else "")
        # matmul FLOPs of the run (every prompt token computed: not for the prefix dataset, whose cache hits
        # skip most of them), over its duration
        tflops = (matmul_flops(mc, s["total_input_tokens"], s["total_output_tokens"]) / s["duration_s"] / 1e12
                  if ds["dataset"] != "prefix" and s["duration_s"] else None)
        rows.append(dict(dataset=label, prompts=s["requests"], duration=s["duration_s"],
                         req_s=s["request_throughput"], in_tokens=s["total_input_tokens"],
                         out_tokens=s["total_output_tokens"], in_tok_s=s["input_throughput"],
                         out_tok_s=s["output_throughput"], tflops=tflops, **loop))
        out = s["output_throughput"]
        split_out.setdefault(dataset_label(ds), out)
        is_base = ds["dataset"] == "random" and base is None and not whole
        if is_base:
            base = out
        if whole:
            rec.doc["figures"].append(figure(f"offline output tok/s, {dataset_label(ds)}", split_out[dataset_label(ds)],
                                             "tok/s", out, "the same run with whole steps (no splits)", "higher"))
        elif ds["dataset"] == anchor_ds and not any(f.get("anchor_key") == "vllm_h100_offline"
                                                  for f in rec.doc["figures"]):
            rec.doc["figures"] += [
                anchored(f"offline output tok/s, {label}", out, "vllm_h100_offline", "higher"),
                anchored(f"offline output tok/s, {label}", out, "sglang_h100_offline", "higher"),
                anchored(f"offline output tok/s, {label}", out, "sglang030_a100_rate_inf", "higher")]
        elif is_base:
            pass        # the anchor of the runs after it (its figures are in the table)
        else:
            rec.doc["figures"].append(figure(f"offline output tok/s, {label}", out, "tok/s", base,
                                             "the random dataset's run" if base else "", "higher"))
        if tflops is not None:
            tflops_figs.append((label, tflops))
        from benchmarks.kernels import _table
        rec.fragment(_table(rows, [("dataset", "dataset", ""), ("prompts", "prompts", "d"),
                                   ("duration", "seconds", ".1f"), ("req_s", "requests/s", ".2f"),
                                   ("in_tokens", "input tokens", "d"), ("out_tokens", "output tokens", "d"),
                                   ("in_tok_s", "input tok/s", ".0f"), ("out_tok_s", "output tok/s", ".0f"),
                                   ("tflops", "matmul TFLOP/s", ".0f"), ("steps", "engine steps", "d"),
                                   ("host_ms", "host ms / step", ".2f"), ("call_ms", "of which call ms", ".2f"),
                                   ("wait_ms", "wait ms / step", ".2f"), ("fill", "tokens / bucket rows", ".2f"),
                                   ("calls", "calls / step", ".2f")]))
    from benchmarks.kernels import measure_matmul
    rate = measure_matmul(cfg.get("matmul_n", 8192)) / 1e12
    for label, tflops in tflops_figs:
        rec.add(figure(f"offline matmul TFLOP/s, {label}", tflops, "TFLOP/s", rate,
                       "bf16 matmul rate (measured after the runs): the run's MFU", "higher"))
    rec.note(f"matmul TFLOP/s: 2 x (every layer's matmul parameters) x (input + output tokens) + 2 x the LM "
             f"head's parameters x output tokens, over the run's duration (attention left out), against a bf16 "
             f"{cfg.get('matmul_n', 8192)}^3 matmul measured in this process after the runs: {rate:.0f} TFLOP/s. "
             "Not given for the prefix dataset (its cache hits skip most prompt tokens).")


def dataset_label(ds: dict) -> str:
    d = ds["dataset"]
    if d == "random":
        return f"random {ds.get('input_len', 1024)}/{ds.get('output_len', 128)}"
    if d == "prefix":
        return f"prefix {ds.get('prefix_len')}+{ds.get('suffix_len')}/{ds.get('output_len', 128)}"
    if d == "sharegpt-lengths":
        return f"sharegpt-lengths (mean 215/198, {ds.get('sharegpt_replies', 'chatgpt')} replies)"
    return d


def anchor_dataset(sets: list[dict]) -> str:
    """The dataset whose rate-inf throughput stands beside the published ShareGPT figures: the
    ShareGPT-shaped one when the plan has it, else random."""
    return "sharegpt-lengths" if any(d["dataset"] == "sharegpt-lengths" for d in sets) else "random"


def layers_matmul_params(mc) -> int:
    """Parameters of every layer's projections (q, k, v, o, gate, up, down), all layers."""
    hd = mc.head_dim
    layer = (mc.hidden_size * (mc.num_heads + 2 * mc.num_kv_heads) * hd + mc.num_heads * hd * mc.hidden_size
             + 3 * mc.hidden_size * mc.intermediate_size)
    return mc.num_layers * layer


def matmul_flops(mc, input_tokens: int, output_tokens: int) -> float:
    """2 x matmul parameters x tokens: every layer's projections for each computed token (input + output),
    the LM head for each output token (a prompt's last row gives the first output token)."""
    return 2.0 * (layers_matmul_params(mc) * (input_tokens + output_tokens)
                  + mc.hidden_size * mc.vocab_size * output_tokens)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class Server:
    """``jaxdyn serve`` (with the plan's bucket lists) as a subprocess; ``start`` times process start -> ready."""

    def __init__(self, argv: list[str], env: dict, log_path: str, url: str):
        self.argv, self.env, self.log_path, self.url = argv, env, log_path, url
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float) -> tuple[float | None, str]:
        """(seconds to /health 200 or None, why not)."""
        t0 = time.perf_counter()
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                return None, f"the server exited with status {self.proc.returncode} before it was ready"
            if _healthy(self.url):
                return time.perf_counter() - t0, ""
            time.sleep(0.25)
        return None, f"not ready within {timeout_s:.0f} s"

    def stop(self) -> int | None:
        """SIGTERM (the server drains, then exits 0), SIGKILL after 30 s; the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log.close()
        return rc

    def tail(self, n: int = 40) -> list[str]:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read().splitlines()[-n:]
        except OSError:
            return []

    def load_line(self) -> str:
        return next((line for line in self.tail(400) if line.startswith("jaxdyn: loaded")), "")


def serve_flags(path: str, name: str, e: dict, dtype: str, port: int) -> tuple[list[str], list[str]]:
    """``jaxdyn serve``'s flags for the plan's engine ``e`` on the checkpoint ``path``: (the rest, the buckets)."""
    serve_args = ["--model", path, "--load-format", "dummy", "--dtype", dtype, "--port", str(port),
                  "--served-model-name", name, "--max-num-seqs", str(e["max_num_seqs"]),
                  "--max-num-batched-tokens", str(e["max_num_batched_tokens"]), "--max-model-len",
                  str(e["max_model_len"]), "--num-pages", str(e["num_pages"]), "--page-size", str(e["page_size"]),
                  "--shutdown-grace", "5", "--log-level", "warning"]
    if e.get("first_compiles_alone"):
        serve_args.append("--first-compiles-alone")
    if e.get("attention_programs"):
        serve_args += ["--attention-programs", str(e["attention_programs"])]
    if e.get("prefill_programs") is not None:
        serve_args += ["--prefill-programs", str(e["prefill_programs"])]
    if e.get("gpu_memory_utilization") is not None:
        serve_args += ["--gpu-memory-utilization", str(e["gpu_memory_utilization"])]
    if e.get("seq_buckets"):
        serve_args += ["--seq-buckets", ",".join(f"{t}:{s}" for t, s in e["seq_buckets"])]
    if e.get("kv_cache_dtype", "auto") != "auto":
        serve_args += ["--kv-cache-dtype", e["kv_cache_dtype"]]
    if e.get("skip_idle_prefill"):
        serve_args.append("--skip-idle-prefill")
    if e.get("attention_fp8_products", "off") != "off":
        serve_args += ["--attention-fp8-products", e["attention_fp8_products"]]
    if e.get("schedule_policy", "fcfs") != "fcfs":
        serve_args += ["--schedule-policy", e["schedule_policy"]]
    from serving.cli import SAMPLER_SWITCH_FLAG, SEPARATE_SAMPLER_FLAG
    # the flag's word for the engine's value (the CLI's tables read backwards); None: by device, the server's default
    for flag, table, value in (("--sampler-switch", SAMPLER_SWITCH_FLAG, e.get("sampler_switch")),
                               ("--separate-sampler", SEPARATE_SAMPLER_FLAG, e.get("separate_sampler", False))):
        word = {v: k for k, v in table.items()}[value]
        if word is not None:
            serve_args += [flag, word]
    buckets = ["--token-buckets", ",".join(map(str, e["token_buckets"])),
               "--page-buckets", ",".join(map(str, e["page_buckets"]))]
    return serve_args, buckets


def body_serve(cfg: dict, rec: Recorder) -> None:
    """Cold start (empty compilation cache), ``jaxdyn bench serve`` runs, stop; warm start (cache warm), stop."""
    t_end = time.perf_counter() + cfg["budget_s"] - min(15.0, 0.2 * cfg["budget_s"])   # time to stop, write
    path = model_dir(cfg["model"], cfg["scratch"], **quant_overrides(cfg))
    e = cfg["engine"]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve_args, buckets = serve_flags(path, cfg["model"], e, cfg["dtype"], port)
    argv = [sys.executable, "-m", "serving.cli", "serve", *serve_args, *buckets]
    # The plan's compilation cache (the sections after this one find the server's steps in it), else a
    # private one. The first start is cold only if the directory is empty: the plans run serve first.
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(cfg["scratch"], "jax_cache_serve")
    os.makedirs(cache, exist_ok=True)
    entries = len(os.listdir(cache))
    env = dict(os.environ)
    if cfg.get("_jax_platforms") is None:     # this process runs on the CPU; the server gets the device
        env.pop("JAX_PLATFORMS", None)
    else:
        env["JAX_PLATFORMS"] = cfg["_jax_platforms"]
    env.update(cfg["server_env"])
    env.update({"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    rec.command(f"jaxdyn serve {shlex.join(serve_args + buckets)}")
    rec.note(f"Model {cfg['model']} (random weights, word-level tokenizer), engine {e}. Server environment: "
             f"{ {k: v for k, v in cfg['server_env'].items()} }, JAX_COMPILATION_CACHE_DIR set (min compile time "
             "0). First start: the cache directory "
             + ("empty" if entries == 0 else f"NOT empty ({entries} entries from earlier sections: not a cold "
                "start)") + "; second start: the same directory, warm.")
    rows: list[dict] = []
    anchor_ds, anchored_done = anchor_dataset(cfg["runs"]), False

    def table():
        from benchmarks.kernels import _table
        rec.fragment(_table(rows, [("run", "run", ""), ("completed", "completed", "d"), ("failed", "failed", "d"),
                                   ("out_tok_s", "output tok/s", ".0f"), ("ttft", "median TTFT ms", ".1f"),
                                   ("tpot", "median TPOT ms", ".2f"), ("itl", "median ITL ms", ".2f"),
                                   ("e2e", "median E2E ms", ".0f"), ("seconds", "seconds", ".1f"),
                                   ("steps", "engine steps", "d"), ("host_ms", "host ms / step", ".2f"),
                                   ("call_ms", "of which call ms", ".2f"),
                                   ("wait_ms", "wait ms / step", ".2f"), ("fill", "tokens / bucket rows", ".2f"),
                                   ("calls", "calls / step", ".2f")]))

    def bench_runs(runs: list[dict], reserve: float, suffix: str = "") -> None:
        nonlocal anchored_done
        for run in runs:
            base_label = run["label"]
            run = dict(run, label=base_label + suffix)
            limit = t_end - time.perf_counter() - reserve
            if limit < 10:
                rec.note(f"{run['label']}: not run, no time left in the budget.")
                continue
            m0 = _engine_counters(url)
            s, cmd, why = _bench_serve(run, url, cfg["model"], path, cfg["scratch"], limit)
            rec.command(cmd)
            if s is None:
                rec.note(f"{run['label']}: {why}")
                continue
            loop = _loop_figures(m0, _engine_counters(url))
            rows.append(dict(run=run["label"], completed=s.get("completed"), failed=s.get("failed"),
                             out_tok_s=s.get("output_throughput"), ttft=s.get("median_ttft_ms"),
                             tpot=s.get("median_tpot_ms"), itl=s.get("median_itl_ms"), e2e=s.get("median_e2el_ms"),
                             seconds=s.get("duration_s"), **loop))
            table()
            out = s.get("output_throughput")
            if cfg.get("ceiling"):    # the stack's ceiling: nothing to set it against here
                rec.add(figure(f"serving stack ceiling, output tok/s, {run['label']}", out, "tok/s", None, "",
                               "higher"))
            elif suffix:        # a compared server: against the same load on the default one
                same = next((r for r in rows if r["run"] == base_label and r.get("out_tok_s")), None)
                rec.add(figure(f"serve output tok/s, {run['label']}", out, "tok/s",
                               same["out_tok_s"] if same else None, "the same load on the default server",
                               "higher"))
            elif run["request_rate"] == "inf" and run["dataset"] == anchor_ds and not anchored_done:
                anchored_done = True
                rec.add(anchored(f"serve output tok/s, {run['label']}", out, "sglang030_a100_rate_inf", "higher"),
                        anchored(f"serve output tok/s, {run['label']}", out, "sglang_h100_offline", "higher"),
                        anchored(f"serve output tok/s, {run['label']}", out, "vllm_h100_offline", "higher"))
            elif run["request_rate"] != "inf":
                rec.add(anchored(f"median ITL, {run['label']}", s.get("median_itl_ms"), "sglang030_a100_rate4_itl",
                                 "lower"),
                        anchored(f"median TTFT, {run['label']}", s.get("median_ttft_ms"),
                                 "sglang030_a100_rate4_ttft", "lower"),
                        anchored(f"median TPOT, {run['label']}", s.get("median_tpot_ms"),
                                 "sglang030_a100_rate4_tpot", "lower"))
            else:
                base_row = next((r for r in rows if r["run"].startswith("random") and r.get("out_tok_s")), None)
                base = base_row["out_tok_s"] if base_row else None
                if base_row is rows[-1]:
                    rec.add(figure(f"serve output tok/s, {run['label']}", out, "tok/s", None, "", "higher"))
                else:
                    rec.add(figure(f"serve output tok/s, {run['label']}", out, "tok/s", base,
                                   "the random rate-inf run", "higher"))
            if s.get("failed"):
                rec.note(f"{run['label']}: {s['failed']} requests failed: {s.get('errors')}")

    server = Server(argv, env, os.path.join(cfg["scratch"], "server_cold.log"), url)
    try:
        left = t_end - time.perf_counter()
        ready, why = server.start(min(cfg["ready_timeout_s"], max(left - cfg["warm_reserve_s"], 0.6 * left)))
        rows.append(dict(run="first start" + (", empty cache" if entries == 0 else "")
                         + ": process start -> /health 200", seconds=ready if ready is not None else why))
        if not cfg.get("ceiling"):
            rec.add(figure("cold start (empty compilation cache)" if entries == 0 else
                           f"first start (cache held {entries} entries)", ready, "s", COLD_START_TARGET_S,
                           "target", "lower"))
        rec.note(f"Cold start: {why or 'ready'}. {server.load_line()}")
        table()
        if ready is None:
            raise RuntimeError(f"the first server start failed: {why} (its log is in suite.log)")
        # time kept for what comes after: the warm start, and the compared server's start and runs
        bench_runs(cfg["runs"], (cfg["warm_reserve_s"] if cfg.get("warm_start") else 0)
                   + (cfg["compare"]["reserve_s"] if cfg.get("compare") else 0))
    finally:
        rc = server.stop()
        rec.note(f"First server stopped with SIGTERM: exit status {rc}.")
        print("\n".join(f"server(cold)| {line}" for line in server.tail(60)), flush=True)
    if not cfg.get("warm_start"):
        return
    left = t_end - time.perf_counter()
    if left < 5:
        rec.note("Warm start: not run, no time left in the budget.")
        return
    server = Server(argv, env, os.path.join(cfg["scratch"], "server_warm.log"), url)
    try:
        ready, why = server.start(left)
        rows.append(dict(run="second start, cache warm: process start -> /health 200",
                         seconds=ready if ready is not None else why))
        rec.add(figure("warm start (compilation cache warm)", ready, "s", WARM_START_TARGET_S, "target", "lower"))
        rec.note(f"Warm start: {why or 'ready'}. {server.load_line()}")
        table()
        if ready is None:
            raise RuntimeError(f"the second server start failed: {why} (its log is in suite.log)")
    finally:
        rc = server.stop()
        rec.note(f"Second server stopped with SIGTERM: exit status {rc}.")
        print("\n".join(f"server(warm)| {line}" for line in server.tail(60)), flush=True)
    cmp = cfg.get("compare")
    left = t_end - time.perf_counter()
    if not cmp:
        return
    if left < 20:
        rec.note(f"Compared server ({cmp['label']}): not run, no time left in the budget.")
        return
    rec.command(f"jaxdyn serve {shlex.join(serve_args + buckets + list(cmp['args']))}")
    server = Server(argv + list(cmp["args"]), env, os.path.join(cfg["scratch"], "server_compare.log"), url)
    try:
        ready, why = server.start(left)
        rows.append(dict(run=f"third start ({cmp['label']}), cache warm: process start -> /health 200",
                         seconds=ready if ready is not None else why))
        table()
        if ready is None:
            raise RuntimeError(f"the compared server's start failed: {why} (its log is in suite.log)")
        bench_runs(cmp["runs"], 0, f" ({cmp['label']})")
    finally:
        rc = server.stop()
        rec.note(f"Compared server stopped with SIGTERM: exit status {rc}.")
        print("\n".join(f"server(compare)| {line}" for line in server.tail(60)), flush=True)


_LOOP_COUNTERS = ("jaxdyn:engine_steps", "jaxdyn:engine_host_seconds", "jaxdyn:engine_device_wait_seconds",
                  "jaxdyn:step_tokens", "jaxdyn:step_token_rows", "jaxdyn:step_calls", "jaxdyn:engine_step_call_seconds")


def _loop_counters(m) -> dict[str, float]:
    """The same counters from an engine's ``EngineMetrics`` in this process (the offline section)."""
    return dict(zip(_LOOP_COUNTERS, (m.steps, m.host_seconds, m.device_wait_seconds, m.step_tokens,
                                     m.step_token_rows, m.step_calls, m.step_call_seconds)))


def _engine_counters(url: str) -> dict[str, float]:
    """The engine loop's counters from the server's /metrics (empty if they cannot be read)."""
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {f.name: sum(x.value for x in f.samples if x.name.endswith("_total"))
            for f in text_string_to_metric_families(text) if f.name in _LOOP_COUNTERS}


def _loop_figures(before: dict, after: dict) -> dict:
    """Engine steps of a run and the loop's host and device-wait ms per step (the serve table's columns;
    the offline table has the same from the engine itself): a served run whose host ms a step exceeds the
    offline run's spends that difference on the server's other Python work in the engine's process."""
    if not all(k in before and k in after for k in _LOOP_COUNTERS):
        return {}
    steps = after["jaxdyn:engine_steps"] - before["jaxdyn:engine_steps"]
    if steps <= 0:
        return {}
    per = lambda k: (after[k] - before[k]) / steps * 1e3  # noqa: E731
    delta = lambda k: after[k] - before[k]  # noqa: E731
    rows = delta("jaxdyn:step_token_rows")
    return dict(steps=int(steps), host_ms=per("jaxdyn:engine_host_seconds"),
                call_ms=per("jaxdyn:engine_step_call_seconds"), wait_ms=per("jaxdyn:engine_device_wait_seconds"),
                fill=delta("jaxdyn:step_tokens") / rows if rows else None,
                calls=delta("jaxdyn:step_calls") / steps)


def _bench_serve(run: dict, url: str, model: str, tokenizer: str, scratch: str, timeout_s: float):
    """One ``jaxdyn bench serve`` in a subprocess on the CPU; (summary or None, command, why)."""
    out = os.path.join(scratch, f"bench_{run['label'].replace(' ', '_').replace('/', '-')}.json")
    flags = ["--url", url, "--model", model, "--tokenizer", tokenizer, "--dataset", run["dataset"],
             "--num-prompts", str(run["num_prompts"]), "--request-rate", str(run["request_rate"]),
             "--num-warmups", str(run.get("num_warmups", 0)), "--seed", str(run.get("seed", 0)),
             "--disable-tqdm", "--timeout", str(int(max(timeout_s, 10)))]
    for k in ("input_len", "output_len", "prefix_len", "suffix_len", "num_prefixes", "num_clients",
              "sharegpt_replies"):
        if k in run:
            flag = {"input_len": "--random-input-len", "output_len": "--random-output-len"}.get(
                k, "--" + k.replace("_", "-"))
            flags += [flag, str(run[k])]
    argv = [sys.executable, "-m", "serving.cli", "bench", "serve", *flags, "--out", out]
    cmd = "jaxdyn bench serve " + shlex.join(flags)
    env = dict(os.environ, JAX_PLATFORMS="cpu")      # the client never touches the accelerator
    try:
        p = subprocess.run(argv, env=env, timeout=timeout_s, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(text[-4000:], flush=True)
        return None, cmd, f"timed out after {timeout_s:.0f} s"
    print(p.stdout[-6000:], flush=True)
    if p.returncode != 0:
        return None, cmd, f"exit status {p.returncode}: {(p.stdout.strip().splitlines() or ['?'])[-1]}"
    with open(out) as f:
        doc = json.load(f)
    return doc["runs"][0]["summary"], cmd, ""


BODIES = {"probe": body_probe, "kernels": body_kernels, "ceilings": body_ceilings, "step": body_step,
          "host": body_host, "offline": body_offline, "serve": body_serve}


def section_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.suite section")
    ap.add_argument("name", choices=sorted(BODIES))
    ap.add_argument("--result", required=True)
    ap.add_argument("--config", required=True, help="JSON")
    args = ap.parse_args(argv)
    rec = Recorder(args.result)
    cfg = json.loads(args.config)
    if args.name == "serve":
        # this process only drives the server and the client: keep it off the accelerator
        cfg["_jax_platforms"] = os.environ.get("JAX_PLATFORMS")
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:
        # the engine's process-wide XLA options (build_engine's) for the sections that build runners directly
        from jaxdyn.engine.xla_options import command_buffer_update_mode, gpu_memory_fraction
        command_buffer_update_mode()
        gpu_memory_fraction(None)       # the plan's environment gives it (0.85); else the engine's default
    try:
        BODIES[args.name](cfg, rec)
    except BaseException as e:
        rec.doc["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        rec.save()
        traceback.print_exc()
        return 1
    return 0


# ----------------------------------------------------------------------------- entry points

def list_plan(plan: Plan, only: list[str] | None, budget_s: float | None) -> str:
    planned = plan.budget(only)
    scale = budget_s / planned if budget_s else 1.0
    lines = [f"plan: {plan.name}; probe {plan.probe_budget_s:.0f} s + sections {planned * scale:.0f} s"]
    if only is None and len(plan.call_groups()) > 1:
        lines.append("  device calls: " + "; ".join(
            f"--sections {','.join(g)} ({plan.probe_budget_s + plan.budget(list(g)):.0f} s)" for g in plan.call_groups()))
    for s in plan.sections:
        if only is None or s.name in only:
            for st in s.steps:
                lines.append(f"  {s.name:9s} {st.label:24s} {st.budget_s * scale:6.0f} s  {json.dumps(st.config)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, plan_factory=None, entry: str = "benchmarks.gpu.suite",
         dry_first: str = "kernels") -> int:
    """The shared command line of the entries: ``plan_factory(quick=bool)`` builds the accelerator's plan."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "section":
        return section_main(argv[1:])
    ap = argparse.ArgumentParser(prog=f"python -m {entry}", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="report.md, results.json and suite.log go here")
    ap.add_argument("--quick", action="store_true", help="smaller sizes and budgets (a smoke run)")
    ap.add_argument("--dry-run", action="store_true",
                    help="every section on the CPU with the tiny preset and toy sizes (proves the plumbing)")
    ap.add_argument("--sections", default=None, help="comma-separated subset, in the plan's order")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="total seconds for the sections run: every step's budget is scaled to it")
    ap.add_argument("--scratch", default=None, help="intermediate files and the compilation cache "
                    "(default: a new temporary directory)")
    ap.add_argument("--model", default=None, help="preset of the engine sections (host, offline, serve); "
                    "default: the entry's (llama-3.1-8b)")
    ap.add_argument("--offline-prompts", type=int, default=None,
                    help="prompts per dataset of the offline section (default: the entry's, 300)")
    ap.add_argument("--full-grid", action="store_true",
                    help="step section: batch 1/8/64/256 x context 512/2048 on both models (run it alone)")
    ap.add_argument("--datasets", default=None,
                    help="comma-separated: only the serve runs and offline datasets of these (random, "
                    "sharegpt-lengths, prefix), no compared server (a shorter call)")
    add_quant_arguments(ap, "the engine sections' model")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"),
                    help="the engine sections' KV cache dtype (jaxdyn serve --kv-cache-dtype; default auto)")
    ap.add_argument("--list", action="store_true", help="print the plan (steps, budgets, configs) and exit")
    args = ap.parse_args(argv)
    if args.dry_run and args.quant:
        ap.error("--quant: the dry run's tiny model is not quantized")
    check_quant_arguments(ap, args)
    if args.quantize_lm_head and (plan_factory is None
                                  or "quantize_lm_head" not in inspect.signature(plan_factory).parameters):
        ap.error(f"--quantize-lm-head: {entry}'s plan has no fp8 lm_head to set")
    if args.kv_cache_dtype != "auto" and (args.dry_run or plan_factory is None
                                          or "kv_cache_dtype" not in inspect.signature(plan_factory).parameters):
        ap.error(f"--kv-cache-dtype: {entry}'s plan has no KV cache dtype to set")
    if args.dry_run or plan_factory is None:
        plan = dry_run_plan(entry, dry_first)
    else:
        extra = {k: v for k, v in (("model", args.model), ("offline_prompts", args.offline_prompts),
                                   ("full_grid", args.full_grid),
                                   ("datasets", args.datasets and args.datasets.split(",")),
                                   ("quant", args.quant), ("quantize_lm_head", args.quantize_lm_head),
                                   ("kv_cache_dtype", args.kv_cache_dtype if args.kv_cache_dtype != "auto" else None))
                 if v}
        plan = plan_factory(quick=args.quick, **extra)
    only = args.sections.split(",") if args.sections else None
    if args.list:
        print(list_plan(plan, only, args.budget_s))
        return 0
    command = shlex.join(["python", "-m", entry, *argv])
    return Driver(plan, args.out, scratch=args.scratch, only=only, budget_s=args.budget_s, command=command).run()


if __name__ == "__main__":
    sys.exit(main())
