"""The reward guard: the moving mean reward of the last N feedbacks, and when it says to stop learning.

The flusher measures the *moving reward*: the mean reward of the last ``window`` feedbacks
that name the route taken (the bandit reward, or 1/0 for full information against the
right route — what the ledger's per-route counts ``route_chosen``/``route_reward`` sum). It
is read off those counts' totals after every batch the flusher learns, so it spans the
last ``window`` feedbacks to within one batch; with the guard on, batches are cut to at
most ``window // 10`` slots. It starts afresh when the flusher starts, resumes or rolls
back (it then needs ``window`` new feedbacks before it is known).

The guard (``--guard-reward DROP``) compares it with the *level*: the moving reward when
the last good checkpoint was written (a checkpoint written while learning, with the moving
reward known and not below the level minus DROP, is good; the first one sets the level).
When the moving reward falls more than DROP below the level, the flusher pauses learning
(``paused`` = by the guard) and, with ``--guard-rollback``, rolls back to that checkpoint.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from ..checks import check_int
from ..errors import InvalidInputError

#: The moving reward's window when no guard sets one (``--guard-window``'s default).
DEFAULT_WINDOW = 500
#: The largest window (the flusher keeps one mark per batch of the window).
MAX_WINDOW = 10_000_000


@dataclass(frozen=True)
class GuardOptions:
    """``--guard-reward DROP [--guard-window N] [--guard-rollback]``: pause (and roll back) when the moving reward
    of the last ``window`` feedbacks falls more than ``drop`` below its level at the last good checkpoint."""

    drop: float
    window: int = DEFAULT_WINDOW
    rollback: bool = False

    def __post_init__(self) -> None:
        drop = self.drop
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not (0.0 < drop <= 1.0):
            raise InvalidInputError(
                f"--guard-reward: expected DROP in (0, 1] (a fall of the mean reward, which is in [0, 1]), got {drop!r}"
            )
        check_int("--guard-window", self.window, 1, MAX_WINDOW)

    @property
    def batch(self) -> int:
        """The most slots the flusher learns between two looks at the moving reward."""
        return max(1, self.window // 10)

    def tripped(self, moving: float | None, level: float | None) -> bool:
        """Whether a moving reward ``moving`` (None: not known yet) is more than DROP below ``level`` (None: none)."""
        return moving is not None and level is not None and moving < level - self.drop


class MovingReward:
    """The mean reward of the last ``window`` feedbacks, from the running totals of feedbacks and of their reward.

    :meth:`observe` takes the totals after each batch (``count`` feedbacks naming the route taken, ever, and their
    summed ``reward``); the mean is taken from the newest mark at least ``window`` feedbacks back.
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self._marks: deque[tuple[int, float]] = deque()
        self._now = (0, 0.0)

    def reset(self, count: int, reward: float) -> None:
        """Start afresh from these totals (nothing known until ``window`` more feedbacks)."""
        self._marks.clear()
        self._marks.append((count, reward))
        self._now = (count, reward)

    def observe(self, count: int, reward: float) -> None:
        """The totals now (after a batch)."""
        if not self._marks:
            self.reset(count, reward)
            return
        if count == self._now[0]:
            return  # no feedback in that batch
        self._now = (count, reward)
        self._marks.append((count, reward))
        marks = self._marks
        while len(marks) >= 2 and count - marks[1][0] >= self.window:
            marks.popleft()

    @property
    def feedbacks(self) -> int:
        """Feedbacks the mean spans (at least ``window`` once known)."""
        return self._now[0] - self._marks[0][0] if self._marks else 0

    @property
    def known(self) -> bool:
        return self.feedbacks >= self.window

    @property
    def mean(self) -> float | None:
        """The moving reward, or None while fewer than ``window`` feedbacks came since the start."""
        if not self.known:
            return None
        n = self.feedbacks
        value = (self._now[1] - self._marks[0][1]) / n
        return value if math.isfinite(value) else None

    @property
    def partial(self) -> float | None:
        """The mean of the feedbacks seen so far, known or not (None: none)."""
        n = self.feedbacks
        return (self._now[1] - self._marks[0][1]) / n if n else None
