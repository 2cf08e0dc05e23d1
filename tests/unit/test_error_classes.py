"""classify: which class an HTTP error from OpenRouter is, by its status and its body, as a
table: OpenRouter's transient provider failures that arrive dressed as final ones are
retried like the status they carry; a caller's own bad request stays final."""

from __future__ import annotations

import pytest

from headspace_inference.inference import errors as e

PROVIDER = "Provider returned error"


@pytest.mark.parametrize(
    ("status", "code", "message", "model_named", "expected"),
    [
        # A provider's failure carried in a 400's body: retried as the status it carries.
        (400, 502, PROVIDER, True, e.UpstreamServerError),
        (400, 503, PROVIDER, True, e.UpstreamServerError),
        (400, 524, PROVIDER, True, e.UpstreamServerError),
        (400, 529, PROVIDER, True, e.UpstreamServerError),
        (400, 429, "Rate limit exceeded", True, e.UpstreamRateLimitError),
        (400, 408, "Timed out", True, e.RequestTimeoutError),
        (404, 502, PROVIDER, True, e.UpstreamServerError),
        # A 404 that is a provider's failure, with or without a model named.
        (404, 404, PROVIDER, True, e.UpstreamServerError),
        (404, 404, "  provider returned error ", False, e.UpstreamServerError),
        # "No models provided" for a request that named one; final for one that did not.
        (400, 400, "No models provided", True, e.UpstreamServerError),
        (400, 400, "No models provided", False, e.BadRequestError),
        # The caller's own bad requests stay final.
        (400, 400, "Invalid request: max_tokens must be positive", True, e.BadRequestError),
        (400, 400, PROVIDER, True, e.BadRequestError),  # inner code 400: the request's fault
        (400, 401, PROVIDER, True, e.BadRequestError),  # a final inner code is not carried
        (400, "invalid_request", "Invalid schema for response_format", True, e.BadRequestError),
        (400, True, PROVIDER, True, e.BadRequestError),  # JSON true is not a status code
        (400, None, "x is not a valid model ID", True, e.BadRequestError),
        (404, 404, "No endpoints found for nope/model.", True, e.ModelNotFoundError),
        # Other statuses as they are.
        (401, 502, PROVIDER, True, e.AuthenticationError),
        (402, 503, PROVIDER, True, e.InsufficientCreditsError),
        (403, 502, PROVIDER, True, e.ModerationError),
        (502, 502, PROVIDER, True, e.UpstreamServerError),
    ],
)
def test_classify(
    status: int, code: object, message: str, model_named: bool, expected: type[e.UpstreamError]
) -> None:
    assert e.classify(status, code, message, model_named=model_named) is expected
