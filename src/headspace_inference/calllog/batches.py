"""Reading a table a batch at a time in id order, by keyset (never OFFSET), so that a log of
any size is read in bounded memory and each batch costs what the first one does."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, Row, Select
from sqlalchemy.orm import QueryableAttribute, Session
from sqlalchemy.sql.elements import ColumnElement


def in_id_order(
    bind: Connection | Session,
    query: Select[Any],
    id_column: ColumnElement[Any] | QueryableAttribute[Any],
    size: int,
) -> Iterator[Sequence[Row[Any]]]:
    """The rows of ``query`` (which selects ``id_column`` as ``id``) ``size`` at a time,
    in the order of ``id_column``."""
    last: Any = None
    while True:
        batch = query.order_by(id_column).limit(size)
        if last is not None:
            batch = batch.where(id_column > last)
        rows = bind.execute(batch).all()
        if not rows:
            return
        yield rows
        last = rows[-1].id
