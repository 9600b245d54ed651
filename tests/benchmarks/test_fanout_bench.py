"""benchmarks.fanout's configuration: every layout it starts is a valid RolloutConfig (its engines are
started only by the benchmark itself: a TP=2 engine takes minutes on 2 cores)."""

from __future__ import annotations

import pytest

from benchmarks.fanout import LAYOUTS, FanoutBenchRoot, _rollout_cfg


@pytest.mark.parametrize("layout", ["one", *LAYOUTS])
def test_every_layout_makes_a_valid_rollout_config(layout):
    num_engines, tp = LAYOUTS.get(layout, (1, 1))
    cfg = _rollout_cfg(
        FanoutBenchRoot(), "float32", num_engines, tp
    )  # the defaults ran into RolloutConfig's checks
    assert (cfg.num_engines, cfg.backend.tensor_parallel_size) == (num_engines, tp)
    assert cfg.timeouts.next_bucket_s > cfg.transfer.timeout_s
