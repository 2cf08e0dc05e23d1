"""The local OpenRouter stand-in (``headspace-inference openrouter-emulator``)."""

from .server import (
    DEFAULT_CHAOS_MIX,
    NAMED_FAULTS,
    PROVIDER_ERRORS,
    REQUEST_THREAD,
    Charged,
    EmulatorServer,
    Fault,
    ReceivedRequest,
)

__all__ = [
    "DEFAULT_CHAOS_MIX",
    "NAMED_FAULTS",
    "PROVIDER_ERRORS",
    "REQUEST_THREAD",
    "Charged",
    "EmulatorServer",
    "Fault",
    "ReceivedRequest",
]
