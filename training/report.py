"""models/report.md: the bundle's measured figures against its bars and the papers, from the manifest.

Our demo model is judged against the attack it was trained with. A user's model (`--classifier`) gets what a
defender can know instead (`render_defender`): no attack of ours was in its training, so no bar of ours applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from service.signals import LEGACY
from training.metrics import pct

MASKS_PNG = "neural_cleanse_masks.png"  # beside report.md: each label's reversed trigger


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
    if manifest["metrics"].get("kind") == "defender":
        return render_defender(manifest)
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


def _attack_rows(name: str, a: dict[str, Any], signals: list[str]) -> str:
    clf, fused = a["classifier"], a["fused"]
    return (
        f"| {name} | {a['target']} | {a['images']['triggered']} | {pct(clf['attack_success'])} | "
        f"{pct(fused['tpr'])} ({fused['auroc']:.4f}) | {pct(fused['attack_success_after'])} | "
        f"{pct(fused['triggered_accuracy'])} | " + " | ".join(pct(a[s]["tpr"]) for s in signals) + " |"
    )


def render_defender(manifest: dict[str, Any]) -> str:
    """A user's model: clean accuracy, thresholds and their FPRs, the Neural Cleanse scan, its reversed triggers
    as stand-in attacks, and the probe trigger if one was given."""
    m, nc, th = manifest["metrics"], manifest["neural_cleanse"], manifest["thresholds"]
    signals = [k for k in manifest.get("signals", LEGACY) if k in m]
    names = manifest["class_names"]
    lines = [
        f"# Guard bundle `{manifest['name']}`",
        "",
        f"Built by `{manifest['build']['command']}` for a model trained elsewhere. Every figure below was measured "
        f"by `{m.get('command', manifest['build']['command'])}` with ONNX Runtime through the service's own guard "
        f"pipeline on the test split of {manifest['dataset']} ({m['images']['clean']} images).",
        "",
        "Which trigger, if any, the model carries is not known here: the figures are what a defender can measure.",
        "",
        "## On clean data",
        "",
        f"Clean accuracy {pct(m['classifier']['clean_accuracy'])}; through the guard (a flagged image gets the "
        f"label policy's label) {pct(m['fused']['clean_accuracy'])}.",
        "",
        f"Every threshold was set on the clean calibration split at {pct(th['target_fpr'])} false positives:",
        "",
        "| signal | threshold | false-positive rate (test split) |",
        "|---|---|---|",
    ]
    for name in signals:
        threshold = th.get(name, {}).get("threshold")
        shown = "n/a" if threshold is None else f"{threshold:.4g}"
        lines.append(f"| {name} | {shown} | {pct(m[name]['fpr'])} |")
    fused = th["fused"]
    lines += [
        f"| fused ({fused.get('rule', 'max')}) | {fused['threshold']:.6g} (calibration FPR "
        f"{pct(fused['calibration_fpr'])}) | {pct(m['fused']['fpr'])} |",
        "",
        "## Neural Cleanse",
        "",
        "| label | " + " | ".join(f"{i}: {names[i][:12]}" for i in range(len(nc["anomaly_index"]))) + " |",
        "|---|" + "---|" * len(nc["anomaly_index"]),
        "| mask L1 norm | " + " | ".join(f"{v:.1f}" for v in nc["l1_norms"]) + " |",
        "| anomaly index | " + " | ".join(f"{v:.2f}" for v in nc["anomaly_index"]) + " |",
        "| reversed trigger's success | " + " | ".join(pct(v) for v in nc["attack_success"]) + " |",
        "",
        f"Flagged labels (anomaly index > 2 with a small mask): {nc['flagged_labels'] or 'none'}. "
        + (
            "A flagged label is a label some small trigger reaches from most images: a backdoor's signature, "
            "or a class that is easy to reach; its reversed trigger is below."
            if nc["flagged_labels"]
            else "No label stands out; the most suspicious one's reversed trigger is still measured below."
        ),
        "",
        f"![Neural Cleanse's reversed triggers]({MASKS_PNG})",
        "",
        "## Stand-in attacks and the probe",
        "",
        "Each watched label's reversed trigger (Neural Cleanse) stamped on the test images of the other labels; "
        "never used for a threshold. "
        + (
            "The probe is the trigger given with `--probe-trigger`."
            if m.get("probe")
            else "Give a trigger you know with `--probe-trigger` to measure it here."
        ),
        "",
        "| trigger | pushes to | images | undefended attack success | fused TPR (AUROC) | attack success "
        "through the guard | true label through the guard | " + " | ".join(f"{s} TPR" for s in signals) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(signals),
    ]
    lines += [_attack_rows(f"reversed trigger of {k}", a, signals) for k, a in m["stand_ins"].items()]
    if m.get("probe"):
        lines.append(_attack_rows(f"probe `{m['probe']['name']}`", m["probe"], signals))
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in m.get("stage_seconds", {}).items()), ""]
    return "\n".join(lines)


def write_masks(path: Path, masks: np.ndarray, patterns: np.ndarray, flagged: list[int], scale: int = 4) -> None:
    """One column per label: the mask (white = stamped) over the trigger as it is stamped (mask x pattern);
    flagged labels framed in red."""
    n, (height, width) = len(masks), masks.shape[1:]
    cell_w, cell_h = width * scale + 8, 2 * height * scale + 24
    sheet = Image.new("RGB", (n * cell_w, cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for t in range(n):
        mask = np.rint(masks[t] * 255).astype(np.uint8)
        stamped = masks[t][None] * patterns[t]  # (C, H, W)
        colour = np.rint(np.broadcast_to(stamped, (3, height, width)).transpose(1, 2, 0) * 255).astype(np.uint8)
        x = t * cell_w + 4
        for row, tile in enumerate(
            (Image.fromarray(mask).convert("RGB"), Image.fromarray(np.ascontiguousarray(colour)))
        ):
            sheet.paste(
                tile.resize((width * scale, height * scale), Image.Resampling.NEAREST), (x, 20 + row * height * scale)
            )
        draw.text((x, 4), str(t), fill="red" if t in flagged else "black")
        if t in flagged:
            draw.rectangle((x - 3, 17, x + width * scale + 2, cell_h - 2), outline="red", width=2)
    sheet.save(path)


def write(path: Path, manifest: dict[str, Any]) -> None:
    path.write_text(render(manifest))
