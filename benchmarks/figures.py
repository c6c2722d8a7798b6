"""The run's figures, one question each, drawn from the rows stored in results.json (never by
re-running anything).

    python -m benchmarks.figures benchmarks/results/<run>/results.json [folder]

Each figure function takes the stored result and a path, and returns True when it drew the figure,
False when the run holds nothing for it (a suite not run, every needed mode failed). A row with an
``"error"`` or a missing mode is left out of a figure, never a reason to stop.
"""

from __future__ import annotations

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OURS, JVP, TORCH, PATCHED, FLOOR = "tab:blue", "tab:red", "tab:gray", "tab:orange", "black"

# Attention modes drawn against N: (label, colour, line style).
ATTENTION_LINES = {
    "ours": ("ours: fused forward + tangent", OURS, "-"),
    "torch.func.jvp (math SDPA)": ("torch.func.jvp through math SDPA", JVP, "-"),
    "jvp_flash_attention": ("jvp_flash_attention (peer kernel)", "tab:purple", "-"),
    "flash SDPA forward": ("torch flash SDPA, forward only (no tangent)", TORCH, "--"),
}
# ViT steps drawn per model, top to bottom: (mode, label, colour).
VIT_BARS = [
    ("plain forward", "plain forward (no grad)", TORCH),
    ("fine-tuning step (last block)", "fine-tuning step", TORCH),
    ("TAFT step (last block)", "TAFT step, ours", OURS),
    ("torch.func.jvp TAFT step (last block)", "TAFT step, torch.func.jvp", JVP),
    ("patched torch.func.jvp TAFT step (last block)", "TAFT step, torch.func.jvp patched", PATCHED),
]
THIRD_PARTY_SUITES = ("meanflow", "open_clip", "hf_clip")
UNPATCHED, PATCHED_MODE = "unpatched (math attention)", "patched"
# Stated dense bf16 tensor-core peaks (TFLOP/s, vendor data sheets), by device-name fragment, most
# specific first; a GPU not listed is drawn against its measured matmul rate only.
STATED_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0)]


def timed(result: dict, *suites: str) -> list[dict]:
    """The rows of ``suites`` that were timed (rows with an error are left out)."""
    return [r for r in result.get("rows", []) if r["suite"] in suites and "median_ms" in r]


def _caption(result: dict) -> str:
    env = result.get("environment", {})
    threads = f", {env['cpu_threads']} threads" if env.get("device_type") == "cpu" and env.get("cpu_threads") else ""
    return (f"{env.get('device', '?')}{threads} · torch {env.get('torch', '?')} · "
            f"commit {str(env.get('commit', '?'))[:12]} · {env.get('time_utc', '')}")  # fmt: skip


def _save(fig, result: dict, path: pathlib.Path) -> bool:
    fig.text(0.5, 0.005, _caption(result), ha="center", va="bottom", fontsize=7, color="dimgray")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _layout(fig, title: str, legend_from=None, ncol: int = 2) -> None:
    """The question as the title, the legend (of ``legend_from``'s lines) under it, never over the
    data, and the panels below both."""
    handles, labels = legend_from.get_legend_handles_labels() if legend_from is not None else ([], [])
    height, title_height = fig.get_figheight(), 0.22 * (title.count("\n") + 1) + 0.1
    legend_height = (0.2 * -(-len(labels) // ncol) + 0.1) if labels else 0.0
    fig.suptitle(title, y=1 - 0.05 / height, va="top")
    if labels:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1 - title_height / height), ncol=ncol,
                   fontsize=8, frameon=False)  # fmt: skip
    fig.tight_layout()
    fig.subplots_adjust(top=1 - (title_height + legend_height + 0.3) / height)  # 0.3 in: the panels' own titles


def _times(a: float, b: float) -> str:
    return f"{a / b:.1f}×" if a / b < 10 else f"{a / b:.0f}×"


