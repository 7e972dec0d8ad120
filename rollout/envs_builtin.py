"""Built-in step-wise environments. Importing this module registers them in ``rollout.env.ENVIRONMENTS``."""

from __future__ import annotations

import random
import re
from collections import deque

from rollout.env import ENVIRONMENTS, StepResult

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_OPERATOR = re.compile(r"([+*])\s*(\d+)")


def min_steps_to_target(start: int, target: int) -> int | None:
    """Fewest ``+1`` / ``*2`` moves from ``start`` to ``target`` (breadth-first), or None if unreachable."""
    if start > target:
        return None
    dist = {start: 0}
    queue = deque([start])
    while queue:
        n = queue.popleft()
        if n == target:
            return dist[n]
        for m in (n + 1, 2 * n):
            if m <= target and m not in dist:
                dist[m] = dist[n] + 1
                queue.append(m)
    return None


@ENVIRONMENTS.register("number_target")
class NumberTargetEnv:
    """Reach the target number from a start number with the moves ``+1`` and ``*2``.

    Rules (all deterministic given the seed and the actions):

    - ``reset(seed)`` draws ``start`` in [1, max_start] and ``target`` in [start + 2, max_target], redrawing until
      the target is reachable in at most ``max_steps`` moves. The same seed gives the same (start, target), so a
      group of trajectories shares its initial state, and states repeat across trajectories (3 -> 4 -> 8 and
      3 -> 6 -> ... both pass through small numbers): many anchor groups of size > 1.
    - Observation: ``"State: 3. Target: 10. Action (+1 or *2):"`` (about 15 tokens; no history, no step counter).
    - Action: read from the last ``\\boxed{...}`` of the response if there is one, else from its first
      whitespace-separated word. Valid forms: ``+1``, ``*2`` or the resulting number itself (``4`` or ``6`` from
      state 3, which suits a model trained to answer arithmetic with a boxed number).
    - Reward: +1 and done on reaching the target exactly; 0 and done on overshooting it (moves only increase the
      number, so the target is lost); an invalid action is a no-op costing ``invalid_penalty`` (0.1, verl-agent's
      invalid-action penalty) and still uses up a step. After ``max_steps`` steps the episode ends (reward 0 for
      that step unless it reached the target).
    - ``state_key()`` is ``"<current>/<target>"``: canonical, with no step counter.
    """

    def __init__(
        self, max_steps: int = 6, max_start: int = 5, max_target: int = 20, invalid_penalty: float = 0.1
    ) -> None:
        if not 1 <= max_start <= max_target - 2:
            raise ValueError(f"need 1 <= max_start <= max_target - 2, got {max_start=}, {max_target=}")
        if max_steps < 2:
            raise ValueError(f"max_steps must be >= 2 (every target is at least 2 moves away), got {max_steps}")
        self.max_steps = max_steps
        self.max_start = max_start
        self.max_target = max_target
        self.invalid_penalty = invalid_penalty
        self.current = 0
        self.target = 0
        self.num_steps = 0
        self.done = True

    def reset(self, seed: int) -> str:
        rng = random.Random(seed)
        while True:
            start = rng.randint(1, self.max_start)
            target = rng.randint(start + 2, self.max_target)
            needed = min_steps_to_target(start, target)
            if needed is not None and needed <= self.max_steps:
                break
        self.current, self.target, self.num_steps, self.done = start, target, 0, False
        return self.observation()

    def observation(self) -> str:
        return f"State: {self.current}. Target: {self.target}. Action (+1 or *2):"

    def state_key(self) -> str:
        return f"{self.current}/{self.target}"

    def parse_action(self, action_text: str) -> int | None:
        """The next number the action leads to, or None when the text is not a valid action."""
        boxed = _BOXED.findall(action_text)
        words = (boxed[-1] if boxed else action_text).split()
        if not words:
            return None
        word = ("".join(words) if boxed else words[0]).rstrip(".,;:")
        candidates = {"+1": self.current + 1, "*2": 2 * self.current}
        op = _OPERATOR.fullmatch(word)
        if op:
            return candidates.get(f"{op.group(1)}{op.group(2)}")
        if word.isdigit() and int(word) in candidates.values():
            return int(word)
        return None

    def step(self, action_text: str) -> StepResult:
        if self.done:
            raise RuntimeError("step() after the episode ended; call reset() first")
        self.num_steps += 1
        nxt = self.parse_action(action_text)
        info = {"invalid_action": nxt is None, "success": False, "overshoot": False}
        reward = 0.0
        if nxt is None:
            reward = -self.invalid_penalty
        else:
            self.current = nxt
            info["success"] = nxt == self.target
            info["overshoot"] = nxt > self.target
            reward = 1.0 if info["success"] else 0.0
        self.done = info["success"] or info["overshoot"] or self.num_steps >= self.max_steps
        return StepResult(self.observation(), reward, self.done, info)
