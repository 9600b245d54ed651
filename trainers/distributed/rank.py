"""One trainer rank (a Ray actor): its FSDP2 shards of the policy, reference and critic, their optimizers,
and the rank's part of each phase of a step, of a refit and of a checkpoint.

The driver (`ShardedLearner`) calls the same method on every rank at once with that rank's rows of the
batch; each call that runs a forward or a gather is collective, so all ranks get the same number of
rows (the driver checks) and every rank runs every call.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass
from typing import Any, Optional

import torch

from trainers.config import AlgorithmConfig, TrainerConfig
from trainers.distributed.sharding import (
    GatherMeter,
    drain,
    full_grad_norm,
    gathered_parameters,
    shard_model,
)
from trainers.distributed.states import Parts, load_states, save_states
from trainers.policy import TokenBatch, ValueModel, load_policy, token_logprobs
from trainers.update import Models, OldScores, minibatch_step, score


@dataclass(frozen=True)
class RankSpec:
    """What every rank is built from (the same on all ranks)."""

    model_path: str
    algorithm: AlgorithmConfig
    trainer: TrainerConfig
    device_type: str  # cpu | cuda
    timeout_s: float
    with_critic: bool
    with_reference: bool


class TrainerRank:
    """Example (through `ShardedLearner`, which starts N of these in a placement group):
    rank = cluster.remote(TrainerRank, bundle=i).remote(i, n, spec)
    addr = ray.get(rank0.address.remote());  ray.get([r.setup.remote(addr) for r in ranks])
    ray.get([r.logprobs.remote(rows_i, 1.0) for r, rows_i in zip(ranks, shares)])
    """

    def __init__(self, rank: int, world_size: int, spec: RankSpec) -> None:
        self.rank, self.world_size, self.spec = rank, world_size, spec
        if spec.trainer.num_threads:
            torch.set_num_threads(spec.trainer.num_threads)
        self.device = torch.device(spec.device_type)
        if self.device.type == "cuda":  # Ray shows each rank only its own GPU (its bundle's)
            self.device = torch.device("cuda", 0)
            torch.cuda.set_device(self.device)
        self._sender = None  # kept across refits on the rank that feeds the engine
        self._warmup_opt: Optional[torch.optim.Optimizer] = None

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def address(self) -> str:
        """A `tcp://host:port` rendezvous on this rank's node (asked of rank 0)."""
        host = socket.gethostbyname(socket.gethostname())
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{host}:{port}"

    def setup(self, init_method: str) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        timeout = datetime.timedelta(seconds=self.spec.timeout_s)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=self.rank,
            world_size=self.world_size,
            timeout=timeout,
            device_id=self.device if self.device.type == "cuda" else None,
        )
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        torch.manual_seed(self.spec.trainer.seed)
        alg = self.spec.algorithm
        policy = shard_model(load_policy(self.spec.model_path).to(self.device), self.mesh)
        self.models = Models(
            policy, torch.optim.AdamW(policy.parameters(), lr=alg.lr, weight_decay=alg.weight_decay)
        )
        if self.spec.with_critic:
            critic = shard_model(ValueModel(self.spec.model_path).to(self.device), self.mesh)
            self.models.critic, self.models.critic_opt = (
                critic,
                torch.optim.AdamW(critic.parameters(), lr=alg.critic_lr),
            )

    # this rank's shards by name
    policy = property(lambda self: self.models.policy)
    optimizer = property(lambda self: self.models.optimizer)
    critic = property(lambda self: self.models.critic)
    critic_opt = property(lambda self: self.models.critic_opt)
    reference = property(lambda self: self.models.reference)

    # -- warm-start and the frozen reference ----------------------------------------------------
    def warm_start_step(self, batch: TokenBatch) -> float:
        """One supervised step on this rank's share of `batch`'s rows; returns this rank's share of the loss."""
        if self._warmup_opt is None:
            self._warmup_opt = torch.optim.AdamW(
                self.policy.parameters(), lr=self.spec.trainer.warmup_lr, weight_decay=0.0
            )
        total_tokens = batch.mask.sum().clamp_min(1.0)
        batch = batch.select(self.share(torch.arange(batch.tokens.shape[0]))).to(self.device)
        logp, _ = token_logprobs(self.policy, batch)
        loss = -(logp * batch.mask).sum() / total_tokens.to(self.device)
        self._warmup_opt.zero_grad(set_to_none=True)
        loss.backward()
        self._warmup_opt.step()
        return loss.item()

    def freeze_reference(self) -> None:
        """The reference is the policy as it is now (after the warm-start): a sharded, frozen copy; kept as
        it is when a checkpoint's reference was loaded already."""
        self._warmup_opt = None
        if not self.spec.with_reference or self.reference is not None:
            return
        reference = shard_model(
            load_policy(self.spec.model_path).to(self.device), self.mesh
        ).requires_grad_(False)
        with torch.no_grad():
            for ref, param in zip(reference.parameters(), self.policy.parameters()):
                ref.copy_(param)  # shard to shard: same mesh, same placements
        self.models.reference = reference

    # -- the phases of a step, on this rank's rows -----------------------------------------------
    def share(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's equal part of `rows` (the driver checked that they divide evenly)."""
        return rows.chunk(self.world_size)[self.rank]

    def score(self, batch: TokenBatch) -> tuple[Optional[torch.Tensor], ...]:
        """trainers.update.score on this rank's share of the rows (OldScores' fields, on the CPU)."""
        batch = batch.select(self.share(torch.arange(batch.tokens.shape[0]))).to(self.device)
        old = score(self.models, batch, self.spec.algorithm, self.spec.trainer.micro_batch_size)
        return tuple(None if t is None else t.cpu() for t in old.tensors())

    def update(
        self,
        batch: TokenBatch,
        old_logp: torch.Tensor,
        ref_logp: Optional[torch.Tensor],
        old_values: Optional[torch.Tensor],
        is_weights: Optional[torch.Tensor],
        advantages: torch.Tensor,
        returns: Optional[torch.Tensor],
        minibatches: list[torch.Tensor],
    ) -> list[dict[str, float]]:
        """One optimizer step per minibatch (row indices into the WHOLE batch, given to every rank), each on
        this rank's share of its rows; returns each minibatch's metrics as this rank's share."""
        d, alg, micro = self.device, self.spec.algorithm, self.spec.trainer.micro_batch_size
        batch = batch.to(d)
        old = OldScores(
            *(
                None if t is None else t.to(d)
                for t in (old_logp, None, ref_logp, old_values, is_weights)
            )
        )
        advantages, returns = advantages.to(d), None if returns is None else returns.to(d)
        out = []
        for idx in minibatches:
            total = batch.mask[idx].sum()  # the minibatch's tokens over all ranks
            mine = self.share(idx).to(d)
            out.append(
                minibatch_step(
                    self.models,
                    batch.select(mine),
                    old.select(mine),
                    advantages[mine],
                    None if returns is None else returns[mine],
                    alg,
                    micro,
                    total,
                    full_grad_norm,
                )
            )
        return out

    # -- refit ----------------------------------------------------------------------------------
    def send_weights(self, endpoint: Any, version: int) -> Optional[dict[str, Any]]:
        """Gather the policy tensor by tensor; the rank given an `endpoint` (a RefitEndpoint) streams each
        into its WeightSender's buckets, the others drop each tensor after the gather. Returns the sender's
        stats and the gather's peak memory on the sending rank."""
        meter = GatherMeter()
        tensors = gathered_parameters(self.policy, meter)
        if endpoint is None:
            drain(tensors)
            return None
        try:
            if self._sender is not None and self._sender.endpoint != endpoint.address:
                self._sender.close()
                self._sender = None
            if self._sender is None:
                self._sender = endpoint.sender(device=self.device.type)
            stats = self._sender.send(tensors, version)
        finally:
            drain(
                tensors
            )  # after an error the other ranks are still gathering: match their collectives
        return {
            "stats": stats,
            "gather_peak_bytes": meter.peak_bytes,
            "largest_tensor_bytes": meter.largest_tensor_bytes,
        }

    # -- checkpoints ----------------------------------------------------------------------------
    def _parts(self) -> Parts:
        return {
            "policy": (self.policy, self.optimizer),
            "critic": (self.critic, self.critic_opt),
            "reference": (self.reference, None),
        }

    def save(self, path: str) -> None:
        """Every rank writes its shards into the directory `path` (torch.distributed.checkpoint)."""
        save_states(self._parts(), path)

    def load(self, path: str) -> None:
        """Load shards saved by any number of ranks (DCP reshards to this world size)."""
        self.freeze_reference()  # the structure the reference's shards load into
        load_states(self._parts(), path)

    def close(self) -> None:
        import torch.distributed as dist

        if self._sender is not None:
            self._sender.close()
            self._sender = None
        if dist.is_initialized():
            dist.destroy_process_group()
