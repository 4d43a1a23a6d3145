"""benchmarks/serve_stack.py runs end to end: the synthetic engine's tokens reach both clients, ratios printed."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_serve_stack_prints_each_client_against_the_raw_one():
    p = subprocess.run([sys.executable, "-m", "benchmarks.serve_stack", "--streams", "6", "--tokens", "5",
                        "--step-ms", "1", "--clients", "1,2"], cwd=ROOT, capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = re.findall(r"^\| (.+?) \| ([\d,]+) \| ([\d.]+) \|$", p.stdout, re.M)
    assert [r[0] for r in rows] == ["raw socket client", "jaxdyn bench serve, 1 client process",
                                    "jaxdyn bench serve, 2 client processes"]
    assert rows[0][2] == "1.00" and all(float(r[1].replace(",", "")) > 0 for r in rows)
    assert "reproduce: python -m benchmarks.serve_stack --streams 6 --tokens 5" in p.stdout
