"""The report's outputs: PNG plots (matplotlib, Agg), report.md, a self-contained report.html, a text table.

Everything here formats the summary that slurm/report.py computed; no numbers are computed here.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

COLUMNS = ["group", "params (non-emb.)", "runs", "steps", "tokens", "time to target", "tokens to target", "final val loss",
           "p (loss < target)", "tokens/s", "MFU", "peak memory", "device", "attention"]


# ---- numbers as text --------------------------------------------------------------------------------------
def human(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def seconds(ms: float) -> str:
    return f"{ms / 1000:.4g}s"


def spread(stats: dict, fmt, total: int | None = None) -> str:
    """`mean ± std` (just the value for one run); with `total`, how many of the runs it covers."""
    if not stats["n"]:
        return "not reached" if total is not None else "n/a"
    text = fmt(stats["mean"]) if stats["n"] == 1 else f"{fmt(stats['mean'])} ± {fmt(stats['std'])}"
    return f"{text} ({stats['n']}/{total} reached)" if total is not None else text


def span(stats: dict) -> str:
    values = stats["values"]
    low, high = min(values), max(values)
    return human(low) if low == high else f"{human(low)}–{human(high)}"


def parameters(counts: dict) -> str:
    """'1.9M (0.33M)': every parameter and, in brackets, those outside the embedding tables and the head."""
    if not counts.get("total"):
        return "n/a"
    inner = counts.get("non_embedding")
    return human(counts["total"]) + (f" ({human(inner)})" if inner is not None else "")


def group_row(g: dict) -> list[str]:
    return [
        g["name"], parameters(g.get("parameters") or {}), str(g["n_runs"]) + (f" ({g['n_runs'] - g['finished']} unfinished)" if g["finished"] < g["n_runs"] else ""),
        span(g["steps"]), span(g["tokens"]),
        spread(g["time_to_target_ms"], seconds, g["n_runs"]),
        spread(g["tokens_to_target"], human, g["n_runs"]),
        spread(g["final_val_loss"], lambda v: f"{v:.4f}"),
        "n/a" if g["p_value"] is None else f"{g['p_value']:.3g}",
        human(g["tokens_per_s"]),
        "n/a" if g["mfu"] is None else f"{100 * g['mfu']:.1f}%",
        "n/a" if g["peak_memory_bytes"] is None else f"{g['peak_memory_bytes'] / 2**30:.1f} GiB",
        g["device"],
        g.get("attention", "unknown"),
    ]


def ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def speedup_rows(summary: dict) -> list[list[str]]:
    return [[s["group"], ratio(s["time_ratio"]), ratio(s["tokens_ratio"])] for s in summary["speedups"]]


def ablation_rows(summary: dict) -> list[list[str]]:
    rows = []
    for a in summary["ablations"]:
        ci = "n/a (needs 2 runs each)" if a["ci_low"] is None else f"[{a['ci_low']:+.4f}, {a['ci_high']:+.4f}]"
        to_target = "n/a" if a["delta_time_to_target_ms"] is None else f"{a['delta_time_to_target_ms'] / 1000:+.4g}s"
        rows.append([a["feature"], a["group"], a["full"], f"{a['delta_final_loss']:+.4f}", ci,
                     f"{a['delta_train_time_ms'] / 1000:+.4g}s", to_target])
    return rows


ABLATION_COLUMNS = ["switched off", "group", "against", "Δ final val loss", "95% CI (Welch)", "Δ train time",
                    "Δ time to target"]


# ---- plots ----------------------------------------------------------------------------------------------------
def mean_curve(runs: list, axis: str, scale: float) -> tuple[list[float], list[float], list[float], list[float]]:
    """(x, mean y, lowest y, highest y) at the evaluation steps every run of a group has, x the runs' mean there:
    one curve and a band for the seeds of a configuration."""
    per_run = [{r["step"]: (r[axis] * scale, r["val_loss"]) for r in run.val if r.get(axis) is not None} for run in runs]
    steps = sorted(set.intersection(*(set(points) for points in per_run))) if per_run else []
    xs = [sum(points[s][0] for points in per_run) / len(per_run) for s in steps]
    ys = [[points[s][1] for points in per_run] for s in steps]
    return xs, [sum(v) / len(v) for v in ys], [min(v) for v in ys], [max(v) for v in ys]


def loss_range(named: dict, target: float) -> tuple[float, float]:
    """The plots' y range: every evaluation after step 0 and the target, with a margin. The step-0 loss (about
    ln(vocabulary size)) squeezed the comparison into a corner of the plot."""
    values = [r["val_loss"] for runs in named.values() for run in runs for r in run.val if r.get("step", 0) > 0]
    values = values or [r["val_loss"] for runs in named.values() for run in runs for r in run.val]
    low, high = min(values + [target]), max(values + [target])
    margin = 0.05 * (high - low or 1.0)
    return low - margin, high + margin


def plot_curves(summary: dict, named: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10").colors
    paths = []
    for axis, xlabel, scale, filename in (("train_time_ms", "training time (s)", 1e-3, "val_loss_vs_time.png"),
                                          ("tokens", "tokens", 1.0, "val_loss_vs_tokens.png")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for index, (name, runs) in enumerate(named.items()):
            color = colors[index % len(colors)]
            several = len(runs) > 1
            for run in runs:  # each seed thin when there are several; the group's mean and band on top
                points = [(r[axis] * scale, r["val_loss"]) for r in run.val if r.get(axis) is not None]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, marker="o", markersize=2 if several else 3, linewidth=0.8 if several else 1.5,
                            alpha=0.35 if several else 1.0, color=color, label=None if several else name)
            if several:
                xs, mean, low, high = mean_curve(runs, axis, scale)
                if xs:
                    ax.plot(xs, mean, color=color, linewidth=2, label=f"{name} (mean of {len(runs)} seeds, band: min-max)")
                    ax.fill_between(xs, low, high, color=color, alpha=0.15, linewidth=0)
        ax.axhline(summary["target"], color="black", linestyle="--", linewidth=1, label=f"target {summary['target']}")
        ax.set_ylim(*loss_range(named, summary["target"]))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss")
        ax.set_title(f"val loss vs {xlabel.split(' (')[0]} (step 0 left out of the y range)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# ---- markdown, html, text ------------------------------------------------------------------------------------------
def md_table(columns: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows])


def html_table(columns: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def sections(summary: dict) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, note, columns, rows) of each table of the report."""
    target = summary["target"]
    found = [("Groups", f"Target val loss {target}. Params: every parameter (in brackets: without the embedding "
              "tables and the output head; models of different sizes are not a like-for-like comparison). Time and "
              "tokens to target: linear interpolation between the evaluations that bracket the target, mean ± std "
              "over the runs that reached it. p: one-sided t-test of the final val losses against the target (n/a "
              "with fewer than 2 runs).",
              COLUMNS, [group_row(g) for g in summary["groups"].values()])]
    if summary["speedups"]:
        found.append(("Speedup over the baseline", f"Baseline group: {summary['baseline']}. Ratio of the baseline's "
                      "mean time (tokens) to target to the group's: above 1 is faster.",
                      ["group", "time to target", "tokens to target"], speedup_rows(summary)))
    if summary["ablations"]:
        found.append(("Ablations", "The cost of switching one feature off: ablated group minus the group with it on.",
                      ABLATION_COLUMNS, ablation_rows(summary)))
    return found


