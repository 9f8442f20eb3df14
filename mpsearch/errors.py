"""User-facing errors.

Every mistake a user can make (a missing model, a malformed map, an unknown format, an
infeasible budget) raises :class:`MpsError` with a one-line message naming the file, field
or layer and what would be valid. The CLI prints ``error: <message>`` and exits with code 2.
"""
from __future__ import annotations


class MpsError(ValueError):
    """A problem with the user's input, reported as one line (CLI exit code 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()) if "\n" in str(message) else str(message))


class ArtifactError(MpsError):
    """An artifact (map, report, table, results) that cannot be read: corrupt, foreign or of another schema."""


class InfeasibleBudget(MpsError):
    """No policy of the search space meets the budget."""
