"""bench/gpu_suite.py: the micro-batch search and MFU arithmetic (fast), and the whole --debug suite on CPU (slow)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is not an installed package: import it from the checkout
    sys.path.insert(0, str(REPO))

from bench import gpu_suite  # noqa: E402


def test_micro_batch_search_takes_the_largest_that_fits():
    tried, freed = [], []

    def measure(micro):
        tried.append(micro)
        if micro > 48:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if micro == 48:
            raise RuntimeError("CUDA error: out of memory")  # the older spelling counts too
        return {"samples_per_s": 10.0 * micro}

    micro, point, oom = gpu_suite.search_micro_batch(measure, [32, 256, 64, 128, 48, 16],
                                                     on_oom=lambda: freed.append(1))
    assert (micro, point) == (32, {"samples_per_s": 320.0})
    assert tried == [256, 128, 64, 48, 32] and oom == [256, 128, 64, 48] and len(freed) == 4


def test_micro_batch_search_none_fits_and_other_errors_propagate():
    def oom(micro):
        raise torch.OutOfMemoryError("out of memory")

    assert gpu_suite.search_micro_batch(oom, [4, 2]) == (None, None, [4, 2])

    def broken(micro):
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        gpu_suite.search_micro_batch(broken, [4, 2])


def test_mfu_and_peak_flops_by_card():
    assert gpu_suite.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_suite.peak_flops("NVIDIA H200") == 989e12
    assert gpu_suite.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_suite.peak_flops("NVIDIA GeForce RTX 4090") is None
    assert gpu_suite.peak_flops(None) is None
    assert gpu_suite.peak_flops("NVIDIA H100", override=500e12) == 500e12
    # 1,000 samples/s x 494.5 GFLOP/sample on a 989 TFLOP/s card: 50 %.
    assert gpu_suite.mfu(1000.0, 494.5e9, 989e12) == pytest.approx(0.5)
    assert gpu_suite.mfu(1000.0, 494.5e9, None) is None


@pytest.mark.slow
def test_debug_suite_runs_every_part(tmp_path, ray_address):
    """Every part at debug size once (a smoke run); part 4's Ray Train stage joins the session's Ray head
    (RAY_ADDRESS) instead of starting its own."""
    out = tmp_path / "suite"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--debug", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    expected = {"microdit/stage1_eager", "microdit/stage1_compile", "microdit/stage3_eager",
                "microdit/stage3_compile", "emmdit/512_eager", "emmdit/512_nocompress", "encoders", "ray/plain", "ray/stage"}
    assert set(report["parts"]) == expected
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part)
        assert part["wall_s"] > 0
        if name != "encoders":
            assert part["samples_per_s"] > 0 and part["micro_batch"] >= 1, (name, part)
    encoders = report["parts"]["encoders"]
    per_s = {k: v for k, v in encoders.items() if k.endswith("_per_s")}
    assert len(per_s) == 5 and all(v > 0 for v in per_s.values()), encoders
    assert all(encoders[k.replace("_per_s", "_status")] == "ok" for k in per_s)
    # Part 2 ran at part 1's stage-1 micro-batch; part 4 logged a ratio.
    assert report["parts"]["emmdit/512_eager"]["micro_batch"] == report["parts"]["microdit/stage1_eager"]["micro_batch"]
    assert report["ray_overhead_ratio"] > 0 and report["emmdit_compression_speedup"] > 0
    assert report["parts"]["emmdit/512_nocompress"]["params"] < report["parts"]["emmdit/512_eager"]["params"]
    assert report["environment"]["device"] == "cpu" and report["environment"]["torch"] == torch.__version__
    table = (out / "gpu_suite.md").read_text()
    assert "| microdit/stage1_eager | ok |" in table and "Ray stage / plain loop" in table and "compression speedup" in table
    assert table.strip() in proc.stdout
