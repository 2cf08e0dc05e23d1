"""Keeps secrets out of log records, whoever logs them."""

from __future__ import annotations

import logging
import threading
from typing import Any

REDACTED = "[REDACTED]"

_lock = threading.Lock()
_secrets: set[str] = set()
_installed = False
_base_factory = logging.getLogRecordFactory()


def redact(text: str) -> str:
    """``text`` with every registered secret replaced."""
    for secret in _secrets:
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    if not _secrets:
        return record
    try:
        message = record.getMessage()
    except Exception:  # a broken format string is the logger's problem, not ours
        return record
    clean = redact(message)
    if clean != message:
        record.msg = clean
        record.args = None
    if record.exc_info and record.exc_info[1] is not None:
        text = redact(str(record.exc_info[1]))
        if text != str(record.exc_info[1]):
            record.exc_text = REDACTED
    return record


def protect(secret: str | None) -> None:
    """Register a secret: from now on no log record carries it."""
    global _installed
    if not secret or len(secret) < 4:
        return
    with _lock:
        _secrets.add(secret)
        if not _installed:
            logging.setLogRecordFactory(_factory)
            _installed = True
