"""bench/gpu_plan.py's reading of optimized HLO (kernels, their classes, the bytes they move) and its calibration
against a device trace. Compiling for a GPU needs JAX's CUDA plugin, which CI does not install: that part is
checked to refuse with the fix named."""

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from bench import gpu_plan

ROOT = Path(__file__).resolve().parents[1]

# The shape of XLA:GPU's output: a GEGLU-like gate that reads both halves of its operand, a GroupNorm-like shift
# that reads one element per row, a cuBLAS call and a cuDNN convolution.
HLO = """HloModule m, is_scheduled=true

%fused_gate (param_0: bf16[8,4]) -> bf16[8,2] {
  %param_0 = bf16[8,4]{1,0} parameter(0)
  %slice.0 = bf16[8,2]{1,0} slice(%param_0), slice={[0:8], [0:2]}
  %slice.1 = bf16[8,2]{1,0} slice(%param_0), slice={[0:8], [2:4]}
  ROOT %multiply.0 = bf16[8,2]{1,0} multiply(%slice.0, %slice.1)
}

%fused_shift (param_0.1: bf16[8,4]) -> f32[8,1] {
  %param_0.1 = bf16[8,4]{1,0} parameter(0)
  %convert.0 = f32[8,4]{1,0} convert(%param_0.1)
  ROOT %slice.2 = f32[8,1]{1,0} slice(%convert.0), slice={[0:8], [0:1]}
}

ENTRY %main (p: bf16[8,4], w: bf16[2,3], x: bf16[1,6,6,3], k: bf16[3,3,3,3]) -> (bf16[8,3], f32[8,1], bf16[1,6,6,3]) {
  %p = bf16[8,4]{1,0} parameter(0)
  %w = bf16[2,3]{1,0} parameter(1)
  %x = bf16[1,6,6,3]{3,2,1,0} parameter(2)
  %k = bf16[3,3,3,3]{3,2,1,0} parameter(3)
  %loop_multiply_fusion = bf16[8,2]{1,0} fusion(%p), kind=kLoop, calls=%fused_gate
  %loop_slice_fusion = f32[8,1]{1,0} fusion(%p), kind=kLoop, calls=%fused_shift
  %custom-call.1 = (bf16[8,3]{1,0}, s8[1024]{0}) custom-call(%loop_multiply_fusion, %w), custom_call_target="__cublas$lt$matmul"
  %get-tuple-element.1 = bf16[8,3]{1,0} get-tuple-element(%custom-call.1), index=0
  %custom-call.2 = (bf16[1,6,6,3]{3,2,1,0}, u8[0]{0}) custom-call(%x, %k), window={size=3x3 pad=1_1x1_1}, custom_call_target="__cudnn$convForward"
  %get-tuple-element.2 = bf16[1,6,6,3]{3,2,1,0} get-tuple-element(%custom-call.2), index=0
  ROOT %tuple = (bf16[8,3]{1,0}, f32[8,1]{1,0}, bf16[1,6,6,3]{3,2,1,0}) tuple(%get-tuple-element.1, %loop_slice_fusion, %get-tuple-element.2)
}
"""


def test_kernels_and_the_bytes_they_move():
    found = {k["name"]: k for k in gpu_plan.kernels(HLO)}
    assert set(found) == {"loop_multiply_fusion", "loop_slice_fusion", "custom-call.1", "custom-call.2"}
    gate, shift = found["loop_multiply_fusion"], found["loop_slice_fusion"]
    assert (gate["class"], gate["read"], gate["written"]) == ("memory-bound", 8 * 4 * 2, 8 * 2 * 2)  # both halves
    assert (shift["class"], shift["read"], shift["written"]) == ("memory-bound", 8 * 2, 8 * 4)  # one element a row
    assert (found["custom-call.1"]["class"], found["custom-call.1"]["read"]) == ("matmul", 8 * 2 * 2 + 2 * 3 * 2)
    assert found["custom-call.2"]["class"] == "convolution"
    summary = gpu_plan.summarize(list(found.values()))
    assert summary["memory-bound"] == {"kernels": 2, "bytes": 64 + 32 + 16 + 32}


def test_kernels_of_a_compiled_program():
    """XLA's own output (here for the CPU): a gate over both halves of its input is one fusion that reads all of it."""

    def gate(x):
        value, g = jnp.split(x, 2, axis=-1)
        return value * jnp.tanh(g)

    x = jnp.ones((64, 256), jnp.float32)
    found = gpu_plan.kernels(jax.jit(gate).lower(x).compile().as_text())
    fusions = [k for k in found if k["op"] == "fusion"]
    assert len(fusions) == 1
    assert (fusions[0]["read"], fusions[0]["written"]) == (64 * 256 * 4, 64 * 128 * 4)


