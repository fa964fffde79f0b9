import math

import numpy as np
import pandas as pd
import pytest
import torch

from sec_online.evaluation.dataset import TRAIN, EvalDataset, action_columns
from sec_online.evaluation.demonstrations import (
    CONTINUOUS,
    DISCRETE,
    Demonstrations,
    discrete_demonstrations,
    is_expert,
    levels_of_scores,
)
from sec_online.evaluation.policies import (
    FUSION_WEIGHTS,
    ClonedPolicy,
    FixedWeightsPolicy,
    PopularPolicy,
    RandomPolicy,
    cloned_variants,
    cluster_popularity,
    train_cloned,
)
from sec_online.losses import nuclear_norm
from sec_online.settings import Settings
from sec_online.userstate import feature_names

N_CLUSTERS = 5
LEVELS = 3
BOUNDARIES = [0.4, 0.7]
# Cluster that users of each level prefer on days after which they come back soon. Before they
# stay away, users of every level prefer NON_EXPERT_CLUSTER.
PREFERRED = [0, 1, 2]
NON_EXPERT_CLUSTER = 4
SCORE_OF_LEVEL = [0.3, 0.55, 0.85]


def make_settings(**overrides) -> Settings:
    values = dict(
        data_dir=None,
        levels=LEVELS,
        clusters=N_CLUSTERS,
        hidden_size=32,
        batch_size=64,
        learning_rate=0.01,
        entropy_weight=0.05,
        centroids_per_level=3,
        delta_quantile=0.9,
        seed=0,
    )
    values.update(overrides)
    return Settings(**values)


def synthetic_days(rows_per_level: int, seed: int) -> pd.DataFrame:
    """Train user-days where each level has its own preferred cluster and its own states.

    Users of level k have ``retention_score`` near ``SCORE_OF_LEVEL[k]`` and history features
    around ``k``, so the encoder can tell the levels apart. Two days in three are followed by a
    return after 1 day (experts); the others by a gap of 6 days, with a non-expert action.
    """
    rng = np.random.default_rng(seed)
    names = feature_names(N_CLUSTERS)
    records = []
    for level in range(LEVELS):
        for index in range(rows_per_level):
            expert = index % 3 != 2
            features = dict.fromkeys(names, 0.0)
            for name in names[:9]:
                features[name] = float(rng.normal(loc=level, scale=0.3))
            features["retention_score"] = SCORE_OF_LEVEL[level] + float(rng.uniform(-0.05, 0.05))
            features["has_retention_score"] = 1.0
            action = np.full(N_CLUSTERS, 0.02)
            action[PREFERRED[level] if expert else NON_EXPERT_CLUSTER] = 1.0
            action /= action.sum()
            records.append(
                {
                    "user_id": level * 10_000 + index,
                    "day": index % 5,
                    "split": TRAIN,
                    **features,
                    "gap_days": 1.0 if expert else 6.0,
                    "censored": False,
                    **dict(zip(action_columns(N_CLUSTERS), action.tolist(), strict=True)),
                }
            )
    return pd.DataFrame.from_records(records)


def make_dataset(days: pd.DataFrame) -> EvalDataset:
    videos = 20
    return EvalDataset(
        n_features=len(feature_names(N_CLUSTERS)),
        n_clusters=N_CLUSTERS,
        feature_names=feature_names(N_CLUSTERS),
        video_ids=np.arange(videos, dtype=np.int64),
        video_cluster=np.array([v % N_CLUSTERS if v < 18 else -1 for v in range(videos)]),
        video_matrix=np.zeros((videos, 2), dtype=np.float32),
        video_popularity=np.arange(videos, dtype=np.int64),
        video_duration_ms=np.full(videos, 10_000.0),
        video_index={v: v for v in range(videos)},
        requests=pd.DataFrame(),
        impressions=pd.DataFrame(),
        days=days,
        user_static={},
        level_boundaries=list(BOUNDARIES),
        levels=LEVELS,
        split_day=5,
        last_day=7,
        day0_ms=0,
    )


@pytest.fixture(scope="module")
def dataset() -> EvalDataset:
    return make_dataset(synthetic_days(rows_per_level=150, seed=1))


@pytest.fixture(scope="module")
def demos(dataset: EvalDataset) -> Demonstrations:
    return discrete_demonstrations(dataset)


@pytest.fixture(scope="module")
def sec_policy(dataset: EvalDataset, demos: Demonstrations) -> ClonedPolicy:
    kwargs = cloned_variants(make_settings())["sec"]
    return train_cloned(dataset, make_settings(), demonstrations=demos, seed=0, epochs=30, **kwargs)


