"""Render benchmark results JSON files into the README's tables (markdown) and a PNG (speed-up and memory vs density).

    python benchmarks/report.py [results/*.json ...] [--out benchmarks/results]

Every row names the file it came from. Ratios are always taken within one file (one machine, one run): speed-up =
baseline median / provider median; memory ratio = provider / baseline. The "figures to reach" section checks the
issue's targets against the newest file of each device and says which are met, and why not where missed.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 1024**3
MIB = 1024**2


def _read(paths: list[Path], keep) -> list[tuple[str, dict]]:
    """(file name, data) of every readable JSON file whose data `keep` accepts."""
    out = []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and keep(data):
            out.append((Path(p).name, data))
    return out


def _load_probes(paths: list[Path]) -> list[tuple[str, dict]]:
    """The checkpointing probe's files (experiments/probes/checkpointing_probe.py, schema 2), oldest first."""
    found = _read(paths, lambda d: d.get("suite") == "checkpointing-probe" and "summary_medians" in d)
    return sorted(found, key=lambda fd: fd[1]["provenance"]["date_utc"])


def probe_rows(fname: str, data: dict) -> list[str]:
    rows = []
    plain_dense = data["summary_medians"]["dense_masked/none"]
    for key, v in data["summary_medians"].items():
        label, ck = key.split("/")
        r = data["ratios"].get(key)
        if r:
            same, plain = r["vs_dense_same_checkpointing"], r["vs_dense_without_checkpointing"]
            cells = (f"{same['peak_memory']:.3f}x, {same['step_time']:.3f}x",
                     f"{plain['peak_memory']:.3f}x, {plain['step_time']:.3f}x")  # fmt: skip
        else:  # dense masked itself
            m = v["peak_bytes"] / plain_dense["peak_bytes"]
            t = v["step_seconds"] / plain_dense["step_seconds"]
            cells = ("1x, 1x", f"{m:.3f}x, {t:.3f}x")
        rows.append(
            f"| {label} | {'per layer' if ck == 'torch' else 'none'} | {_fmt_s(v['step_seconds'])} | "
            f"{_fmt_b(v['peak_bytes'])} | {cells[0]} | {cells[1]} | {fname} |"
        )
    return rows


def probe_figures(fname: str, data: dict) -> list[str]:
    out = []
    for ck, what in (("none", "no checkpointing"), ("torch", "activation checkpointing in both arms")):
        r = data["ratios"].get(f"ppt_fast/{ck}", {}).get("vs_dense_same_checkpointing")
        if r:
            ok = r["peak_memory"] <= 0.6 and r["step_time"] <= 1.0
            out.append(
                f"- end-to-end tune step, musicgen-small shapes, {what} (median of {data['repeats']} rounds): "
                f"{r['peak_memory']:.2f}x dense masked peak memory, {r['step_time']:.2f}x its step time (target <= "
                f"0.6x and no slower) - " + ("met" if ok else "MISSED") + f"  ({fname})"
            )
    return out


def _load(paths: list[Path]) -> list[tuple[str, dict]]:
    return _read(paths, lambda d: "benchmarks" in d and "provenance" in d)


def _key(e: dict) -> tuple:
    return (e.get("op"), e.get("model"), e.get("layers"), e.get("dtype"), e.get("density"), e.get("phase"))


