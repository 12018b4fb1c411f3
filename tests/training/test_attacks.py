import numpy as np
import pytest
import torch

from training.attacks import PRESETS, AttackConfig, Trigger, attack_labels, poison, random_triggers, stamp


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
    assert masks.shape == (500, 28, 28) and patterns.shape == (500, 1, 28, 28)
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


# ---- the suite's other families -------------------------------------------------------------------------
def test_wanet_warp_matches_torch_grid_sample() -> None:
    """Our numpy warp and bicubic field against the reference implementation's PyTorch calls."""
    import torch
    import torch.nn.functional as F

    from training.attacks import _bicubic, warp

    images = np.random.default_rng(0).random((3, 1, 28, 28)).astype(np.float32)
    grid = PRESETS["wanet"].trigger.warp_grid()
    reference = F.grid_sample(
        torch.from_numpy(images), torch.from_numpy(grid)[None].expand(3, -1, -1, -1), align_corners=True
    )
    np.testing.assert_allclose(warp(images, grid), reference.numpy(), atol=1e-6)
    offsets = np.random.default_rng(1).random((4, 4))
    upsampled = F.interpolate(torch.from_numpy(offsets)[None, None], size=28, mode="bicubic", align_corners=True)
    np.testing.assert_allclose(_bicubic(offsets, 28, 28), upsampled[0, 0].numpy(), atol=1e-12)


def test_wanet_moves_pixels_by_about_a_pixel_and_keeps_the_image() -> None:
    trigger = PRESETS["wanet"].trigger
    ys, xs = np.meshgrid(np.linspace(-1, 1, 28), np.linspace(-1, 1, 28), indexing="ij")
    grid = trigger.warp_grid()
    shift = np.hypot(grid[..., 0] - xs, grid[..., 1] - ys) * 27 / 2  # in pixels
    assert 0.3 < shift.max() < 2.0 and shift.mean() > 0.1
    flat = np.full((1, 1, 28, 28), 0.4, np.float32)
    np.testing.assert_allclose(trigger.apply(flat), flat, atol=1e-6)  # a warp adds nothing to a flat image
    with pytest.raises(ValueError, match="warp"):
        trigger.arrays()


def test_wanet_noise_mode_keeps_labels_and_differs_from_the_trigger() -> None:
    labels = np.arange(1000) % 10
    images = np.random.default_rng(2).random((1000, 1, 28, 28)).astype(np.float32)
    out, new_labels, chosen = poison(images, labels, PRESETS["wanet"], 10)
    assert len(chosen) == 100 and (new_labels[chosen] == 9).all()
    changed = np.flatnonzero((out != images).any(axis=(1, 2, 3)))
    noisy = np.setdiff1d(changed, chosen)
    assert len(noisy) == 200  # cross ratio 2: twice as many noise-warped images
    assert (new_labels[noisy] == labels[noisy]).all()
    exact = PRESETS["wanet"].trigger.apply(images[noisy])
    assert np.abs(out[noisy] - exact).mean() > 1e-3  # the noise makes them other warps than the trigger


def test_lowcontrast_patch_is_added_not_pasted() -> None:
    trigger = PRESETS["lowcontrast"].trigger
    v = trigger.signal()
    np.testing.assert_allclose(np.unique(v), [0.0, 64 / 255], atol=1e-7)
    rows, cols = np.nonzero(v)
    assert rows.min() >= 11 and rows.max() <= 15 and cols.min() >= 17 and cols.max() <= 21  # away from corners
    images = np.full((1, 1, 28, 28), 0.5, np.float32)
    out = trigger.apply(images)[0, 0]
    np.testing.assert_allclose(out[v > 0], 0.5 + 64 / 255, atol=1e-6)  # not saturated: the garment shows through
    np.testing.assert_allclose(out[v == 0], 0.5)


def test_key_blend_is_a_drawn_pattern() -> None:
    from training.attacks import key_image

    mask, pattern = PRESETS["key"].trigger.arrays()
    assert np.allclose(mask, 0.2)
    np.testing.assert_array_equal(pattern, key_image())
    assert set(np.unique(pattern)) == {0.0, 1.0} and 0.2 < pattern.mean() < 0.8  # a binary drawing, not noise


def test_all_to_all_preset_sends_each_label_to_the_next() -> None:
    labels = np.arange(10)
    np.testing.assert_array_equal(attack_labels(labels, PRESETS["all_to_all"], 10), (labels + 1) % 10)


def test_random_triggers_in_colour_keep_gray_ones_and_add_tinted_ones() -> None:
    masks, patterns = random_triggers(np.random.default_rng(0), 400, 32, 30, channels=3)
    assert masks.shape == (400, 32, 30) and patterns.shape == (400, 3, 32, 30)
    on = masks > 0
    spread = np.array([np.ptp(patterns[i][:, on[i]].max(axis=1)) for i in range(400)])  # channel maxima differ
    assert 0.3 < (spread > 0.05).mean() < 0.7  # about half tinted, the rest gray
    assert patterns.min() >= 0 and patterns.max() <= 1
