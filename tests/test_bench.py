"""The benchmark's arithmetic (bench/run.py): passes per image, the headline keys and the report, without timing."""

import importlib.util
import sys

import pytest

from service.bundle import Bundle
from tests.conftest import MODELS

spec = importlib.util.spec_from_file_location("bench_run", MODELS.parent / "bench" / "run.py")
assert spec is not None and spec.loader is not None
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_run"] = bench
spec.loader.exec_module(bench)


@pytest.mark.data
def test_passes_per_image_counts_what_each_signal_hands_its_model(strip_bundle: Bundle) -> None:
    passes = bench.passes_per_image(Bundle.load(MODELS))
    expected = {"image": 1.0, "detrigger": 1.0, "activation": 0.0, "repaired": 1.0, "expert": 1.0, "mahalanobis": 0.0}
    assert {k: v for k, v in passes.items() if k != "total"} == expected
    assert passes["total"] == sum(expected.values()) == 4  # the shipped signals: make cost's choice
    n = strip_bundle.manifest["signals"]["strip"]["n"]
    assert bench.passes_per_image(strip_bundle) == {**expected, "strip": float(n), "total": 4.0 + n}


def run(c: int, rps: float, p50: float) -> dict[str, float]:
    return {"concurrency": c, "requests": 100, "errors": 0, "throughput_rps": rps, "p50_ms": p50, "p95_ms": p50,
            "p99_ms": p50, "mean_batch_images": 1.0}  # fmt: skip


