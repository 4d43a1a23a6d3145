"""Benchmark results out: a markdown table per document, JSON, two documents side by side (B/A), PNG plots.

A document is what ``bench serve`` (``runs``: one per request rate, each a
summary and its requests) or ``bench offline`` (one ``summary``) writes.
matplotlib is imported only for plots.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys

from serving.bench import BenchError
from serving.bench.metrics import LATENCIES

LATENCY_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}

# (summary key, label) of the counts and rates, in the order vLLM prints them.
SERVE_ROWS = [
    ("completed", "Successful requests"),
    ("failed", "Failed requests"),
    ("duration_s", "Benchmark duration (s)"),
    ("total_input_tokens", "Total input tokens"),
    ("total_output_tokens", "Total generated tokens"),
    ("total_cached_tokens", "Cached prompt tokens (server's usage)"),
    ("request_throughput", "Request throughput (req/s)"),
    ("output_throughput", "Output token throughput (tok/s)"),
    ("total_token_throughput", "Total token throughput (tok/s)"),
    ("peak_concurrency", "Peak concurrent requests"),
    ("good_requests", "Requests meeting every SLO"),
    ("goodput", "Goodput (req/s)"),
]
OFFLINE_ROWS = [
    ("requests", "Requests"),
    ("duration_s", "Duration (s)"),
    ("total_input_tokens", "Total input tokens"),
    ("total_output_tokens", "Total generated tokens"),
    ("request_throughput", "Request throughput (req/s)"),
    ("input_throughput", "Input token throughput (tok/s)"),
    ("output_throughput", "Output token throughput (tok/s)"),
    ("total_token_throughput", "Total token throughput (tok/s)"),
]


def _latency_rows(summary: dict) -> list[tuple[str, str]]:
    rows = []
    for kind in LATENCIES:
        name = LATENCY_NAMES[kind]
        for key in summary:
            if key.endswith(f"_{kind}_ms") and not key.startswith("std_"):
                stat = key[: -len(f"_{kind}_ms")]
                label = {"mean": "Mean", "median": "Median"}.get(stat, stat.upper())
                rows.append((key, f"{label} {name} (ms)"))
    return rows


def _rows(summary: dict, offline: bool) -> list[tuple[str, str]]:
    if offline:
        return [r for r in OFFLINE_ROWS if r[0] in summary]
    return [r for r in SERVE_ROWS if r[0] in summary] + _latency_rows(summary)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:,.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:.4f}"
    return str(v)


def _rate(rate) -> str:
    return f"{rate:g}" if isinstance(rate, (int, float)) else str(rate)


def _runs(doc: dict) -> list[tuple[str, dict]]:
    """(column label, summary) of each run of a document."""
    if "runs" in doc:
        out = []
        for run in doc["runs"]:
            label = f"rate {_rate(run['request_rate'])}"
            if run.get("burstiness") not in (None, 1.0):
                label += f", burstiness {run['burstiness']}"
            if run.get("max_concurrency") is not None:
                label += f", concurrency {run['max_concurrency']}"
            out.append((label, run["summary"]))
        return out
    if "summary" in doc:
        return [("offline", doc["summary"])]
    raise BenchError("not a jaxdyn bench result: no 'runs' or 'summary'")


def _is_offline(doc: dict) -> bool:
    return "runs" not in doc


def table(doc: dict) -> str:
    """A markdown table (one column per run) and the errors of failed requests."""
    runs = _runs(doc)
    rows = _rows(runs[0][1], _is_offline(doc))
    lines = ["| metric | " + " | ".join(label for label, _ in runs) + " |",
             "|---|" + "---:|" * len(runs)]
    for key, label in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(s.get(key)) for _, s in runs) + " |")
    notes = []
    for label, s in runs:
        sources = s.get("token_sources")
        if sources:
            notes.append(f"{label}: output tokens counted from " +
                         ", ".join(f"{k} ({v} requests)" for k, v in sources.items()))
        for err, count in list(s.get("errors", {}).items())[:5]:
            notes.append(f"{label}: {count} failed: {err}")
        if len(s.get("errors", {})) > 5:
            notes.append(f"{label}: ... {len(s['errors']) - 5} more distinct errors (see the JSON)")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def _dumps(obj, level: int = 0) -> str:
    """JSON indented by structure, but a dict or list holding only numbers, strings or lists of them (a
    request record, the ITLs) on one line: readable, and a few hundred bytes per request."""
    def flat(v):
        return not isinstance(v, (dict, list)) or (isinstance(v, list) and not any(isinstance(x, (dict, list))
                                                                                 for x in v))
    values = list(obj.values()) if isinstance(obj, dict) else obj if isinstance(obj, list) else []
    if all(flat(v) for v in values):
        return json.dumps(obj, allow_nan=False)
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    return "[\n" + ",\n".join(inner + _dumps(v, level + 1) for v in obj) + "\n" + pad + "]"


def check_writable(path: str, flag: str = "--out") -> None:
    """BenchError unless a file can be written at ``path`` -- checked before a run, not after it: a directory is
    refused, and the file is opened for appending (and removed again if that created it)."""
    if os.path.isdir(path):
        raise BenchError(f"{flag} {path}: is a directory; give a file name")
    missing = []                         # folders write_json will make, made here for the probe and removed after
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(d):
        missing.append(d)
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise BenchError(f"{flag} {path}: {d} is not a directory")
    existed = os.path.lexists(path)
    try:
        for folder in reversed(missing):
            os.mkdir(folder)
        with open(path, "a"):
            pass
    except OSError as e:
        raise BenchError(f"{flag} {path}: {e.strerror or e}") from None
    finally:
        if not existed and os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
        for folder in missing:
            if os.path.isdir(folder):
                os.rmdir(folder)


def command_line(args) -> str:
    """The ``jaxdyn`` command line that reproduces a run (``args.argv``, set by ``serving.cli.main``; this process's
    otherwise), its API key (``--api-key``) left out."""
    shown, hide = [], False
    for a in getattr(args, "argv", sys.argv[1:]):
        if hide:
            shown.append("***")
            hide = False
        elif a == "--api-key":
            shown.append(a)
            hide = True
        elif a.startswith("--api-key="):
            shown.append("--api-key=***")
        else:
            shown.append(a)
    return shlex.join(["jaxdyn", *shown])


def _finite(obj):
    """``obj`` with every non-finite float (an infinite or NaN figure) as None: JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(doc: dict, path: str) -> None:
    """``doc`` written to ``path``, serialised first (a file is never left half written or empty)."""
    text = _dumps(_finite(doc)) + "\n"
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise BenchError(f"--out {path}: {e.strerror or e}") from None


