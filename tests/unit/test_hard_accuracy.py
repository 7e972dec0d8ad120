"""``eval/hard_accuracy``: held-out accuracy on the problems no sample solved at step 0, by hand, across a resume."""

import json

import numpy as np
import pytest

from trainers.kinds.single_turn import initially_unsolved_accuracy


def test_hard_accuracy_by_hand_and_after_a_resume(tmp_path):
    path = tmp_path / "eval_initial.json"
    ids = ["a", "b", "c", "d"]
    # step 0: a and c unsolved (0 of 2), b and d solved at least once
    step0 = np.array([[0, 0], [1, 0], [0, 0], [1, 1]], dtype=float)
    assert initially_unsolved_accuracy(path, 0, ids, step0) == {"eval/hard_accuracy": 0.0, "eval/hard_problems": 2.0}
    assert json.loads(path.read_text()) == {"ids": ids, "num_samples": 2, "correct": [0, 1, 0, 2]}
    later = np.array([[1, 0], [0, 0], [1, 1], [1, 1]], dtype=float)
    # hard problems a and c: 3 of their 4 samples right now
    assert initially_unsolved_accuracy(path, 10, ids, later) == {"eval/hard_accuracy": pytest.approx(0.75),
                                                                  "eval/hard_problems": 2.0}
    assert not list(tmp_path.glob("*.tmp"))
    # another eval set or sample count: no baseline to compare with
    assert initially_unsolved_accuracy(path, 20, ["a", "b", "c", "e"], later) == {}
    assert initially_unsolved_accuracy(path, 20, ids, later[:, :1]) == {}
    # a resumed run whose step 0 file is gone says nothing rather than guess
    path.unlink()
    assert initially_unsolved_accuracy(path, 30, ids, later) == {}


def test_no_hard_problems_at_step_0(tmp_path):
    path = tmp_path / "eval_initial.json"
    assert initially_unsolved_accuracy(path, 0, ["a"], np.array([[1.0]])) == {"eval/hard_problems": 0.0}
    # a new run into the same folder writes its own step 0
    assert initially_unsolved_accuracy(path, 0, ["a"], np.array([[0.0]]))["eval/hard_problems"] == 1.0