def test_headline_keys_and_the_bar_table() -> None:
    r = {
        "command": "python bench/run.py", "machine": "test", "strip_n": 32, "strip_rounds": [1, 3, 8, 32],
        "signals": ["detrigger", "strip"],
        "passes": {"image": 1.0, "detrigger": 1.0, "strip": 32.0, "total": 34.0},
        "service": [run(1, 100, 9.0), run(8, 200, 30), run(32, 300, 90), {**run(32, 900, 30), "traffic": "triggered"}],
        "measured_passes": {
            "clean": {"images": 10, "passes_per_image": 12.5, "strip_overlays": {"2": 8, "32": 2}},
            "triggered": {"images": 9, "passes_per_image": 4.0, "strip_overlays": {"2": 9}},
        },
        "service_unguarded": [run(1, 400, 3.0), run(8, 800, 9), run(32, 500, 60)],
        "paired_c32": {"requests": 1000, "median_guarded": 300.0, "median_unguarded": 500.0, "median_ratio": 0.6,
                       "pairs": [{"guarded": 300.0, "unguarded": 500.0, "ratio": 0.6},
                                 {"guarded": 310.0, "unguarded": 450.0, "ratio": 310 / 450}]},
        "paired_batched": {"requests": 500, "concurrency": 4, "images_per_request": 16, "median_guarded": 450.0,
                           "median_unguarded": 600.0, "median_ratio": 0.75,
                           "pairs": [{"guarded": 450.0, "unguarded": 600.0, "ratio": 0.75, "errors": 0}]},
        "stages": {"decode": 0.1, "mean_batch_size": 4.0},
        "roofline": {"classifier_images_per_s": 17000.0, "passes_per_image": 34.0, "guarded_images_per_s": 500.0,
                     "classifier_passes_only_images_per_s": 17000.0 / 34,
                     "models": {"classifier": {"images_per_s": 17000.0, "rows_per_image": 34.0},
                                "detrigger_ae": {"images_per_s": 10000.0, "rows_per_image": 1.0}}},
        "in_process": {"16": 400.0, "256": 450.0},
        "art": {"images_per_s": 100.0}, "art_n32": {"images_per_s": 50.0, "runs": [48.0, 50.0, 55.0]},
        "naive": {"images_per_s": 50.0},
        "art_detection": {"kwon": {"art_strip_auroc": 0.99, "fused_auroc": 0.999},
                          "wanet": {"art_strip_auroc": 0.8, "fused_auroc": 0.7}},
        "art_detection_images": 1000,
    }  # fmt: skip
    h = bench.headline(r)
    assert h["guarded_images_per_s"] == 300 and h["unguarded_images_per_s"] == 500
    assert h["guarded_share_of_unguarded"] == pytest.approx(0.6) and h["roofline_efficiency"] == pytest.approx(0.6)
    assert h["over_art_strip"] == pytest.approx(3.0) and h["p50_c1_ratio"] == pytest.approx(3.0)
    assert {"passes_per_image", "roofline_images_per_s", "art_strip_images_per_s", "p50_ms_c1_guarded",
            "p50_ms_c1_unguarded"} <= set(h)  # fmt: skip
    r.update(h)
    suite = {"command": "make evaluate", "attacks": {"kwon": {
        "signals": {"detrigger": {"auroc": 0.99}, "strip": {"auroc": 0.9}}, "fused": {"tpr": 0.999},
        "ablation": {"all": {"tpr": 0.999}, "without detrigger": {"tpr": 0.989}, "without strip": {"tpr": 0.999}},
    }}}  # fmt: skip
    text = bench.render({**r, "suite": suite})
    assert (
        "| guarded >= 50% of unguarded images/s at concurrency 32 (medians of 2 alternating pairs) | 300.0 / "
        "500.0; median ratio 60% | yes |" in text
    )
    assert "| 2 | 310.0 | 450.0 | 69% |" in text
    assert h["batched_roofline_efficiency"] == pytest.approx(0.9) and h["batched_share_of_unguarded"] == 0.75
    assert "| ... over HTTP with 16 images per request (concurrency 4) | 0.90 | yes |" in text
    assert "| 1 | 450.0 | 600.0 | 75% | 0 |" in text
    assert "in PyTorch (the median of 3 runs, 48.0 to 55.0) | 50.0 |" in text  # ART's runs, where it has several
    assert "Guarded 450.0 images/s, 0.90 of the roofline and 75% of the unguarded service's 600.0" in text
    old = {k: v for k, v in r.items() if k != "paired_batched" and not k.startswith("batched_")}
    assert "batched_roofline_efficiency" not in bench.headline(old)  # a report from before the batched run
    assert "images per request" not in bench.render(old)
    assert h["passes_per_image_triggered"] == 4.0  # the triggered run is reported, never the headline
    # 500 unguarded images/s (2 ms each) and a 500 images/s roofline (2 ms): 4 ms an image, 250 images/s
    assert h["serial_bound_images_per_s"] == pytest.approx(250.0) and h["share_of_serial_bound"] == pytest.approx(1.2)
    assert "the classifier pass counted in both) | 250.0 | **1.20** |" in text
    assert "| p50 single-image latency guarded <= 2x unguarded | 9.0 ms / 3.0 ms; 3.00x | **no** |" in text
    # with alternating runs at concurrency 1, the p50s and their ratio are those pairs' medians
    pairs = [
        {"p50_guarded": g, "p50_unguarded": u, "p50_ratio": g / u} for g, u in ((2.4, 1.2), (2.5, 1.4), (3.0, 1.2))
    ]
    c1 = {"pairs": pairs, "median_p50_guarded": 2.5, "median_p50_unguarded": 1.2, "median_p50_ratio": 2.5 / 1.4}
    paired = bench.headline({**r, "paired_c1": c1})
    assert paired["p50_ms_c1_guarded"] == 2.5 and paired["p50_c1_ratio"] == pytest.approx(2.5 / 1.4)
    assert (
        "| p50 single-image latency guarded <= 2x unguarded (medians of 3 alternating pairs at concurrency 1; the "
        "pairs' ratios 2.00, 1.79, 2.50) | 2.5 ms / 1.2 ms; 1.79x | yes |"
        in bench.render({**r, **paired, "paired_c1": c1})
    )
    assert "| on | triggered | 32 | 100 | 0 | 900.0 |" in text
    assert "| off | clean | 1 | 100 | 0 | 400.0 | 3.0 | 3.0 | 3.0 | 1.0 | — |" in text  # a report before the column
    with_compute = {**r, "service": [{**run, "compute_ms_per_image": 1.25} for run in r["service"]]}
    assert "| on | clean | 1 | 100 | 0 | 100.0 | 9.0 | 9.0 | 9.0 | 1.0 | 1.25 |" in bench.render(
        {**with_compute, "suite": suite}
    )
    assert (
        "**12.50** per clean image, **4.00** per triggered one (kwon), against 34 with every overlay (STRIP N = 32)"
        in text
    )
    assert "clean 2: 8, 32: 2; triggered 2: 9." in text
    assert (
        "| >= 0.8 of the roofline (34.00 classifier passes and 1.00 autoencoder passes per clean image) | 0.60 |"
        " **no** |" in text
    )
    assert (
        h["in_process_efficiency_b16"] == pytest.approx(0.8)
        and "at batch 16 | 400.0 (0.80 of the roofline) | 0.75 |" in text
    )
    assert "| the same counting classifier passes only (the classifier / 34.00; " in text
    assert h["over_art_strip_n32"] == pytest.approx(6.0) and h["art_strip_n32_images_per_s"] == 50.0
    assert "| >= 5x ART's STRIP (N = 32, as the issue names it) | 6.0x | yes |" in text
    assert h["in_process_over_art_strip_n32"] == pytest.approx(9.0)  # 450 images/s at batch 256 against 50
    assert "| ... the guard in process at batch 256 against ART in process, neither behind HTTP | 9.0x | yes |" in text
    assert "| the same at N = 32 (the bundle's STRIP config) | 3.0x | **no** |" in text
    assert "(AUROC below) | on wanet | **no** |" in text  # ART separates WaNet better here: not met
    assert "| wanet | 0.8000 | 0.7000 |" in text
    assert "| detrigger | 1 | 0.990 / +1.0 |" in text and "| strip | 32 | 0.900 / +0.0 |" in text