def load_json(path: str) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise BenchError(f"--compare {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchError(f"--compare {path}: not JSON ({e})") from None
    if not isinstance(doc, dict) or ("runs" not in doc and "summary" not in doc):
        raise BenchError(f"--compare {path}: not a jaxdyn bench result (no 'runs' or 'summary')")
    if "runs" in doc:
        runs = doc["runs"]
        if not isinstance(runs, list) or not runs or not all(
                isinstance(r, dict) and isinstance(r.get("summary"), dict) and "request_rate" in r for r in runs):
            raise BenchError(f"--compare {path}: its 'runs' are not complete bench serve runs (each with "
                             "'request_rate' and a 'summary')")
    elif not isinstance(doc["summary"], dict):
        raise BenchError(f"--compare {path}: its 'summary' is not a bench offline summary")
    return doc


def compare(a: dict, b: dict, names=("A", "B")) -> str:
    """Each metric of A and B side by side with the ratio B/A; runs paired by position, or by request
    rate when the documents have different runs."""
    if _is_offline(a) != _is_offline(b):
        raise BenchError("--compare: one file is from bench serve, the other from bench offline")
    ra, rb = _runs(a), _runs(b)
    if len(ra) == len(rb):
        pairs = list(zip(ra, rb))
    else:
        by_label = dict(rb)
        pairs = [((la, sa), (la, by_label[la])) for la, sa in ra if la in by_label]
        if not pairs:
            raise BenchError("--compare: the two files have no request rate in common")
    out = [f"A = {names[0]}", f"B = {names[1]}"]
    for (la, sa), (lb, sb) in pairs:
        out += ["", f"| metric | A: {la} | B: {lb} | B/A |", "|---|---:|---:|---:|"]
        keys = [(k, label) for k, label in _rows(sa, _is_offline(a)) if k in sb]
        for key, label in keys:
            va, vb = sa.get(key), sb.get(key)
            ratio = vb / va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va else None
            out.append(f"| {label} | {_fmt(va)} | {_fmt(vb)} | {'-' if ratio is None else f'{ratio:.3f}'} |")
    return "\n".join(out)


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise BenchError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _cdf(ax, values_ms, label):
    import numpy as np
    xs = np.sort(np.asarray(values_ms, dtype=np.float64))
    if len(xs):
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)