def attention_time_memory(result: dict, path: pathlib.Path) -> bool:
    """Time and peak memory of attention forward + tangent against N, log-log, with the FLOP floor."""
    rows = timed(result, "attention")
    lines = {mode: sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["n"]) for mode in ATTENTION_LINES}
    lines = {mode: points for mode, points in lines.items() if points}
    if not lines:
        return False
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 4.6))
    for mode, points in lines.items():
        label, colour, style = ATTENTION_LINES[mode]
        n = [r["n"] for r in points]
        time_ax.loglog(n, [r["median_ms"] for r in points], style, color=colour, marker="o", label=label)
        memory_ax.loglog(n, [r["peak_memory_bytes"] / 2**20 for r in points], style, color=colour, marker="o")
    rate = result.get("environment", {}).get("matmul_tflops_per_s")
    ours = [r for r in lines.get("ours", []) if "flops" in r]
    if rate and ours:
        time_ax.loglog([r["n"] for r in ours], [r["flops"] / (rate * 1e12) * 1e3 for r in ours], ":", color=FLOOR,
                       label=f"FLOP floor: forward + tangent FLOPs at the measured matmul rate ({rate:.2f} TFLOP/s)")  # fmt: skip
    jvp = {r["n"]: r for r in lines.get("torch.func.jvp (math SDPA)", [])}
    both = [r for r in lines.get("ours", []) if r["n"] in jvp]
    if both:  # the answer, written right of the largest N both ran, half-way (in log) between the two
        ours_row, jvp_row = both[-1], jvp[both[-1]["n"]]
        for ax, key, scale, what in ((time_ax, "median_ms", 1, "faster"),
                                     (memory_ax, "peak_memory_bytes", 2**-20, "less\nmemory")):  # fmt: skip
            low, high = ours_row[key] * scale, jvp_row[key] * scale
            ax.annotate("", (ours_row["n"], low), (ours_row["n"], high), arrowprops={"arrowstyle": "<->", "color": OURS})
            ax.annotate(f"{_times(high, low)}\n{what}", (ours_row["n"], (low * high) ** 0.5), xytext=(6, 0),
                        textcoords="offset points", va="center", color=OURS, fontsize=9, fontweight="bold")  # fmt: skip
            ax.set_xlim(right=ours_row["n"] * 2.2)
    shape = rows[0]
    time_ax.set_title("time per call")
    time_ax.set_ylabel("time per call (ms, median)")
    memory_ax.set_title("peak memory per call")
    memory_ax.set_ylabel("peak memory allocated by one call (MiB)")
    lengths = sorted({r["n"] for points in lines.values() for r in points})
    for ax in (time_ax, memory_ax):
        ax.set_xlabel("sequence length N (tokens)")
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.grid(alpha=0.3, which="major")
    _layout(fig, f"Attention forward + tangent: how much faster and leaner than torch.func.jvp?\n"
                 f"B={shape.get('batch')}, H={shape.get('heads')}, d={shape.get('head_dim')}, "
                 f"{str(shape.get('dtype', '')).removeprefix('torch.')}", time_ax)  # fmt: skip
    return _save(fig, result, path)


def layer_norm_bandwidth(result: dict, path: pathlib.Path) -> bool:
    """Each norm mode's bandwidth (bytes it must move / time) against the copy bandwidth."""
    rows = [r for r in timed(result, "layer_norm") if "gb_per_s" in r]
    if not rows:
        return False
    cases = list(dict.fromkeys(r["case"] for r in rows))
    modes = [("plain forward", "plain forward (x → y)", TORCH), ("ours", "forward + tangent, ours", OURS),
             ("torch.func.jvp", "forward + tangent, torch.func.jvp", JVP)]  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 4.4))
    width = 0.8 / len(modes)
    for i, (mode, label, colour) in enumerate(modes):
        by_case = {r["case"]: r["gb_per_s"] for r in rows if r["mode"] == mode}
        xs = [c + (i - 1) * width for c, case in enumerate(cases) if case in by_case]
        values = [by_case[case] for case in cases if case in by_case]
        bars = ax.bar(xs, values, width, color=colour, label=label)
        ax.bar_label(bars, [f"{v:.3g}" for v in values], fontsize=7)
    copy = result.get("environment", {}).get("copy_gb_per_s")
    if copy:
        ax.axhline(copy, color=FLOOR, linestyle=":", label=f"tensor copy (read + write): {copy:.3g} GB/s")
    labels = []
    for case in cases:
        r = next(r for r in rows if r["case"] == case)
        labels.append(f"{r.get('norm', 'LayerNorm')}\n{r.get('rows')} rows × {r.get('width')}\n"
                      f"{str(r.get('dtype', '')).removeprefix('torch.')}")
    ax.set_xticks(range(len(cases)), labels)
    ax.set_xlabel("input shape (rows × width)")
    ax.set_ylabel("GB/s of the bytes each must move\n(read inputs, write outputs)")
    ax.set_title("Layer norm and RMSNorm: how close to the copy bandwidth?")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, result, path)


