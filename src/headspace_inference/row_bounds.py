"""What one row of the call log can hold: the columns are declared with these bounds, and
settings, validation and the client check what they read against them (a value no row can
hold is refused where it is read, not by the database afterwards)."""

from __future__ import annotations

from decimal import Decimal

# The largest value an INTEGER column holds (32-bit on PostgreSQL): ids, links and token
# counts alike.
MAX_INTEGER = 2**31 - 1

# USD with twelve decimals: exact sums on PostgreSQL, enough for fractions of a token's price.
# Every amount the service computes is quantized to USD_QUANTUM, so sums stay exact.
USD_DIGITS = 20
USD_DECIMALS = 12
USD_QUANTUM = Decimal(10) ** -USD_DECIMALS
PICO = Decimal(10) ** USD_DECIMALS  # picodollars per dollar (SQLite keeps sums as integers)
# The largest amount one call can carry into the log: a money column holds less than
# 10**8 (PostgreSQL refuses the row past it), SQLite's rollup sums integer picodollars up to
# 2**63 - 1, about 9.2 million: the lower of the two.
MAX_USD = min(
    Decimal(10) ** (USD_DIGITS - USD_DECIMALS) - USD_QUANTUM,
    Decimal(2**63 - 1) / PICO,
)
# The width of a model name's columns (model, requested_model, the rollup's model): the
# configured names are bounded by it at start-up, an answering model's name is cut to it.
MODEL_NAME_CHARS = 200
# The width of the purpose column: a caller's longer purpose is refused before anything is
# spent (validation), never cut.
PURPOSE_CHARS = 200
# The widths of the spend guard's counts (inference_budget_use): a bucket's key ("<rule
# name>|<window>|<window start>", so a rule's name is bounded to leave room for the rest)
# and its part ("" or a project id, at most 11 characters for a 32-bit id).
BUDGET_KEY_CHARS = 200
BUDGET_PART_CHARS = 20