def level_states(demos: Demonstrations, level: int) -> torch.Tensor:
    return demos.states[(demos.levels == level) & demos.expert]


def batch(states: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    return states, torch.full((states.shape[0],), level, dtype=torch.long)


# --- demonstrations ------------------------------------------------------------------------


def test_discrete_demonstrations_levels_and_experts(demos):
    assert len(demos) == 450
    assert demos.level_counts() == [150, 150, 150]
    assert int(demos.expert.sum()) == 300
    assert demos.boundaries == tuple(BOUNDARIES)
    torch.testing.assert_close(demos.actions.sum(dim=1), torch.ones(450))


def test_discrete_demonstrations_skip_days_without_action():
    days = synthetic_days(rows_per_level=3, seed=0)
    days.loc[0, action_columns(N_CLUSTERS)] = 0.0
    demos = discrete_demonstrations(make_dataset(days))
    assert len(demos) == 8


def test_discrete_demonstrations_use_only_train_days():
    days = synthetic_days(rows_per_level=3, seed=0)
    days.loc[:2, "split"] = "test"
    assert len(discrete_demonstrations(make_dataset(days))) == 6


def test_censored_day_is_never_expert():
    gaps = torch.tensor([1.0, 3.0, 3.5, math.nan, 10.0])
    assert is_expert(gaps).tolist() == [True, True, False, False, False]


def test_unrated_user_is_level_zero():
    levels = levels_of_scores([0.9, 0.9, 0.5, 0.1], [1.0, 0.0, 1.0, 1.0], BOUNDARIES)
    assert levels.tolist() == [2, 0, 1, 0]


def test_demonstrations_reject_level_out_of_range(demos):
    with pytest.raises(ValueError, match="levels must be in"):
        Demonstrations(
            action_type=DISCRETE,
            states=demos.states[:2],
            actions=demos.actions[:2],
            levels=torch.tensor([0, 3]),
            gap_days=demos.gap_days[:2],
            expert=demos.expert[:2],
            boundaries=demos.boundaries,
        )


# --- random, popular, fixed ----------------------------------------------------------------


def test_random_discrete_is_uniform():
    policy = RandomPolicy(DISCRETE, n_clusters=N_CLUSTERS)
    actions = policy.act(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), torch.Generator())
    assert actions.shape == (4, N_CLUSTERS)
    torch.testing.assert_close(actions, torch.full((4, N_CLUSTERS), 1 / N_CLUSTERS))


def test_random_continuous_is_seeded_and_bounded():
    policy = RandomPolicy(CONTINUOUS)
    states, levels = torch.zeros(500, 3), torch.zeros(500, dtype=torch.long)
    first = policy.act(states, levels, torch.Generator().manual_seed(5))
    again = policy.act(states, levels, torch.Generator().manual_seed(5))
    other = policy.act(states, levels, torch.Generator().manual_seed(6))
    assert first.shape == (500, FUSION_WEIGHTS)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert float(first.min()) >= -1.0
    assert float(first.max()) <= 1.0
    assert float(first.min()) < -0.9
    assert float(first.max()) > 0.9


def test_random_discrete_needs_cluster_count():
    with pytest.raises(ValueError, match="n_clusters"):
        RandomPolicy(DISCRETE)


def test_cluster_popularity_skips_unknown_videos():
    popularity = cluster_popularity([5, 1, 2, 100], [0, 1, 0, -1], n_clusters=3)
    assert popularity.tolist() == [7.0, 1.0, 0.0]


def test_popular_policy_follows_train_popularity(dataset):
    policy = PopularPolicy.from_dataset(dataset)
    actions = policy.act(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.Generator())
    # Videos 0..17 have popularity v and cluster v % 5; videos 18 and 19 have no cluster.
    expected = torch.tensor([sum(range(c, 18, N_CLUSTERS)) for c in range(N_CLUSTERS)])
    expected = (expected / expected.sum()).to(torch.float32)
    assert actions.shape == (3, N_CLUSTERS)
    torch.testing.assert_close(actions, expected.expand(3, -1))


def test_popular_policy_rejects_zero_popularity():
    with pytest.raises(ValueError, match="sums to 0"):
        PopularPolicy(torch.zeros(4))


