"""The uncertainty-aware prediction score and the ranking of the tasks to label next."""

from __future__ import annotations

import math

import pytest

from egm.active_learning import (Candidate, prediction_score, rank_candidates, samples_agreement, unlabeled_filter,
                                 view_for)
from egm.confidence import sample_agreement
from egm.geometry import Box
from egm.parsing import parse_completion
from tests.stack import SAMPLES, batch_job, sample_images
from egm.worker.cache import ResultCache
from egm.worker.engines.base import EngineOutput
from egm.worker.engines.scripted import ScriptedEngine
from egm.worker.batch_processor import BatchProcessor

LOGPROB = -0.2


def test_prediction_score_modes_and_fallbacks():
    boxes = [0.9, 0.5, None]
    assert prediction_score(boxes, None, "logprob") == pytest.approx(0.7)
    assert prediction_score(boxes, 0.4, "logprob") == pytest.approx(0.7)
    assert prediction_score(boxes, 0.4, "samples") == pytest.approx(0.4)
    assert prediction_score(boxes, 0.4, "both") == pytest.approx(0.28)
    # one ingredient missing: the other one
    assert prediction_score([None], 0.4, "logprob") == pytest.approx(0.4)
    assert prediction_score(boxes, None, "samples") == pytest.approx(0.7)
    assert prediction_score([], 0.4, "both") == pytest.approx(0.4)
    assert prediction_score([], None, "both") is None
    with pytest.raises(ValueError):
        prediction_score(boxes, None, "vibes")


def test_samples_agreement_averages_queries_with_two_or_more_answers():
    a, b = Box(0, 0, 10, 10), Box(5, 0, 15, 10)
    assert samples_agreement([[[a]]]) is None  # one answer: nothing to compare
    assert samples_agreement([[[a], [a]]]) == pytest.approx(1.0)
    assert samples_agreement([[[a], [a]], [[a], [b]]]) == pytest.approx((1.0 + a.iou(b)) / 2)


def test_candidates_rank_most_uncertain_first_unscored_last():
    ranked = rank_candidates([Candidate(5, 0.4, {}), Candidate(2, None, {}), Candidate(9, 0.1, {}),
                              Candidate(3, 0.4, {}), Candidate(1, None, {})])
    assert [c.task_id for c in ranked] == [9, 3, 5, 1, 2]


def test_view_filters_to_the_chosen_scores():
    filters, ordering = view_for([Candidate(1, 0.1, {}), Candidate(2, 0.3, {})])
    assert ordering == ["tasks:predictions_score"]
    assert filters["items"][:2] == unlabeled_filter()["items"]
    assert filters["items"][2]["filter"] == "filter:tasks:predictions_score" and filters["items"][2]["value"] == 0.3
    filters, _ = view_for([Candidate(1, 0.1, {}), Candidate(2, None, {})])
    assert len(filters["items"]) == 2  # an unscored task cannot be reached by a score filter


class SamplingEngine(ScriptedEngine):
    """Scripted answers with per-token log-probs; the k-th repeat of a request moves the box right,
    as a sampling model unsure of the object would."""

    def generate(self, requests):
        outputs = super().generate(requests)
        out = []
        for req, o in zip(requests, outputs):
            shift = int(req.request_id.rsplit(":s", 1)[1]) * 40 if ":s" in req.request_id else 0
            parsed = parse_completion(o.text)
            box = parsed.boxes[0].box
            text = o.text.replace(f"[{int(box.x1)}, {int(box.y1)}, {int(box.x2)}, {int(box.y2)}]",
                                  f"[{int(box.x1) + shift}, {int(box.y1)}, {int(box.x2) + shift}, {int(box.y2)}]")
            out.append(EngineOutput(text=text, tokens=list(text), logprobs=[LOGPROB] * len(text)))
        return out


@pytest.fixture()
def redis_settings(egm_env, monkeypatch):
    monkeypatch.setenv("EGM_LOCAL_FILES_ROOT", str(SAMPLES))

    def configure(mode: str, k: int):
        monkeypatch.setenv("EGM_UNCERTAINTY", mode)
        monkeypatch.setenv("EGM_UNCERTAINTY_SAMPLES", str(k))
        from egm.config.settings import reload_settings

        return reload_settings()

    return configure


def _processor(settings, engine):
    from egm.queue import QueueClient

    queue = QueueClient(settings)
    cache = ResultCache(queue.redis, settings.queue_prefix, settings.cache_ttl_s)
    return BatchProcessor(engine, settings, cache=cache)


def _expected_agreement(text: str) -> float:
    box = parse_completion(text).boxes[0].box
    moved = [Box(box.x1 + 40 * n, box.y1, box.x2 + 40 * n, box.y2) for n in (1, 2)]
    return sample_agreement([[box], [moved[0]], [moved[1]]])


def test_logprob_score_needs_no_extra_requests(redis_settings):
    settings = redis_settings("logprob", 3)
    engine = SamplingEngine()
    result = _processor(settings, engine).process(batch_job(sample_images()[:2]))
    assert engine.requests_seen == 2  # K is ignored in logprob mode
    assert all(r.score == pytest.approx(math.exp(LOGPROB)) for r in result.results)


def test_samples_score_is_the_agreement_of_k_answers_and_is_cached(redis_settings):
    settings = redis_settings("samples", 3)
    engine = SamplingEngine()
    processor = _processor(settings, engine)
    first = processor.process(batch_job(sample_images()[:2]))
    assert engine.requests_seen == 6  # K = 3 answers per query
    for r in first.results:
        assert r.status == "ok" and r.score == pytest.approx(_expected_agreement(r.completions[0]))
        assert r.score < 1.0
        assert r.boxes[0].grid == parse_completion(r.completions[0]).boxes[0].box.to_list()  # the kept answer
    again = processor.process(batch_job(sample_images()[:2]))
    assert engine.requests_seen == 6 and all(r.cached for r in again.results)
    assert [r.score for r in again.results] == [r.score for r in first.results]


def test_both_multiplies_logprob_confidence_and_agreement(redis_settings):
    settings = redis_settings("both", 3)
    result = _processor(settings, SamplingEngine()).process(batch_job(sample_images()[:1]))
    (r,) = result.results
    assert r.score == pytest.approx(math.exp(LOGPROB) * _expected_agreement(r.completions[0]))


def test_agreeing_samples_score_one(redis_settings):
    settings = redis_settings("samples", 4)
    result = _processor(settings, ScriptedEngine()).process(batch_job(sample_images()[:1]))
    assert result.results[0].score == pytest.approx(1.0)
