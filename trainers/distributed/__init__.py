"""Distributed training on Ray: `trainer.num_workers > 1` trainer ranks sharding the models with FSDP2.

`cluster` (the Ray lifecycle and placement group), `sharding` (FSDP2 and the tensor-by-tensor gather),
`rank` (one rank's actor), `learner` (the driver's handle on all ranks). Nothing here imports Ray at import.
"""