def vit_steps(result: dict, path: pathlib.Path) -> bool:
    """Per model: time and bytes saved for the backward of a plain forward, a fine-tuning step and
    the TAFT steps (ours, torch.func.jvp, torch.func.jvp patched)."""
    rows = timed(result, "vit")
    cases = list(dict.fromkeys(r["case"] for r in rows))
    if not cases:
        return False
    fig, axes = plt.subplots(len(cases), 2, figsize=(12, 0.5 + 2.4 * len(cases)), squeeze=False)
    for (time_ax, saved_ax), case in zip(axes, cases):
        by_mode = {r["mode"]: r for r in rows if r["case"] == case}
        bars = [(label, colour, by_mode[mode]) for mode, label, colour in VIT_BARS if mode in by_mode]
        ys = range(len(bars))[::-1]
        ours = by_mode.get("TAFT step (last block)")
        drawn = time_ax.barh(ys, [r["median_ms"] for _, _, r in bars], color=[c for _, c, _ in bars])
        time_ax.bar_label(drawn, [f"{r['median_ms']:.0f} ms" + (f" ({r['median_ms'] / ours['median_ms']:.2f}× ours)"
                                  if ours and r is not ours else "") for _, _, r in bars], fontsize=7, padding=2)  # fmt: skip
        saved = [r.get("saved_bytes", 0) / 2**20 for _, _, r in bars]
        drawn = saved_ax.barh(ys, saved, color=[c for _, c, _ in bars])
        saved_ax.bar_label(drawn, [f"{s:.1f} MiB" if "saved_bytes" in r else "none (no grad)"
                                   for s, (_, _, r) in zip(saved, bars)], fontsize=7, padding=2)  # fmt: skip
        for ax in (time_ax, saved_ax):
            ax.set_yticks(list(ys), [label for label, _, _ in bars], fontsize=8)
            ax.margins(x=0.45)
            ax.grid(alpha=0.3, axis="x")
        first = next(iter(by_mode.values()))
        time_ax.set_title(f"{first.get('model', case)}, batch {first.get('batch')}: time", fontsize=9)
        saved_ax.set_title(f"{first.get('model', case)}, batch {first.get('batch')}: memory", fontsize=9)
        time_ax.set_xlabel("time per call (ms, median; in brackets: relative to the TAFT step, ours)")
        saved_ax.set_xlabel("bytes saved for the backward (MiB, weights not counted)")
    _layout(fig, "Whole ViT: how much faster and leaner than torch.func.jvp is a TAFT step?\n"
                 "(last block, final norm and head trained; random weights)")  # fmt: skip
    return _save(fig, result, path)


