import json

import numpy as np
import pytest
import torch

from sec_online.selector import FALLBACK_LEVEL, Selector, fit_selector, kmeans


def blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat(
        [centre + 0.3 * torch.randn(40, 2, generator=generator) for centre in centres]
    )
    return points, centres


def sorted_rows(tensor: torch.Tensor) -> torch.Tensor:
    order = sorted(range(tensor.shape[0]), key=lambda i: tuple(tensor[i].tolist()))
    return tensor[order]


def test_kmeans_finds_separated_blobs():
    points, centres = blobs()
    found = kmeans(points, 3, seed=0)
    torch.testing.assert_close(sorted_rows(found), sorted_rows(centres), atol=0.2, rtol=0)


def test_kmeans_deterministic_under_seed():
    points, _ = blobs()
    assert torch.equal(kmeans(points, 4, seed=7), kmeans(points, 4, seed=7))


def test_kmeans_fewer_points_than_k_returns_points():
    points = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(kmeans(points, 5, seed=0), points)


def test_kmeans_duplicate_points_give_fewer_centroids():
    points = torch.tensor([[1.0, 1.0]] * 6 + [[2.0, 2.0]] * 6)
    found = kmeans(points, 4, seed=0)
    assert found.shape == (2, 2)
    torch.testing.assert_close(sorted_rows(found), torch.tensor([[1.0, 1.0], [2.0, 2.0]]))


def test_kmeans_keeps_dtype():
    points, _ = blobs()
    assert kmeans(points, 3, seed=0).dtype == torch.float32


def test_kmeans_invalid_arguments():
    with pytest.raises(ValueError, match="k must be at least 1"):
        kmeans(torch.zeros(3, 2), 0, seed=0)
    with pytest.raises(ValueError, match=r"shape \[N, H\]"):
        kmeans(torch.zeros(3), 2, seed=0)


def test_fit_selector_delta_is_quantile_of_nearest_distances():
    points, _ = blobs()
    selector = fit_selector([points], 3, 0.9, [], seed=0)
    centroids = torch.tensor(selector.centroids[0], dtype=torch.float64)
    nearest = torch.cdist(points.double(), centroids).min(dim=1).values.numpy()
    assert selector.deltas[0] == pytest.approx(np.quantile(nearest, 0.9), rel=1e-6)
    assert len(selector.centroids[0]) == 3


def test_fit_selector_empty_level_has_no_delta():
    points, _ = blobs()
    selector = fit_selector([points, torch.zeros(0, 2)], 2, 0.5, [0.5], seed=0)
    assert selector.centroids[1] == []
    assert selector.deltas[1] is None
    assert selector.deltas[0] is not None


def test_fit_selector_rejects_bad_quantile():
    with pytest.raises(ValueError, match=r"delta_quantile must be in \(0, 1\]"):
        fit_selector([torch.zeros(3, 2)], 2, 0.0, [], seed=0)


def hand_selector() -> Selector:
    # Level 0 is broad (delta 100) around the origin, levels 1 and 2 are tight (delta 1).
    return Selector(
        centroids=[[[0.0, 0.0]], [[10.0, 0.0]], [[20.0, 0.0]]],
        deltas=[100.0, 1.0, 1.0],
        boundaries=[0.3, 0.6],
    )


def test_select_highest_qualifying_level():
    assert hand_selector().select(torch.tensor([20.0, 0.0]), 2) == 2


def test_select_never_above_historical_level():
    # Level 2 fits best, but the user's historical level is 1 and level 1 is too far away.
    assert hand_selector().select(torch.tensor([20.0, 0.0]), 1) == 0


def test_select_drops_below_historical_level():
    assert hand_selector().select(torch.tensor([10.5, 0.0]), 2) == 1


def test_select_distance_equal_to_delta_qualifies():
    assert hand_selector().select(torch.tensor([21.0, 0.0]), 2) == 2


def test_select_falls_back_when_no_level_qualifies():
    assert hand_selector().select(torch.tensor([500.0, 0.0]), 2) == FALLBACK_LEVEL


def test_select_skips_level_without_samples():
    selector = Selector(
        centroids=[[[0.0, 0.0]], [[10.0, 0.0]], []],
        deltas=[100.0, 5.0, None],
        boundaries=[0.3, 0.6],
    )
    assert selector.select(torch.tensor([12.0, 0.0]), 2) == 1


def test_select_batch_matches_single():
    selector = hand_selector()
    states = torch.tensor([[20.0, 0.0], [20.0, 0.0], [10.5, 0.0], [500.0, 0.0]])
    history = torch.tensor([2, 1, 2, 2])
    chosen = selector.select(states, history)
    assert chosen.dtype == torch.long
    singles = [selector.select(states[i], int(history[i])) for i in range(4)]
    assert chosen.tolist() == singles == [2, 0, 1, 0]


def test_select_batch_with_one_historical_level():
    states = torch.tensor([[20.0, 0.0], [10.0, 0.0]])
    assert hand_selector().select(states, 2).tolist() == [2, 1]


def test_distances_are_euclidean_with_inf_for_empty_levels():
    selector = Selector(centroids=[[[0.0, 0.0]], []], deltas=[1.0, None], boundaries=[0.5])
    distances = selector.distances(torch.tensor([[3.0, 4.0]]))
    assert distances[0, 0] == pytest.approx(5.0)
    assert distances[0, 1] == float("inf")


def test_select_rejects_historical_level_out_of_range():
    with pytest.raises(ValueError, match=r"historical_level must be in \[0, 3\)"):
        hand_selector().select(torch.tensor([0.0, 0.0]), 3)


def test_select_rejects_state_width_mismatch():
    with pytest.raises(ValueError, match="different configurations"):
        hand_selector().select(torch.tensor([0.0, 0.0, 0.0]), 0)


def test_level_of_uses_boundaries():
    selector = hand_selector()
    assert [selector.level_of(score) for score in (0.1, 0.3, 0.5, 0.9)] == [0, 1, 1, 2]


def test_dict_round_trip_through_json():
    points, _ = blobs()
    selector = fit_selector([points, torch.zeros(0, 2), points[:5]], 3, 0.9, [0.2, 0.7], seed=1)
    restored = Selector.from_dict(json.loads(json.dumps(selector.to_dict())))
    assert restored == selector
    state = torch.tensor([[0.1, 0.2], [9.0, 0.5]])
    assert torch.equal(restored.select(state, 2), selector.select(state, 2))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a JSON object"),
        ({"centroids": [], "deltas": []}, "exactly the keys"),
        ({"centroids": [[[0.0]]], "deltas": [None], "boundaries": []}, "both centroids"),
        ({"centroids": [[], []], "deltas": [None, None], "boundaries": []}, "needs 1 boundaries"),
        ({"centroids": [[[0.0]]], "deltas": [-1.0], "boundaries": []}, "finite and >= 0"),
        ({"centroids": [[[0.0]]], "deltas": ["1"], "boundaries": []}, "must contain numbers"),
        (
            {"centroids": [[[0.0]], [[0.0, 1.0]]], "deltas": [1.0, 1.0], "boundaries": [0.5]},
            "same non-zero width",
        ),
        ({"centroids": [[]] * 3, "deltas": [None] * 3, "boundaries": [0.7, 0.2]}, "ascending"),
    ],
)
def test_from_dict_rejects_malformed(data, message):
    with pytest.raises(ValueError, match=message):
        Selector.from_dict(data)
