"""Process-group helpers shared by the losses, the trainer and the evaluation code.

Every helper works unchanged in a single process (no ``torch.distributed`` group), so the same
code path runs on a laptop, in the CPU tests and under ``torchrun``.

Gathering convention: the tensors of all processes are concatenated along dim 0 **in rank
order**, so on rank r the local rows sit at ``[r * B, (r + 1) * B)`` of the gathered tensor.
The losses rely on this to find their positives (``rank() * B + arange(B)``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor

# Shapes are exchanged as a fixed-length integer vector (ndim, then the sizes, zero-padded), so
# that the check itself never needs equal shapes to run.
_MAX_DIMS = 8


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group; 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group; 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def _check_same_shape(x: Tensor) -> None:
    """Raise on every rank if the ranks do not all hold a tensor of ``x``'s shape.

    ``all_gather`` with unequal shapes either hangs or returns garbage, depending on the
    backend, so this costs one tiny collective (and one host sync) to turn that into an error.
    Every rank sees the same gathered shapes, so every rank raises together: no rank is left
    waiting in a later collective.
    """
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"can only gather tensors of at most {_MAX_DIMS} dims, got shape {tuple(x.shape)}")
    meta = torch.zeros(_MAX_DIMS + 1, dtype=torch.long, device=x.device)
    meta[0] = x.dim()
    if x.dim():
        meta[1 : x.dim() + 1] = torch.tensor(x.shape, dtype=torch.long, device=x.device)
    metas = [torch.empty_like(meta) for _ in range(world_size())]
    dist.all_gather(metas, meta)
    shapes = [tuple(m[1 : int(m[0]) + 1].tolist()) for m in metas]
    if any(shape != shapes[0] for shape in shapes):
        raise ValueError(
            f"all_gather needs the same tensor shape on every process, got {shapes} (by rank); "
            "give every process the same local batch size (drop_last=True in the DataLoader, "
            "a DistributedSampler over the data set)"
        )


def gather_with_grad(x: Tensor, *, check_shapes: bool = True) -> Tensor:
    """All-gather ``x`` along dim 0, keeping the autograd graph.

    Args:
        x: [B, ...] the local tensor; the same shape on every process.
        check_shapes: exchange shapes first and raise a clear error if they differ.

    Returns:
        [W*B, ...] the tensors of all ranks in rank order; ``x`` itself when not distributed.

    Backward is a collective: every rank must run it. The gradient reaching ``x`` on rank r is
    the **sum over all ranks** of the gradient of their (local) losses w.r.t. rank r's rows, as
    ``torch.distributed.nn.functional.all_gather`` reduces the output gradients across ranks.
    """
    if not is_distributed():
        return x
    if check_shapes:
        _check_same_shape(x)
    return torch.cat(dist_fn.all_gather(x), dim=0)


def gather_no_grad(x: Tensor, *, check_shapes: bool = True) -> Tensor:
    """All-gather ``x`` along dim 0 with no autograd graph.

    Args:
        x: [B, ...] the local tensor; the same shape on every process.
        check_shapes: exchange shapes first and raise a clear error if they differ.

    Returns:
        [W*B, ...] detached, the tensors of all ranks in rank order. When not distributed this is
        ``x.detach()`` (a view of ``x``, no copy): detached in both cases so that a caller gets the
        same gradient semantics with one process as with many (the authors' release returned the
        live tensor on one GPU, so its single- and multi-GPU runs optimised different objectives).
    """
    if not is_distributed():
        return x.detach()
    if check_shapes:
        _check_same_shape(x)
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)