def test_calibration_joins_a_device_trace_with_its_hlo():
    """The H200 profile in bench/results: every XLA fusion of the trace is found in the HLO by name, and the
    memory-bound ones ran at ~2.2 TB/s (what bench/NOTES.md converts bytes into milliseconds with)."""
    stem = ROOT / "bench" / "results" / "perf" / "2_jax_unet-b2_temporalconv"
    report = gpu_plan.calibrate(f"{stem}.hlo.txt.gz", f"{stem}.trace.json.gz")["by_class"]
    memory_bound = report["memory-bound"]
    assert memory_bound["kernels"] > 1000
    assert 100 < memory_bound["ms"] < 150
    assert 2.0 < memory_bound["TB_per_s"] < 2.4


@pytest.mark.parametrize("case", ["unet/b3", "vae/encode", "run/dmd", "unet/b2:chunk=8", "run/gi:steps=3"])
def test_bad_cases_are_refused(case):
    with pytest.raises(SystemExit):
        gpu_plan.parse_case(case)


def test_compiling_without_the_cuda_plugin_names_the_fix():
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
        pytest.skip("JAX's CUDA plugin is installed here")
    except ImportError:
        pass
    with pytest.raises(SystemExit, match="CUDA plugin"):
        gpu_plan.target_device("h200")


def test_targets_are_shipped():
    assert {"h100", "h200"} <= set(gpu_plan.TARGETS)


def test_loop_bodies_count_once_per_trip():
    """A lax.scan's body launches its kernels once per step: bytes per execution scale with the trip count."""

    def steps(x):
        return jax.lax.scan(lambda c, _: (jnp.sin(c) * 2, None), x, None, length=7)[0]

    found = gpu_plan.kernels(jax.jit(steps).lower(jnp.ones((1000,), jnp.float32)).compile().as_text())
    body = [k for k in found if k["op"] == "fusion" and k["shape"] == "f32[1000]"]
    assert [k["runs"] for k in body] == [7]
    assert gpu_plan.summarize(body)["memory-bound"] == {"kernels": 7, "bytes": 7 * 8000}


def test_an_update_in_place_moves_only_its_slice():
    """A loop that writes one frame per step into its output buffer: XLA updates the buffer in place, so each
    step reads and writes one frame, not the whole buffer (how `lax.map` outputs and scan carries run)."""
    hlo = """HloModule m

%fused_update (param_0: bf16[25,64,64], param_1: bf16[64,64], param_2: s32[]) -> bf16[25,64,64] {
  %param_0 = bf16[25,64,64]{2,1,0} parameter(0)
  %param_1 = bf16[64,64]{1,0} parameter(1)
  %negate.1 = bf16[64,64]{1,0} negate(%param_1)
  %bitcast.1 = bf16[1,64,64]{2,1,0} bitcast(%negate.1)
  %param_2 = s32[] parameter(2)
  %constant.0 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = bf16[25,64,64]{2,1,0} dynamic-update-slice(%param_0, %bitcast.1, %param_2, %constant.0, %constant.0)
}

ENTRY %main (buffer: bf16[25,64,64], frame: bf16[64,64], i: s32[]) -> bf16[25,64,64] {
  %buffer = bf16[25,64,64]{2,1,0} parameter(0)
  %frame = bf16[64,64]{1,0} parameter(1)
  %i = s32[] parameter(2)
  ROOT %loop_dynamic_update_slice_fusion = bf16[25,64,64]{2,1,0} fusion(%buffer, %frame, %i), kind=kLoop, calls=%fused_update
}
"""
    (update,) = gpu_plan.kernels(hlo)
    frame = 64 * 64 * 2
    assert (update["read"], update["written"]) == (frame + 4, frame)


def test_table_reads_a_plan_report():
    report = {"results": [
        {"case": "unet/b2", "compile_s_here": 25.0, "kernels": {"memory-bound": {"kernels": 3, "bytes": 2e9},
                                                                "matmul": {"kernels": 2, "bytes": 1e9}},
         "memory_bytes": {"arguments": 3e9, "temporaries": 5e9, "outputs": 0, "aliased": 0, "peak": 8e9}},
        {"case": "run/gi", "error": "..."}]}
    lines = gpu_plan.table(report).splitlines()
    assert lines[2] == "| `unet/b2` | 8.00 (3.00 + 5.00) | 5 | 2.0 | 25 |"
    assert lines[3].startswith("| `run/gi` | error")
