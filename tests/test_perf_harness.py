"""bench/perf.py on tiny models on the CPU: every kind of case runs in its own process and reports what the GPU
runs will report, the table reads the reports, and bad cases are refused. (A check of the script; the numbers
on a CPU mean nothing.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import perf

ROOT = Path(__file__).resolve().parents[1]


def run_set(tmp_path, command, cases, *extra):
    out = tmp_path / f"{command}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, str(ROOT / "bench" / "perf.py"), command, "--tiny", "--cases", ",".join(cases),
                    "--repeats", "1", "--out", str(out), "--steps", "2", *extra], check=True, env=env, cwd=tmp_path,
                   capture_output=True, text=True)
    report = json.loads(out.read_text())
    return out, {r["case"]: r for r in report["results"]}


def of_kind(results, *kinds):
    return {case: r for case, r in results.items() if case.split("/")[0] in kinds}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """(report paths, results by case, folder): the cases one after another in the driver's process (--in-process,
    quicker), but for one run in a process of its own, as every case runs on the GPU."""
    tmp_path = tmp_path_factory.mktemp("perf")
    in_process = run_set(tmp_path, "models",
                         ["unet/jax/b2", "unet/jax/b2:maps=inject", "unet/jax/b2:precision=fp8", "unet/torch-eager/b2",
                          "vae/jax", "vae/torch-eager", "profile/jax/unet-b2", "profile/torch-eager/unet-b2",
                          "run/jax/gi:decode_chunks=2+all", "run/torch-eager/i2v", "run/jax/mr-catr"],
                         "--trace-dir", str(tmp_path / "traces"), "--in-process")
    child = run_set(tmp_path, "samplers", ["run/jax/i2v"])
    return [in_process[0], child[0]], {**in_process[1], **child[1]}, tmp_path


def test_model_cases_report_times_memory_fields_and_counted_flops(reports):
    models = of_kind(reports[1], "unet", "vae")
    assert len(models) == 6, sorted(models)
    for case, result in models.items():
        assert "error" not in result, result
        assert result["median_s"] > 0 and len(result["times_s"]) == 1 and result["flops"] > 0, case
        assert "peak_bytes" in result and result["env"]
    jax_unet, torch_unet = models["unet/jax/b2"], models["unet/torch-eager/b2"]
    assert jax_unet["compile_s"] > 0 and jax_unet["dtype"] == "float32"
    # jinbetween's single-token cross-attention shortcut does less work than diffusers' attention over one token.
    assert jax_unet["flops"] < torch_unet["flops"]
    assert models["vae/jax"]["lean_decode"] is True
    # GI's injecting direction skips its temporal layers' queries and keys.
    assert models["unet/jax/b2:maps=inject"]["flops"] < jax_unet["flops"]
    # FP8 (emulated on the CPU): the same products, rounded through e4m3, a few of its steps (2^-4) off at most.
    fp8 = models["unet/jax/b2:precision=fp8"]
    assert fp8["flops"] == jax_unet["flops"] and 1e-4 < fp8["relative_error_vs_full"] < 0.25, fp8


def test_run_cases_time_whole_pipeline_calls(reports):
    runs = of_kind(reports[1], "run")
    gi, i2v, torch_i2v = runs["run/jax/gi:decode_chunks=2+all"], runs["run/jax/i2v"], runs["run/torch-eager/i2v"]
    for result in (gi, i2v, torch_i2v):
        assert "error" not in result, result
    # 2 steps, the first re-noised and repeated 5 times: 7 moves of 2 guided UNet calls (forward, backward).
    assert (gi["steps"], gi["moves"], gi["unet_calls"]) == (2, 7, 14)
    assert set(gi["flops_by_phase"]) == {"sample", "decode", "encode"}
    # GI's backward calls take injected maps (no Q·K): a little under 7× the work of i2v's 2 guided calls.
    assert 6 < gi["flops_by_phase"]["sample"] / i2v["flops_by_phase"]["sample"] < 7
    assert i2v["unet_calls"] == torch_i2v["unet_calls"] == 2
    for result in (gi, i2v):  # phase by phase, the sampler compiled ahead of time
        phases = result["phases"]
        assert phases["sample"]["compile_s"] > 0
        assert result["median_s"] == sum(phases[p]["median_s"] for p in ("encode", "sample", "decode"))
    assert set(gi["decode_by_chunk"]) == {"2", "3"}  # F = 3: "all" is a chunk of 3
    mr_catr = runs["run/jax/mr-catr"]
    assert "error" not in mr_catr, mr_catr
    # 2 steps of two guided calls each (step 0 conflict-aware, 0 < 0.2·2; step 1 plain): as i2v's 2 calls
    # twice over, the projection adding no matrix products.
    assert (mr_catr["steps"], mr_catr["moves"], mr_catr["unet_calls"]) == (2, 2, 4)
    assert mr_catr["flops_by_phase"]["sample"] == 2 * i2v["flops_by_phase"]["sample"]
    assert list(gi["peaks"]) == ["after_encode", "after_sample", "after_decode_chunk_2", "after_decode_chunk_3"]


def test_profile_cases_sum_kernel_time_by_category(reports):
    _, results, tmp_path = reports
    profile = of_kind(results, "profile")
    assert len(profile) == 2, sorted(profile)
    for case, result in profile.items():
        assert "error" not in result, result
        assert result["kernel_s_total"] > 0 and result["top"] and result["by_category_s"]
        assert abs(sum(result["by_category_s"].values()) - result["kernel_s_total"]) < 1e-9
    assert (tmp_path / "traces" / "jax_unet-b2.trace.json.gz").exists()


def test_table_reads_the_reports(reports):
    text = perf.table([str(path) for path in reports[0]])
    assert "| UNet forward, B=2 (one CFG call) |" in text
    assert "| VAE decode, all frames (lean) |" in text
    assert "| gi:decode_chunks=2+all | 14 |" in text and "(calls × B=2 UNet + decode)" in text
    assert "(measured)" in text  # i2v against diffusers' own pipeline
    assert "| UNet forward B=2 ≤ 0.45× eager |" in text and "| GI end to end ≤ 100 s |" in text
    assert "| UNet forward B=2 ≤ 0.65× torch.compile | not measured | – |" in text  # no torch.compile case ran


def test_categories_of_typical_kernel_names():
    assert perf.categorize("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert perf.categorize("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert perf.categorize("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT") == "gemm"
    assert perf.categorize("loop_convert_fusion_3") == "elementwise fusion"
    assert perf.categorize("input_reduce_fusion_12") == "reduction fusion"
    assert perf.categorize("transpose_fusion") == "transpose / copy"
    assert perf.categorize("pallas_temporal_attention_capture") == "pallas kernel"


def test_cases_split_where_a_new_case_starts():
    text = "unet/jax/b2:feedforward=pallas,temporal=pallas,vae/jax,run/jax/mpd-seq:xla=no-triton-gemm"
    assert perf.split_cases(text) == ["unet/jax/b2:feedforward=pallas,temporal=pallas", "vae/jax",
                                      "run/jax/mpd-seq:xla=no-triton-gemm"]
    assert perf.parse_case("unet/jax/b2:feedforward=pallas,temporal=pallas")[3] == {"feedforward": "pallas",
                                                                                    "temporal": "pallas"}


@pytest.mark.parametrize("case", ["unet/jax", "disk/jax/b2", "unet/jax/b2:lean", "unet/jax/b2:lean=0",
                                  "unet/jax/b2:xla=fastest", "unet/jax/b2:maps=both",
                                  "unet/torch-eager/b2:maps=inject"])
def test_bad_cases_are_refused(case):
    with pytest.raises(SystemExit):
        perf.parse_case(case)


def test_xla_presets_need_a_process_of_their_own(tmp_path):
    args = __import__("argparse").Namespace(command="variants", cases="unet/jax/b2:xla=no-triton-gemm",
                                            in_process=True, out=str(tmp_path / "v.json"))
    with pytest.raises(SystemExit, match="drop --in-process"):
        perf.drive(args)


def test_flop_counts_of_every_program():
    args = __import__("argparse").Namespace(tiny=True, frames=3, height=16, width=24, steps=2, peak_tflops=1.0)
    counts = perf.count_all(args)["counts"]
    unet_b2 = counts["unet/b2"]["flops"]
    # Twice the batch is twice the work, less the frame-index embedding, computed once per frame for any batch.
    assert 0 < 2 * counts["unet/b1"]["flops"] - unet_b2 < 1e-3 * unet_b2
    assert unet_b2 < counts["unet/b2:shortcut=0"]["flops"]
    assert counts["vae"]["flops"] > counts["vae:lean=0"]["flops"]  # the lean decode recomputes a conv
    # MPD's moves branch under lax.cond (a distillation move makes one UNet call, the others two): its sampler is
    # counted as calls × one guided forward, not as every move taking the dearer branch.
    mpd = counts["run/mpd"]
    assert mpd["flops_by_phase"]["sample"] == mpd["unet_calls"] * unet_b2
    # i2v and MR-CATR have no branch: counted from their scans, each is exactly its calls × one guided forward.
    for method in ("i2v", "mr-catr"):
        assert counts[f"run/{method}"]["flops_by_phase"]["sample"] == counts[f"run/{method}"]["unet_calls"] * unet_b2
    assert counts["run/mr-catr"]["unet_calls"] == counts["run/vibid"]["unet_calls"]
    assert all(entry["floor_s"] == entry["flops"] / 1e12 for entry in counts.values())


def test_gpu_trace_summary_takes_the_stream_lines(tmp_path):
    """A trace shaped like a GPU one: kernels on "Stream" lines, the same time again on the profiler's "XLA Ops"
    summary line, and host events; only the kernels count."""
    import gzip

    def meta(pid, name, tid=None):
        event = {"ph": "M", "pid": pid, "name": "thread_name" if tid else "process_name", "args": {"name": name}}
        return {**event, "tid": tid} if tid else event

    def span(pid, tid, name, dur, op=None):
        return {"ph": "X", "pid": pid, "tid": tid, "ts": 0, "dur": dur, "name": name,
                **({"args": {"hlo_op": op}} if op else {})}

    events = [meta(1, "/host:CPU"), meta(2, "/device:GPU:0"), meta(2, "Stream #13(Compute)", 7),
              meta(2, "XLA Ops", 8), meta(1, "python", 3),
              span(2, 7, "sm90_xmma_fprop_implicit_gemm", 300.0, "convolution.1"),
              span(2, 7, "loop_add_fusion", 100.0, "add_fusion"), span(2, 7, "loop_add_fusion", 50.0, "add_fusion"),
              span(2, 8, "convolution.1", 300.0), span(1, 3, "PjitFunction", 5000.0, "whatever")]
    path = tmp_path / "t.trace.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    summary = perf.summarize_jax_trace(path)
    assert summary["kernel_s_total"] == pytest.approx(450e-6)
    assert summary["by_category_s"] == pytest.approx({"convolution": 300e-6, "elementwise fusion": 150e-6})
    assert summary["top"][1] == {"name": "loop_add_fusion", "s": pytest.approx(150e-6), "count": 2,
                                 "category": "elementwise fusion"}
    assert set(summary["device_lines_s"]) == {"Stream #13(Compute)", "XLA Ops"}
    assert summary["top_hlo_ops"][0]["op"] == "convolution.1"


def test_table_refuses_a_kernel_benchmark_report_by_name(tmp_path):
    probe = tmp_path / "spatial_attention_kernel.json"
    probe.write_text(json.dumps({"device": "cpu", "levels": []}))
    with pytest.raises(SystemExit, match="spatial_attention_kernel.json is not a bench/perf.py report"):
        perf.table([str(probe)])