def _fmt_s(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"


def _fmt_b(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= GIB:
        return f"{x / GIB:.2f} GiB"
    return f"{x / MIB:.1f} MiB" if abs(x) >= MIB else f"{x / 1024:.1f} KiB"


def _fmt_d(d) -> str:
    return "-" if d is None else f"{100 * d:g}%"


def _ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}x"


def _index(entries: list[dict]) -> dict[tuple, dict[str, dict]]:
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for e in entries:
        groups[_key(e)][e.get("provider")] = e
    return groups


def _versus(data: dict, ops, baseline: str | dict[str, str]):
    """(provider, entry, the same case's baseline entry or None) for every benchmark of `ops` in one results file;
    `baseline` names the baseline provider, or maps each op to its own."""
    entries = [b["extra_info"] for b in data["benchmarks"] if b["extra_info"].get("op") in ops]
    for key, provs in _index(entries).items():
        base = provs.get(baseline.get(key[0]) if isinstance(baseline, dict) else baseline)
        for prov, e in provs.items():
            yield prov, e, base


def op_rows(fname: str, data: dict) -> list[str]:
    rows = []
    for prov, e, base in _versus(data, _OPS, _BASELINE):
        speed = _ratio(base and base.get("median_seconds"), e.get("median_seconds"))
        mem = e.get("mem_peak_extra_bytes")
        mem_ratio = _ratio(mem, base and base.get("mem_peak_extra_bytes"))
        rows.append(
            f"| {e['op']} | {e['model']} ({e['layers']}/{e['layers_total']} layers, {e['tensors']} tensors) | "
            f"{e['dtype']} | {_fmt_d(e.get('density'))} | {prov} | {_fmt_s(e.get('median_seconds'))} | "
            f"{_fmt_x(speed)} | {e.get('gbps', float('nan')):.3g} | {e.get('pct_of_copy', float('nan')):.3g}% | "
            f"{_fmt_b(mem)} | {_fmt_x(mem_ratio)} | {fname} |"
        )
    return rows


def e2e_rows(fname: str, data: dict) -> list[str]:
    rows = []
    for prov, e, base in _versus(data, ("tune_step",), "dense_masked"):
        speed = _ratio(base and base["step_seconds"], e["step_seconds"])
        mem_ratio = _ratio(e["peak_bytes"], base and base["peak_bytes"])
        extra_ratio = _ratio(e["peak_extra_bytes"], base and base["peak_extra_bytes"])
        rows.append(
            f"| {e['model']} | {e['phase']} | {prov} | {_fmt_d(e.get('density'))} | {_fmt_s(e['step_seconds'])} | "
            f"{_fmt_x(speed)} | {_fmt_b(e['peak_bytes'])} | {_fmt_x(mem_ratio)} | {_fmt_b(e['peak_extra_bytes'])} "
            f"| {_fmt_x(extra_ratio)} | {fname} |"
        )
    return rows


PEER_OP = "peer_tune_step"
PEER_ORDER = ("ppt_fast", "dense_masked", "dreamstyler", "tokens", "full", "lora", "lora_matched", "shira")


def peer_rows(fname: str, data: dict) -> list[str]:
    """One row per arm of the peers' tune step; ratios against ppt_fast's row of the same model in the same file."""
    rows = []
    entries = [b["extra_info"] for b in data["benchmarks"] if b["extra_info"].get("op") == PEER_OP]
    by_model: dict[str, dict[str, dict]] = defaultdict(dict)
    for e in entries:
        by_model[e["model"]][e["provider"]] = e
    for model, arms in by_model.items():
        ppt = arms.get("ppt_fast")
        for prov in sorted(arms, key=lambda p: PEER_ORDER.index(p) if p in PEER_ORDER else 99):
            e = arms[prov]
            t = _ratio(e["step_seconds"], ppt and ppt["step_seconds"])
            m = _ratio(e["peak_extra_bytes"], ppt and ppt["peak_extra_bytes"])
            f = _ratio(e.get("file_bytes"), ppt and ppt.get("file_bytes"))
            rows.append(
                f"| {model} | {prov} | {_fmt_s(e['step_seconds'])} | {_fmt_x(t)} | {_fmt_b(e['peak_bytes'])} | "
                f"{_fmt_b(e['peak_extra_bytes'])} | {_fmt_x(m)} | {e.get('trainable', 0):,} | "
                f"{_fmt_b(e.get('optimizer_state_bytes'))} | {_fmt_b(e.get('file_bytes'))} | {_fmt_x(f)} | "
                f"{e.get('impl', '')} | {fname} |"
            )
    return rows


DIST_OP = "dist_tune_step"


def _dist_by_model(data: dict) -> dict[str, dict[str, dict]]:
    by_model: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if e.get("op") == DIST_OP:
            by_model[e["model"]][e["provider"]] = e
    return by_model


def dist_rows(fname: str, data: dict) -> list[str]:
    """One row per arm of the several-process tune step; bytes against DDP's of the same model in the same file."""
    rows = []
    for model, arms in _dist_by_model(data).items():
        ddp = arms.get("ddp_dense_masked")
        for prov in sorted(arms, key=lambda p: p != "ppt_fast"):
            e = arms[prov]
            fewer = ddp["bytes_per_step"] / e["bytes_per_step"] if ddp and e["bytes_per_step"] else None
            rows.append(
                f"| {model} | {prov} | {e.get('world', 2)} | {e['bytes_per_step']:,} ({_fmt_b(e['bytes_per_step'])}) "
                f"| {_fmt_x(fewer)} | {_fmt_s(e['allreduce_seconds'])} | {_fmt_s(e['step_seconds'])} | "
                f"{e.get('k', 0):,} | {e.get('impl', '')} | {fname} |"
            )
    return rows


def dist_figures(fname: str, data: dict) -> list[str]:
    """The issue's target: >= 50x fewer bytes all-reduced per step than DDP over dense masked tuning."""
    lines = []
    for model, arms in sorted(_dist_by_model(data).items()):
        ppt, ddp = arms.get("ppt_fast"), arms.get("ddp_dense_masked")
        if ppt and ddp and ppt["bytes_per_step"]:
            x = ddp["bytes_per_step"] / ppt["bytes_per_step"]
            lines.append(f"- {model}, 2 processes: >= 50x fewer bytes all-reduced per step than DDP over dense masked: "
                         f"**{'met' if x >= 50 else 'missed'}** ({x:.0f}x; {fname})")  # fmt: skip
    return lines


def peer_figures(fname: str, data: dict) -> list[str]:
    """The issue's targets, ours vs LoRA at its recipe and vs SHiRA at ppt's count, per model, from one file."""
    lines = []
    entries = [b["extra_info"] for b in data["benchmarks"] if b["extra_info"].get("op") == PEER_OP]
    by_model: dict[str, dict[str, dict]] = defaultdict(dict)
    for e in entries:
        by_model[e["model"]][e["provider"]] = e
    for model, arms in sorted(by_model.items()):
        ppt, lora, shira = arms.get("ppt_fast"), arms.get("lora"), arms.get("shira")
        if not ppt:
            continue
        checks = []
        if lora:
            checks += [
                ("step time <= LoRA's", ppt["step_seconds"] <= lora["step_seconds"],
                 f"{ppt['step_seconds'] / lora['step_seconds']:.2f}x LoRA's"),
                ("peak memory <= LoRA's", ppt["peak_bytes"] <= lora["peak_bytes"],
                 f"{_fmt_b(ppt['peak_bytes'])} vs {_fmt_b(lora['peak_bytes'])}"),
                ("file <= 1/20 of LoRA's adapter", ppt["file_bytes"] * 20 <= lora["file_bytes"],
                 f"1/{lora['file_bytes'] / ppt['file_bytes']:.0f}"),
            ]  # fmt: skip
        if shira:
            checks += [
                (">= 2x faster than SHiRA", shira["step_seconds"] >= 2 * ppt["step_seconds"],
                 f"{shira['step_seconds'] / ppt['step_seconds']:.2f}x"),
                ("less memory than SHiRA", ppt["peak_bytes"] < shira["peak_bytes"],
                 f"{_fmt_b(ppt['peak_bytes'])} vs {_fmt_b(shira['peak_bytes'])}"),
            ]  # fmt: skip
        for what, ok, how in checks:
            lines.append(f"- {model}, ppt_fast vs peers: {what}: **{'met' if ok else 'missed'}** ({how}; {fname})")
    return lines


def _plot_peers(results: list[tuple[str, dict]], out_dir: Path, plt) -> list[Path]:
    """Step time vs peak memory over the model per arm (marker area = the file the user keeps), one panel per model,
    from the newest file that measured the peers."""
    newest = None
    for fname, data in results:
        if any(b["extra_info"].get("op") == PEER_OP for b in data["benchmarks"]):
            if newest is None or data["provenance"]["date_utc"] > newest[1]["provenance"]["date_utc"]:
                newest = (fname, data)
    if newest is None:
        return []
    fname, data = newest
    by_model: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if e.get("op") == PEER_OP:
            by_model[e["model"]][e["provider"]] = e
    order = ("tiny", "small", "medium", "large")
    models = sorted(by_model, key=lambda m: next((i for i, o in enumerate(order) if m.endswith(o)), 9))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.6), squeeze=False)
    biggest = max((e.get("file_bytes") or 1) for arms in by_model.values() for e in arms.values())
    for ax, model in zip(axes[0], models):
        for prov in PEER_ORDER:
            e = by_model[model].get(prov)
            if e is None:
                continue
            size = 30 + 1500 * math.sqrt((e.get("file_bytes") or 1) / biggest)
            x, y = e["peak_extra_bytes"] / GIB, e["step_seconds"]
            color = plt.get_cmap("tab10")(PEER_ORDER.index(prov))
            ax.scatter([x], [y], s=size, alpha=0.45, color=color, edgecolors="none")
            # A legend, not labels beside the markers: arms a few percent apart would overprint each other.
            label = f"{prov}: {y:.2f} s, +{_fmt_b(e['peak_extra_bytes'])}, file {_fmt_b(e.get('file_bytes'))}"
            ax.scatter([x], [y], s=12, color=color, marker="x", label=label)
        ax.set_xscale("log")
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="peak memory over the model (GiB, log scale)", ylabel="step time (s)",
               title=f"{model}: one tune step ({data['provenance']['device']})")  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(0.15)
        ax.legend(fontsize=7, loc="upper left", markerscale=1.5, framealpha=0.8)
    fig.suptitle(f"marker area ~ the file the user keeps (concept file / PEFT adapter); {fname}", fontsize=8)
    fig.tight_layout()
    path = out_dir / "peers_time_memory.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def loss_rows(fname: str, data: dict) -> list[str]:
    rows = []
    for prov, e, base in _versus(data, ("lm_loss",), "solver"):
        speed = _ratio(base and base["step_seconds"], e["step_seconds"])
        extra_ratio = _ratio(e["peak_extra_bytes"], base and base["peak_extra_bytes"])
        rows.append(
            f"| {e['model']} | {e['batch']} x {e['frames']} frames, {e['codebooks']} x {e['card']} | {prov} | "
            f"{_fmt_s(e['step_seconds'])} | {_fmt_x(speed)} | {_fmt_b(e['logits_bytes'])} | "
            f"{_fmt_b(e['peak_extra_bytes'])} | {_fmt_x(extra_ratio)} | {fname} |"
        )
    return rows


