"""docs/rewards.md shows examples/my_reward.py verbatim, and that example works through the pool."""

from __future__ import annotations

import re
from pathlib import Path

from rewards import RewardPool, RewardRequest, RewardSpec

REPO = Path(__file__).resolve().parents[2]


def test_doc_embeds_the_example_file_verbatim() -> None:
    doc = (REPO / "docs" / "rewards.md").read_text()
    example = (REPO / "examples" / "my_reward.py").read_text().rstrip("\n")
    blocks = re.findall(r"```python\n(.*?)\n```", doc, flags=re.DOTALL)
    assert example in blocks


def test_example_plugin_through_the_pool() -> None:
    path = REPO / "examples" / "my_reward.py"
    specs = [RewardSpec(f"{path}:integer_match"), RewardSpec(f"{path}:shows_work", weight=0.1)]
    with RewardPool(specs, num_workers=1) as pool:
        right, wrong, odd = pool.score([
            RewardRequest("", "a\nb\nc\nd\nso \\boxed{042}", "42"),
            RewardRequest("", "so \\boxed{41}", "42"),
            RewardRequest("", "so \\boxed{x}", "42"),
        ])
    assert (right.correct, right.score) == (True, 1.1)
    assert (wrong.correct, wrong.score) == (False, 0.0)
    assert odd.status == "parse_fail"