def third_party_patched(result: dict, path: pathlib.Path) -> bool:
    """Third-party torch.func.jvp training steps, unpatched against under ``tk.patch``: time and peak memory."""
    rows = timed(result, *THIRD_PARTY_SUITES)
    cases = list(dict.fromkeys(r["case"] for r in rows))
    if not cases:
        return False
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 0.8 + 0.75 * len(cases)), sharey=True)
    height = 0.38
    labels = []
    for i, case in enumerate(cases):
        by_mode = {r["mode"]: r for r in rows if r["case"] == case}
        first = next(iter(by_mode.values()))
        y = len(cases) - 1 - i
        step = "MeanFlow step" if first["suite"] == "meanflow" else "LinearizedModel step"
        layout = {True: ", batch first", False: ", sequence first"}.get(first.get("batch_first"), "")
        labels.append((y, f"{first.get('model', case)}{layout}\n{step}, batch {first.get('batch')}"))
        for mode, offset, colour, label in ((UNPATCHED, height / 2, TORCH, "unpatched (torch's math attention)"),
                                            (PATCHED_MODE, -height / 2, OURS, "patched (tk.patch)")):  # fmt: skip
            if mode not in by_mode:
                continue
            r = by_mode[mode]
            legend = label if i == 0 else None
            drawn = time_ax.barh(y + offset, r["median_ms"], height, color=colour, label=legend)
            time_ax.bar_label(drawn, [f"{r['median_ms']:.0f} ms"], fontsize=7, padding=2)
            drawn = memory_ax.barh(y + offset, r["peak_memory_bytes"] / 2**20, height, color=colour)
            memory_ax.bar_label(drawn, [f"{r['peak_memory_bytes'] / 2**20:.0f} MiB"], fontsize=7, padding=2)
        if UNPATCHED in by_mode and PATCHED_MODE in by_mode:
            speed = by_mode[UNPATCHED]["median_ms"] / by_mode[PATCHED_MODE]["median_ms"]
            time_ax.annotate(f"patched:\n{speed:.2f}× faster" if speed >= 1 else f"patched:\n{1 / speed:.2f}× slower", (1.0, y),
                             xycoords=("axes fraction", "data"), xytext=(4, 0), textcoords="offset points",
                             va="center", fontsize=8, color=OURS)  # fmt: skip
    time_ax.set_yticks([y for y, _ in labels], [label for _, label in labels], fontsize=8)
    time_ax.set_xlabel("time per training step (ms, median)")
    memory_ax.set_xlabel("peak memory of one step (MiB)")
    time_ax.set_title("time", fontsize=9)
    memory_ax.set_title("peak memory", fontsize=9)
    for ax in (time_ax, memory_ax):
        ax.margins(x=0.3)
        ax.grid(alpha=0.3, axis="x")
    _layout(fig, "Third-party torch.func.jvp training steps: what does tk.patch change?", time_ax)
    return _save(fig, result, path)


def attention_tflops(result: dict, path: pathlib.Path) -> bool:
    """GPU runs: each attention mode's TFLOP/s against N, under the device's peak."""
    env = result.get("environment", {})
    rows = [r for r in timed(result, "attention") if "tflops_per_s" in r]
    if env.get("device_type") != "cuda" or not rows:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.6))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        points = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["n"])
        label, colour, style = ATTENTION_LINES.get(mode, (mode, None, "-"))
        ax.semilogx([r["n"] for r in points], [r["tflops_per_s"] for r in points], style, color=colour,
                    marker="o", label=label)  # fmt: skip
    stated = next((peak for name, peak in STATED_PEAK_TFLOPS if name in str(env.get("device"))), None)
    if stated:
        ax.axhline(stated, color=FLOOR, linestyle="--", label=f"stated dense bf16 peak: {stated:.0f} TFLOP/s")
    if env.get("matmul_tflops_per_s"):
        ax.axhline(env["matmul_tflops_per_s"], color=FLOOR, linestyle=":",
                   label=f"measured matmul rate: {env['matmul_tflops_per_s']:.0f} TFLOP/s")  # fmt: skip
    lengths = sorted({r["n"] for r in rows})
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("sequence length N (tokens)")
    ax.set_ylabel("TFLOP/s (each mode's FLOP formula / time)")
    ax.set_title("Attention on the GPU: how close to the device's peak?")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save(fig, result, path)


FIGURES = {
    "attention_time_memory.png": attention_time_memory,
    "attention_tflops.png": attention_tflops,
    "layer_norm_bandwidth.png": layer_norm_bandwidth,
    "vit_steps.png": vit_steps,
    "third_party_patched.png": third_party_patched,
}


def write_figures(result: dict, folder: pathlib.Path) -> list[str]:
    """Every figure the result holds data for, written into ``folder``; the file names written."""
    return [name for name, draw in FIGURES.items() if draw(result, folder / name)]


if __name__ == "__main__":
    results = pathlib.Path(sys.argv[1])
    print(write_figures(json.loads(results.read_text()), pathlib.Path(sys.argv[2]) if len(sys.argv) > 2 else results.parent))