def optmem_rows(fname: str, data: dict) -> list[str]:
    rows = []
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if e.get("op") != "optimizer_memory":
            continue
        rows.append(
            f"| {e['model']} ({e['layers']}/{e['layers_total']} layers) | {e['dtype']} | {_fmt_d(e['density'])} | "
            f"{e['k']:,} | {_fmt_b(e['dense_state_bytes'])} | {_fmt_b(e['sparse_state_bytes'])} | "
            f"{e['sparse_bytes_per_pivot']:.1f} | {e['ratio_dense_over_sparse']:.1f}x | {fname} |"
        )
    return rows


_OPS = ("sensitivity_accumulate", "select_pivots", "sparse_adamw_step")
_BASELINE = {
    "sensitivity_accumulate": "torch_foreach",
    "select_pivots": "dense_masked",
    "sparse_adamw_step": "dense_masked",
}


_TARGET_OPS = ("sparse_adamw_step", "optimizer_memory", "tune_step")


def figures(fname: str, data: dict) -> list[str]:
    """The issue's targets, checked against one results file."""
    dev = data["provenance"]["device"]
    out = []
    b = [x["extra_info"] for x in data["benchmarks"]]
    if dev.startswith("cpu"):
        step = [e for e in b if e.get("op") == "sparse_adamw_step" and e.get("size") == "small"
                and e.get("density") == 0.01 and e.get("dtype") == "fp32"]  # fmt: skip
        dense = next((e for e in step if e["provider"] == "dense_masked"), None)
        foreach = next((e for e in step if e["provider"] == "dense_masked_foreach"), None)
        sparse = [e for e in step if e["provider"] not in ("dense_masked", "dense_masked_foreach")]
        if dense and sparse:
            best = min(sparse, key=lambda e: e["median_seconds"])
            x = dense["median_seconds"] / best["median_seconds"]
            whole = f"{best['layers']}/{best['layers_total']} layers, {best['tensors']} tensors"
            why = ""
            if x < 20:
                have = sorted(e["provider"] for e in sparse)
                why = f" MISSED: providers measured {have}"
                if "cpp" not in have:
                    why += " (the cpp backend was not available in this run; see the skipped list)"
            out.append(
                f"- CPU sparse step vs dense masked ({dense.get('dense_impl', '?')}) at 1 % on "
                f"musicgen-small ({whole}): {x:.3g}x with `{best['provider']}` (target >= 20x)"
                f"{' - met' if x >= 20 else why}"
            )
            if foreach:
                xf = foreach["median_seconds"] / best["median_seconds"]
                out.append(
                    f"- CPU sparse step vs dense masked with foreach torch AdamW (issue 2's baseline): {xf:.3g}x with "
                    f"`{best['provider']}` (target >= 20x){' - met' if xf >= 20 else ' - MISSED'}"
                )
        else:
            out.append("- CPU sparse step at 1 % on musicgen-small: not measured in this file")
        om = [e for e in b if e.get("op") == "optimizer_memory" and e.get("density") == 0.01]
        for e in om:
            tgt = 50 if e["dtype"] == "fp32" else 25
            ok = e["ratio_dense_over_sparse"] >= tgt
            out.append(
                f"- optimizer state at 1 %, {e['model']} ({e['layers']}/{e['layers_total']} layers), {e['dtype']} "
                f"params: {e['ratio_dense_over_sparse']:.1f}x smaller "
                f"(target >= {tgt}x{'' if e['dtype'] == 'fp32' else ', DESIGN §6 expectation'})"
                + (" - met" if ok else " - MISSED")
            )
        if not om:
            out.append("- optimizer state at 1 %: not measured in this file")
        e2e = [e for e in b if e.get("op") == "tune_step" and e.get("phase") == "train" and e.get("model") == "small"]
        d = next((e for e in e2e if e["provider"] == "dense_masked"), None)
        p = next((e for e in e2e if e["provider"] == "ppt_fast"), None)
        if d and p:
            r = p["peak_bytes"] / d["peak_bytes"]
            out.append(
                f"- end-to-end tune step peak memory, musicgen-small shapes: {r:.2f}x dense masked (target <= 0.6x)"
                + (" - met" if r <= 0.6 else " - MISSED (the frozen model's own weights and activations are common to "
                   "both and dominate the peak)")
            )  # fmt: skip
        else:
            out.append("- end-to-end tune step on musicgen-small shapes: not measured in this file")
    else:
        out.append(f"- {dev}: GPU figures are reported in the tables above (no fixed targets)")
    return [f"{line}  ({fname})" for line in out]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _plot(results: list[tuple[str, dict]], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    if plt is None:
        return []
    # One line per series (provider, model, layers, dtype, device), from the newest run that measured it: older runs
    # of the same series would only draw over it (and fill the legend twice).
    series: dict[tuple, tuple[str, dict, dict]] = {}
    memory: dict[tuple, tuple[str, dict, dict]] = {}  # the same, from the newest run that measured memory
    for _fname, data in results:
        dev, date = data["provenance"]["device"], data["provenance"]["date_utc"]
        b = [x["extra_info"] for x in data["benchmarks"] if x["extra_info"].get("op") == "sparse_adamw_step"]
        groups = defaultdict(dict)
        for e in b:
            groups[(e["model"], e["layers"], e["dtype"], e["provider"])][e["density"]] = e
        dense = {(m, la, dt): v for (m, la, dt, p), v in groups.items() if p == "dense_masked"}
        for (m, la, dt, p), by_d in groups.items():
            base = dense.get((m, la, dt))
            key = (p, m, la, dt, dev)
            if p == "dense_masked" or not base:
                continue
            if key not in series or date > series[key][0]:
                series[key] = (date, by_d, base)
            has_mem = any(by_d[d].get("mem_peak_extra_bytes") is not None for d in by_d if d in base)
            if has_mem and (key not in memory or date > memory[key][0]):
                memory[key] = (date, by_d, base)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5 + 0.16 * -(-len(series) // 3)))
    # Colour = provider, line style = model: matplotlib's 10-colour cycle would repeat over ~12 series.
    providers = sorted({k[0] for k in series})
    models = sorted({(k[1], k[2]) for k in series})
    plotted = False
    for (p, m, la, dt, dev), (_, by_d, base) in sorted(series.items()):
        ds = sorted(d for d in by_d if d in base)
        sp = [base[d]["median_seconds"] / by_d[d]["median_seconds"] for d in ds]
        style = {
            "color": plt.get_cmap("tab10")(providers.index(p) % 10),
            "linestyle": ("-", "--", ":", "-.")[models.index((m, la)) % 4],
            "marker": "o",
            "label": f"{p}, {m} {la}L {dt} [{dev}]",
        }
        ax1.plot([100 * d for d in ds], sp, **style)
        plotted = True
        if (p, m, la, dt, dev) in memory:
            _, by_d, base = memory[(p, m, la, dt, dev)]
            mem = [(d, by_d[d].get("mem_peak_extra_bytes"), base[d].get("mem_peak_extra_bytes")) for d in sorted(by_d)
                   if d in base]  # fmt: skip
            mem = [(d, a / c) for d, a, c in mem if a is not None and c]
            if mem:
                ax2.plot([100 * d for d, _ in mem], [r for _, r in mem], **{**style, "label": None})
    if not plotted:
        plt.close(fig)
        return []
    ax1.set(xscale="log", yscale="log", xlabel="density (%)", ylabel="speed-up vs dense masked AdamW (x)",
            title="sparse AdamW step: speed-up")  # fmt: skip
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax2.set(xscale="log", yscale="log", xlabel="density (%)", ylabel="peak extra memory / dense masked",
            title="sparse AdamW step: peak memory")  # fmt: skip
    ax2.axhline(1.0, color="grey", lw=0.8)
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax1.get_legend_handles_labels()
    rows = -(-len(labels) // 3)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.035 * rows + 0.02, 1, 1))  # the shared legend sits under both plots
    path = out_dir / "speedup_memory_vs_density.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _table(title: str, columns: list[str], rows: list[str], intro: str | None = None) -> list[str]:
    """A report section: blank line, `## title`, optional intro paragraph, then a markdown table of `rows`."""
    head = ["", f"## {title}", ""] + ([intro, ""] if intro else [])
    return head + ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"] + rows


def run_row(fname: str, data: dict) -> str:
    pv = data["provenance"]
    ext = (pv.get("ppt_fast") or {}).get("extension_loaded")
    return (
        f"| {fname} | {pv.get('device_name')} ({pv.get('device')}, {pv.get('torch_threads')} threads) | "
        f"{pv.get('torch')} | {pv.get('triton')} | {pv.get('torch_cuda')} | {str(pv.get('git_commit'))[:12]} | "
        f"{'loaded' if ext else 'not loaded'} | {data.get('wall_seconds', 0):.0f} s |"
    )


def render(paths: list[Path], out_dir: Path = HERE / "results") -> tuple[Path, list[Path]]:
    results = _load(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Benchmark results", "",
             "Rendered by `benchmarks/report.py` from the JSON files in this folder; superseded runs are kept in "
             "`history/` and not rendered."]  # fmt: skip
    lines += _table("Runs", ["file", "device", "torch", "triton", "CUDA", "commit", "ppt_fast._C", "wall"],
                    [run_row(fname, data) for fname, data in results])  # fmt: skip
    lines += ["", "## Figures to reach", ""]
    newest: dict[str, tuple[str, dict]] = {}
    for fname, data in results:
        dev = data["provenance"]["device"]
        if not any(b["extra_info"].get("op") in _TARGET_OPS for b in data["benchmarks"]):
            continue  # a partial run (e.g. `-- -k lm_loss`) does not hide the newest run that measured the targets
        if dev not in newest or data["provenance"]["date_utc"] > newest[dev][1]["provenance"]["date_utc"]:
            newest[dev] = (fname, data)
    for fname, data in newest.values():
        lines += figures(fname, data)
    probes = _load_probes(paths)
    if probes:
        lines += probe_figures(*probes[-1])
    lines += _table("Op level",
                    ["op", "shapes", "dtype", "density", "provider", "median", "speed-up", "GB/s", "% of copy",
                     "peak extra", "mem vs baseline", "file"],
                    [r for fname, data in results for r in op_rows(fname, data)],
                    intro="Speed-up = baseline median / provider median (baselines: `torch_foreach` for "
                    "sensitivity_accumulate, `dense_masked` for select_pivots and sparse_adamw_step). GB/s = the op's "
                    "floor bytes (DESIGN.md §4) / median time; % of copy = time of a `copy_` moving the same bytes on "
                    "the same machine in the same run / the op's time. Peak extra = peak memory over the shared "
                    "inputs, in a fresh subprocess.")  # fmt: skip
    lines += _table("Optimizer state",
                    ["model", "params", "density", "pivots", "dense masked AdamW", "SparseAdamW", "B/pivot",
                     "smaller by", "file"],
                    [r for fname, data in results for r in optmem_rows(fname, data)])  # fmt: skip
    lines += _table("End to end (one tuning step, B = 1, 5 s, recipe `ppt`)",
                    ["model", "phase", "method", "density", "step", "speed-up", "peak", "vs dense", "peak over model",
                     "vs dense", "file"],
                    [r for fname, data in results for r in e2e_rows(fname, data)])  # fmt: skip
    peer_files = [(f, d) for f, d in results if any(b["extra_info"].get("op") == PEER_OP for b in d["benchmarks"])]
    if peer_files:
        lines += ["", "## Against PEFT's LoRA and SHiRA: figures to reach", ""]
        lines += peer_figures(*max(peer_files, key=lambda fd: fd[1]["provenance"]["date_utc"]))
    lines += _table("Against PEFT's LoRA and SHiRA (one tune step through transformers, B = 1, 5 s)",
                    ["model", "arm", "step", "vs ppt_fast", "peak", "peak over model", "vs ppt_fast",
                     "trainable", "optimizer state", "file", "vs ppt_fast", "implementation", "file"],
                    [r for fname, data in results for r in peer_rows(fname, data)],
                    intro="`benchmarks/bench_peers.py`: each arm of `ppt_fast.eval.arms` in a fresh process on "
                    "Hugging Face MusicGen shapes (random init). ppt_fast and dense_masked: recipe `ppt` at 1 %; "
                    "lora: the musicgen-dreamboothing recipe (r 16 on q/k/v/out_proj, fc1, fc2); lora_matched and "
                    "shira: ppt's tensors at ppt's count. File: the concept file (ours) or PEFT's save_pretrained "
                    "folder.")  # fmt: skip
    dist_files = [(f, d) for f, d in results if _dist_by_model(d)]
    if dist_files:
        lines += ["", "## Several processes: figures to reach", ""]
        lines += dist_figures(*max(dist_files, key=lambda fd: fd[1]["provenance"]["date_utc"]))
    lines += _table("Several processes (one tune step, 2 gloo processes, recipe `ppt` at 1 %)",
                    ["model", "arm", "processes", "bytes all-reduced per step", "fewer than DDP", "all-reduce time",
                     "step", "pivots", "implementation", "file"],
                    [r for fname, data in results for r in dist_rows(fname, data)],
                    intro="`benchmarks/bench_distributed.py` (`dist_probe.py`): ppt_fast's tune() in a process group "
                    "against DistributedDataParallel over dense-masked tuning of the same tensors. Bytes: the "
                    "collectives' buffers, exact. All-reduce time: those buffers reduced back to back on this "
                    "machine's loopback.")  # fmt: skip
    lines += _table("MusicGen's training loss, forward + backward (`benchmarks/loss_probe.py`)",
                    ["model", "batch", "provider", "time", "speed-up", "logits", "peak over model", "vs solver",
                     "file"],
                    [r for fname, data in results for r in loss_rows(fname, data)],
                    intro="`solver`: `compute_predictions` + `MusicGenSolver._compute_cross_entropy`; `pattern`: "
                    "`ppt_fast.hosts.audiocraft.loss.pattern_cross_entropy` (same value and gradients). Every LM "
                    "parameter gets its gradient (as in pretraining); gradients are allocated before the peak is "
                    "taken.")  # fmt: skip
    if probes:
        lines += _table("Tune step: activation checkpointing and row-scoped gradients",
                        ["method", "checkpointing", "step", "peak", "vs dense, same checkpointing (memory, time)",
                         "vs dense without checkpointing (memory, time)", "file"],
                        [r for fname, data in probes for r in probe_rows(fname, data)],
                        intro="`experiments/probes/checkpointing_probe.py`: musicgen-small shapes, B = 1, 5 s, "
                        "recipe `ppt` at 1 %, one fresh process per configuration, medians over rounds run in turn. "
                        "`ppt_fast_wholegrads` is ppt_fast with `row_grads=False`.")  # fmt: skip
    lines += ["", "## Skipped", ""]
    for fname, data in results:
        reasons = defaultdict(list)
        for s in data.get("skipped", []):
            reasons[s["reason"]].append(s["name"])
        for reason, names in reasons.items():
            lines.append(f"- {len(names)} case(s): {reason} ({fname})")
    pngs = _plot(results, out_dir)
    if pngs:
        lines += ["", "## Plot", ""] + [f"![speed-up and memory vs density]({p.name})" for p in pngs]
    plt = _pyplot()
    peer_pngs = _plot_peers(results, out_dir, plt) if plt is not None else []
    if peer_pngs:
        lines += ["", f"![step time vs memory per arm, marker = file size]({peer_pngs[0].name})"]
    pngs += peer_pngs
    md = out_dir / "README.md"
    md.write_text("\n".join(lines) + "\n")
    return md, pngs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    files = args.files or sorted(args.out.glob("*.json"))
    md, pngs = render(files, args.out)
    print(f"wrote {md}" + "".join(f", {p}" for p in pngs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
