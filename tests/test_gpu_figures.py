"""``make gpu-check``'s benchmark, dry-run on the CPU: the script must still run where no GPU is lent."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_gpu_figures_dry_run_prints_every_figure(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_figures.py"), "--device", "cpu", "--quick"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    table = result.stdout.split("Figures on CPU (32-true, quick dry run):\n")[1].splitlines()
    figures = {line.rsplit(None, 1)[0].strip(): float(line.rsplit(None, 1)[1].replace(",", "")) for line in table}
    assert len(figures) == 6
    assert {label.split(" training")[0] for label in figures if "training steps/s" in label} == {
        "VQ-VAE", "LSTM prior", "CNN-VAE"}
    assert all(math.isfinite(value) and value > 0 for value in figures.values()), figures
