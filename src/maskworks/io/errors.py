"""The errors a person can act on, shared by every module of :mod:`maskworks.io`."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input a person can fix: the message names the file, the value and what was expected."""


class OutputBusy(InputError):
    """Another run holds one of the outputs right now (it is writing or committing it)."""


class Unreachable(RuntimeError):
    """A service the input lives on (the CryoET Data Portal) cannot be reached: not the input's fault,
    and a later retry may work."""


class Interrupted(BaseException):
    """SIGTERM (or SIGINT) arrived: the stage stops, its staging is removed, earlier outputs stay."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        super().__init__(signal.Signals(signum).name)
