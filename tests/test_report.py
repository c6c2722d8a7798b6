"""The benchmark report on a small synthetic results file: the figures, report.md, and the noise
guard's decision. Nothing is timed here; every number is made up."""

import json

import matplotlib.pyplot as plt
import pytest

from benchmarks import figures, noise
from benchmarks.report import write_report
from benchmarks.run import exit_status

MIB = 2**20


def row(suite, case, mode, ms, peak_mib=1.0, **fields):
    return {"suite": suite, "case": case, "mode": mode, "median_ms": ms, "p20_ms": 0.99 * ms, "p80_ms": 1.01 * ms,
            "peak_memory_bytes": peak_mib * MIB, **fields}  # fmt: skip


def synthetic_rows():
    rows = []
    for n, ours_ms in ((197, 1.0), (1024, 20.0)):
        case, shape = f"N={n}", {"n": n, "batch": 1, "heads": 2, "head_dim": 64, "dtype": "torch.float32"}
        rows += [row("attention", case, "ours", ours_ms, 2, flops=12e6 * n, tflops_per_s=0.1, backend="cpp", **shape),
                 row("attention", case, "torch.func.jvp (math SDPA)", 3 * ours_ms, 50, **shape),
                 row("attention", case, "flash SDPA forward", ours_ms / 3, 1, **shape)]  # fmt: skip
    rows.append({"suite": "attention", "case": "N=1024", "mode": "jvp_flash_attention", "error": "ImportError: none"})
    shape = {"rows": 8, "width": 16}
    rows += [row("layer_norm", "8x16", "plain forward", 0.1, gb_per_s=20.0, **shape),
             row("layer_norm", "8x16", "ours", 0.2, gb_per_s=20.0, **shape),
             row("layer_norm", "8x16", "torch.func.jvp", 1.0, gb_per_s=4.0, **shape)]  # fmt: skip
    rms = {**shape, "norm": "RMSNorm"}
    rows += [row("layer_norm", "RMSNorm 8x16", "ours", 0.2, gb_per_s=20.0, **rms),
             row("layer_norm", "RMSNorm 8x16", "torch.func.jvp", 0.5, gb_per_s=8.0, **rms)]  # fmt: skip
    rows += [row("mlp", "tiny", "plain forward", 1.0), row("mlp", "tiny", "ours", 3.1),
             row("mlp", "tiny", "torch.func.jvp", 3.0)]  # fmt: skip
    vit = {"model": "vit_tiny", "batch": 2}
    rows += [row("vit", "vit_tiny", "plain forward", 10, **vit), row("vit", "vit_tiny", "ours (all blocks)", 30, **vit),
             row("vit", "vit_tiny", "torch.func.jvp (all blocks)", 33, **vit),
             row("vit", "vit_tiny", "TAFT step (last block)", 12, saved_bytes=10 * MIB, **vit),
             row("vit", "vit_tiny", "torch.func.jvp TAFT step (last block)", 30, saved_bytes=18 * MIB, **vit),
             row("vit", "vit_tiny", "patched torch.func.jvp TAFT step (last block)", 31, saved_bytes=13 * MIB, **vit),
             row("vit", "vit_tiny", "fine-tuning step (last block)", 11, saved_bytes=10 * MIB, **vit)]  # fmt: skip
    for suite, case in (("meanflow", "DiT MeanFlow step"), ("open_clip", "open_clip LinearizedModel step"),
                        ("hf_clip", "HF CLIP LinearizedModel step")):  # fmt: skip
        rows += [row(suite, case, "unpatched (math attention)", 30, 100, model=suite, batch=2, batch_first=True),
                 row(suite, case, "patched", 10, 50, model=suite, batch=2, batch_first=True)]  # fmt: skip
    rows += [row("taft_data", "vit_tiny", "data loading (one batch)", 2, model="vit_tiny", batch=8),
             row("taft_data", "vit_tiny", "TAFT step from a DataLoader (last block)", 50, model="vit_tiny", batch=8,
                 images_per_s=160.0, backend="auto"),
             row("taft_data", "vit_tiny", "fine-tuning step from a DataLoader (last block)", 45, model="vit_tiny",
                 batch=8)]  # fmt: skip
    rows.append(row("some_new_suite", "c", "ours", 1.0))
    return rows


