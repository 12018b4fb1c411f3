"""Draw the Grafana dashboard's panels from their own queries, for the README (Grafana does not run here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from tests.docker.prometheus_live import DASHBOARD, Prometheus, grafana_expr

# What a heatmap panel's buckets measure, by the histogram it draws.
HEATMAP_AXES = {"guard_fused_surprise": "surprise -ln(1 - score)", "guard_strip_entropy": "entropy (log2)"}


def _legend(fmt: str, metric: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m[1], ""), fmt) or "value"


def _format(value: float, unit: str | None) -> str:
    if not np.isfinite(value):
        return "–"
    if unit == "percentunit":
        return f"{100 * value:.1f}%"
    if unit == "s":
        return f"{1000 * value:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "reqps":
        return f"{value:.1f} req/s"
    return f"{value:,.0f}" if value == round(value) else f"{value:.3g}"


def render(prom: Prometheus, start: float, end: float, out: Path) -> None:
    """One picture of every panel at its grid position, over [start, end]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    fig = plt.figure(figsize=(16, rows * 0.36 + 0.4), facecolor="#111217")
    top = rows * 0.36 / (rows * 0.36 + 0.4)  # the grid's share of the height, under the title
    plt.rcParams.update({"text.color": "#ccccdc", "axes.labelcolor": "#ccccdc", "xtick.color": "#9fa7b3",
                         "ytick.color": "#9fa7b3", "axes.edgecolor": "#2f3138", "font.size": 8})  # fmt: skip
    fig.suptitle(
        "backdoor-guard dashboard: each panel's own PromQL against a real Prometheus scraping a real guard "
        "(drawn by tests/docker/dashboard_preview.py: Grafana does not run where this was made)",
        color="#9fa7b3", fontsize=9, y=0.995,
    )  # fmt: skip
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        pad_x, pad_y = 0.012, 0.5 / rows * top
        ax = fig.add_axes(
            (g["x"] / 24 + pad_x, top * (1 - (g["y"] + g["h"]) / rows) + pad_y,
             g["w"] / 24 - 1.5 * pad_x, g["h"] / rows * top - 2.6 * pad_y)
        )  # fmt: skip
        ax.set_facecolor("#181b1f")
        ax.set_title(panel["title"], loc="left", fontsize=9, color="#ccccdc")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        if panel["type"] == "stat":
            ax.set_xticks([])
            ax.set_yticks([])
            texts = []
            for target in panel["targets"]:
                for series in prom.query(grafana_expr(target["expr"])):
                    texts.append(f"{_format(float(series['value'][1]), unit)}")
            ax.text(0.5, 0.45, "  /  ".join(texts) or "–", ha="center", va="center", fontsize=18, color="#73bf69",
                    transform=ax.transAxes)  # fmt: skip
            continue
        if panel["type"] == "heatmap":
            (series,) = [prom.query_range(grafana_expr(t["expr"]), start, end) for t in panel["targets"]]
            series = sorted(series, key=lambda s: float(s["metric"]["le"]))
            bounds = [s["metric"]["le"] for s in series]
            grid = np.array([[float(v) for _, v in s["values"]] for s in series])
            counts = np.diff(grid, axis=0, prepend=0)  # cumulative buckets -> per bucket
            ax.imshow(np.log1p(counts), aspect="auto", origin="lower", cmap="Oranges", interpolation="nearest")
            ax.set_yticks(range(len(bounds))[::2], [f"≤{b}" for b in bounds][::2])
            ax.set_xticks([])
            expr = panel["targets"][0]["expr"]
            ax.set_ylabel(next((label for metric, label in HEATMAP_AXES.items() if metric in expr), ""))
            continue
        for target in panel["targets"]:
            for series in prom.query_range(grafana_expr(target["expr"]), start, end):
                t = np.array([float(x) for x, _ in series["values"]]) - end
                v = np.array([float(y) for _, y in series["values"]])
                scale = {"s": 1000, "percentunit": 100}.get(unit or "", 1)
                ax.plot(t, v * scale, lw=1.4, label=_legend(target.get("legendFormat", ""), series["metric"]))
        ax.set_xlabel("seconds before the picture")
        ax.set_ylabel({"s": "ms", "percentunit": "%"}.get(unit or "", ""))
        ax.grid(color="#2f3138", lw=0.5)
        ax.legend(fontsize=7, loc="upper left", facecolor="#181b1f", edgecolor="#2f3138", labelcolor="#ccccdc")
    fig.savefig(out, dpi=90, facecolor=fig.get_facecolor())
    plt.close(fig)
