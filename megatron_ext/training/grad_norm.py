"""Gradient norms without a host sync per parameter, where megatron-core has no fused kernel.

Without Transformer Engine or Apex, megatron-core 0.16.1 computes the L2 norm used for gradient
clipping with ``local_multi_tensor_l2_norm``: one ``torch.norm`` per parameter, then
``torch.tensor([...])`` of those device scalars — a device→host copy per parameter (hundreds per
step at 1B) — and one more for the total. :func:`foreach_l2_norm` computes the same quantity with
``torch._foreach_norm`` and stays on the device: the norm of the per-tensor norms, as before.
On CPU it is bit-identical (the same per-tensor kernel); on CUDA the per-tensor sums may round in
another order.
"""

from __future__ import annotations

import torch

from megatron_ext.platform.collectives import collective_device


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm`` as megatron-core calls it: (total, None)."""
    tensors = [t for group in tensor_lists for t in group]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=collective_device()), None
    norms = torch._foreach_norm(tensors)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    return total.reshape(1), None


def use_foreach_l2_norm(enabled: bool = True) -> bool:
    """Replace megatron-core's per-parameter local fallback by :func:`foreach_l2_norm` (or put
    it back). Returns whether the fallback was in use; fused TE/Apex kernels are left alone."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    current = clip_grads.l2_norm_impl
    if current not in (utils.local_multi_tensor_l2_norm, foreach_l2_norm):
        return False
    clip_grads.l2_norm_impl = foreach_l2_norm if enabled else utils.local_multi_tensor_l2_norm
    return True
