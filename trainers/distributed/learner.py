"""The driver's handle on N sharded trainer ranks: each call splits the batch's rows over the ranks, runs
the rank's part on all of them at once, and puts the answers back together.

Same math as one process: a minibatch's loss is normalised by the minibatch's GLOBAL response-token
count, gradients are summed over the ranks (FSDP2), and clipping sees the whole model's norm; the
driver adds the ranks' metric shares. Rows are split evenly (every rank must run the same number of
forwards: they are collectives), so each minibatch's rows must be a multiple of `num_workers`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from trainers.checkpoint import SHARDS, save_sharded_checkpoint
from trainers.config import AlgorithmConfig, TrainerConfig
from trainers.distributed.cluster import RayCluster, RayConfig
from trainers.distributed.rank import RankSpec, TrainerRank
from trainers.learner import warm_start_batch
from trainers.policy import TokenBatch
from trainers.update import OldScores, minibatch_order


class ShardedLearner:
    """Example:
    with ShardedLearner(model_path, alg, trainer_cfg, RayConfig(), num_workers=2) as learner:
        old = learner.logprobs(batch)
        metrics = learner.update(batch, old, advantages, None, seed=step)
        stats = ro.refit(1, learner.send)           # ro = learner.open_engine(rollout_cfg, model_path)
        learner.save("out/checkpoints/step_000001")
    """

    def __init__(
        self,
        model_path: str,
        alg: AlgorithmConfig,
        trainer: TrainerConfig,
        ray_cfg: RayConfig,
        num_workers: int,
        device_type: str = "cpu",
        engine_gpus: Optional[float] = None,
    ) -> None:
        """`engine_gpus`: a standalone engine's bundle of its own (its GPUs; 0 on the CPU), placed after the
        ranks' bundles; None: the engine shares rank 0's bundle (colocate)."""
        if num_workers < 2:
            raise ValueError(
                f"trainer.num_workers={num_workers!r}: a ShardedLearner needs >= 2 ranks"
            )
        self.num_workers = num_workers
        self.spec = RankSpec(
            model_path,
            alg,
            trainer,
            device_type,
            ray_cfg.timeout_s,
            with_critic=alg.name.value == "ppo",
            with_reference=alg.kl_coef > 0,
        )
        self.engine_bundle = 0 if engine_gpus is None else num_workers
        extra = [] if engine_gpus is None else [{"GPU": engine_gpus}]
        self.cluster = RayCluster(
            ray_cfg,
            num_workers,
            gpus_per_bundle=1 if device_type == "cuda" else 0,
            extra_bundles=extra,
        )
        self.ranks: list[Any] = []
        self.device = torch.device(
            "cpu"
        )  # the driver's copy of a batch; each rank moves its share to its device
        self.last_refit: Optional[dict[str, Any]] = (
            None  # the feeding rank's report of the last refit
        )
        self.last_gather_peak_bytes: Optional[int] = None

    @property
    def dtype(self) -> torch.dtype:
        """The policy's parameter dtype on the ranks (load_policy's fp32)."""
        return torch.float32

    def __enter__(self) -> "ShardedLearner":
        return self.start()

    def start(self) -> "ShardedLearner":
        """Start (or join) Ray, place the ranks, form their process group and build the sharded models."""
        self.cluster.__enter__()
        try:
            self.ranks = [
                self.cluster.remote(TrainerRank, bundle=i).remote(i, self.num_workers, self.spec)
                for i in range(self.num_workers)
            ]
            (init_method,) = self.cluster.get(
                [self.ranks[0].address.remote()], "rank 0's rendezvous address"
            )
            self._all("setup", init_method)
            self.node_ids = self._all("node_id")
        except BaseException:
            self.close()
            raise
        return self

    # -- plumbing -------------------------------------------------------------------------------
    def _all(self, method: str, *args: Any, timeout_s: Optional[float] = None) -> list[Any]:
        """`method(*args)` on every rank at once (each takes its own share of a batch's rows)."""
        import ray

        args = tuple(
            ray.put(a) if isinstance(a, TokenBatch) else a for a in args
        )  # one copy for all ranks
        refs = [getattr(r, method).remote(*args) for r in self.ranks]
        return self.cluster.get(refs, f"trainer ranks: {method}", timeout_s)

    def _check_rows(self, n: int, what: str) -> None:
        if n % self.num_workers:
            raise ValueError(
                f"{what} has {n} rows, not a multiple of trainer.num_workers={self.num_workers} "
                "(each rank takes an equal share: its forwards are collectives)"
            )

    # -- the phases (the same verbs as the single-process Learner) --------------------------------
    def warm_start(self, tokenizer: Any, task: Any) -> Optional[float]:
        """The supervised warm-start, each batch split over the ranks; returns the last loss."""
        t = self.spec.trainer
        loss = None
        for step in range(1, t.warmup_steps + 1):
            examples = task.batch(
                -step, t.warmup_batch_size
            )  # negative steps: disjoint from the RL batches
            batch = warm_start_batch(tokenizer, examples)
            self._check_rows(
                batch.tokens.shape[0], "a warm-start batch (trainer.warmup_batch_size)"
            )
            loss = sum(self._all("warm_start_step", batch))
        return loss

    def freeze_reference(self, state: Optional[dict] = None) -> None:
        """The reference is the policy now, unless a checkpoint's was loaded (`state` is always None here:
        a sharded checkpoint brings the reference's shards through `load_state_dict`)."""
        self._all("freeze_reference")

    def logprobs(self, batch: TokenBatch) -> OldScores:
        """The old log-probs (sampling temperature and 1), the reference's and the critic's over the batch."""
        self._check_rows(
            batch.tokens.shape[0],
            "a step's batch (trainer.prompts_per_step x algorithm.num_samples)",
        )
        shares = self._all("score", batch)
        return OldScores(
            *(None if parts[0] is None else torch.cat(parts) for parts in zip(*shares))
        )

    def update(
        self,
        batch: TokenBatch,
        old: OldScores,
        advantages: torch.Tensor,
        returns: Optional[torch.Tensor],
        seed: int,
    ) -> dict[str, Optional[float]]:
        """`num_epochs` passes of `num_minibatches` clipped steps (shuffled by `seed`): the mean metrics."""
        minibatches = minibatch_order(batch.tokens.shape[0], self.spec.algorithm, seed)
        for idx in minibatches:
            self._check_rows(
                len(idx), "a minibatch (the step's samples / algorithm.num_minibatches)"
            )
        cpu = [
            None if t is None else t.cpu()
            for t in (old.logp, old.ref_logp, old.values, old.is_weights, advantages, returns)
        ]
        shares = self._all("update", batch, *cpu, minibatches)  # [rank][minibatch] -> metrics share
        metrics: dict[str, Optional[float]] = {}
        for key in shares[0][0]:
            if key == "grad_norm":  # the whole model's, the same on every rank
                per_mb = [mb[key] for mb in shares[0]]
            else:  # each rank's share of the minibatch's token mean
                per_mb = [sum(rank[i][key] for rank in shares) for i in range(len(minibatches))]
            metrics[key] = sum(per_mb) / len(per_mb)
        metrics["kl"] = metrics["kl"] if self.spec.with_reference else None
        metrics.setdefault("value_loss", None)
        return metrics

    # -- the engine, refit, checkpoints ------------------------------------------------------------
    def engine_model_path(self, model_path: str, out_dir: Path) -> str:
        """The engine starts on `model_path` (the ranks train the full model: no LoRA here)."""
        return model_path

    def open_engine(self, rollout_cfg: Any, model_path: str) -> Any:
        """The rollout engine as an actor of this run's placement group (trainers/distributed/engine_actor.py):
        on rank 0's bundle (colocate) or on its own (standalone), on rank 0's node (the transfer is node-local)."""
        from trainers.distributed.engine_actor import RayEngine

        engine = RayEngine(
            self.cluster,
            self.engine_bundle,
            rollout_cfg,
            model_path,
            share_bundle=self.engine_bundle == 0,
        )
        try:
            self._check_beside_engine(engine.node_id, 0)
        except BaseException:
            engine.close()
            raise
        return engine

    def send(self, port: Any, version: int, feeding_rank: int = 0) -> Any:
        """The sending half of a refit from the sharded policy: every rank gathers, `feeding_rank` (the rank
        on the engine's node and device) streams each full tensor into its sender's buckets."""
        endpoint = port.endpoint()
        if endpoint.node_id is not None:
            self._check_beside_engine(endpoint.node_id, feeding_rank)
        refs = [
            r.send_weights.remote(endpoint if i == feeding_rank else None, version)
            for i, r in enumerate(self.ranks)
        ]
        self.last_refit = self.cluster.get(refs, f"refit to version {version}")[feeding_rank]
        self.last_gather_peak_bytes = self.last_refit["gather_peak_bytes"]
        return self.last_refit["stats"]

    def _check_beside_engine(self, engine_node: str, rank: int) -> None:
        """The transfer's socket and shared memory are node-local: the feeding rank must share the engine's node."""
        there = self.node_ids[rank]
        if there != engine_node:
            raise RuntimeError(
                f"trainer rank {rank} was placed on Ray node {there}, the engine runs on {engine_node}: a refit needs "
                "them on one node (the transfer is node-local); use ray.placement_strategy=PACK or STRICT_PACK, or "
                "rollout.mode=colocate, which puts the engine on rank 0's bundle"
            )

    def save(self, path: str) -> None:
        """Every rank writes its shards into the directory `path`."""
        self._all("save", path)

    def load(self, path: str) -> None:
        """Shards saved by any number of ranks, resharded to these."""
        self._all("load", path)

    def save_checkpoint(self, path: Path, run_state: dict[str, Any]) -> Path:
        return save_sharded_checkpoint(path, run_state, self.save)

    def load_state_dict(self, state: dict[str, Any], source: str = "the checkpoint") -> None:
        if SHARDS not in state:
            raise ValueError(
                f"trainer.resume={source!r} is a one-process checkpoint: resume it with trainer.num_workers=1"
            )
        self.load(state[SHARDS])

    def close(self) -> None:
        """Idempotent: closes the ranks' senders and process groups (bounded), then the Ray resources."""
        try:
            if self.ranks:
                try:
                    self._all("close", timeout_s=min(30.0, self.cluster.cfg.timeout_s))
                except Exception:  # noqa: BLE001 - a dead rank: the cluster below kills the rest
                    pass
        finally:
            self.ranks = []
            self.cluster.close()

    def __exit__(self, *exc: object) -> None:
        self.close()
