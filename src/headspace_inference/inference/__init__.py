"""The inference layer: client, retry, limiter, cache, recorder and the service."""

from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .types import Answer, CallLinks, CallOptions, GenerationParams, InferenceResult

__all__ = [
    *_errors_all,
    "Answer",
    "CallLinks",
    "CallOptions",
    "GenerationParams",
    "InferenceResult",
]
