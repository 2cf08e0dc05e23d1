"""The per-process spend-guard store against the stores' one contract."""

from __future__ import annotations

import pytest
from tests.budget_contract import BudgetStoreContract

from headspace_inference.inference.budget_store import BudgetStore, MemoryBudgetStore


class TestMemoryStore(BudgetStoreContract):
    @pytest.fixture
    def store(self) -> BudgetStore:
        return MemoryBudgetStore()

    @pytest.fixture
    def twin(self, store: BudgetStore) -> BudgetStore:
        return store  # one process: the store is its own twin
