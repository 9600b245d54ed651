"""The driver's handle on N sharded trainer ranks: each call splits the batch's rows over the ranks, runs
the rank's part on all of them at once, and puts the answers back together.

Same math as one process: a minibatch's loss is normalised by the minibatch's GLOBAL response-token
count, gradients are summed over the ranks (FSDP2), and clipping sees the whole model's norm; the
driver adds the ranks' metric shares. Rows are split evenly (every rank must run the same number of
forwards: they are collectives), so each minibatch's rows must be a multiple of `num_workers`.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from trainers.config import AlgorithmConfig, TrainerConfig
from trainers.distributed.cluster import RayCluster, RayConfig
from trainers.distributed.rank import RankSpec, TrainerRank
from trainers.policy import TokenBatch


class ShardedLearner:
    """Example:
        with ShardedLearner(model_path, alg, trainer_cfg, RayConfig(), num_workers=2) as learner:
            old_logp = learner.logprobs(batch, temperature=1.0)
            metrics = learner.policy_step(batch.select(idx), old_logp[idx], advantages[idx], None)
            stats = learner.refit(ro, version=1)
            learner.save("out/checkpoints/step_000001")
    """

    def __init__(self, model_path: str, alg: AlgorithmConfig, trainer: TrainerConfig, ray_cfg: RayConfig,
                 num_workers: int, device_type: str = "cpu") -> None:
        if num_workers < 2:
            raise ValueError(f"trainer.num_workers={num_workers!r}: a ShardedLearner needs >= 2 ranks")
        self.num_workers = num_workers
        self.spec = RankSpec(model_path, alg, trainer, device_type, ray_cfg.timeout_s,
                             with_critic=alg.name.value == "ppo", with_reference=alg.kl_coef > 0)
        self.cluster = RayCluster(ray_cfg, num_workers, gpus_per_bundle=1 if device_type == "cuda" else 0)
        self.ranks: list[Any] = []

    def __enter__(self) -> "ShardedLearner":
        self.cluster.__enter__()
        try:
            self.ranks = [self.cluster.remote(TrainerRank, bundle=i).remote(i, self.num_workers, self.spec)
                          for i in range(self.num_workers)]
            init_method = self.cluster.get(self.ranks[0].address.remote(), "rank 0's rendezvous address")
            self._all("setup", init_method)
        except BaseException:
            self.close()
            raise
        return self

    # -- plumbing -------------------------------------------------------------------------------
    def _all(self, method: str, *args: Any) -> list[Any]:
        """`method(*args)` on every rank, the same arguments."""
        return self.cluster.get([getattr(r, method).remote(*args) for r in self.ranks], f"trainer ranks: {method}")

    def _each(self, method: str, *per_rank: list[Any], shared: Iterable[Any] = ()) -> list[Any]:
        """`method(per_rank[0][i], per_rank[1][i], ..., *shared)` on rank i."""
        shared = tuple(shared)
        refs = [getattr(r, method).remote(*(a[i] for a in per_rank), *shared) for i, r in enumerate(self.ranks)]
        return self.cluster.get(refs, f"trainer ranks: {method}")

    def _rows(self, n: int, what: str) -> list[torch.Tensor]:
        if n % self.num_workers:
            raise ValueError(f"{what} has {n} rows, not a multiple of trainer.num_workers={self.num_workers} "
                             "(each rank takes an equal share)")
        return list(torch.arange(n).chunk(self.num_workers))

    def _split(self, batch: TokenBatch, *tensors: Optional[torch.Tensor], what: str) -> list[list[Any]]:
        rows = self._rows(batch.tokens.shape[0], what)
        out = [[batch.select(r) for r in rows]]
        for t in tensors:
            out.append([None if t is None else t[r].cpu() for r in rows])
        return out

    # -- the phases -----------------------------------------------------------------------------
    def warm_start_step(self, batch: TokenBatch) -> float:
        (shares,) = self._split(batch, what="a warm-start batch (trainer.warmup_batch_size)")
        return sum(self._each("warm_start_step", shares, shared=(batch.mask.sum().item(),)))

    def freeze_reference(self) -> None:
        self._all("freeze_reference")

    def logprobs(self, batch: TokenBatch, temperature: float, reference: bool = False) -> torch.Tensor:
        (shares,) = self._split(batch, what="a step's batch")
        return torch.cat(self._each("ref_logprobs" if reference else "logprobs", shares, shared=(temperature,)))

    def values(self, batch: TokenBatch) -> torch.Tensor:
        (shares,) = self._split(batch, what="a step's batch")
        return torch.cat(self._each("values", shares))

    def policy_step(self, mb: TokenBatch, old_logp: torch.Tensor, advantages: torch.Tensor,
                    ref_logp: Optional[torch.Tensor]) -> dict[str, float]:
        parts = self._split(mb, old_logp, advantages, ref_logp, what="a minibatch (algorithm.num_minibatches)")
        shares = self._each("policy_step", *parts, shared=(mb.mask.sum().cpu(),))
        metrics = {k: sum(s[k] for s in shares) for k in shares[0] if k != "grad_norm"}
        metrics["grad_norm"] = shares[0]["grad_norm"]  # the whole model's norm, the same on every rank
        return metrics

    def critic_step(self, mb: TokenBatch, old_values: torch.Tensor, returns: torch.Tensor) -> float:
        parts = self._split(mb, old_values, returns, what="a minibatch (algorithm.num_minibatches)")
        return sum(self._each("critic_step", *parts, shared=(mb.mask.sum().cpu(),)))

    # -- refit, checkpoints -----------------------------------------------------------------------
    def refit(self, ro: Any, version: int, feeding_rank: int = 0) -> Any:
        """A refit of engine `ro` (in this process) from the sharded policy: every rank gathers, `feeding_rank`
        (the rank on the engine's host/device) streams each full tensor into its sender's buckets."""
        endpoint = ro.begin_refit(version)
        refs = [r.send_weights.remote(endpoint if i == feeding_rank else None, version) for i, r in enumerate(self.ranks)]
        try:
            answers = self.cluster.get(refs, f"refit to version {version}")
        except BaseException as exc:  # noqa: BLE001 - finish_refit raises RefitError naming the root cause
            return ro.finish_refit(error=exc)
        self.last_refit = answers[feeding_rank]
        return ro.finish_refit(self.last_refit["stats"])

    def save(self, path: str) -> None:
        self._all("save", path)

    def load(self, path: str) -> None:
        self._all("load", path)

    def close(self) -> None:
        """Idempotent: closes the ranks' senders and process groups (bounded), then the Ray resources."""
        try:
            if self.ranks:
                try:
                    self._all("close")
                except Exception:  # noqa: BLE001 - a dead rank: the cluster below kills the rest
                    pass
        finally:
            self.ranks = []
            self.cluster.close()

    def __exit__(self, *exc: object) -> None:
        self.close()
