"""A user simulator fitted to the log: how users respond to videos, end days and come back.

Three PyTorch models, fitted on the train days of an ``EvalDataset`` only:

- Response: the probability of each of the seven feedback signals for one shown video, given the
  user's state and the video (its standardised clustering features, cluster one-hot, log train
  popularity and a learned embedding). One network with seven sigmoid outputs, trained with
  binary cross-entropy. Two more outputs give the mean capped watch ratio of a view with and
  without a long view, so simulated impressions carry a play time.
- Leave: the probability that the user-day ends after a request, given the state, the request's
  feedback per shown video and the request's index in the day.
- Return: a discrete-time hazard model of the return gap in days. Output ``k`` (days 1 to 9) is
  the probability ``h_k`` that the user returns on day ``k`` given no return before, and the
  last bin ("10 or more") takes the remaining mass. Censored user-days enter the likelihood only
  through the survival term ``prod_{j <= c} (1 - h_j)``.

Every random draw uses a local ``torch.Generator`` seeded from the ``seed`` argument, and layers
are built with ``torch.nn.utils.skip_init`` and initialised from that generator, so fitting
neither reads nor advances the global random state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from sec_online.evaluation.dataset import GAP_CAP_DAYS, TEST, TRAIN, EvalDataset, day_rate_columns
from sec_online.evaluation.metrics import roc_auc, total_variation
from sec_online.model import FeatureNormalizer
from sec_online.schemas import FEEDBACK_SIGNALS
from sec_online.userstate import WATCH_RATIO_CAP

logger = logging.getLogger(__name__)

SIMULATOR_FORMAT = "user-simulator/1"
N_SIGNALS = len(FEEDBACK_SIGNALS)
LONG_VIEW = FEEDBACK_SIGNALS.index("long_view")
# Hazard outputs for gap days 1..9; the tenth bin of a distribution is "10 or more".
N_HAZARDS = GAP_CAP_DAYS - 1
# Day aggregates: log1p(requests), the seven signal rates per impression, mean watch ratio.
N_AGGREGATES = 2 + N_SIGNALS
# Leave model inputs beside the state: feedback per shown video and two request index terms.
N_LEAVE_EXTRA = N_SIGNALS + 2
VIDEO_EMBEDDING_SIZE = 16
RESPONSE_HIDDEN = (128, 64)
HIDDEN = 64
WEIGHT_DECAY = 1e-5
EMBEDDING_INIT_STD = 0.1
PREDICT_CHUNK = 8192
DEFAULT_MAX_REQUESTS = 30


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads of torch, then restore the previous count.

    The simulator's networks are small (at most 128 units, batches of a few hundred rows), so
    extra threads gain little and cost a lot on a busy machine. On a loaded 2-core machine, one
    Adam step of the leave model took 72 ms with 2 threads and 3 ms with 1. One thread also
    removes the thread count as a source of float differences between machines.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def day_aggregates(
    requests: torch.Tensor,
    impressions: torch.Tensor,
    signal_sums: torch.Tensor,
    watch_sums: torch.Tensor,
) -> torch.Tensor:
    """Build the day feedback vector ``[B, G]`` that the return model reads.

    The vector is ``log1p(requests)``, the seven signal counts per impression and the mean
    capped watch ratio. The impression count only divides: logged requests show about one
    video, simulated ones show a slate, so counts of impressions would put simulated days
    outside the range the model was fitted on, while rates per impression stay comparable.

    Parameters
    ----------
    requests, impressions
        ``[B]`` counts of the day's requests and shown videos.
    signal_sums
        ``[B, 7]`` number of shown videos with each signal, in ``FEEDBACK_SIGNALS`` order.
    watch_sums
        ``[B]`` sum of the capped watch ratios of the shown videos.
    """
    impressions = impressions.to(torch.float32).clamp(min=1.0)  # [B]
    rates = signal_sums.to(torch.float32) / impressions[:, None]  # [B, 7]
    watch = watch_sums.to(torch.float32) / impressions  # [B]
    return torch.cat(
        [torch.log1p(requests.to(torch.float32))[:, None], rates, watch[:, None]], dim=1
    )


def logged_day_aggregates(days: pd.DataFrame) -> torch.Tensor:
    """``day_aggregates`` of ``EvalDataset.days`` rows, ``[D, G]``."""
    impressions = torch.tensor(days["impressions"].to_numpy(dtype=np.float64))
    rates = torch.tensor(days[day_rate_columns()].to_numpy(dtype=np.float64))
    watch = torch.tensor(days["day_watch_ratio"].to_numpy(dtype=np.float64))
    return day_aggregates(
        torch.tensor(days["requests"].to_numpy(dtype=np.float64)),
        impressions,
        rates * impressions[:, None],
        watch * impressions,
    )


def hazard_distribution(logits: torch.Tensor) -> torch.Tensor:
    """Gap distribution ``[B, 10]`` over days 1..9 and "10 or more" from hazard logits ``[B, 9]``.

    ``P(gap = k) = h_k * prod_{j < k} (1 - h_j)`` and ``P(gap >= 10) = prod_{j <= 9} (1 - h_j)``,
    computed in log space. The terms telescope, so each row sums to 1.
    """
    log_hazard = F.logsigmoid(logits)  # [B, 9]
    log_survival = torch.cumsum(F.logsigmoid(-logits), dim=1)  # [B, 9], log S_k
    before = F.pad(log_survival[:, :-1], (1, 0))  # [B, 9], log S_{k-1} with S_0 = 1
    log_probs = torch.cat([log_hazard + before, log_survival[:, -1:]], dim=1)  # [B, 10]
    return log_probs.exp()


def hazard_log_likelihood(
    logits: torch.Tensor, gap_days: torch.Tensor, censored_at: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood ``[B]`` of observed or right-censored return gaps under hazard logits.

    Parameters
    ----------
    logits
        ``[B, 9]`` hazard logits for gap days 1..9.
    gap_days
        ``[B]`` float: the observed gap in 1..10 ("10" is "10 or more"), NaN when censored.
    censored_at
        ``[B]`` float: for a censored row, the number of days ``c >= 0`` the gap is known to
        exceed; ignored where ``gap_days`` is observed.

    Notes
    -----
    An observed gap ``g < 10`` contributes ``log h_g + sum_{j < g} log(1 - h_j)``, a gap of 10
    or more ``sum_{j <= 9} log(1 - h_j)``. A gap censored at ``c`` contributes only the survival
    term ``sum_{j <= min(c, 9)} log(1 - h_j)``, so ``c = 0`` contributes nothing.
    """
    censored = torch.isnan(gap_days)  # [B]
    days = torch.arange(1, N_HAZARDS + 1, dtype=torch.float32)  # [9], day j of hazard j
    gap = torch.nan_to_num(gap_days.to(torch.float32), nan=0.0)[:, None]  # [B, 1]
    horizon = torch.nan_to_num(censored_at.to(torch.float32), nan=0.0)[:, None]  # [B, 1]
    event = (~censored[:, None]) & (days[None, :] == gap)  # [B, 9], all False for gap 10
    survived = torch.where(censored[:, None], days[None, :] <= horizon, days[None, :] < gap)
    terms = event * F.logsigmoid(logits) + survived * F.logsigmoid(-logits)  # [B, 9]
    return terms.sum(dim=1)


