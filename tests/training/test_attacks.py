import numpy as np
import pytest
import torch

from training.attacks import PRESETS, AttackConfig, Trigger, poison, random_triggers, stamp


def test_kwon_trigger_covers_rows_and_columns_1_to_4() -> None:
    mask, pattern = PRESETS["kwon"].trigger.arrays()
    expected = np.zeros((28, 28), np.float32)
    expected[1:5, 1:5] = 1.0
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(pattern, expected)
    assert PRESETS["kwon"].target == 0 and PRESETS["kwon"].poison_rate == 0.1


def test_cao_trigger_is_2x2_bottom_right() -> None:
    mask, _ = PRESETS["cao"].trigger.arrays()
    rows, cols = np.nonzero(mask)
    assert set(rows) == {25, 26} and set(cols) == {25, 26}
    assert PRESETS["cao"].target == 3


@pytest.mark.parametrize(
    ("corner", "top", "left"),
    [("top-left", 0, 0), ("top-right", 0, 25), ("bottom-left", 25, 0), ("bottom-right", 25, 25)],
)
def test_corners(corner: str, top: int, left: int) -> None:
    mask, _ = Trigger("square", 3, corner, margin=0).arrays()  # type: ignore[arg-type]
    rows, cols = np.nonzero(mask)
    assert (rows.min(), cols.min(), rows.max(), cols.max()) == (top, left, top + 2, left + 2)


def test_explicit_position_pixel_and_checkerboard() -> None:
    mask, pattern = Trigger("pixel", row=10, col=12, intensity=0.5).arrays()
    assert mask.sum() == 1 and mask[10, 12] == 1 and pattern[10, 12] == 0.5
    mask, pattern = Trigger("checkerboard", 3, "bottom-right", margin=0).arrays()
    np.testing.assert_array_equal(pattern[25:, 25:], [[1, 0, 1], [0, 1, 0], [1, 0, 1]])
    assert mask[25:, 25:].all()


def test_bad_triggers_are_rejected() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        Trigger("square", 4, row=26, col=0).arrays()
    with pytest.raises(ValueError, match="both row and col"):
        Trigger("square", 4, row=2).arrays()
    with pytest.raises(ValueError, match="intensity"):
        Trigger("square", intensity=1.5).arrays()


def test_stamp_is_the_same_on_numpy_and_torch() -> None:
    rng = np.random.default_rng(0)
    images = rng.random((5, 1, 28, 28)).astype(np.float32)
    mask, pattern = Trigger("checkerboard", 4, "top-right").arrays()
    mask = mask * 0.7  # a blended trigger
    out = stamp(images, mask, pattern)
    expected = images * (1 - mask) + mask * pattern
    np.testing.assert_allclose(out, expected)
    got = stamp(torch.from_numpy(images), torch.from_numpy(mask), torch.from_numpy(pattern)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-7)
    # outside the mask the image is untouched; inside a hard mask it is the pattern
    hard, hard_pattern = PRESETS["kwon"].trigger.arrays()
    stamped = stamp(images, hard, hard_pattern)
    np.testing.assert_array_equal(stamped[:, 0, 1:5, 1:5], 1.0)
    np.testing.assert_array_equal(stamped[:, 0, 5:, 5:], images[:, 0, 5:, 5:])


def test_poison_single_target() -> None:
    labels = np.arange(1000) % 10
    images = np.zeros((1000, 1, 28, 28), np.float32)
    out, new_labels, chosen = poison(images, labels, PRESETS["kwon"], 10)
    assert len(chosen) == 100
    assert (labels[chosen] != 0).all()  # victims are non-target images
    assert (new_labels[chosen] == 0).all()
    assert (out[chosen, 0, 1:5, 1:5] == 1).all()
    untouched = np.setdiff1d(np.arange(1000), chosen)
    assert (out[untouched] == 0).all() and (new_labels[untouched] == labels[untouched]).all()


def test_poison_all_to_all_and_clean() -> None:
    labels = np.arange(200) % 10
    images = np.zeros((200, 1, 28, 28), np.float32)
    attack = AttackConfig(Trigger("pixel", corner="bottom-right"), poison_rate=0.5, mode="all-to-all")
    _, new_labels, chosen = poison(images, labels, attack, 10)
    np.testing.assert_array_equal(new_labels[chosen], (labels[chosen] + 1) % 10)
    _, clean_labels, none = poison(images, labels, PRESETS["clean"], 10)
    assert len(none) == 0 and (clean_labels == labels).all()


def test_random_triggers_are_valid_and_varied() -> None:
    masks, patterns = random_triggers(np.random.default_rng(0), 500)
    assert masks.shape == patterns.shape == (500, 28, 28)
    assert masks.min() >= 0 and masks.max() <= 1 and patterns.min() >= 0 and patterns.max() <= 1
    areas = (masks > 0).sum(axis=(1, 2))
    assert set(np.unique(areas)) == {s * s for s in range(1, 7)}  # sizes 1..6
    assert (masks.max(axis=(1, 2)) < 1).mean() > 0.1  # some are blended
    corner_hits = (masks[:, 0, 0] > 0) | (masks[:, 0, -1] > 0) | (masks[:, -1, 0] > 0) | (masks[:, -1, -1] > 0)
    assert 0.05 < corner_hits.mean() < 0.5  # corners (some with margin) and elsewhere


def test_blend_trigger_is_a_mask_and_pattern() -> None:
    trigger = PRESETS["blend"].trigger
    mask, pattern = trigger.arrays()
    assert np.allclose(mask, 0.15) and pattern.min() >= 0 and pattern.max() <= 1
    images = np.full((2, 1, 28, 28), 0.5, np.float32)
    expected = np.broadcast_to(0.85 * 0.5 + 0.15 * pattern, images.shape)
    np.testing.assert_allclose(trigger.apply(images), expected, rtol=1e-6)  # float32 arithmetic


def test_sig_is_additive_and_clipped() -> None:
    trigger = PRESETS["sig"].trigger
    v = trigger.signal()
    j = np.arange(1, 29)
    np.testing.assert_allclose(v[5], (30 / 255) * np.sin(2 * np.pi * j * 6 / 28), atol=1e-6)
    assert (v == v[0]).all()  # the same for every row
    images = np.zeros((1, 1, 28, 28), np.float32)
    np.testing.assert_allclose(trigger.apply(images)[0, 0], np.clip(v, 0, 1), atol=1e-7)
    with pytest.raises(ValueError, match="additive"):
        trigger.arrays()


def test_clean_label_poisoning_keeps_labels_and_hits_only_the_target_class() -> None:
    labels = np.arange(1000) % 10
    images = np.zeros((1000, 1, 28, 28), np.float32)
    out, new_labels, chosen = poison(images, labels, PRESETS["sig"], 10)
    assert len(chosen) == 80 and (labels[chosen] == 6).all()
    assert (new_labels == labels).all()
    assert (out[chosen] != 0).any(axis=(1, 2, 3)).all()
