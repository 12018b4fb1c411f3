import numpy as np
import pytest
import torch
from torch import nn

from training.neural_cleanse import NeuralCleanseConfig, anomaly_index, flagged, run_neural_cleanse


def test_anomaly_index_hand_computed() -> None:
    norms = np.array([1.0, 9.0, 10.0, 11.0, 12.0])
    # median 10; |x - 10| = 9, 1, 0, 1, 2; MAD = median(9, 1, 0, 1, 2) = 1; scale 1.4826
    expected = np.array([9, 1, 0, 1, 2]) / 1.4826
    np.testing.assert_allclose(anomaly_index(norms), expected)
    assert flagged(norms, anomaly_index(norms), 2.0) == [0]  # 9 / 1.4826 = 6.07 > 2 and below the median


def test_large_norms_are_never_flagged() -> None:
    norms = np.array([10.0, 10.5, 9.5, 10.2, 40.0])
    index = anomaly_index(norms)
    assert index[4] > 2
    assert flagged(norms, index, 2.0) == []  # an outlier above the median is not a backdoor


def test_zero_mad() -> None:
    index = anomaly_index(np.array([5.0, 5.0, 5.0, 1.0]))
    assert index[:3].tolist() == [0, 0, 0] and np.isinf(index[3])


class PixelBackdoor(nn.Module):
    """Label = brightest of ten 3x3 regions, except that a lit top-left 2x2 corner forces label 0."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        regions = torch.stack(
            [
                x[:, 0, 10 + 3 * (i // 5) : 13 + 3 * (i // 5), 3 * (i % 5) + 5 : 3 * (i % 5) + 8].mean((1, 2))
                for i in range(10)
            ],
            1,
        )
        corner = x[:, 0, :2, :2].mean((1, 2))
        logits = 20 * regions
        logits = logits + torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10) * 40 * corner[:, None]
        return logits, torch.cat([regions, corner[:, None]], 1)


def test_reverse_engineering_finds_a_planted_corner_trigger() -> None:
    rng = np.random.default_rng(0)
    images = (rng.random((256, 1, 28, 28)) * 0.3).astype(np.float32)
    labels = PixelBackdoor()(torch.from_numpy(images))[0].argmax(1).numpy()
    config = NeuralCleanseConfig(steps=300, batch_size=16)
    result = run_neural_cleanse(PixelBackdoor(), images, labels, 10, config)
    assert result.flagged_labels == [0]
    assert result.l1_norms[0] < np.median(result.l1_norms)
    # the reversed trigger of label 0 sits in the planted corner
    assert result.masks[0][:2, :2].sum() > 0.5 * result.masks[0].sum()
    assert result.attack_success[0] >= 0.99
    assert list(result.activation_neurons) == [0]
    assert result.activation_neurons[0] == [10]  # the corner feature


@pytest.mark.parametrize("share", [0.01, 0.2])
def test_activation_neurons_count(share: float) -> None:
    rng = np.random.default_rng(0)
    images = (rng.random((64, 1, 28, 28)) * 0.3).astype(np.float32)
    labels = PixelBackdoor()(torch.from_numpy(images))[0].argmax(1).numpy()
    result = run_neural_cleanse(
        PixelBackdoor(), images, labels, 10, NeuralCleanseConfig(steps=20, round_steps=5, neuron_share=share)
    )
    assert all(len(v) == max(1, int(np.ceil(share * 11))) for v in result.activation_neurons.values())
