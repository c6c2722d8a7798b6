"""A run's report, written beside its results.json from the stored rows: report.md (the
environment, whether the timings can be trusted, the figures with two sentences per suite on what
they show, and the full table) and the figures (benchmarks/figures.py).

    python -m benchmarks.report benchmarks/results/<run>/results.json   # report.md + figures beside it
"""

from __future__ import annotations

import json
import pathlib
import sys

from .figures import THIRD_PARTY_SUITES, write_figures

# The report's sections, in order: (heading, suites, figures shown under it when written).
SECTIONS = [
    ("Attention forward + tangent", ("attention",), ("attention_time_memory.png", "attention_tflops.png")),
    ("Layer norm and RMSNorm forward + tangent", ("layer_norm",), ("layer_norm_bandwidth.png",)),
    ("ViT MLP forward + tangent", ("mlp",), ()),
    ("Whole ViT: linearized forward and TAFT step", ("vit",), ("vit_steps.png",)),
    ("Third-party torch.func.jvp steps under tk.patch", THIRD_PARTY_SUITES, ("third_party_patched.png",)),
    ("TAFT steps fed by a DataLoader", ("taft_data",), ()),
]


def markdown_table(result: dict) -> str:
    """One row per (case, mode): median time, TFLOP/s, peak and saved memory, error, ratios."""
    env = result["environment"]
    lines = [
        f"{env.get('device')}, {env.get('cpu_threads')} threads, torch {env.get('torch')}, triton {env.get('triton')}, "
        f"commit {str(env.get('commit'))[:12]}, {env.get('time_utc')}",
        "",
        "| suite | case | mode | median ms | TFLOP/s | peak MiB | saved MiB | max rel. error | ratios |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        mode = f"{r['mode']} [{r['backend']}]" if r["mode"].startswith(("ours", "TAFT")) and r.get("backend") else r["mode"]
        if "error" in r:
            lines.append(f"| {r['suite']} | {r['case']} | {mode} | failed: {r['error'][:80]} | | | | | |")
            continue
        ratios = ", ".join(f"{k.removeprefix('time ')} = {v:.2f}×" for k, v in r.get("ratios", {}).items())
        cells = [
            f"{r['median_ms']:.3f}",
            f"{r['tflops_per_s']:.2f}" if "tflops_per_s" in r else "",
            f"{r['peak_memory_bytes'] / 2**20:.1f}",
            f"{r['saved_bytes'] / 2**20:.1f}" if "saved_bytes" in r else "",
            f"{r['max_relative_error']:.1e}" if "max_relative_error" in r else "",
        ]
        lines.append(f"| {r['suite']} | {r['case']} | {mode} | " + " | ".join(cells) + f" | {ratios} |")
    return "\n".join(lines)


# --- two sentences per suite, computed from the rows -------------------------------------------------


def _timed(rows: list[dict], mode: str, case: str | None = None) -> dict | None:
    """The timed row of ``mode`` (in ``case``, else the last case that has it), or ``None``."""
    found = [r for r in rows if r["mode"] == mode and "median_ms" in r and case in (None, r["case"])]
    return found[-1] if found else None


def _x(slower: float, faster: float) -> str:
    """``slower / faster`` as a factor, with one decimal below 10 (``3.1×``, ``145×``)."""
    ratio = slower / faster
    return f"{ratio:.2f}×" if ratio < 1.995 else f"{ratio:.1f}×" if ratio < 9.95 else f"{ratio:.0f}×"


def _faster(ours: float, other: float) -> str:
    """``ours`` against ``other`` (both times): ``2.3× faster``, ``1.04× slower`` or ``as fast (1.01×)``."""
    if abs(other / ours - 1) < 0.03:  # within the noise of a quiet machine
        return f"about as fast ({_x(other, ours)})"
    return f"{_x(other, ours)} faster" if other >= ours else f"{_x(ours, other)} slower"


def _mib(row: dict, key: str = "peak_memory_bytes") -> str:
    return f"{row[key] / 2**20:.1f} MiB"


def _attention(rows: list[dict], env: dict) -> list[str]:
    ours, jvp = "ours", "torch.func.jvp (math SDPA)"
    both = sorted((r["n"], r["case"]) for r in rows if _timed(rows, ours, r["case"]) and _timed(rows, jvp, r["case"])
                  and r["mode"] == ours)  # fmt: skip
    sentences = []
    if both:
        n, case = both[-1]
        a, b = _timed(rows, ours, case), _timed(rows, jvp, case)
        sentences.append(f"At N={n} ours takes {a['median_ms']:.1f} ms against {b['median_ms']:.1f} ms for "
                         f"torch.func.jvp through math SDPA ({_faster(a['median_ms'], b['median_ms'])}), with "
                         f"{_x(b['peak_memory_bytes'], a['peak_memory_bytes'])} less peak memory "
                         f"({_mib(a)} against {_mib(b)}, which grows as N²).")  # fmt: skip
    flash = _timed(rows, "flash SDPA forward", both[-1][1] if both else None)
    a = _timed(rows, ours, flash["case"]) if flash else None
    if a and flash:
        floor = ""
        if env.get("matmul_tflops_per_s") and a.get("tflops_per_s"):
            floor = (f"; it reaches {a['tflops_per_s'] / env['matmul_tflops_per_s']:.0%} of the measured matmul rate "
                     f"({env['matmul_tflops_per_s']:.3g} TFLOP/s)")  # fmt: skip
        sentences.append(f"Forward + tangent does 3× the FLOPs of a forward, and at N={a['n']} ours takes "
                         f"{_x(a['median_ms'], flash['median_ms'])} the time of torch's flash forward{floor}.")  # fmt: skip
    return sentences


def _layer_norm(rows: list[dict], env: dict) -> list[str]:
    sentences = _centered_norm([r for r in rows if r.get("norm", "LayerNorm") == "LayerNorm"], env)
    rms = [r for r in rows if r.get("norm") == "RMSNorm"]
    a = _timed(rms, "ours")
    jvp = _timed(rms, "torch.func.jvp", a["case"]) if a else None
    if jvp:
        sentences.append(f"RMSNorm at {a.get('rows')}×{a.get('width')}: ours is "
                         f"{_faster(a['median_ms'], jvp['median_ms'])} than torch.func.jvp of F.rms_norm.")  # fmt: skip
    return sentences


def _centered_norm(rows: list[dict], env: dict) -> list[str]:
    a = _timed(rows, "ours")
    if not a:
        return []
    jvp, plain = _timed(rows, "torch.func.jvp", a["case"]), _timed(rows, "plain forward", a["case"])
    copy = env.get("copy_gb_per_s")
    share = f", {a['gb_per_s'] / copy:.0%} of the measured copy bandwidth ({copy:.0f} GB/s)" if copy and "gb_per_s" in a else ""
    sentences = [f"At {a.get('rows')}×{a.get('width')} ours moves the least traffic forward + tangent needs (read x, x_t; write y, y_t) at "
                 f"{a.get('gb_per_s', float('nan')):.0f} GB/s{share}"
                 + (f", {_faster(a['median_ms'], jvp['median_ms'])} than torch.func.jvp." if jvp else ".")]  # fmt: skip
    if plain:
        sentences.append(f"It takes {_x(a['median_ms'], plain['median_ms'])} the time of the plain forward, "
                         f"which moves half those bytes.")  # fmt: skip
    return sentences


def _mlp(rows: list[dict], env: dict) -> list[str]:
    a = _timed(rows, "ours")
    if not a:
        return []
    jvp, plain = _timed(rows, "torch.func.jvp", a["case"]), _timed(rows, "plain forward", a["case"])
    sentences = []
    if plain:
        sentences.append(f"On {a['case']} ours takes {_x(a['median_ms'], plain['median_ms'])} the plain forward's "
                         f"time, where the FLOP floor is 3× (six GEMMs against two).")  # fmt: skip
    if jvp:
        sentences.append(f"torch.func.jvp runs the same GEMMs: ours is {_faster(a['median_ms'], jvp['median_ms'])}, "
                         f"with {_mib(a)} peak memory against {_mib(jvp)}.")  # fmt: skip
    return sentences


def _vit(rows: list[dict], env: dict) -> list[str]:
    a = _timed(rows, "TAFT step (last block)")
    sentences = []
    if a:
        jvp = _timed(rows, "torch.func.jvp TAFT step (last block)", a["case"])
        patched = _timed(rows, "patched torch.func.jvp TAFT step (last block)", a["case"])
        fine = _timed(rows, "fine-tuning step (last block)", a["case"])
        parts = [f"On {a.get('model', a['case'])} (batch {a.get('batch')}) a TAFT step with ours takes "
                 f"{a['median_ms']:.0f} ms"]  # fmt: skip
        if fine:
            parts.append(f"{_x(a['median_ms'], fine['median_ms'])} a fine-tuning step of the same layers")
        if jvp:
            parts.append(f"{_faster(a['median_ms'], jvp['median_ms'])} than the torch.func.jvp step"
                         + (f" ({_faster(a['median_ms'], patched['median_ms'])} than it patched)" if patched else ""))  # fmt: skip
        if jvp and "saved_bytes" in a and "saved_bytes" in jvp:
            parts.append(f"and saves {_mib(a, 'saved_bytes')} for the backward against {_mib(jvp, 'saved_bytes')}")
        sentences.append(", ".join(parts) + ".")
    lin, plain = _timed(rows, "ours (all blocks)"), _timed(rows, "plain forward")
    if lin and plain:
        jvp = _timed(rows, "torch.func.jvp (all blocks)", lin["case"])
        sentences.append(f"The whole linearized forward (every block) takes {_x(lin['median_ms'], plain['median_ms'])} "
                         f"the plain forward (floor about 3×)"
                         + (f", {_faster(lin['median_ms'], jvp['median_ms'])} than torch.func.jvp." if jvp else "."))  # fmt: skip
    return sentences


def _third_party(rows: list[dict], env: dict) -> list[str]:
    sentences = []
    for case in dict.fromkeys(r["case"] for r in rows):
        patched, unpatched = _timed(rows, "patched", case), _timed(rows, "unpatched (math attention)", case)
        if patched and unpatched:
            side_by_side = patched.get("interleaved_ratios", {}).get("time unpatched (math attention) / patched")
            speed = (_side_by_side(side_by_side) if side_by_side
                     else f"patched {_faster(patched['median_ms'], unpatched['median_ms'])}")  # fmt: skip
            sentences.append(f"{case}: {speed} ({patched['median_ms']:.0f} against {unpatched['median_ms']:.0f} ms), "
                             f"peak memory {patched['peak_memory_bytes'] / unpatched['peak_memory_bytes']:.2f}× "
                             "the unpatched.")  # fmt: skip
    return sentences


def _side_by_side(ratio: dict) -> str:
    """An unpatched/patched time ratio measured round by round, and what its spread says."""
    spread = f"{ratio['median']:.2f}× (p20–p80 {ratio['p20']:.2f}–{ratio['p80']:.2f}, {ratio['rounds']} rounds)"
    if ratio["p20"] > 1:
        return f"patched faster, unpatched/patched time {spread}"
    if ratio["p80"] >= 1:
        return f"patched as fast within the noise, unpatched/patched time {spread}"
    return f"patched slower, unpatched/patched time {spread}"


def _taft_data(rows: list[dict], env: dict) -> list[str]:
    a = _timed(rows, "TAFT step from a DataLoader (last block)")
    if not a:
        return []
    fine = _timed(rows, "fine-tuning step from a DataLoader (last block)", a["case"])
    load = _timed(rows, "data loading (one batch)", a["case"])
    sentences = [f"Fed by a DataLoader, a TAFT step of {a.get('model')} (batch {a.get('batch')}) takes "
                 f"{a['median_ms']:.0f} ms ({a.get('images_per_s', float('nan')):.1f} images/s)"
                 + (f", {_x(a['median_ms'], fine['median_ms'])} a fine-tuning step of the same layers." if fine else ".")]  # fmt: skip
    if load:
        sentences.append(f"Loading one batch alone takes {load['median_ms']:.0f} ms, "
                         f"{load['median_ms'] / a['median_ms']:.0%} of the TAFT step.")  # fmt: skip
    return sentences


SUMMARIES = {"attention": _attention, "layer_norm": _layer_norm, "mlp": _mlp, "vit": _vit, "meanflow": _third_party,
             "open_clip": _third_party, "hf_clip": _third_party, "taft_data": _taft_data}  # fmt: skip


def summary(suite: str, rows: list[dict], env: dict) -> str:
    """What the suite's rows show, in a sentence or two, with its failures and wrong results."""
    sentences = SUMMARIES.get(suite, lambda rows, env: [])(rows, env)
    if not sentences:
        sentences = [f"{len(rows)} rows, too few of them timed side by side to compare; see the table."]
    failed = [f"{r['mode']} on {r['case']} ({r['error'][:100]})" for r in rows if "error" in r]
    wrong = [f"{r['mode']} on {r['case']} (max rel. error {r['max_relative_error']:.1e})"
             for r in rows if r.get("correct") is False]  # fmt: skip
    if failed:
        sentences.append("Failed to run: " + "; ".join(failed) + ".")
    if wrong:
        sentences.append("**Wrong result**: " + "; ".join(wrong) + ".")
    return " ".join(sentences)


# --- report.md -----------------------------------------------------------------------------------


def noise_warning(result: dict) -> str | None:
    """Why the run's timings are not trustworthy, in one sentence (``None`` when they are)."""
    noise = result.get("noise")
    if not noise or noise.get("trustworthy", True):
        return None
    return "these timings are not trustworthy: " + "; ".join(noise["reasons"]) + ". Rerun on a quiet machine."


def environment_lines(result: dict) -> list[str]:
    env, noise = result["environment"], result.get("noise")
    lines = [
        "| | |", "|---|---|",
        f"| device | {env.get('device')}" + (f", {env.get('cpu_threads')} threads" if env.get("device_type") == "cpu" else "") + " |",
        f"| versions | torch {env.get('torch')}, triton {env.get('triton')}, python {env.get('python')} |",
        f"| commit | {env.get('commit')} |",
        f"| time (UTC), host | {env.get('time_utc')}, {env.get('host')} |",
        f"| suite size | {'full' if result.get('full') else 'small default'} |",
    ]  # fmt: skip
    if env.get("matmul_tflops_per_s"):
        lines.append(f"| measured matmul rate (the FLOP floor's yardstick) | {env['matmul_tflops_per_s']:.3g} TFLOP/s "
                     f"({env.get('matmul')}) |")  # fmt: skip
    else:
        lines.append("| measured matmul rate | not measured in this run (no FLOP floor drawn) |")
    if env.get("copy_gb_per_s"):
        lines.append(f"| measured copy bandwidth | {env['copy_gb_per_s']:.3g} GB/s (read + write of "
                     f"{env.get('copy_bytes', 0) / 2 / 2**20:.0f} MiB) |")  # fmt: skip
    else:
        lines.append("| measured copy bandwidth | not measured in this run (no copy line drawn) |")
    if noise:
        start, end = noise["calibration_start"], noise["calibration_end"]
        spread = noise.get("median_row_spread")
        lines += [
            f"| load average before → after (1 min) | {noise['load_average_before'][0]:.2f} → "
            f"{noise['load_average_after'][0]:.2f} on {noise.get('cpu_cores')} cores |",
            *([f"| other processes in a 1 s sample before the run | {noise['other_load_before']:.2f} cores |"]
              if noise.get("other_load_before") is not None else []),
            f"| other processes during the run | {noise['other_load_during']:.2f} cores ({noise.get('other_load_how')}) |",
            f"| calibration matmul, start → end | {start['median_ms']:.2f} → {end['median_ms']:.2f} ms |",
            f"| median spread of a row's repeats (p80/p20) | {spread:.3f} |" if spread else "| median spread | – |",
            f"| timings trustworthy | {'yes' if noise['trustworthy'] else 'no'} |",
            f"| run time | {noise.get('wall_seconds', 0):.0f} s (the suites, with set-up of their cases) |",
        ]  # fmt: skip
    else:
        lines.append("| timings trustworthy | not checked (this run recorded no noise measurements) |")
    return lines


def report_markdown(result: dict, figures: list[str]) -> str:
    """report.md's text for ``result``, embedding those of ``figures`` (file names) that were written."""
    env, rows = result["environment"], result["rows"]
    suites = list(dict.fromkeys(r["suite"] for r in rows))
    lines = [f"# Benchmarks: {env.get('device')}, {str(env.get('time_utc', ''))[:10]}", ""]
    warning = noise_warning(result)
    if warning:
        lines += [f"> **Warning: {warning}** (`python -m benchmarks.run --strict` exits non-zero on such a run.)", ""]
    if result.get("not_run"):
        skipped = result["not_run"]
        lines += [f"> Not run within the time budget of {skipped['budget_s']:.0f} s: "
                  + ", ".join(f"`{name}`" for name in skipped["cases"]) + ".", ""]  # fmt: skip
    lines += ["## Environment", "", *environment_lines(result), ""]
    known = {s for _, group, _ in SECTIONS for s in group}
    sections = SECTIONS + [(f"Suite {s}", (s,), ()) for s in suites if s not in known]
    for heading, group, pictures in sections:
        present = [s for s in group if s in suites]
        if not present:
            continue
        lines += [f"## {heading}", ""]
        lines += [f"![{heading}]({name})\n" for name in pictures if name in figures]
        for suite in present:
            lines.append(f"**{suite}**: " + summary(suite, [r for r in rows if r["suite"] == suite], env))
            lines.append("")
    lines += ["## All rows", "", markdown_table(result), ""]
    return "\n".join(lines)


def write_report(result: dict, folder: pathlib.Path) -> list[str]:
    """report.md and the figures written into ``folder``; the names of the files written."""
    figures = write_figures(result, folder)
    (folder / "report.md").write_text(report_markdown(result, figures))
    return ["report.md", *figures]


if __name__ == "__main__":
    results = pathlib.Path(sys.argv[1])
    print(write_report(json.loads(results.read_text()), results.parent))
