"""``jaxdyn bench serve``: load an OpenAI-compatible server (this one, vLLM, SGLang) as vLLM's ``bench serve`` does.

Requests arrive at ``--request-rate`` per second, Poisson (gamma intervals with
``--burstiness`` < 1 burstier, > 1 more regular; ``inf`` sends all at once), at
most ``--max-concurrency`` in flight; a comma-separated rate list runs a sweep.
Multi-turn conversations send turn k when turn k-1 has answered, with its
prompts and the model's actual replies as history. Records, summary, table,
JSON, plots: ``metrics`` and ``report``.

    jaxdyn bench serve --url http://127.0.0.1:8000 --model demo --tokenizer checkpoints/demo \\
        --random-input-len 128 --random-output-len 64 --num-prompts 200 --request-rate 8,inf --out run.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import math
import multiprocessing
import os
import sys
import time

import httpx
import numpy as np
from tqdm.auto import tqdm

from serving.bench import BenchError, datasets, metrics, offline, report
from serving.bench.client import ENDPOINTS, Endpoint, RequestRecord, send
from serving.bench.datasets import PromptSource, Sample


def arrival_times(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Seconds after the start at which each of n requests arrives: the first at 0, then gamma-distributed
    intervals of mean 1/rate and shape ``burstiness`` (1: exponential, a Poisson process); all 0 at rate inf."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(n - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"--request-rate: expected numbers or inf, comma-separated, got {text!r}") from None
    if not rates or any(not r > 0 for r in rates):
        raise BenchError(f"--request-rate: rates must be > 0 (or inf), got {text!r}")
    return rates


POOL_SHARDS = 16     # HTTP clients a large run's requests are spread over (see ``clients``)
POOL_SIZE = 64       # requests per client before a run takes another


@contextlib.asynccontextmanager
async def clients(requests: int):
    """httpx clients for a run of ``requests`` requests, request i on client i % n, n = requests / 64 (1 to
    16). One client's connection pool scans every connection each time a request is assigned or released
    (httpcore's ``is_idle``): with 300 streams that scan was 4 of the 11 s of a one-process client's CPU
    (``benchmarks/serve_stack.py`` profiled), growing with the square of the streams; n pools make it n times
    smaller. A small run keeps one client (each client's first request costs a little more)."""
    n = max(1, min(POOL_SHARDS, requests // POOL_SIZE))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=1000)
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits))
               for _ in range(n)]


class LoadRun:
    """One run at one request rate: schedules the samples, sends them, keeps every record."""

    def __init__(self, endpoint: Endpoint, samples: list[Sample], source: PromptSource, *, rate: float,
                 burstiness: float = 1.0, max_concurrency: int | None = None,
                 rng: np.random.Generator | None = None, progress: bool = False):
        self.endpoint, self.samples, self.source = endpoint, samples, source
        self.rate, self.burstiness, self.max_concurrency = rate, burstiness, max_concurrency
        self.arrivals = arrival_times(len(samples), rate, burstiness, rng or np.random.default_rng(0))
        self.progress = progress
        self.in_flight = 0
        self.peak_concurrency = 0

    def _prompt(self, sample: Sample, history: list[tuple[Sample, RequestRecord]]):
        """The request's prompt and the caller's count of its tokens (multi-turn: with the history; chat: the
        messages' text only, the server's chat template adds more, which its usage counts)."""
        chat = self.endpoint.kind == "chat"
        if chat:
            messages = []
            for s, r in history:
                messages += [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": r.text}]
            messages.append({"role": "user", "content": sample.prompt})
            count = sum(self.source.count(m["content"], special=False) for m in messages)
            return messages, count
        if not history:
            return sample.prompt, sample.prompt_len if sample.prompt_len is not None \
                else self.source.count(sample.prompt)
        text = ""
        for s, r in history:
            text += s.prompt + r.text + "\n"
        text += sample.prompt
        return text, self.source.count(text)

    async def _one(self, pool: list, i: int, sample: Sample, t0: float, sem, history, bar) -> RequestRecord:
        record = RequestRecord(index=i, conversation=sample.conversation,
                               turn=sample.turn if sample.conversation is not None else None)
        if history:     # multi-turn: wait for the previous turn; its reply joins the history
            prev = await history[-1][1]
            if not prev.success:
                record.start = time.perf_counter() - t0
                record.error = (f"not sent: turn {prev.turn} of conversation {prev.conversation} failed "
                                f"({prev.error})")
                bar.update(1)
                return record
        prompt, count = self._prompt(sample, [(s, task.result()) for s, task in history])
        record.prompt_len = count
        record.prompt_token_source = "tokenizer" if self.source.exact else "estimate"
        async with sem:
            self.in_flight += 1
            self.peak_concurrency = max(self.peak_concurrency, self.in_flight)
            try:
                await send(pool[i % len(pool)], self.endpoint, prompt, sample.output_len, record, t0=t0,
                           tokenizer=self.source.tokenizer)
            finally:
                self.in_flight -= 1
        bar.update(1)
        return record

    async def run(self, pool: list, *, t0: float | None = None, indices=None
                  ) -> tuple[list[RequestRecord], float]:
        """Send every sample on schedule over ``pool`` (httpx clients, from ``clients()``); returns the
        records (dataset order) and the run's duration.
        ``t0`` (perf_counter, shared by the processes of one machine) and ``indices`` (each sample's index in
        the whole run): a client process's part of a run (``run_processes``)."""
        sem = asyncio.Semaphore(self.max_concurrency or len(self.samples))
        bar = tqdm(total=len(self.samples), desc=f"rate {self.rate:g}", disable=not self.progress)
        tasks: list[asyncio.Task] = []
        turns: dict[int, list[tuple[Sample, asyncio.Task]]] = {}   # conversation -> its turns so far
        t0 = time.perf_counter() if t0 is None else t0
        indices = range(len(self.samples)) if indices is None else indices
        try:
            for i, sample, at in zip(indices, self.samples, self.arrivals):
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                history = list(turns.get(sample.conversation, ())) if sample.conversation is not None else []
                task = asyncio.create_task(self._one(pool, i, sample, t0, sem, history, bar))
                if sample.conversation is not None:
                    turns.setdefault(sample.conversation, []).append((sample, task))
                tasks.append(task)
            records = await asyncio.gather(*tasks)
        finally:
            bar.close()
        return list(records), time.perf_counter() - t0

    def run_processes(self, n: int) -> tuple[list[RequestRecord], float]:
        """``run`` split over ``n`` client processes: one Python process parses a bounded number of streamed
        chunks a second (on 2 CPUs, 1,000 streams: 0.65x of what a raw socket client read from the same server,
        ``python -m benchmarks.serve_stack --streams 1000 --tokens 100``), which would cap what a fast server
        shows. The processes share the run's arrival schedule and start time; a conversation's turns stay
        in one process; ``--max-concurrency`` is divided among them (their shares add up to it: at most that many
        processes, each a share of at least one); the peak concurrency is their sum."""
        ctx = multiprocessing.get_context("spawn")
        parts, limits = deal_requests(self.samples, n, self.max_concurrency)
        conns, procs = [], []
        for part, limit in zip(parts, limits):
            mine, theirs = ctx.Pipe()
            job = dict(endpoint=self.endpoint, samples=[self.samples[i] for i in part], source=self.source,
                       rate=self.rate, arrivals=self.arrivals[part], indices=part, max_concurrency=limit)
            proc = ctx.Process(target=_client_process, args=(theirs, job), daemon=True)
            proc.start()
            theirs.close()
            conns.append(mine)
            procs.append(proc)
        try:
            for c in conns:          # every process ready (imported, connected) before the clock starts
                if c.recv() != "ready":
                    raise BenchError("a client process failed to start")
            t0 = time.perf_counter() + 0.05
            for c in conns:
                c.send(t0)
            bar = tqdm(total=len(self.samples), desc=f"rate {self.rate:g}", disable=not self.progress)
            records: list[RequestRecord | None] = [None] * len(self.samples)
            end = t0
            for c in conns:
                got, peak, done_at = c.recv()
                for r in got:
                    records[r.index] = r
                self.peak_concurrency += peak
                end = max(end, done_at)
                bar.update(len(got))
            bar.close()
        except EOFError:
            raise BenchError("a client process died (its error is above)") from None
        finally:
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.terminate()
        return records, end - t0


def _client_process(conn, job: dict) -> None:
    """A client process of ``LoadRun.run_processes``: its part of the run, records sent back."""
    async def go():
        run = LoadRun(job["endpoint"], job["samples"], job["source"], rate=job["rate"],
                      max_concurrency=job["max_concurrency"])
        run.arrivals = job["arrivals"]
        async with clients(len(job["samples"])) as pool:
            conn.send("ready")
            t0 = conn.recv()
            records, _ = await run.run(pool, t0=t0, indices=job["indices"])
        conn.send((records, run.peak_concurrency, time.perf_counter()))

    asyncio.run(go())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None,
                   help="the served model name, or the model's directory (the name jaxdyn serve gives it, its "
                        "folder's name, and its tokenizer); default: the first of /v1/models")
    p.add_argument("--served-model-name", default=None,
                   help="the name the requests send, where it is not --model's (vLLM's flag)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (tokenizer.json) or file: exact prompt lengths and output counts "
                   "when the server gives no usage (default: --model if it is such a directory)")
    p.add_argument("--endpoint", default=None, choices=[*ENDPOINTS.values(), *ENDPOINTS],
                   help="/v1/completions (default) or /v1/chat/completions")
    p.add_argument("--backend", default=None, choices=["openai", "openai-chat"],
                   help="vLLM's spelling of the endpoint: openai = completions, openai-chat = chat")
    datasets.add_arguments(p)
    p.add_argument("--request-rate", "--rate", dest="request_rate", default="inf",
                   help="requests per second (Poisson arrivals), or inf; a comma-separated list runs a sweep")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival intervals: 1 Poisson, < 1 burstier, > 1 more regular")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--num-clients", type=int, default=1,
                   help="client processes the requests are spread over (one Python process parses a bounded "
                   "number of streamed chunks a second); the arrival schedule is the same")
    p.add_argument("--num-warmups", type=int, default=0, help="requests sent (and not counted) before the runs")
    offline.add_sampling_arguments(p)
    p.add_argument("--no-stream-usage", dest="stream_usage", action="store_false",
                   help="do not send stream_options.include_usage (for servers that refuse it)")
    p.add_argument("--percentiles", default="90,99", help="latency percentiles to report (mean and median always)")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT at most this")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT at most this")
    p.add_argument("--slo-e2e-ms", type=float, default=None, help="goodput: end-to-end latency at most this")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take, stream included")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as a Bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--out", default=None, help="write the results (summary and every request) as JSON")
    p.add_argument("--plot", default=None, metavar="DIR",
                   help="save latency CDFs (and, for a rate sweep, throughput and latency against rate) as PNGs")
    p.add_argument("--compare", nargs=2, default=None, metavar=("A.json", "B.json"),
                   help="print two saved runs side by side with ratios B/A (nothing is sent)")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def load_tokenizer(path: str):
    from tokenizers import Tokenizer as HFTokenizer

    from jaxdyn.engine.tokenizer import Tokenizer, TokenizerError

    if os.path.isfile(path):
        try:
            return Tokenizer(HFTokenizer.from_file(path))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise BenchError(f"--tokenizer {path}: cannot be read: {e}") from None
    if not os.path.isdir(path):
        raise BenchError(f"--tokenizer {path!r}: no such file or directory")
    try:
        return Tokenizer.from_pretrained(path)
    except TokenizerError as e:
        raise BenchError(f"--tokenizer {e}") from None


