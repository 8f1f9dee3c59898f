"""`harvest.batch_size: auto`: on a GPU, the largest batch whose forward pass fits in half the free
memory (a power of two, at most 1024 sequences and one shard's rows); on the CPU, 32
(larger batches do not run faster there).

At most one shard (of at least 16,384 tokens): the shards a batch ends are written only once its
forward pass is done, so a batch of several shards makes the writers wait for it at the start and
the harvest wait for them at the end.  On an H200 a 16,384-token batch ran the Pythia-70m-shaped
forward at 0.89 of a 131,072-token one's rate, and the harvest stored the same tokens/s at both.

The memory one sequence needs is measured, not modelled: one forward pass of a small probe batch
with the harvest's own hooks and truncation, its peak allocation above what was allocated before.
Half the free memory leaves room for the shard buffers, the allocator's fragmentation and
whatever else shares the GPU.
"""

from __future__ import annotations

import numpy as np
import torch

from compsae.lm.models import LoadedModel

CPU_BATCH = 32
MAX_BATCH = 1024
MEMORY_SHARE = 0.5
# the one-shard cap never goes below this many tokens a batch: on an H200 the Pythia-70m-shaped
# forward ran 1.28M tokens/s at 16,384 tokens a batch and 1.44M at 131,072, so smaller shards
# than the default must not shrink the batch further
MIN_CAP_TOKENS = 16_384
PROBE_SEQS = 4  # sequences in the measuring forward pass


def choose_batch(
    free_bytes: float, bytes_per_seq: float, n_seqs: int, max_seqs: int = MAX_BATCH
) -> int:
    """Largest power of two `b` with `b * bytes_per_seq <= MEMORY_SHARE * free_bytes`, within
    [1, min(MAX_BATCH, max_seqs)] and no larger than the power of two that covers `n_seqs`."""
    fit = int(MEMORY_SHARE * free_bytes // max(bytes_per_seq, 1.0))
    cover = 1 << max(0, int(n_seqs) - 1).bit_length()
    return max(
        1,
        min(
            1 << max(fit, 1).bit_length() - 1,
            MAX_BATCH,
            1 << max(max_seqs, 1).bit_length() - 1,
            cover,
        ),
    )


def bytes_per_sequence(
    loaded: LoadedModel, hooks: list[str], tokens: np.ndarray, stop: int | None
) -> float:
    """Peak CUDA memory of one harvest forward pass per sequence, from `tokens[:PROBE_SEQS]`."""
    device = loaded.device
    seqs = torch.from_numpy(tokens[:PROBE_SEQS]).to(device=device, dtype=torch.long)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        acts = loaded.run_hooks(seqs, hooks, stop)
        del acts
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / len(seqs)


def auto_batch_size(
    loaded: LoadedModel,
    hooks: list[str],
    tokens: np.ndarray,
    stop: int | None,
    shard_rows: int | None = None,
    n_seqs: int | None = None,
) -> int:
    """The batch size `auto` stands for, for the harvest's `tokens: [n_seqs, context]` (at least
    their first `PROBE_SEQS`; `n_seqs` when not all of them are there yet) on the model's device
    and shards of `shard_rows` rows (None: no cap from the shards)."""
    n_seqs = len(tokens) if n_seqs is None else n_seqs
    if loaded.device.type != "cuda":
        return min(CPU_BATCH, n_seqs)
    per_seq = bytes_per_sequence(loaded, hooks, tokens, stop)
    free, _total = torch.cuda.mem_get_info(loaded.device)
    max_seqs = MAX_BATCH if shard_rows is None else shard_cap(shard_rows, tokens.shape[1])
    return choose_batch(free, per_seq, n_seqs, max_seqs)


def shard_cap(shard_rows: int, context: int) -> int:
    """Most sequences `auto` puts in a batch: one shard's rows, or `MIN_CAP_TOKENS` if more."""
    return max(1, max(shard_rows, MIN_CAP_TOKENS) // context)
