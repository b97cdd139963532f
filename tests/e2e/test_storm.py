"""The switch storm at CI size (issue 11, item 1): 20 concurrent clients × 3 models × 5 requests each
(`LLM_ROUTER_STORM_REQUESTS`, 10 for the full size; bench/storm.py runs that with a table of figures).

Two models are co-resident by `needs` (`chat-a`, `embed` with `idle_unload: 1`), one is exclusive (`chat-x`).
The clients send a random mix of streamed and non-streamed chat and legacy completions, embeddings, and streams
they leave mid-answer or while waiting for a switch. Scenario, checks and the definition of "the minimum number of
unit starts the admission order needs" are in tests/e2e/storm.py (`SwitchReplay`); in short: the waiting requests
for one model, walked in the order the router admitted them, form batches of requests that waited together (for
the same load); each batch needs one load and no load can serve two, so batches <= starts, and starts may exceed
batches by at most ×1.2 (grouping works).

Ports: the router on 18840, its engines on 18841-18845 (clear of the other end-to-end tests).
"""

from __future__ import annotations

import os
import random

from tests.e2e import storm
from tests.e2e.conftest import RouterEnv

CLIENTS = 20
REQUESTS_PER_CLIENT = int(os.environ.get("LLM_ROUTER_STORM_REQUESTS", "5"))
BASE_PORT = 18840


def test_switch_storm(router_factory) -> None:  # type: ignore[no-untyped-def]
    seed = int(os.environ.get("LLM_ROUTER_STORM_SEED", random.randrange(1_000_000)))
    router: RouterEnv = router_factory(storm.storm_models(BASE_PORT), base_port=BASE_PORT, **storm.STORM_CONFIG)
    result = storm.run_storm(router, CLIENTS, REQUESTS_PER_CLIENT, seed)
    print(f"\nswitch storm (seed {seed}):\n{result.table()}")
    assert result.problems == [], f"seed {seed} (LLM_ROUTER_STORM_SEED):\n" + "\n".join(result.problems[:20])
    # The storm must have exercised what it is about: switches, waiting, both kinds of disconnect, co-residency.
    assert result.replay.alternations > 0 and result.replay.waited > 0, result.table()
    assert {o.left for o in result.outcomes} >= {"mid-answer", "waiting"}, result.table()