def _endpoint_kind(args) -> str:
    kind = None
    if args.endpoint is not None:
        kind = "chat" if args.endpoint in ("chat", ENDPOINTS["chat"]) else "completions"
    if args.backend is not None:
        backend_kind = "chat" if args.backend == "openai-chat" else "completions"
        if kind is not None and kind != backend_kind:
            raise BenchError(f"--backend {args.backend} contradicts --endpoint {args.endpoint}")
        kind = backend_kind
    return kind or "completions"


def check_arguments(args) -> dict:
    """Everything that can be checked before a request is sent; returns the parsed numbers."""
    if args.url is None:
        raise BenchError("--url is required (or --compare A.json B.json)")
    if not args.url.startswith(("http://", "https://")):
        raise BenchError(f"--url {args.url!r}: expected http://host:port")
    datasets.check_arguments(args)
    rates = parse_rates(args.request_rate)
    try:
        percentiles = metrics.parse_percentiles(args.percentiles)
    except ValueError as e:
        raise BenchError(f"--percentiles: {e}") from None
    if not 0 < args.burstiness < math.inf:
        raise BenchError(f"--burstiness must be a finite number > 0, got {args.burstiness}")
    for rate in rates:
        # the gaps' scale 1 / (rate * burstiness) must be a number (1e-320 overflowed it: arrivals at inf, a hang,
        # or NaN, every request at once)
        if not math.isinf(rate) and not math.isfinite(1.0 / (rate * args.burstiness)):
            raise BenchError(f"--request-rate {rate:g} with --burstiness {args.burstiness:g}: the mean gap "
                             f"between requests overflows; use a larger rate or burstiness")
    if args.num_clients < 1:
        raise BenchError(f"--num-clients must be at least 1, got {args.num_clients}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BenchError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    if args.num_warmups < 0:
        raise BenchError(f"--num-warmups must be >= 0, got {args.num_warmups}")
    if not 0 < args.timeout < math.inf:
        raise BenchError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    offline.check_sampling_arguments(args)
    slo = {k: v for k, v in (("ttft", args.slo_ttft_ms), ("tpot", args.slo_tpot_ms),
                             ("e2el", args.slo_e2e_ms)) if v is not None}
    for k, v in slo.items():
        if not 0 < v < math.inf:
            raise BenchError(f"--slo-{'e2e' if k == 'e2el' else k}-ms must be a finite number > 0, got {v}")
    if args.plot is not None:
        report.require_matplotlib()
        if os.path.exists(args.plot) and not os.path.isdir(args.plot):
            raise BenchError(f"--plot {args.plot}: exists and is not a directory")
        try:                             # a file written there now, and removed: not a failure after the run
            report.check_writable(os.path.join(args.plot, "plot.png"), "--plot")
        except BenchError as e:
            raise BenchError(f"--plot {args.plot}: cannot write there ({str(e).rsplit(': ', 1)[-1]})") from None
    if args.out:
        report.check_writable(args.out)
    return {"rates": rates, "percentiles": percentiles, "slo_ms": slo, "kind": _endpoint_kind(args)}


def _served_model(base: str, model: str | None, api_key: str | None, flag: str = "--model") -> str:
    """Check that the server answers; the model name to send (the first listed when none is given)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(base + "/v1/models", headers=headers, timeout=30)
    except httpx.InvalidURL as e:          # not an HTTPError
        raise BenchError(f"--url {base}: not a valid URL ({e})") from None
    except httpx.HTTPError as e:
        raise BenchError(f"--url {base}: cannot reach the server ({type(e).__name__}: {e})") from None
    ids = []
    if r.status_code == 200:
        try:
            ids = [m["id"] for m in r.json().get("data", [])]
        except (ValueError, AttributeError, KeyError, TypeError):
            ids = []
    if model is None:
        if not ids:
            raise BenchError(f"--model not given and {base}/v1/models lists no model (HTTP {r.status_code})")
        return ids[0]
    if ids and model not in ids:
        folder = os.path.basename(os.path.normpath(model))
        if os.path.isdir(model) and folder in ids:       # jaxdyn serve --model DIR serves it as DIR's name
            return folder
        raise BenchError(f"{flag} {model!r}: the server serves {', '.join(map(repr, ids))}")
    return model


def deal_requests(samples, n: int, max_concurrency: int | None) -> tuple[list[list[int]], list[int | None]]:
    """The samples' indices for each of (at most) ``n`` client processes and each one's share of
    ``max_concurrency``: the shares add up to it (at most that many processes, a share of at least one each), and
    requests are dealt in proportion to them (a process of two slots gets two for one's one); a conversation's
    turns go to one process. Processes given no request are left out."""
    mc = max_concurrency
    if mc is not None:
        n = min(n, mc)
    shares = [None] * n if mc is None else [mc // n + (j < mc % n) for j in range(n)]
    deal = list(range(n)) if mc is None else [j for j in range(n) for _ in range(shares[j])]
    parts: list[list[int]] = [[] for _ in range(n)]
    for i, sample in enumerate(samples):
        key = sample.conversation if sample.conversation is not None else i
        parts[deal[key % len(deal)]].append(i)
    return [p for p in parts if p], [shares[j] for j in range(n) if parts[j]]


def _config(args, parsed: dict, model: str) -> dict:
    keep = ("url", "tokenizer", "dataset", "dataset_path", "sharegpt_replies", "num_prompts", "seed", "input_len",
            "output_len",
            "range_ratio", "prefix_len", "suffix_len", "num_prefixes", "num_turns", "turn_len", "ignore_eos",
            "burstiness", "max_concurrency", "num_clients", "num_warmups", "temperature", "top_p", "top_k", "stream_usage",
            "timeout")
    cfg = {k: getattr(args, k) for k in keep}
    cfg.update(model=model, endpoint=ENDPOINTS[parsed["kind"]], request_rates=args.request_rate,
               percentiles=parsed["percentiles"], slo_ms=parsed["slo_ms"],
               command=report.command_line(args))
    if not cfg["dataset"].startswith("sharegpt"):
        cfg.pop("sharegpt_replies")
    if cfg["dataset"] != "random":
        for k in ("input_len", "range_ratio"):
            cfg.pop(k)
    if cfg["dataset"] != "prefix":
        for k in ("prefix_len", "suffix_len", "num_prefixes"):
            cfg.pop(k)
    if cfg["dataset"] != "multiturn":
        for k in ("num_turns", "turn_len"):
            cfg.pop(k)
    return cfg


def plan_runs(args, tokenizer, rates: list[float]) -> list[tuple[float, np.random.Generator, PromptSource,
                                                                   list[Sample]]]:
    """(rate, arrival generator, prompt source, samples) of each run. Run k draws its own prompts from the
    seed's stream (k + 1, 0) and its arrival times from (k + 1, 1) (the warm-up's prompts: stream (0,)), so
    no run finds an earlier one's prompts in the server's prefix cache."""
    plans = []
    for k, rate in enumerate(rates):
        source = PromptSource(datasets.seeded_rng(args.seed, k + 1, 0), tokenizer)
        plans.append((rate, datasets.seeded_rng(args.seed, k + 1, 1), source, datasets.load_samples(args, source)))
    return plans


async def _run_all(endpoint, tokenizer, plans, parsed, args) -> tuple[dict | None, list[dict]]:
    """The warm-up, then the runs."""
    async with clients(max(args.num_prompts, args.num_warmups)) as pool:
        warmup = None
        if args.num_warmups:
            source = PromptSource(datasets.seeded_rng(args.seed, 0), tokenizer)
            n = args.num_warmups * (args.num_turns if args.dataset == "multiturn" else 1)
            samples = [s for s in datasets.load_samples(args, source, n) if s.turn == 0][:args.num_warmups]
            records, _ = await LoadRun(endpoint, samples, source, rate=math.inf,
                                       max_concurrency=args.max_concurrency).run(pool)
            errors = [r.error for r in records if not r.success]
            warmup = {"requests": len(records), "failed": len(errors), "errors": errors[:10]}
            if errors:
                print(f"jaxdyn bench serve: {len(errors)} of {len(records)} warm-up requests failed: {errors[0]}",
                      file=sys.stderr)
        runs = []
        for rate, rng, source, samples in plans:
            run = LoadRun(endpoint, samples, source, rate=rate, burstiness=args.burstiness,
                          max_concurrency=args.max_concurrency, rng=rng, progress=not args.disable_tqdm)
            if args.num_clients > 1:
                records, duration = await asyncio.to_thread(run.run_processes, args.num_clients)
            else:
                records, duration = await run.run(pool)
            summary = metrics.summarize(records, duration, percentiles=parsed["percentiles"],
                                        slo_ms=parsed["slo_ms"], peak_concurrency=run.peak_concurrency)
            runs.append({"request_rate": "inf" if math.isinf(rate) else rate, "burstiness": args.burstiness,
                         "max_concurrency": args.max_concurrency, "summary": summary,
                         "requests": [r.to_json() for r in records]})
    return warmup, runs


def main(args) -> int:
    if args.compare is not None:
        docs = [report.load_json(path) for path in args.compare]
        print(report.compare(docs[0], docs[1], names=args.compare))
        return 0
    parsed = check_arguments(args)
    base = args.url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    tok_path = args.tokenizer
    if tok_path is None and args.model is not None and os.path.isfile(os.path.join(args.model, "tokenizer.json")):
        tok_path = args.model
    tokenizer = load_tokenizer(tok_path) if tok_path is not None else None
    model = _served_model(base, args.served_model_name or args.model, args.api_key,
                          "--served-model-name" if args.served_model_name else "--model")
    endpoint = Endpoint(base, parsed["kind"], model, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, ignore_eos=args.ignore_eos,
                        stream_usage=args.stream_usage, timeout=args.timeout, api_key=args.api_key)
    plans = plan_runs(args, tokenizer, parsed["rates"])
    warmup, runs = asyncio.run(_run_all(endpoint, tokenizer, plans, parsed, args))
    doc = {"benchmark": "jaxdyn bench serve", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "config": _config(args, parsed, model), "warmup": warmup, "runs": runs}
    print(report.table(doc))
    print(f"command: {doc['config']['command']}")
    if args.out:
        report.write_json(doc, args.out)
        print(f"wrote {args.out}")
    if args.plot:
        for path in report.plot(doc, args.plot):
            print(f"wrote {path}")
    if runs and all(r["summary"]["completed"] == 0 for r in runs):
        errors = runs[0]["summary"].get("errors") or {}
        raise BenchError(f"every request failed (first error: {next(iter(errors), 'unknown')})")
    return 0