class ResponseModel(nn.Module):
    """Signal logits ``[B, S, 7]`` and watch ratios ``[B, S, 2]`` of slates of video rows.

    The video table ``video_inputs`` ``[V, Dv + A + 1]`` (clustering features, cluster one-hot,
    standardised log1p train popularity) is a buffer, so it travels with the weights.
    """

    def __init__(
        self,
        n_features: int,
        n_videos: int,
        video_input_size: int,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.normalizer = FeatureNormalizer(n_features)
        self.register_buffer("video_inputs", torch.zeros(n_videos, video_input_size))
        self.embedding = nn.utils.skip_init(nn.Embedding, n_videos, VIDEO_EMBEDDING_SIZE)
        nn.init.normal_(self.embedding.weight, std=EMBEDDING_INIT_STD, generator=generator)
        width = n_features + video_input_size + VIDEO_EMBEDDING_SIZE
        self.net = _mlp([width, *RESPONSE_HIDDEN, N_SIGNALS + 2], generator)

    def forward(
        self, states: torch.Tensor, videos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return signal logits ``[B, S, 7]`` and watch ratios ``[B, S, 2]`` in [0, cap]."""
        state = self.normalizer(states)  # [B, F]
        video = torch.cat([self.video_inputs[videos], self.embedding(videos)], dim=-1)
        state = state[:, None, :].expand(-1, videos.shape[1], -1)  # [B, S, F]
        out = self.net(torch.cat([state, video], dim=-1))  # [B, S, 9]
        watch = WATCH_RATIO_CAP * torch.sigmoid(out[..., N_SIGNALS:])  # [B, S, 2]
        return out[..., :N_SIGNALS], watch


class LeaveModel(nn.Module):
    """Logit ``[B]`` of the user-day ending after a request."""

    def __init__(self, n_features: int, generator: torch.Generator) -> None:
        super().__init__()
        self.normalizer = FeatureNormalizer(n_features)
        self.net = _mlp([n_features + N_LEAVE_EXTRA, HIDDEN, HIDDEN, 1], generator)

    def forward(
        self, states: torch.Tensor, feedback_per_video: torch.Tensor, request_index: torch.Tensor
    ) -> torch.Tensor:
        """Return the leave logit ``[B]``; ``feedback_per_video`` is ``[B, 7]`` in [0, 1]."""
        index = request_index.to(torch.float32)[:, None]  # [B, 1]
        extra = torch.cat([feedback_per_video, torch.log1p(index), 1.0 / (1.0 + index)], dim=1)
        return self.net(torch.cat([self.normalizer(states), extra], dim=1)).squeeze(1)


class ReturnModel(nn.Module):
    """Hazard logits ``[B, 9]`` of the return gap given day-start state and day aggregates."""

    def __init__(self, n_features: int, generator: torch.Generator) -> None:
        super().__init__()
        self.normalizer = FeatureNormalizer(n_features)
        self.aggregate_normalizer = FeatureNormalizer(N_AGGREGATES)
        self.net = _mlp([n_features + N_AGGREGATES, HIDDEN, HIDDEN, N_HAZARDS], generator)

    def forward(self, states: torch.Tensor, aggregates: torch.Tensor) -> torch.Tensor:
        """Return hazard logits ``[B, 9]``."""
        inputs = [self.normalizer(states), self.aggregate_normalizer(aggregates)]
        return self.net(torch.cat(inputs, dim=1))


class UserSimulator:
    """The response, leave and return models of one fitted simulator.

    Build one with :meth:`fit` or :meth:`load`. Prediction methods run without gradients in
    evaluation mode and accept any batch size ``B``.

    Attributes
    ----------
    video_ids
        ``[V]`` int64 video ids of the rows that ``videos`` arguments index.
    training
        What fitting did: rows, epochs, final losses and seconds per model.
    """

    def __init__(
        self,
        response: ResponseModel,
        leave: LeaveModel,
        returns: ReturnModel,
        video_ids: np.ndarray,
        config: dict[str, int],
        training: dict[str, Any] | None = None,
    ) -> None:
        self.response = response.eval()
        self.leave = leave.eval()
        self.returns = returns.eval()
        self.video_ids = np.asarray(video_ids, dtype=np.int64)
        self.config = dict(config)
        self.training = training or {}

    @property
    def n_features(self) -> int:
        """Width ``F`` of the state vectors."""
        return self.config["n_features"]

    @property
    def n_clusters(self) -> int:
        """Number ``A`` of video clusters."""
        return self.config["n_clusters"]

    @property
    def n_videos(self) -> int:
        """Number ``V`` of video rows."""
        return self.config["n_videos"]

    @classmethod
    def fit(
        cls,
        dataset: EvalDataset,
        seed: int = 0,
        epochs: int = 8,
        *,
        batch_size: int = 512,
        learning_rate: float = 1e-3,
    ) -> UserSimulator:
        """Fit the three models on the train days of ``dataset``.

        Parameters
        ----------
        dataset
            The evaluation dataset; only rows with ``split == "train"`` are used.
        seed
            Seed of the layer initialisation and of the batch order.
        epochs
            Passes over the train rows of each model.
        batch_size, learning_rate
            Adam mini-batch size and step size.

        Raises
        ------
        ValueError
            When the dataset has no train impressions, requests or days.
        """
        if epochs < 1 or batch_size < 1:
            raise ValueError(
                f"epochs and batch_size must be at least 1, got {epochs}, {batch_size}"
            )
        seeds = np.random.SeedSequence(seed).generate_state(3).tolist()
        config = {
            "n_features": dataset.n_features,
            "n_clusters": dataset.n_clusters,
            "n_videos": dataset.n_videos,
            "video_input_size": dataset.video_matrix.shape[1] + dataset.n_clusters + 1,
        }
        options = {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate}
        with torch_threads(1):
            response, response_info = _fit_response(dataset, config, seeds[0], options)
            leave, leave_info = _fit_leave(dataset, seeds[1], options)
            returns, return_info = _fit_return(dataset, seeds[2], options)
        training = {"seed": seed, "response": response_info, "leave": leave_info}
        training["return"] = return_info
        return cls(response, leave, returns, dataset.video_ids, config, training)

    @torch.no_grad()
    def response_probs(self, states: torch.Tensor, videos: torch.Tensor) -> torch.Tensor:
        """Probability of each signal for each shown video, ``[B, S, 7]``.

        Parameters
        ----------
        states
            ``[B, F]`` float32 user states.
        videos
            ``[B, S]`` long video rows of the dataset's video arrays.
        """
        self._check_states(states)
        self._check_videos(videos, states.shape[0])
        logits, _ = self.response(states, videos)
        return torch.sigmoid(logits)

    @torch.no_grad()
    def watch_ratios(
        self, states: torch.Tensor, videos: torch.Tensor, long_view: torch.Tensor
    ) -> torch.Tensor:
        """Mean capped watch ratio ``[B, S]`` of each shown video given its long view (0/1)."""
        self._check_states(states)
        self._check_videos(videos, states.shape[0])
        _, watch = self.response(states, videos)  # [B, S, 2]
        index = (long_view > 0.5).long()[..., None]  # [B, S, 1]
        return watch.gather(-1, index).squeeze(-1)

    @torch.no_grad()
    def sample_responses(
        self, states: torch.Tensor, videos: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw feedback for shown videos with one pass of the response model.

        Returns
        -------
        tuple of torch.Tensor
            Signals ``[B, S, 7]`` (float 0/1, Bernoulli draws of :meth:`response_probs`) and
            the watch ratios ``[B, S]`` that go with each draw's long view.
        """
        self._check_states(states)
        self._check_videos(videos, states.shape[0])
        logits, watch = self.response(states, videos)  # [B, S, 7], [B, S, 2]
        signals = torch.bernoulli(torch.sigmoid(logits), generator=generator)
        index = signals[..., LONG_VIEW].long()[..., None]  # [B, S, 1]
        return signals, watch.gather(-1, index).squeeze(-1)

    @torch.no_grad()
    def leave_prob(
        self,
        states: torch.Tensor,
        feedback: torch.Tensor,
        request_index: torch.Tensor,
        slate_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Probability ``[B]`` that the user-day ends after this request.

        Parameters
        ----------
        states
            ``[B, F]`` states at the request's start.
        feedback
            ``[B, 7]`` the request's signals summed over its slate.
        request_index
            ``[B]`` 0-based index of the request in its user-day.
        slate_sizes
            ``[B]`` videos shown in the request, 1 when ``None``. The model reads feedback per
            shown video: logged requests show one video 93% of the time, so sums over a
            larger simulated slate would lie outside the fitted range.
        """
        self._check_states(states)
        batch = states.shape[0]
        _check_shape("feedback", feedback, (batch, N_SIGNALS))
        _check_shape("request_index", request_index, (batch,))
        sizes = torch.ones(batch) if slate_sizes is None else slate_sizes.to(torch.float32)
        _check_shape("slate_sizes", sizes, (batch,))
        per_video = feedback.to(torch.float32) / sizes.clamp(min=1.0)[:, None]
        return torch.sigmoid(self.leave(states, per_video, request_index))

    @torch.no_grad()
    def return_distribution(self, states: torch.Tensor, aggregates: torch.Tensor) -> torch.Tensor:
        """Return-gap distribution ``[B, 10]`` over days 1..9 and "10 or more"; rows sum to 1.

        Parameters
        ----------
        states
            ``[B, F]`` states at the first request of the day.
        aggregates
            ``[B, G]`` the day's feedback from :func:`day_aggregates`.
        """
        self._check_states(states)
        _check_shape("aggregates", aggregates, (states.shape[0], N_AGGREGATES))
        return hazard_distribution(self.returns(states, aggregates.to(torch.float32)))

    def validate(
        self, dataset: EvalDataset, seed: int = 0, *, max_requests: int = DEFAULT_MAX_REQUESTS
    ) -> dict[str, Any]:
        """Compare the simulator with the logged days; every figure is a JSON value.

        Returns
        -------
        dict
            ``auc``: ROC AUC of each signal on test impressions (``None`` when a signal has one
            class only), with the mean predicted and observed rates. ``return_gap``: per split,
            the shares of observed gaps 1..10, real and simulated, and their total variation
            distance. ``session_length``: per split, the mean requests per user-day, real and
            simulated. Each entry has a ``note`` on what it can and cannot tell.
        """
        generator = torch.Generator().manual_seed(seed)
        self.check_dataset(dataset)
        with torch_threads(1):
            return {
                "auc": self._validate_response(dataset),
                "return_gap": {
                    split: self._validate_gaps(dataset, split, generator) for split in (TRAIN, TEST)
                },
                "session_length": {
                    split: self._validate_lengths(dataset, split, max_requests, generator)
                    for split in (TRAIN, TEST)
                },
            }

    def save(self, path: Path | str) -> None:
        """Write the weights, configuration and training summary to one ``torch.save`` file."""
        payload = {
            "format": SIMULATOR_FORMAT,
            "config": self.config,
            "video_ids": torch.as_tensor(self.video_ids),
            "response": self.response.state_dict(),
            "leave": self.leave.state_dict(),
            "return": self.returns.state_dict(),
            "training": self.training,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, path)

    @classmethod
    def load(cls, path: Path | str) -> UserSimulator:
        """Read a simulator written by :meth:`save`.

        Raises
        ------
        ValueError
            When the file is not a simulator of this format.
        """
        try:
            payload = torch.load(Path(path), weights_only=True)
        except (OSError, RuntimeError, EOFError) as exc:
            raise ValueError(f"cannot read a user simulator from {path}: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != SIMULATOR_FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise ValueError(f"{path} contains {found!r}, expected a {SIMULATOR_FORMAT!r} file")
        config = payload["config"]
        generator = torch.Generator().manual_seed(0)  # weights are overwritten below
        response = ResponseModel(
            config["n_features"], config["n_videos"], config["video_input_size"], generator
        )
        leave = LeaveModel(config["n_features"], generator)
        returns = ReturnModel(config["n_features"], generator)
        response.load_state_dict(payload["response"])
        leave.load_state_dict(payload["leave"])
        returns.load_state_dict(payload["return"])
        video_ids = payload["video_ids"].numpy()
        return cls(response, leave, returns, video_ids, config, payload["training"])

    def check_dataset(self, dataset: EvalDataset) -> None:
        """Raise ``ValueError`` unless ``dataset`` has the videos and features of the fit."""
        if not np.array_equal(dataset.video_ids, self.video_ids):
            raise ValueError(
                f"the dataset has {dataset.n_videos} videos that differ from the simulator's "
                f"{self.n_videos}; use the dataset the simulator was fitted on"
            )
        if dataset.n_features != self.n_features:
            raise ValueError(
                f"the dataset has {dataset.n_features} state features, the simulator "
                f"{self.n_features}; use the dataset the simulator was fitted on"
            )

    def _validate_response(self, dataset: EvalDataset) -> dict[str, Any]:
        impressions = dataset.impressions.loc[dataset.impressions["day"] >= dataset.split_day]
        if impressions.empty:
            return {"note": "no test impressions"}
        probs = self._impression_probs(dataset, impressions)  # [N, 7]
        labels = impressions[list(FEEDBACK_SIGNALS)].to_numpy()
        result: dict[str, Any] = {}
        for j, name in enumerate(FEEDBACK_SIGNALS):
            auc = roc_auc(labels[:, j], probs[:, j])
            result[name] = {
                "auc": None if math.isnan(auc) else round(auc, 4),
                "predicted_rate": round(float(probs[:, j].mean()), 5),
                "observed_rate": round(float(labels[:, j].mean()), 5),
                "positives": int(labels[:, j].sum()),
            }
        result["impressions"] = len(impressions)
        result["note"] = (
            "AUC on held-out test-day impressions of logged slates: it tells how well the "
            "model ranks logged videos for a user, not whether its probabilities hold for the "
            "videos a new policy would show"
        )
        return result

    def _impression_probs(self, dataset: EvalDataset, impressions: pd.DataFrame) -> np.ndarray:
        states = dataset.states(dataset.requests)[impressions["request_id"].to_numpy()]
        videos = impressions["video_row"].to_numpy(dtype=np.int64)[:, None]
        chunks = []
        for start in range(0, len(states), PREDICT_CHUNK):
            end = start + PREDICT_CHUNK
            probs = self.response_probs(
                torch.tensor(states[start:end]), torch.tensor(videos[start:end])
            )
            chunks.append(probs[:, 0, :].numpy())
        return np.concatenate(chunks)

    def _validate_gaps(
        self, dataset: EvalDataset, split: str, generator: torch.Generator
    ) -> dict[str, Any]:
        days = dataset.days.loc[dataset.days["split"] == split]
        if days.empty:
            return {"note": f"no {split} days"}
        probs = self.return_distribution(
            torch.tensor(dataset.states(days)), logged_day_aggregates(days)
        )
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1).numpy() + 1
        # A gap is observed only when the next active day falls inside the log. The simulated
        # gaps get the same window, so both histograms have the same censoring.
        window = dataset.last_day - days["day"].to_numpy()
        real = days["gap_days"].dropna().to_numpy(dtype=np.int64)
        simulated = sampled[sampled <= window]
        real_shares = _shares(real)
        simulated_shares = _shares(simulated)
        both = real_shares is not None and simulated_shares is not None
        return {
            "user_days": len(days),
            "real_observed": len(real),
            "simulated_observed": len(simulated),
            "real": real_shares,
            "simulated": simulated_shares,
            "total_variation": round(total_variation(real_shares, simulated_shares), 4)
            if both
            else None,
            "note": (
                "shares of gaps of 1..10 days that fall inside the log, real vs sampled for "
                "the same user-days under their logged feedback; it tests the return model "
                "under logged behaviour, not its response to other recommendations, and says "
                "nothing about gaps longer than the log"
            ),
        }

    def _validate_lengths(
        self, dataset: EvalDataset, split: str, max_requests: int, generator: torch.Generator
    ) -> dict[str, Any]:
        days = dataset.days.loc[dataset.days["split"] == split]
        requests = dataset.requests.loc[dataset.requests["split"] == split]
        if days.empty:
            return {"note": f"no {split} days"}
        probs = self._leave_matrix(dataset, days, requests, max_requests)  # [D, M]
        leaves = torch.bernoulli(probs, generator=generator).bool()
        leaves[:, -1] = True  # a user-day ends at max_requests at the latest
        simulated = leaves.int().argmax(dim=1).numpy() + 1
        real = np.minimum(days["requests"].to_numpy(), max_requests)
        return {
            "user_days": len(days),
            "real_mean": round(float(real.mean()), 4),
            "simulated_mean": round(float(simulated.mean()), 4),
            "real_one_request_share": round(float((real == 1).mean()), 4),
            "simulated_one_request_share": round(float((simulated == 1).mean()), 4),
            "max_requests": max_requests,
            "note": (
                "requests per user-day (capped at max_requests), real vs the leave model "
                "rolled out over the logged requests, repeating a day's last request when the "
                "model stays longer than the log; it cannot tell how length reacts to other "
                "slates"
            ),
        }

    def _leave_matrix(
        self, dataset: EvalDataset, days: pd.DataFrame, requests: pd.DataFrame, max_requests: int
    ) -> torch.Tensor:
        """Leave probability ``[D, M]`` at each request index of each logged user-day.

        Index ``i`` of a day uses its logged request ``i`` when there is one, else the day's
        last request with index ``i``.
        """
        feedback = torch.tensor(requests[list(FEEDBACK_SIGNALS)].to_numpy(dtype=np.float32))
        sizes = torch.tensor(requests["slate_size"].to_numpy(dtype=np.float32))
        states = torch.tensor(dataset.states(requests))
        index = torch.tensor(requests["request_index"].to_numpy(dtype=np.int64))
        logged = self.leave_prob(states, feedback, index, sizes)  # [R]
        day_row = torch.tensor(pd.Index(days.index).get_indexer(requests["day_id"].to_numpy()))
        last = torch.tensor(requests["is_last"].to_numpy(dtype=bool))
        tail = self._tail_leave(states[last], feedback[last], sizes[last], max_requests)
        matrix = torch.empty(len(days), max_requests)
        matrix[day_row[last]] = tail
        inside = index < max_requests
        matrix[day_row[inside], index[inside]] = logged[inside]
        return matrix

    def _tail_leave(
        self, states: torch.Tensor, feedback: torch.Tensor, sizes: torch.Tensor, steps: int
    ) -> torch.Tensor:
        """Leave probability ``[D, steps]`` of repeating each day's last request at every index."""
        chunks = []
        per_chunk = max(1, PREDICT_CHUNK // steps)
        for start in range(0, states.shape[0], per_chunk):
            end = start + per_chunk
            count = states[start:end].shape[0]
            probs = self.leave_prob(
                states[start:end].repeat_interleave(steps, dim=0),
                feedback[start:end].repeat_interleave(steps, dim=0),
                torch.arange(steps).repeat(count),
                sizes[start:end].repeat_interleave(steps, dim=0),
            )
            chunks.append(probs.view(count, steps))
        return torch.cat(chunks) if chunks else torch.empty(0, steps)

    def _check_states(self, states: torch.Tensor) -> None:
        if states.dim() != 2 or states.shape[1] != self.n_features:
            raise ValueError(
                f"states must have shape [B, {self.n_features}], got {tuple(states.shape)}"
            )

    def _check_videos(self, videos: torch.Tensor, batch: int) -> None:
        if videos.dim() != 2 or videos.shape[0] != batch:
            raise ValueError(f"videos must have shape [{batch}, S], got {tuple(videos.shape)}")
        if videos.is_floating_point():
            raise ValueError(f"videos must be a long tensor of video rows, got {videos.dtype}")
        if videos.numel() and (videos.min() < 0 or videos.max() >= self.n_videos):
            raise ValueError(
                f"video rows must be in [0, {self.n_videos}), got {int(videos.min())} to "
                f"{int(videos.max())}"
            )


def _fit_response(
    dataset: EvalDataset, config: dict[str, int], seed: int, options: dict[str, Any]
) -> tuple[ResponseModel, dict[str, Any]]:
    impressions = dataset.impressions.loc[dataset.impressions["day"] < dataset.split_day]
    _require_rows("train impressions", len(impressions))
    generator = torch.Generator().manual_seed(seed)
    model = ResponseModel(
        config["n_features"], config["n_videos"], config["video_input_size"], generator
    )
    model.video_inputs.copy_(_video_inputs(dataset))
    all_states = torch.tensor(dataset.states(dataset.requests))
    request_ids = torch.tensor(impressions["request_id"].to_numpy(dtype=np.int64))
    states = all_states[request_ids]  # [N, F]
    model.normalizer.observe(states)
    videos = torch.tensor(impressions["video_row"].to_numpy(dtype=np.int64))[:, None]
    labels = torch.tensor(impressions[list(FEEDBACK_SIGNALS)].to_numpy(dtype=np.float32))
    watch = torch.tensor(impressions["watch_ratio"].to_numpy(dtype=np.float32))

    def batch_loss(index: torch.Tensor) -> torch.Tensor:
        logits, ratios = model(states[index], videos[index])  # [b, 1, 7], [b, 1, 2]
        bce = F.binary_cross_entropy_with_logits(logits[:, 0], labels[index])
        long_view = labels[index, LONG_VIEW].long()[:, None]  # [b, 1]
        predicted = ratios[:, 0].gather(1, long_view).squeeze(1)
        return bce + F.mse_loss(predicted, watch[index])

    info = _train(model, batch_loss, len(impressions), options, generator, "response")
    return model, info


def _video_inputs(dataset: EvalDataset) -> torch.Tensor:
    """Video table ``[V, Dv + A + 1]``: features, cluster one-hot, standardised log popularity."""
    one_hot = np.zeros((dataset.n_videos, dataset.n_clusters), dtype=np.float32)
    known = dataset.video_cluster >= 0
    one_hot[np.flatnonzero(known), dataset.video_cluster[known]] = 1.0
    popularity = np.log1p(dataset.video_popularity.astype(np.float64))
    std = popularity.std()
    popularity = (popularity - popularity.mean()) / (std if std > 0 else 1.0)
    table = np.concatenate([dataset.video_matrix, one_hot, popularity[:, None]], axis=1)
    return torch.as_tensor(table, dtype=torch.float32)


def _fit_leave(
    dataset: EvalDataset, seed: int, options: dict[str, Any]
) -> tuple[LeaveModel, dict[str, Any]]:
    requests = dataset.requests.loc[dataset.requests["split"] == TRAIN]
    _require_rows("train requests", len(requests))
    generator = torch.Generator().manual_seed(seed)
    model = LeaveModel(dataset.n_features, generator)
    states = torch.tensor(dataset.states(requests))
    model.normalizer.observe(states)
    sizes = requests["slate_size"].to_numpy(dtype=np.float32)[:, None]
    feedback = requests[list(FEEDBACK_SIGNALS)].to_numpy(dtype=np.float32) / sizes
    per_video = torch.as_tensor(feedback)
    index = torch.tensor(requests["request_index"].to_numpy(dtype=np.int64))
    labels = torch.tensor(requests["is_last"].to_numpy(dtype=np.float32))

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        logits = model(states[rows], per_video[rows], index[rows])
        return F.binary_cross_entropy_with_logits(logits, labels[rows])

    info = _train(model, batch_loss, len(requests), options, generator, "leave")
    return model, info


def _fit_return(
    dataset: EvalDataset, seed: int, options: dict[str, Any]
) -> tuple[ReturnModel, dict[str, Any]]:
    days = dataset.days.loc[dataset.days["split"] == TRAIN]
    _require_rows("train user-days", len(days))
    generator = torch.Generator().manual_seed(seed)
    model = ReturnModel(dataset.n_features, generator)
    states = torch.tensor(dataset.states(days))
    aggregates = logged_day_aggregates(days)
    model.normalizer.observe(states)
    model.aggregate_normalizer.observe(aggregates)
    gaps, censored_at = train_window_gaps(days, dataset.split_day)

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        logits = model(states[rows], aggregates[rows])
        return -hazard_log_likelihood(logits, gaps[rows], censored_at[rows]).mean()

    info = _train(model, batch_loss, len(days), options, generator, "return")
    info["censored_share"] = round(float(torch.isnan(gaps).float().mean()), 4)
    return model, info


def train_window_gaps(days: pd.DataFrame, split_day: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaps of train user-days as seen from the train days alone, ``[D]`` each.

    A gap that ends on a test day, or a day without a next active day, is censored at
    ``split_day - 1 - day``: the last train day shows only that the user had not returned yet.
    This keeps test-day activity out of the fit.

    Returns
    -------
    tuple of torch.Tensor
        ``gap_days`` (float, NaN where censored) and ``censored_at`` (float, NaN where observed).
    """
    day = days["day"].to_numpy(dtype=np.float64)
    gap = days["gap_days"].to_numpy(dtype=np.float64)
    observed = ~np.isnan(gap) & (day + gap <= split_day - 1)
    gaps = np.where(observed, gap, np.nan)
    censored_at = np.where(observed, np.nan, split_day - 1 - day)
    return torch.as_tensor(gaps, dtype=torch.float32), torch.as_tensor(
        censored_at, dtype=torch.float32
    )


def _train(
    model: nn.Module,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    rows: int,
    options: dict[str, Any],
    generator: torch.Generator,
    name: str,
) -> dict[str, Any]:
    """Minimise ``batch_loss`` over shuffled mini-batches of row indices with Adam."""
    started = time.monotonic()
    optimizer = torch.optim.Adam(
        model.parameters(), lr=options["learning_rate"], weight_decay=WEIGHT_DECAY
    )
    model.train()
    losses = []
    for epoch in range(options["epochs"]):
        order = torch.randperm(rows, generator=generator)
        total = 0.0
        for start in range(0, rows, options["batch_size"]):
            index = order[start : start + options["batch_size"]]
            loss = batch_loss(index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        losses.append(total / rows)
        logger.debug(
            "%s model epoch %d/%d: loss=%.5f", name, epoch + 1, options["epochs"], losses[-1]
        )
    model.eval()
    seconds = time.monotonic() - started
    logger.info(
        "fitted %s model: rows=%d epochs=%d loss=%.5f seconds=%.1f",
        name,
        rows,
        options["epochs"],
        losses[-1],
        seconds,
    )
    return {
        "rows": rows,
        "losses": [round(loss, 6) for loss in losses],
        "seconds": round(seconds, 2),
    }


def _mlp(widths: list[int], generator: torch.Generator) -> nn.Sequential:
    """ReLU network with the given layer widths, initialised from ``generator``.

    The initialisation matches ``nn.Linear``'s default (Kaiming uniform weights, biases uniform
    in ``±1/sqrt(fan_in)``), drawn from the local generator instead of the global one.
    """
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        linear = nn.utils.skip_init(nn.Linear, fan_in, fan_out)
        nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(linear.bias, -bound, bound, generator=generator)
        layers.append(linear)
        if index < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _shares(gaps: np.ndarray) -> list[float] | None:
    if len(gaps) == 0:
        return None
    counts = np.bincount(gaps - 1, minlength=GAP_CAP_DAYS)[:GAP_CAP_DAYS]
    return [round(float(value), 5) for value in counts / counts.sum()]


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        expected = ", ".join("B" if size < 0 else str(size) for size in shape)
        raise ValueError(f"{name} must have shape [{expected}], got {tuple(tensor.shape)}")


def _require_rows(description: str, count: int) -> None:
    if count == 0:
        raise ValueError(f"the dataset has no {description}; lower split_day or use a longer log")