def test_fixed_weights_policy_repeats_weights():
    weights = torch.linspace(-1, 1, FUSION_WEIGHTS)
    policy = FixedWeightsPolicy(weights, name="fixed")
    actions = policy.act(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.Generator())
    assert torch.equal(actions, weights.expand(2, -1))


# --- cloned policies -----------------------------------------------------------------------


def test_sec_heads_learn_level_preferences(sec_policy, demos):
    for level in range(LEVELS):
        states, levels = batch(level_states(demos, level), level)
        actions = sec_policy.act(states, levels, torch.Generator())
        assert actions.shape == (states.shape[0], N_CLUSTERS)
        torch.testing.assert_close(actions.sum(dim=1), torch.ones(states.shape[0]))
        assert actions.mean(dim=0).argmax().item() == PREFERRED[level], level


def test_sec_clones_experts_only_but_bc_clones_all(dataset, demos):
    settings = make_settings()
    variants = cloned_variants(settings)
    bc = train_cloned(dataset, settings, demonstrations=demos, seed=0, epochs=30, **variants["bc"])
    sec = train_cloned(
        dataset,
        settings,
        demonstrations=demos,
        seed=0,
        epochs=30,
        **variants["sec_no_stratification"],
    )
    states, levels = demos.states, demos.levels
    bc_share = bc.act(states, levels, torch.Generator())[:, NON_EXPERT_CLUSTER].mean()
    sec_share = sec.act(states, levels, torch.Generator())[:, NON_EXPERT_CLUSTER].mean()
    assert bc.training_rows == [450]
    assert sec.training_rows == [300]
    assert float(bc_share) > 0.2
    assert float(sec_share) < 0.1


def test_top_level_cloning_prefers_top_cluster(dataset, demos):
    settings = make_settings()
    kwargs = cloned_variants(settings)["bc_top"]
    policy = train_cloned(dataset, settings, demonstrations=demos, seed=0, epochs=30, **kwargs)
    states, levels = batch(level_states(demos, 0), 0)
    actions = policy.act(states, levels, torch.Generator())
    assert policy.training_rows == [100]
    assert actions.mean(dim=0).argmax().item() == PREFERRED[LEVELS - 1]


def test_entropy_term_raises_predicted_entropy(dataset, demos):
    entropies = []
    for weight in (0.0, 0.5):
        policy = train_cloned(
            dataset,
            make_settings(),
            name=f"entropy-{weight}",
            levels=LEVELS,
            entropy_weight=weight,
            demonstrations=demos,
            seed=0,
            epochs=20,
        )
        probs = policy.act(demos.states, demos.levels, torch.Generator())
        entropies.append(float(-(probs * probs.log()).sum(dim=1).mean()))
    assert entropies[1] > entropies[0] + 0.05


def test_selection_shares_are_reported(sec_policy, demos):
    assert sec_policy.adaptive_selection
    states, levels = demos.states, demos.levels
    sec_policy.act(states, levels, torch.Generator())
    selected = sec_policy.last_selected_levels
    assert selected is not None
    assert selected.shape == (len(demos),)
    assert bool((selected <= levels).all())
    shares = torch.bincount(selected, minlength=LEVELS) / len(demos)
    assert math.isclose(float(shares.sum()), 1.0)
    # Users sit near their own level's experts, so most keep their historical level.
    assert float((selected == levels).float().mean()) > 0.8


def test_selection_falls_back_for_unfamiliar_state(sec_policy, demos):
    far = demos.states[:1] + 50.0
    sec_policy.act(far, torch.tensor([2]), torch.Generator())
    assert sec_policy.last_selected_levels.tolist() == [0]


def test_historical_level_picks_head_without_selection(dataset, demos):
    policy = train_cloned(
        dataset,
        make_settings(),
        name="sec-fixed",
        levels=LEVELS,
        entropy_weight=0.0,
        demonstrations=demos,
        seed=0,
        epochs=30,
    )
    states = level_states(demos, 0)
    for level in range(LEVELS):
        actions = policy.act(*batch(states, level), torch.Generator())
        assert actions.mean(dim=0).argmax().item() == PREFERRED[level]
    assert policy.last_selected_levels is None


def test_training_is_deterministic(dataset, demos):
    kwargs = cloned_variants(make_settings())["sec"]
    policies = [
        train_cloned(dataset, make_settings(), demonstrations=demos, seed=3, epochs=2, **kwargs)
        for _ in range(2)
    ]
    first, second = (policy.model.state_dict() for policy in policies)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert policies[0].selector == policies[1].selector
    actions = [policy.act(demos.states, demos.levels, torch.Generator()) for policy in policies]
    assert torch.equal(actions[0], actions[1])