def calibration(median_ms, spread=1.02):
    return {"matmul": "64x64x64 float32", "median_ms": median_ms, "p20_ms": median_ms, "p80_ms": spread * median_ms,
            "repeats": 10, "tflops_per_s": 0.2}  # fmt: skip


def noise_record(device_type="cpu", before=0.1, during=0.1, start=10.0, end=10.2, calibration_spread=1.02,
                 row_spread=1.02, sampled_before=None):  # fmt: skip
    record = {"device_type": device_type, "cpu_cores": 2, "threads": 2, "load_average_before": [before, 0.2, 0.2],
              "other_load_before": sampled_before,
              "load_average_after": [2.0 + during, 1.0, 0.5], "other_load_during": during, "other_load_how": "test",
              "wall_seconds": 100.0, "calibration_start": calibration(start, calibration_spread),
              "calibration_end": calibration(end), "median_row_spread": row_spread}  # fmt: skip
    record["reasons"] = noise.verdict(record)
    record["trustworthy"] = not record["reasons"]
    return record


def synthetic_result(**noise_fields):
    environment = {"device": "cpu (test)", "device_type": "cpu", "cpu_threads": 2, "torch": "x", "triton": "y",
                   "python": "3", "commit": "abc", "time_utc": "2026-01-01T00:00:00", "host": "h",
                   "matmul": "64x64x64 float32", "matmul_tflops_per_s": 0.2, "copy_gb_per_s": 30.0,
                   "copy_bytes": 2 * 64 * MIB}  # fmt: skip
    # through JSON, as the report reads a stored results file
    return json.loads(json.dumps({"environment": environment, "full": False, "noise": noise_record(**noise_fields),
                                  "rows": synthetic_rows()}))  # fmt: skip


@pytest.fixture
def drawn(monkeypatch):
    """Every figure drawn, by file name, kept open for inspection."""
    kept = {}

    def keep(fig, result, path):
        kept[path.name] = fig
        fig.savefig(path, dpi=40)
        return True

    monkeypatch.setattr(figures, "_save", keep)
    yield kept
    for fig in kept.values():
        plt.close(fig)


def y_labelled(ax):
    """A y label, or categories written as the y tick labels (horizontal bars)."""
    return ax.get_ylabel() or any(t.get_text() for t in ax.get_yticklabels())


def test_every_figure_is_written_with_labels_and_a_title(tmp_path, drawn):
    written = figures.write_figures(synthetic_result(), tmp_path)
    assert written == ["attention_time_memory.png", "layer_norm_bandwidth.png", "vit_steps.png",
                       "third_party_patched.png"]  # no GPU figure for a CPU run  # fmt: skip
    for name in written:
        assert (tmp_path / name).stat().st_size > 0
        fig = drawn[name]
        assert fig.get_suptitle() or all(ax.get_title() for ax in fig.axes), name
        for ax in fig.axes:
            assert ax.get_xlabel(), f"{name}: an axis without an x label"
            assert any(y_labelled(a) for a in ax.get_shared_y_axes().get_siblings(ax)), f"{name}: no y label"


def test_gpu_run_adds_tflops_against_the_peak(tmp_path, drawn):
    result = synthetic_result()
    result["environment"].update(device_type="cuda", device="NVIDIA H100 80GB HBM3")
    assert "attention_tflops.png" in figures.write_figures(result, tmp_path)
    labels = drawn["attention_tflops.png"].axes[0].get_legend_handles_labels()[1]
    assert any("stated dense bf16 peak: 989" in label for label in labels)


def test_missing_suites_and_failed_rows_are_skipped(tmp_path, drawn):
    result = synthetic_result()
    for r in result["rows"]:  # every attention row failed, every ViT row is gone
        if r["suite"] == "attention":
            r.pop("median_ms", None)
            r["error"] = "RuntimeError: boom"
    result["rows"] = [r for r in result["rows"] if r["suite"] != "vit"]
    del result["environment"]["copy_gb_per_s"], result["environment"]["matmul_tflops_per_s"]
    assert figures.write_figures(result, tmp_path) == ["layer_norm_bandwidth.png", "third_party_patched.png"]
    assert figures.write_figures({"environment": {}, "rows": []}, tmp_path) == []
    report = (tmp_path / write_report(result, tmp_path)[0]).read_text()
    assert "Failed to run: ours on N=197 (RuntimeError: boom)" in report
    assert "attention_time_memory.png" not in report


