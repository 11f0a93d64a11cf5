"""Errors a user of the engine can hit. Each says what was wrong and what is accepted."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every user-facing engine error."""


class InvalidParams(EngineError, ValueError):
    """A generation parameter is out of range. ``field`` names it; ``accepted`` describes the valid values."""

    def __init__(self, field: str, message: str, accepted: str | None = None):
        self.field = field
        self.message = message
        self.accepted = accepted
        text = f"{field}: {message}"
        if accepted:
            text += f" (accepted: {accepted})"
        super().__init__(text)


class UnknownModel(EngineError, ValueError):
    """The model is neither a preset, nor an existing folder, nor a reachable hub id."""


class CheckpointError(EngineError, ValueError):
    """A checkpoint folder is missing files, or its config and weights do not match the model."""


class DeviceError(EngineError, ValueError):
    """The requested device or dtype cannot be used on this machine."""


class SettingError(EngineError, ValueError):
    """A setting names something this process cannot use (an unreachable Redis, an unwritable folder)."""


class GenerationCancelled(EngineError):
    """Raised inside ``generate`` at a step boundary when the cancellation check returns True."""
