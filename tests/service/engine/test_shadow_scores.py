"""The pure parts of shadow traffic, evaluation and per-task metrics, against hand-computed values."""

from __future__ import annotations

import time

import torch

from service.engine.evaluate import calibration_error, score
from service.engine.metrics import OTHER, TaskLabels
from service.engine.shadow import compare


def test_compare_matches_labels_by_name() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    same_agree, same_drift = compare(logits, ["a", "b", "c"], logits, ["a", "b", "c"])
    assert same_agree.tolist() == [True, True] and same_drift.abs().max() < 1e-12
    # the same distributions with the staged version's labels in another order: no drift, full agreement
    permuted = logits[:, [2, 0, 1]]
    agree, drift = compare(logits, ["a", "b", "c"], permuted, ["c", "a", "b"])
    assert agree.tolist() == [True, True] and drift.abs().max() < 1e-12
    # disjoint label sets: total variation 1, never agreeing
    agree, drift = compare(logits, ["a", "b", "c"], logits, ["x", "y", "z"])
    assert agree.tolist() == [False, False] and torch.allclose(drift, torch.ones(2, dtype=drift.dtype))


def test_compare_is_half_the_l1_distance_of_the_softmaxes() -> None:
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    p, q = torch.softmax(a, -1)[0], torch.softmax(b, -1)[0]
    agree, drift = compare(a, ["x", "y"], b, ["x", "y"])
    assert agree.tolist() == [False]
    assert abs(float(drift[0]) - 0.5 * float((p - q).abs().sum())) < 1e-7


def test_calibration_error_by_hand() -> None:
    # 15 bins: 0.95 falls in bin 14 (accuracy 0.5, gap 0.45), 0.55 in bin 8 (accuracy 1, gap 0.45)
    confidence = torch.tensor([0.95, 0.95, 0.55, 0.55])
    correct = torch.tensor([True, False, True, True])
    assert abs(calibration_error(confidence, correct) - 0.45) < 1e-6  # float32 inputs
    assert calibration_error(torch.tensor([1.0]), torch.tensor([True])) == 0.0  # 1.0 is in the last bin


def test_score_confusion_and_per_class() -> None:
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [0, 0, 5.0]])
    truth = torch.tensor([0, 1, 1, 2])
    result = score(logits, truth, ["a", "b", "c"], version=3, current=False)
    assert result.confusion == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert result.accuracy == 0.75
    assert result.per_class_accuracy == {"a": 1.0, "b": 0.5, "c": 1.0}
    empty_class = score(logits[:1], truth[:1], ["a", "b", "c"], version=3, current=False)
    assert empty_class.per_class_accuracy == {"a": 1.0, "b": None, "c": None}


def test_task_labels_keep_the_busiest_and_free_the_others() -> None:
    left: list[str] = []
    labels = TaskLabels(2, left.append, window_s=3600)
    assert [labels.label(n) for n in ("a", "b", "c")] == ["a", "b", OTHER]
    for _ in range(10):
        labels.label("c")
    labels._next = time.monotonic()  # the window ends: rank by traffic
    assert labels.label("c") == "c"
    assert labels.labelled == {"c", "a"} and left == ["b"]
    labels.forget("c")
    assert left == ["b", "c"] and labels.peek("c") == OTHER
