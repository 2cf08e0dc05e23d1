"""One process of the spend guard's race (test_budget_database.py): ``budget_worker.py
<index> <spec>``. Waits for the common start, then its threads each reserve a worst case
against one small cap (and this process's part of another rule) and, when granted, correct
it to a "real" cost after a moment; prints one JSON line of what it was granted and spent.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time

from headspace_inference.calllog.database import Database
from headspace_inference.inference.budget_database import DatabaseBudgetStore
from headspace_inference.inference.budget_store import NANO, Bucket
from headspace_inference.settings import DatabaseSettings


def main() -> None:
    index, spec = int(sys.argv[1]), json.loads(sys.argv[2])
    database = Database(DatabaseSettings(url=spec["url"], pool_size=spec["threads"]))
    store = DatabaseBudgetStore(database)
    ends_at = time.time() + 86_400
    cap = round(spec["cap_usd"] * NANO)
    tight = Bucket("race|day|0", "", cap, None, cap, None, ends_at)
    own = Bucket("race-each|day|0", str(index), None, None, None, None, ends_at)
    worst, worst_tokens = round(spec["worst_usd"] * NANO), spec["worst_tokens"]
    lock = threading.Lock()
    out = {"index": index, "granted": 0, "refused": 0, "real_usd": 0, "real_tokens": 0,
           "highest_use": 0}  # fmt: skip

    def run(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(spec["attempts"]):
            done = store.reserve([tight, own], worst, worst_tokens, None, time.time())
            if not done.granted:
                with lock:
                    out["refused"] += 1
                continue
            time.sleep(rng.random() * 0.005)  # the call, while others reserve
            real, real_tokens = rng.randint(0, worst), rng.randint(1, worst_tokens)
            store.adjust([tight, own], real - worst, real_tokens - worst_tokens, time.time())
            with lock:
                out["granted"] += 1
                out["real_usd"] += real
                out["real_tokens"] += real_tokens
                out["highest_use"] = max(out["highest_use"], done.uses[0].usd)

    threads = [
        threading.Thread(target=run, args=(index * 100 + i,)) for i in range(spec["threads"])
    ]
    time.sleep(max(0.0, spec["start_at"] - time.time()))
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out["seconds"] = time.monotonic() - started
    database.dispose()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
