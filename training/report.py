"""models/report.md: the bundle's measured figures against its bars and the papers, from the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.signals import LEGACY
from training.metrics import pct


def _check(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def bars(manifest: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    """(what, measured, bar, met) for each bar of the bundle; used by the report and the tests."""
    m, nc = manifest["metrics"], manifest["neural_cleanse"]
    clf, det = m["classifier"], m["detrigger"]
    parity = max(f.get("parity_max_abs_diff", 0.0) for f in manifest["files"].values())
    control = (m.get("control") or {}).get("flagged_labels")
    return [
        ("classifier clean accuracy", clf["clean_accuracy"], ">= 90%", clf["clean_accuracy"] >= 0.90),
        ("attack success (triggered non-target)", clf["attack_success"], ">= 99%", clf["attack_success"] >= 0.99),
        (
            "de-trigger AE: clean accuracy after restoration",
            det["clean_accuracy_after"],
            ">= 89%",
            det["clean_accuracy_after"] >= 0.89,
        ),
        (
            "de-trigger AE: triggered restored to true label",
            det["triggered_accuracy_after"],
            ">= 88%",
            det["triggered_accuracy_after"] >= 0.88,
        ),
        ("de-trigger flag rule: false-positive rate", det["fpr"], "<= 5%", det["fpr"] <= 0.05),
        ("de-trigger flag rule: detection", det["tpr"], ">= 95%", det["tpr"] >= 0.95),
        (
            "Neural Cleanse: anomaly index of label 0, the only flagged label",
            float(nc["anomaly_index"][0]),
            "> 2, flagged == [0]",
            nc["flagged_labels"] == [0] and nc["anomaly_index"][0] > 2,
        ),
        (
            "Neural Cleanse on the clean control model: labels flagged",
            float("nan") if control is None else float(len(control)),
            "0",
            control == [],
        ),
        ("ONNX parity: max abs difference", parity, "<= 1e-4", parity <= 1e-4),
    ]


def render(manifest: dict[str, Any]) -> str:
    m, nc, th = manifest["metrics"], manifest["neural_cleanse"], manifest["thresholds"]
    lines = [
        f"# Guard bundle `{manifest['name']}`",
        "",
        f"Built by `{manifest['build']['command']}`; every figure below was measured by "
        f"`{m.get('command', manifest['build']['command'])}` with ONNX Runtime",
        f"through the service's own guard pipeline on the {manifest['dataset']} test split "
        f"({m['images']['clean']} clean images, {m['images']['triggered']} triggered non-target images).",
        "",
        "## The bars",
        "",
        "| what | measured | bar | met |",
        "|---|---|---|---|",
    ]
    for what, value, bar, ok in bars(manifest):
        shown = f"{value:.2e}" if "parity" in what else f"{value:.2f}" if "Neural" in what else pct(value)
        lines.append(f"| {what} | {shown} | {bar} | {_check(ok)} |")
    d = m["detrigger"]
    lines += [
        "",
        "## Against Kwon (Fashion-MNIST, paper figures)",
        "",
        "| | Kwon 2021 (paper) | this bundle |",
        "|---|---|---|",
        f"| detection (flag rule) | 82.3% | {pct(d['tpr'])} |",
        f"| clean accuracy after the AE | 89.6% | {pct(d['clean_accuracy_after'])} |",
        "| false-positive rate of the flag rule | not reported | " + pct(d["fpr"]) + " |",
        "",
        f"## Every signal (thresholds at {pct(th['target_fpr'])} clean FPR on the calibration split)",
        "",
        "| signal | FPR (clean) | TPR (triggered) | AUROC |",
        "|---|---|---|---|",
    ]
    for name in [*(k for k in manifest.get("signals", LEGACY) if k in m), "fused"]:
        s = m[name]
        lines.append(f"| {name} | {pct(s['fpr'])} | {pct(s['tpr'])} | {s['auroc']:.4f} |")
    f = m["fused"]
    lines += [
        "",
        f"With the fused verdict and its label policy: clean accuracy {pct(f['clean_accuracy'])} "
        f"(undefended {pct(m['classifier']['clean_accuracy'])}), triggered images given their true label "
        f"{pct(f['triggered_accuracy'])}, given the attacker's label {pct(f['attack_success_after'])} "
        f"(undefended {pct(m['classifier']['attack_success'])}).",
        "",
        "## Neural Cleanse",
        "",
        "| label | " + " | ".join(str(i) for i in range(len(nc["anomaly_index"]))) + " |",
        "|---|" + "---|" * len(nc["anomaly_index"]),
        "| mask L1 norm | " + " | ".join(f"{v:.1f}" for v in nc["l1_norms"]) + " |",
        "| anomaly index | " + " | ".join(f"{v:.2f}" for v in nc["anomaly_index"]) + " |",
    ]
    control = m.get("control")
    if control:
        lines.append("| control model's index | " + " | ".join(f"{v:.2f}" for v in control["anomaly_index"]) + " |")
    lines += [
        "",
        f"Flagged labels: {nc['flagged_labels']}. "
        + (
            f"Control model (same recipe, no poison, clean accuracy {pct(control['clean_accuracy'])}): "
            f"flagged {control['flagged_labels']}."
            if control
            else "No control model was built (run the `control` stage)."
        ),
        "",
        "Stand-in attacks (Neural Cleanse's reversed trigger on the calibration split; never used for a threshold): "
        + ", ".join(
            f"label {k}: fused TPR {pct(v['fused_tpr'])}"
            for k, v in manifest["calibration"]["neural_cleanse_reversed_triggers"].items()
        ),
        "",
        "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in m.get("stage_seconds", {}).items()),
        "",
    ]
    return "\n".join(lines)


def write(path: Path, manifest: dict[str, Any]) -> None:
    path.write_text(render(manifest))