def plot(doc: dict, directory: str) -> list[str]:
    """latency_cdf.png (TTFT, TPOT, ITL, E2E, a line per run) and, for a sweep over several request rates,
    rate_sweep.png (throughput and latency against the rate). Returns the paths written."""
    plt = require_matplotlib()
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise BenchError(f"--plot {directory}: {e.strerror or e}") from None
    runs = doc["runs"]
    paths = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, kind in zip(axes.flat, LATENCIES):
        for run in runs:
            ok = [r for r in run["requests"] if r["success"]]
            if kind == "itl":
                values = [x * 1000 for r in ok for x in r["itls"]]
            else:
                field = {"ttft": "ttft", "tpot": "tpot", "e2el": "e2e"}[kind]
                values = [r[field] * 1000 for r in ok if r[field] is not None]
            _cdf(ax, values, f"rate {_rate(run['request_rate'])}")
        ax.set_xlabel(f"{LATENCY_NAMES[kind]} (ms)")
        ax.set_ylabel("fraction of requests" if kind != "itl" else "fraction of gaps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    cfg = doc.get("config", {})
    fig.suptitle(f"{cfg.get('model', '')} {cfg.get('endpoint', '')}, dataset {cfg.get('dataset', '')}: latency CDFs")
    fig.tight_layout()
    paths.append(os.path.join(directory, "latency_cdf.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    if len(runs) > 1:
        xs = list(range(len(runs)))
        labels = [_rate(run["request_rate"]) for run in runs]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        s = [run["summary"] for run in runs]
        axes[0].plot(xs, [x["request_throughput"] or 0 for x in s], "o-", label="completed req/s")
        if "goodput" in s[0]:
            axes[0].plot(xs, [x["goodput"] or 0 for x in s], "s--", label="goodput req/s")
        axes[0].set_ylabel("requests / s")
        axes[1].plot(xs, [x["output_throughput"] or 0 for x in s], "o-", label="output tok/s")
        axes[1].plot(xs, [x["total_token_throughput"] or 0 for x in s], "s--", label="total tok/s")
        axes[1].set_ylabel("tokens / s")
        for kind, style in (("ttft", "o-"), ("tpot", "s-"), ("e2el", "^-")):
            for stat, alpha in (("median", 1.0), ("p99", 0.5)):
                key = f"{stat}_{kind}_ms"
                if key in s[0]:
                    axes[2].plot(xs, [x[key] if x[key] is not None else math.nan for x in s], style,
                                 alpha=alpha, label=f"{stat} {LATENCY_NAMES[kind]}")
        axes[2].set_ylabel("ms")
        axes[2].set_yscale("log")
        for ax in axes:
            ax.set_xticks(xs, labels)
            ax.set_xlabel("request rate (req/s)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("throughput and latency against the request rate")
        fig.tight_layout()
        paths.append(os.path.join(directory, "rate_sweep.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
