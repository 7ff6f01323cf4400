"""Past one machine: `torchrun --nproc-per-node N [--nnodes M ...] cli.py compress ...` runs pass 1, the LP and pass 2
over ranks with torch.distributed (gloo on CPU, NCCL on GPU) and writes what one process writes.

- driver.py  RankDriver: the pipeline's driver on one rank (batches split over ranks, rank 0 decides and writes)
- calls.py   ShardedCalls: a layer's experts and linears owned by ranks; routed inputs sent to their owners
- assign.py  owners by LPT over routed rows and matrix sizes; contiguous batch runs (pure)
- lead.py    rank 0's journals and measurement cache, their decisions broadcast
- comm.py    the process group, guarded collectives, heartbeats: a failed or dead rank is named, never a hang
- wire.py    tensors packed into bytes for the collectives (no pickle)
- launch.py  the CLI's entry when launched as a rank
"""

from .comm import RankFailure, launched
from .driver import NotDistributed

__all__ = ["RankFailure", "NotDistributed", "launched"]
