"""Active learning: an uncertainty-aware prediction score, and which tasks to label next.

**Prediction score** (the ``score`` written with every prediction; higher = the model is
surer, so sorting *ascending* puts the most uncertain tasks first). ``EGM_UNCERTAINTY``:

* ``logprob`` (default): ``L`` = mean over the task's boxes of the geometric-mean
  probability of the tokens that wrote each box's four coordinates
  (:func:`egm.confidence.box_scores` / :func:`egm.confidence.task_score`). Free: it
  comes with the answer.
* ``samples``: ``A`` = agreement of K answers per query (``EGM_UNCERTAINTY_SAMPLES``):
  the kept answer and K-1 more (:func:`egm.confidence.sample_agreement`: mean
  matched-IoU of each extra answer against the kept one, 1 = all agree), averaged
  over the task's queries. Costs K-1 extra engine requests per query and only means
  something when the engine samples (``EGM_TEMPERATURE`` > 0).
* ``both``: ``L * A`` - high only when the model is sure of its digits *and* says the
  same thing when asked again.

When one ingredient is missing (an engine without log-probs, K = 1, an answer without
boxes) the score falls back to the other; with neither it is ``None`` (no score).

**Next tasks**: unannotated tasks that have a prediction of the model version, sorted by
that prediction's score ascending (``None`` scores last: nothing to rank them by).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from egm.confidence import sample_agreement, task_score
from egm.geometry import Box

UNCERTAINTY_MODES = ("logprob", "samples", "both")


def samples_agreement(per_query_samples: list[list[list[Box]]]) -> float | None:
    """Mean agreement over queries; each query's list holds K answers (boxes), the kept one first.
    ``None`` when no query has two answers to compare."""
    values = [sample_agreement(samples) for samples in per_query_samples if len(samples) >= 2]
    return sum(values) / len(values) if values else None


def prediction_score(box_scores: list[float | None], agreement: float | None, mode: str) -> float | None:
    if mode not in UNCERTAINTY_MODES:
        raise ValueError(f"unknown uncertainty mode {mode!r}; use one of {', '.join(UNCERTAINTY_MODES)}")
    logprob = task_score(box_scores)
    if mode == "logprob":
        return logprob if logprob is not None else agreement
    if mode == "samples":
        return agreement if agreement is not None else logprob
    if logprob is None or agreement is None:
        return logprob if logprob is not None else agreement
    return logprob * agreement


# --------------------------------------------------------------------------- next tasks


@dataclass
class Candidate:
    task_id: int
    score: float | None
    data: dict


def rank_candidates(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Most uncertain first; unscored last; ties by task id (stable, reproducible)."""
    return sorted(candidates, key=lambda c: (c.score is None, c.score if c.score is not None else 0.0, c.task_id))


def unlabeled_filter() -> dict:
    """Data Manager filter: tasks nobody annotated (or skipped) yet."""
    return {"conjunction": "and", "items": [
        {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
        {"filter": "filter:tasks:cancelled_annotations", "operator": "equal", "type": "Number", "value": 0},
    ]}


def next_candidates(client, project_id: int, model_version: str) -> tuple[list[Candidate], int]:
    """Unlabeled tasks with a prediction of ``model_version``, ranked; and how many have none yet.

    Scores come from the Data Manager's ``predictions_score`` column, which Label Studio
    computes for the project's selected model version: the caller makes sure it is ours."""
    out, unpredicted = [], 0
    for task in client.iter_tasks(project_id, filters=unlabeled_filter(), columns=("predictions_score",)):
        if model_version not in task.model_versions:
            unpredicted += 1
            continue
        score = task.raw.get("predictions_score")
        out.append(Candidate(task_id=task.id, score=float(score) if score is not None else None, data=task.data))
    return rank_candidates(out), unpredicted


def view_for(chosen: list[Candidate]) -> tuple[dict, list[str]]:
    """Filters and ordering of a Data Manager view that lists the chosen tasks, most uncertain first.

    The view is live: unlabeled tasks whose score is at most the last chosen one's, so a
    labelled task drops out and the label stream follows the order."""
    filters = unlabeled_filter()
    scored = [c.score for c in chosen if c.score is not None]
    if scored and len(scored) == len(chosen):
        filters["items"].append({"filter": "filter:tasks:predictions_score", "operator": "less_or_equal",
                                 "type": "Number", "value": max(scored)})
    return filters, ["tasks:predictions_score"]
