import numpy as np
import pytest
import torch

from sec_online.model import CLIP_STD, FeatureNormalizer, SECModel


def make_model(seed: int = 0) -> SECModel:
    torch.manual_seed(seed)
    return SECModel(n_features=6, n_actions=5, n_levels=3, hidden_size=8)


def test_model_output_shapes():
    model = make_model()
    x = torch.randn(4, 6)
    assert model.encode(x).shape == (4, 8)
    assert model.logits(x).shape == (4, 3, 5)
    assert model(x).shape == (4, 3, 5)
    assert model.level_logits(x, torch.tensor([0, 1, 2, 1])).shape == (4, 5)


def test_level_logits_picks_each_sample_head():
    model = make_model()
    x = torch.randn(3, 6)
    levels = torch.tensor([2, 0, 1])
    all_logits = model.logits(x)
    picked = model.level_logits(x, levels)
    for row, level in enumerate(levels.tolist()):
        torch.testing.assert_close(picked[row], all_logits[row, level])


def test_level_logits_gradient_reaches_only_named_heads():
    model = make_model()
    x = torch.randn(5, 6)
    model.level_logits(x, torch.full((5,), 1)).sum().backward()
    assert model.heads[0].weight.grad is None or not model.heads[0].weight.grad.any()
    assert model.heads[2].weight.grad is None or not model.heads[2].weight.grad.any()
    assert model.heads[1].weight.grad.abs().sum() > 0
    assert model.encoder[0].weight.grad.abs().sum() > 0


def test_normalizer_matches_numpy_over_uneven_batches():
    rng = np.random.default_rng(3)
    data = rng.normal(loc=5.0, scale=[1.0, 10.0, 0.1], size=(101, 3))
    normalizer = FeatureNormalizer(3)
    for start, stop in [(0, 1), (1, 40), (40, 41), (41, 101)]:
        normalizer.observe(torch.tensor(data[start:stop], dtype=torch.float32))
    assert float(normalizer.count) == 101
    np.testing.assert_allclose(normalizer.mean.numpy(), data.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(normalizer.variance().numpy(), data.var(axis=0), rtol=1e-5)


def test_normalizer_forward_does_not_update():
    normalizer = FeatureNormalizer(2)
    normalizer.observe(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    before = {name: buffer.clone() for name, buffer in normalizer.named_buffers()}
    normalizer(torch.tensor([[100.0, 100.0]]))
    for name, buffer in normalizer.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_normalizer_standardises():
    normalizer = FeatureNormalizer(1)
    normalizer.observe(torch.tensor([[1.0], [3.0]]))  # mean 2, population std 1
    torch.testing.assert_close(normalizer(torch.tensor([[4.0]])), torch.tensor([[2.0]]))


def test_normalizer_constant_feature_only_centred():
    normalizer = FeatureNormalizer(1)
    normalizer.observe(torch.full((10, 1), 7.0))
    torch.testing.assert_close(normalizer(torch.tensor([[8.5]])), torch.tensor([[1.5]]))


def test_normalizer_clips_outliers():
    normalizer = FeatureNormalizer(1)
    normalizer.observe(torch.tensor([[-1.0], [1.0]]))
    out = normalizer(torch.tensor([[1e6], [-1e6]]))
    torch.testing.assert_close(out, torch.tensor([[CLIP_STD], [-CLIP_STD]]))


def test_normalizer_identity_before_any_batch():
    normalizer = FeatureNormalizer(2)
    x = torch.tensor([[0.5, -2.0]])
    torch.testing.assert_close(normalizer(x), x)


def test_state_dict_carries_normalizer():
    model = make_model()
    model.observe(torch.randn(7, 6))
    state = model.state_dict()
    assert float(state["normalizer.count"]) == 7
    clone = SECModel.from_config(model.config())
    clone.load_state_dict(state)
    x = torch.randn(2, 6)
    torch.testing.assert_close(clone.logits(x), model.logits(x))


def test_config_round_trip():
    model = make_model()
    assert model.config() == {"n_features": 6, "n_actions": 5, "n_levels": 3, "hidden_size": 8}
    assert SECModel.from_config(model.config()).config() == model.config()


def test_from_config_names_missing_keys():
    with pytest.raises(ValueError, match="lacks hidden_size"):
        SECModel.from_config({"n_features": 1, "n_actions": 2, "n_levels": 1})


def test_wrong_feature_width_rejected():
    with pytest.raises(ValueError, match=r"shape \[B, 6\], got \(2, 5\)"):
        make_model().encode(torch.zeros(2, 5))


def test_level_out_of_range_rejected():
    with pytest.raises(ValueError, match=r"levels must be in \[0, 3\)"):
        make_model().level_logits(torch.zeros(2, 6), torch.tensor([0, 3]))


def test_float_levels_rejected():
    with pytest.raises(ValueError, match="integer tensor"):
        make_model().level_logits(torch.zeros(1, 6), torch.tensor([1.0]))


def test_invalid_sizes_rejected():
    with pytest.raises(ValueError, match="n_actions must be at least 2"):
        SECModel(n_features=3, n_actions=1, n_levels=2, hidden_size=4)
    with pytest.raises(ValueError, match="n_levels must be at least 1"):
        SECModel(n_features=3, n_actions=2, n_levels=0, hidden_size=4)
