"""The project's RMSNorm: works under sequence parallelism and carries LayerNorm-Scaling.

megatron-core's torch fallback (``WrappedTorchNorm``) refuses sequence parallelism, and LNS
needs a depth-dependent scale; both are simple in a module of our own.

Math (spec §1): var = mean(x²) over the hidden dim in fp32; x·rsqrt(var + ε) cast back to the
input dtype, *then* multiplied by γ (and, in the fixed LNS form, by a constant 1/√(l+1)).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def param_device(config: TransformerConfig) -> torch.device:
    """Where megatron-core allocates parameters: CPU with ``use_cpu_initialization``."""
    if config.use_cpu_initialization:
        return torch.device("cpu")
    return torch.device(torch.cuda.current_device())


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + ε) with the statistics in fp32, returned in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    var = xf.pow(2).mean(dim=-1, keepdim=True)
    return (xf * torch.rsqrt(var + eps)).to(x.dtype)


class RMSNorm(MegatronModule):
    """RMSNorm with a learnable γ and an optional fixed output multiplier.

    Args:
        config: the model's TransformerConfig (``sequence_parallel`` and ``params_dtype`` are read).
        hidden_size: normalized dimension.
        eps: ε inside the square root.
        gamma_init: initial value of γ (LNS, learnable form: 1/√(l+1)).
        output_scale: fixed, non-learnable multiplier applied after γ (LNS, fixed form).
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-6,
        gamma_init: float = 1.0,
        output_scale: float = 1.0,
    ):
        super().__init__(config=config)
        self.eps = eps
        self.gamma_init = float(gamma_init)
        self.output_scale = float(output_scale)
        self.weight = torch.nn.Parameter(
            torch.full(
                (hidden_size,),
                self.gamma_init,
                dtype=config.params_dtype,
                device=param_device(config),
            )
        )
        # Under sequence parallelism each TP rank sees a slice of the sequence, so γ's gradient
        # is a partial sum that finalize_model_grads must all-reduce over TP.
        self.weight.sequence_parallel = config.sequence_parallel

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(self.gamma_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = rms_normalize(x, self.eps) * self.weight
        if self.output_scale != 1.0:
            out = out * self.output_scale
        return out

    def extra_repr(self) -> str:
        extra = f", output_scale={self.output_scale:.6g}" if self.output_scale != 1.0 else ""
        return f"{self.weight.shape[0]}, eps={self.eps}{extra}"
