"""Round-robin dealing and interleaving (rl.round_robin), shared by the driver's and the DC-CoT executor's
dispatch over engines and by evaluation's order of benchmark chunks."""

import pytest

from rl.round_robin import deal, interleave


def test_deal_hand_values():
    assert deal([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    assert deal([0, 1, 2, 3, 4], 1) == [[0, 1, 2, 3, 4]]
    assert deal([0, 1], 4) == [[0], [1], [], []]  # more workers than items: the trailing shares are empty
    assert deal([], 3) == [[], [], []]
    with pytest.raises(ValueError, match="at least one"):
        deal([1], 0)


def test_interleave_hand_values():
    assert interleave([[0, 2, 4], [1, 3]]) == [0, 1, 2, 3, 4]
    assert interleave([["a1", "a2", "a3"], ["b1"], ["c1", "c2"]]) == ["a1", "b1", "c1", "a2", "c2", "a3"]
    assert interleave([[], ["b1"]]) == ["b1"]
    assert interleave([]) == []


@pytest.mark.parametrize("n", range(0, 12))
@pytest.mark.parametrize("k", [1, 2, 3, 5, 16])
def test_interleave_undoes_deal(n, k):
    items = [f"r{i}" for i in range(n)]
    assert interleave(deal(items, k)) == items
    # a dispatcher skips empty shares; the answers still come back in request order
    assert interleave([s for s in deal(items, k) if s]) == items


def test_engines_generate_fn_returns_request_order(monkeypatch):
    """The DC-CoT ``generate_fn`` over engine actors, with fake actors that answer each share in order."""
    import ray

    from rollout.engine import engines_generate_fn

    class _Remote:
        def __init__(self, name):
            self.name = name

        def remote(self, prompts, seeds, max_tokens, stops, settings):
            return [(self.name, p, s, m, st) for p, s, m, st in zip(prompts, seeds, max_tokens, stops)]

    class _Engine:
        def __init__(self, name):
            self.generate_tokens = _Remote(name)

    monkeypatch.setattr(ray, "get", lambda futures: futures)  # the fake actors answer at once
    fn = engines_generate_fn([_Engine("e0"), _Engine("e1"), _Engine("e2")], settings=None)
    out = fn([[1], [2], [3], [4], [5]], [10, 20, 30, 40, 50], [7] * 5, [["x"]] * 5)
    assert [o[1:3] for o in out] == [([1], 10), ([2], 20), ([3], 30), ([4], 40), ([5], 50)]
    assert [o[0] for o in out] == ["e0", "e1", "e2", "e0", "e1"]
