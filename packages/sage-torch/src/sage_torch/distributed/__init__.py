"""Context parallelism for sage's attention over torch.distributed (forward only).

* :func:`ring_attention`: K/V shards travel around the ring; causal is load balanced by the
  zigzag split (:func:`shard_sequence` ``sharding="zigzag"``).
* :func:`ulysses_attention`: all-to-all from sequence shards to head groups and back.
* :func:`merge_attention`: the out/LSE merge both are built on (numerically stable, ``-inf`` rows).
* :func:`shard_sequence` / :func:`unshard_sequence`: the contiguous and zigzag splits.

Each block runs :func:`sage_torch.attention` with ``return_lse=True`` (natural-log LSE, BSHD or
BHSD), or a per-block function of your own (``attention_fn=``). torch.distributed is imported
when these functions run, not when this package is imported. Tested on CPU with gloo
(packages/sage-torch/tests/test_torch_distributed.py); the multi-GPU run is ci/context_parallel.sh.
"""

from .merge import LseAccumulator, merge_attention
from .ring import RingComm, ring_attention
from .sharding import SHARDINGS, shard_sequence, unshard_sequence
from .ulysses import ulysses_attention

__all__ = ["ring_attention", "ulysses_attention", "merge_attention", "LseAccumulator", "RingComm",
           "shard_sequence", "unshard_sequence", "SHARDINGS"]