def test_report_names_every_suite_and_embeds_the_figures(tmp_path):
    result = synthetic_result()
    written = write_report(result, tmp_path)
    report = (tmp_path / "report.md").read_text()
    for suite in {r["suite"] for r in result["rows"]}:
        assert f"**{suite}**:" in report, suite
    for name in written[1:]:
        assert f"]({name})" in report and (tmp_path / name).exists()
    assert "Warning" not in report and "| timings trustworthy | yes |" in report
    assert "At N=1024 ours takes 20.0 ms against 60.0 ms for torch.func.jvp through math SDPA (3.0× faster), " \
           "with 25× less peak memory" in report  # fmt: skip
    assert "| attention | N=197 | ours [cpp] | 1.000 |" in report  # the full table
    assert "RMSNorm at 8×16: ours is 2.5× faster than torch.func.jvp of F.rms_norm." in report


@pytest.mark.parametrize("p20,p80,verdict", [(1.2, 1.5, "patched faster"), (0.95, 1.04, "patched as fast within the noise"),
                                             (0.8, 0.9, "patched slower")])  # fmt: skip
def test_side_by_side_ratio_verdict(tmp_path, p20, p80, verdict):
    """The third-party sentences read the interleaved ratio's spread, not the two medians."""
    result = synthetic_result()
    key = "time unpatched (math attention) / patched"
    for r in result["rows"]:
        if r["suite"] == "meanflow" and r["mode"] == "patched":
            r["interleaved_ratios"] = {key: {"median": (p20 + p80) / 2, "p20": p20, "p80": p80, "rounds": 11}}
    write_report(result, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert f"DiT MeanFlow step: {verdict}, unpatched/patched time {(p20 + p80) / 2:.2f}× (p20–p80 {p20:.2f}–{p80:.2f}, 11 rounds)" in report


def test_untrustworthy_run_is_flagged_at_the_top_of_the_report(tmp_path):
    result = synthetic_result(during=1.0)
    write_report(result, tmp_path)
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[2].startswith("> **Warning: these timings are not trustworthy: other processes kept 1.00 cores")
    assert exit_status(result, strict=True) == 2 and exit_status(result, strict=False) == 0
    assert exit_status(synthetic_result(), strict=True) == 0


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({}, None),  # a quiet machine
        ({"before": 1.2}, "busy before the run (1-minute load average 1.20"),  # without /proc/stat
        ({"before": 1.65, "sampled_before": 0.02}, None),  # the load average remembers make bench's own set-up
        ({"before": 0.1, "sampled_before": 0.9}, "busy before the run (other processes' cores busy in a 1 s sample 0.90"),
        ({"during": 0.9}, "other processes kept 0.90 cores busy"),
        ({"start": 10.0, "end": 19.0}, "took 10.00 ms at the start and 19.00 ms at the end"),
        ({"start": 19.0, "end": 10.0}, "took 19.00 ms at the start and 10.00 ms at the end"),  # sped up: also void
        ({"calibration_spread": 1.6}, "spread 1.60x (p80/p20) at the start"),
        ({"row_spread": 1.3}, "the median row's repeats spread 1.30x"),
        ({"device_type": "cuda", "before": 3.0, "during": 3.0}, None),  # a GPU's timings ignore the host's load
    ],
)
def test_noise_verdict(fields, reason):
    reasons = noise_record(**fields)["reasons"]
    if reason is None:
        assert reasons == []
    else:
        assert len(reasons) == 1 and reason in reasons[0], reasons


def test_the_collapsed_run_is_void():
    """The run that read a linearized ViT at 19× the plain forward: each row's repeats agreed, the
    machine did not (one core kept busy all along)."""
    reasons = noise_record(before=1.1, during=1.3, start=10.0, end=58.0)["reasons"]
    assert len(reasons) == 3


def test_median_row_spread():
    assert noise.median_row_spread([{"p20_ms": 1.0, "p80_ms": 1.1}, {"p20_ms": 2.0, "p80_ms": 3.0},
                                    {"error": "x"}, {"p20_ms": 1.0, "p80_ms": 1.2}]) == pytest.approx(1.2)  # fmt: skip
    assert noise.median_row_spread([]) is None
