"""The two ways a `trellis lab` command fails, so the CLI can map each to an exit status.

`LabError` is something the user can fix (a malformed description, an unknown pod,
a port already taken): one line, exit 2. `LabFailure` is the lab itself not
coming up (a process that never got ready): a line plus detail lines such as the
tail of that process's log, exit 1.
"""

from __future__ import annotations


class LabError(Exception):
    """A mistake in what the user asked for; the message is one complete line."""

    exit_code = 2
    details: tuple[str, ...] = ()


class LabFailure(LabError):
    """The lab could not reach the state asked for; `details` says what was seen."""

    exit_code = 1

    def __init__(self, message: str, details: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.details = details


class LabNotUp(LabError):
    """A command that needs a running lab found none."""

    exit_code = 1
