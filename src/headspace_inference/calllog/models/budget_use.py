"""The spend guard's counts, where they are kept in the database (inference/budget_database.py):
one row per bucket, i.e. per rule's window (``key``) and part of it (``part``)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Double, String
from sqlalchemy.orm import Mapped, mapped_column

from ...row_bounds import BUDGET_KEY_CHARS, BUDGET_PART_CHARS
from .base import Base


class BudgetUse(Base):
    """What one bucket has used, reservations in flight included, and which of its alerts
    have been given (each once per window, whichever process gives it)."""

    __tablename__ = "inference_budget_use"

    key: Mapped[str] = mapped_column(String(BUDGET_KEY_CHARS), primary_key=True)
    part: Mapped[str] = mapped_column(String(BUDGET_PART_CHARS), primary_key=True)
    # Whole nanodollars (budget_store.NANO per USD): integers every database adds exactly.
    used_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    used_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    # The window's end in epoch seconds, as the store's callers give it (Bucket.ends_at and
    # their ``now``): compared with ``now`` as it comes, no timezone or conversion on either
    # database. Only the clean-up reads it (rows ended a day ago are deleted), through its
    # index.
    ends_at: Mapped[float] = mapped_column(Double, index=True)
    warned: Mapped[bool] = mapped_column(Boolean, default=False)
    capped: Mapped[bool] = mapped_column(Boolean, default=False)
