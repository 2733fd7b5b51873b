"""Errors a user can cause. The CLI prints each as one line and exits with its code."""

from __future__ import annotations


class VermError(Exception):
    """A problem the user can fix; `exit_code` is what the CLI returns."""

    exit_code = 1


class InputError(VermError):
    """Bad input file or argument (missing, not an image, truncated, too large)."""

    exit_code = 2


class ModelError(VermError):
    """No usable model: missing, incomplete, corrupt, or not Qwen3-VL."""

    exit_code = 3


class AnswerError(VermError):
    """The model's answer could not be read as a judgement."""

    exit_code = 4


class PlanError(VermError):
    """This machine cannot run what was asked (no such device, not enough memory)."""

    exit_code = 5


class FetchError(VermError):
    """A download or import failed: hub unreachable, offline, integrity check, disk full."""

    exit_code = 6