def markdown(summary: dict, plots: list[Path]) -> str:
    parts = ["# Training report", "", "Inputs: " + ", ".join(f"`{i}`" for i in summary["inputs"]), ""]
    for title, note, columns, rows in sections(summary):
        parts += [f"## {title}", "", note, "", md_table(columns, rows), ""]
    parts += ["## Runs", ""] + [f"- {g['name']}: " + ", ".join(f"`{r}`" for r in g["runs"])
                                for g in summary["groups"].values()] + [""]
    parts += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if summary["warnings"]:
        parts += ["## Warnings", ""] + [f"- {w}" for w in summary["warnings"]] + [""]
    return "\n".join(parts)


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:14px}th{background:#f0f0f0}
img{max-width:100%;display:block;margin:1em 0}.warn{color:#a00}code{background:#f4f4f4}"""


def html_page(summary: dict, plots: list[Path]) -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Training report</title><style>{STYLE}</style>"
             "</head><body><h1>Training report</h1>",
             "<p>Inputs: " + ", ".join(f"<code>{html.escape(i)}</code>" for i in summary["inputs"]) + "</p>"]
    for title, note, columns, rows in sections(summary):
        parts += [f"<h2>{html.escape(title)}</h2><p>{html.escape(note)}</p>", html_table(columns, rows)]
    parts.append("<h2>Plots</h2>")
    for path in plots:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'>")
    parts.append("<h2>Runs</h2><ul>" + "".join(
        f"<li>{html.escape(g['name'])}: " + ", ".join(f"<code>{html.escape(r)}</code>" for r in g["runs"]) + "</li>"
        for g in summary["groups"].values()) + "</ul>")
    if summary["warnings"]:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li class='warn'>{html.escape(w)}</li>"
                                                      for w in summary["warnings"]) + "</ul>")
    return "\n".join(parts + ["</body></html>"]) + "\n"


def text_table(summary: dict) -> str:
    blocks = []
    for title, _, columns, rows in sections(summary):
        widths = [max(len(str(c)) for c in column) for column in zip(columns, *rows, strict=True)]
        lines = [title, "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
        blocks.append("\n".join(line.rstrip() for line in lines))
    return "\n\n".join(blocks)


def write_all(summary: dict, named: dict, out: Path) -> dict:
    plots = plot_curves(summary, named, out)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(markdown(summary, plots))
    html_path.write_text(html_page(summary, plots))
    return {"markdown": str(md_path), "html": str(html_path), "plots": [str(p) for p in plots]}
