"""bench/geglu_kernel.py, bench/temporal_attention_kernel.py and bench/spatial_attention_kernel.py on small shapes
with the kernels interpreted (`--tiny`): every configuration runs and agrees with XLA, so a GPU call spent on them
times kernels rather than finds a bug in the script. (The numbers on a CPU mean nothing.) Tolerance: both sides round
float32 results to bf16, so they may differ by a bf16 ulp of the output's largest magnitude (2⁻⁸ relative); 1e-2.
The spatial-attention probe compares bf16 kernels against a float32 reference on the same bf16 inputs: the kernel
rounds its probabilities and output to bf16, so again ~1 ulp; same bound."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(tmp_path, script: str) -> dict:
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, str(ROOT / "bench" / script), "--tiny", "--repeats", "1", "--out", str(out)],
                   check=True, env=env, capture_output=True, text=True)
    return json.loads(out.read_text())


@pytest.mark.parametrize("script,entries,configs", [("temporal_attention_kernel.py", "levels", "kernel"),
                                                    ("geglu_kernel.py", "shapes", "fused")])
def test_kernel_benchmark_runs_every_configuration(tmp_path, script, entries, configs):
    report = run_bench(tmp_path, script)
    assert report["tiny"] and report[entries]
    for entry in report[entries]:
        assert entry["xla_s"] > 0 and entry[configs], entry
        for config in entry[configs]:
            assert "error" not in config, config
            assert config["s"] > 0 and config["max_error_relative"] < 1e-2, config
    if script.startswith("temporal"):
        assert {entry["mode"] for entry in report["levels"]} == {"attend", "capture", "apply"}


def test_spatial_attention_probe_runs_and_agrees_with_the_float32_reference(tmp_path):
    report = run_bench(tmp_path, "spatial_attention_kernel.py")
    rows = [row for level in report["levels"] for row in level["kernels"]]
    assert report["tiny"] and rows
    for row in rows:
        assert "error" not in row, row
        assert row["s"] > 0 and row["max_error_relative"] < 1e-2, row