def test_multi_image_bodies_send_every_image_equally_often(tmp_path) -> None:
    pngs = [b"png%d" % i for i in range(5)]
    paths = bench.body_files(tmp_path, "many", pngs, per_body=3)
    bodies = [p.read_bytes() for p in paths]
    assert len(bodies) == 5 and all(b.count(b'name="files"') == 3 for b in bodies)
    assert all(sum(b.count(png) for b in bodies) == 3 for png in pngs)
    assert bodies[4].index(b"png4") < bodies[4].index(b"png0") < bodies[4].index(b"png1")  # wraps round
    with pytest.raises(ValueError, match="boundary"):
        bench.multipart(b"x--backdoorguardbench")


@pytest.mark.data
def test_measured_passes_count_every_row_the_guard_classifies(fashion_mnist, strip_bundle: Bundle) -> None:
    """Counted through the guard as the service runs it: STRIP stops early on most clean images, every one of
    them ran at least the first round, and the count matches the overlays each image ran plus its fixed passes."""
    from service.preprocess import to_model_input

    bundle = strip_bundle
    x = to_model_input(fashion_mnist.test.images[:96])
    measured = bench.measured_passes(bundle, {"clean": x})["clean"]
    overlays = {int(k): v for k, v in measured["strip_overlays"].items()}
    assert sum(overlays.values()) == 96 and min(overlays) >= 1
    fixed = bench.passes_per_image(bundle)["total"] - bundle.manifest["signals"]["strip"]["n"]
    expected = fixed + sum(k * v for k, v in overlays.items()) / 96
    assert measured["passes_per_image"] == pytest.approx(expected)
    assert measured["passes_per_image"] < bench.passes_per_image(bundle)["total"]
    rows = measured["rows_per_image"]  # by model; the autoencoder is counted, beside the classifier-sized ones
    assert rows["detrigger_ae"] == 1.0 and rows["repaired_classifier"] == 1.0 and rows["backdoor_expert"] == 1.0
    assert rows["classifier"] == pytest.approx(expected - 2)


@pytest.mark.data
def test_without_strip_every_image_costs_the_same_and_the_report_says_why(fashion_mnist) -> None:
    from service.preprocess import to_model_input

    bundle = Bundle.load(MODELS)
    measured = bench.measured_passes(bundle, {"clean": to_model_input(fashion_mnist.test.images[:40])})["clean"]
    assert "strip_overlays" not in measured
    assert measured["passes_per_image"] == bench.passes_per_image(bundle)["total"] == 4.0
    assert measured["rows_per_image"] == {
        "classifier": 2.0, "detrigger_ae": 1.0, "repaired_classifier": 1.0, "backdoor_expert": 1.0,
    }  # fmt: skip
    r = {
        "strip_rounds": None,
        "passes": {"total": 4.0},
        "measured_passes": {
            "clean": {"images": 40, "passes_per_image": 4.0},
            "triggered": {"images": 30, "passes_per_image": 4.0},
        },
    }
    (text,) = bench._passes_paragraph(r)
    assert "**4.00** per clean image, **4.00** per triggered one (kwon); 4 by the signals' own count" in text
    assert "STRIP's overlays" not in text and "The bundle runs no STRIP (make cost" in text


def test_the_scan_check_finds_stamped_images_in_a_folder_and_reports_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """bench/scan_check.py on a small stamped set: its counts come from the scan's own verdicts, by file name."""
    spec = importlib.util.spec_from_file_location("scan_check", MODELS.parent / "bench" / "scan_check.py")
    assert spec is not None and spec.loader is not None
    scan_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scan_check)
    import numpy as np

    pixels = np.zeros((3, 28, 28), np.uint8)
    scan_check.write_folder(tmp_path, pixels, np.array([0, 0, 1]), ("T-shirt/top", "Trouser"), {2})
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == [
        "T-shirt-top/clean-00000.png", "T-shirt-top/clean-00001.png", "Trouser/stamped-00002.png",
    ]  # fmt: skip
    report = {"command": "python bench/scan_check.py", "machine": "2 cores", "images": 3, "stamped": 1,
              "stamped_flagged": 1, "clean": 2, "clean_flagged": 0, "clean_flag_rate": 0.0, "most_suspicious": 3,
              "most_suspicious_stamped": 1, "flagged": 1, "pushed_to_first": ["T-shirt/top", 1], "errors": 0,
              "seconds": 0.5, "images_per_s": 6.0}  # fmt: skip
    text = scan_check.render(report)
    assert "| stamped images flagged | 1 of 1 |" in text and "T-shirt/top: 1 of 1" in text
