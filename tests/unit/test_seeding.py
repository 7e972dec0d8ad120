"""Sampling seeds are pinned: these values decide which responses every run samples, so a change to the hash (or to
how a call site builds its key) changes every run's samples and must show up here."""

import pytest

from trainers.kinds.base import request_seed as train_request_seed
from trainers.evaluation import request_seed as eval_request_seed
from rl.seeding import stable_seed
from rollout.dccot import segment_seed
from rollout.multiturn import sampling_seed


def test_training_request_seeds():
    # (run seed, step, prompt slot), SHA-256
    assert [train_request_seed(0, 0, 0), train_request_seed(0, 1, 0), train_request_seed(1234, 7, 3),
            train_request_seed(42, 100, 17)] == [1428933352, 2085219357, 1364777604, 1677031767]


def test_evaluation_problem_seeds():
    # (seed, benchmark, problem id), CRC-32
    assert [eval_request_seed(0, "math500", "p1"), eval_request_seed(1, "math500", "p1"),
            eval_request_seed(0, "aime24", "2024-I-1")] == [1301783197, 1446178546, 729892353]


def test_dccot_segment_and_environment_step_seeds():
    # BLAKE2b (8 bytes)
    assert [segment_seed(0, 0, 0), segment_seed(0, 0, 1), segment_seed(123456, 2, 3)] == [
        487671014, 710833413, 686531746]
    assert [sampling_seed(0, 0, 0, 0, 0), sampling_seed(7, 1, 99, 2, 3)] == [598732073, 1480447700]


def test_stable_seed_is_what_the_call_sites_use():
    assert stable_seed(1234, 7, 3, digest="sha256") == train_request_seed(1234, 7, 3)
    assert stable_seed(0, "math500", "p1", sep="/", digest="crc32") == eval_request_seed(0, "math500", "p1")
    assert stable_seed("dccot", 123456, 2, 3) == segment_seed(123456, 2, 3)
    assert stable_seed(7, 1, 99, 2, 3) == sampling_seed(7, 1, 99, 2, 3)


@pytest.mark.parametrize("digest", ["blake2b", "sha256", "crc32"])
def test_stable_seed_range_and_spread(digest):
    seeds = [stable_seed(0, step, i, digest=digest) for step in range(20) for i in range(50)]
    assert all(0 <= s < 2**31 for s in seeds)
    assert len(set(seeds)) == len(seeds)


def test_unknown_digest_is_an_error():
    with pytest.raises(ValueError, match="blake2b, sha256, crc32"):
        stable_seed(1, digest="md5")