def test_training_leaves_global_rng_alone(dataset, demos):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_cloned(
        dataset,
        make_settings(),
        name="bc",
        levels=1,
        entropy_weight=0.0,
        stratified=False,
        demonstrations=demos,
        seed=0,
        epochs=1,
    )
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"levels": 2}, "one head per demonstration level"),
        ({"levels": 3, "stratified": False}, "unstratified cloning trains one head"),
        ({"levels": 1, "adaptive_selection": True, "stratified": False}, "needs levels > 1"),
        ({"levels": 2, "only_level": 2}, "only_level trains one head"),
        ({"levels": 1, "only_level": 5}, "only_level must be in"),
        ({"levels": 3, "action_type": CONTINUOUS}, "continuous cloning needs demonstrations"),
    ],
)
def test_train_cloned_rejects_contradictions(dataset, demos, kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_cloned(
            dataset,
            make_settings(),
            name="x",
            entropy_weight=0.0,
            epochs=1,
            demonstrations=demos if "action_type" not in kwargs else None,
            **kwargs,
        )


# --- continuous cloning --------------------------------------------------------------------


def continuous_demos(rows_per_level: int, seed: int) -> Demonstrations:
    """Level k's experts use weights ``TARGETS[k]`` plus small noise."""
    generator = torch.Generator().manual_seed(seed)
    n_features = len(feature_names(N_CLUSTERS))
    states, actions, levels = [], [], []
    for level in range(LEVELS):
        level_states = torch.randn(rows_per_level, n_features, generator=generator) * 0.3 + level
        noise = torch.randn(rows_per_level, FUSION_WEIGHTS, generator=generator) * 0.05
        states.append(level_states)
        actions.append((CONTINUOUS_TARGETS[level] + noise).clamp(-1, 1))
        levels.append(torch.full((rows_per_level,), level, dtype=torch.long))
    count = rows_per_level * LEVELS
    return Demonstrations(
        action_type=CONTINUOUS,
        states=torch.cat(states),
        actions=torch.cat(actions),
        levels=torch.cat(levels),
        gap_days=torch.ones(count),
        expert=torch.ones(count, dtype=torch.bool),
        boundaries=tuple(BOUNDARIES),
    )


CONTINUOUS_TARGETS = torch.tensor(
    [
        [0.8, 0.2, 0.0, 0.0, 0.0, 0.0, -0.5],
        [0.2, 0.8, 0.3, 0.0, 0.0, 0.0, -0.5],
        [0.5, 0.5, 0.6, 0.2, 0.2, 0.2, -0.9],
    ]
)


def test_continuous_sec_learns_level_weights(dataset):
    demos = continuous_demos(rows_per_level=150, seed=0)
    kwargs = cloned_variants(make_settings())["sec"]
    policy = train_cloned(
        dataset,
        make_settings(),
        action_type=CONTINUOUS,
        demonstrations=demos,
        seed=0,
        epochs=30,
        **{**kwargs, "entropy_weight": 0.0},
    )
    for level in range(LEVELS):
        states, levels = batch(demos.states[demos.levels == level], level)
        actions = policy.act(states, levels, torch.Generator())
        assert actions.shape == (states.shape[0], FUSION_WEIGHTS)
        assert float(actions.abs().max()) <= 1.0
        error = (actions.mean(dim=0) - CONTINUOUS_TARGETS[level]).abs().max()
        assert float(error) < 0.1, level


def test_nuclear_norm_term_spreads_continuous_actions(dataset):
    demos = continuous_demos(rows_per_level=100, seed=1)
    norms = []
    for weight in (0.0, 0.5):
        policy = train_cloned(
            dataset,
            make_settings(),
            name="nuclear",
            levels=1,
            stratified=False,
            entropy_weight=weight,
            action_type=CONTINUOUS,
            demonstrations=demos,
            seed=0,
            epochs=20,
        )
        actions = policy.act(demos.states, demos.levels, torch.Generator())
        norms.append(float(nuclear_norm(actions)))
    assert norms[1] > norms[0]


def test_continuous_demonstrations_rejected_for_discrete(dataset):
    demos = continuous_demos(rows_per_level=5, seed=0)
    with pytest.raises(ValueError, match="demonstrations are continuous"):
        train_cloned(
            dataset,
            make_settings(),
            name="x",
            levels=1,
            entropy_weight=0.0,
            stratified=False,
            demonstrations=demos,
            epochs=1,
        )
