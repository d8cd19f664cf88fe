"""GPAS overhead: pre_gpas vs pre, forward+backward time and saved-activation memory.

Both models are built from the same seed and timed alternately (ABAB…) in one process, so the
ratio is measured side by side. Saved-activation memory is the total size of the distinct
storages autograd keeps for backward (via saved_tensors_hooks).

    python bench/bench_gpas_overhead.py            # CPU (uses CPU emulation)
    python bench/bench_gpas_overhead.py --device cuda --bf16

Target (issue): time ratio ≤ 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_ext.config import ParallelConfig
from megatron_ext.models.gpt import build_model, build_transformer_config
from megatron_ext.models.presets import model_preset
from megatron_ext.platform.distributed import init_distributed

SHAPES = {
    "tiny": dict(preset="tiny4", batch=8, seq=128),
    "71m-shaped, 2 layers": dict(preset="71m", num_layers=2, batch=4, seq=256),
}


def _model(norm_type, shape, device, bf16):
    kw = {"num_layers": shape["num_layers"]} if "num_layers" in shape else {}
    cfg = model_preset(shape["preset"], norm_type=norm_type, seq_length=shape["seq"], **kw)
    tc = build_transformer_config(cfg, bf16=bf16, use_cpu=device == "cpu")
    model = build_model(cfg, tc, seed=1)
    if bf16:
        model = model.to(torch.bfloat16)
    return cfg, model.to(device)


def _inputs(cfg, shape, device):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (shape["batch"], shape["seq"]), generator=gen)
    pos = torch.arange(shape["seq"]).unsqueeze(0).expand(shape["batch"], -1)
    return tokens.to(device), pos.to(device)


def _step(model, tokens, pos):
    loss = model(tokens, pos, None, labels=tokens).float().mean()
    loss.backward()


def _saved_bytes(model, tokens, pos) -> int:
    storages = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, pos, None, labels=tokens).float().mean()
    loss.backward()
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in param_ptrs)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run(shape_name, shape, device, bf16, repeats):
    models = {nt: _model(nt, shape, device, bf16) for nt in ("pre", "pre_gpas")}
    tokens, pos = _inputs(models["pre"][0], shape, device)
    times = {nt: [] for nt in models}
    for _, m in models.values():  # warm-up
        _step(m, tokens, pos)
    for _ in range(repeats):
        for nt, (_, m) in models.items():
            m.zero_grad(set_to_none=True)
            _sync(device)
            t0 = time.perf_counter()
            _step(m, tokens, pos)
            _sync(device)
            times[nt].append(time.perf_counter() - t0)
    med = {nt: statistics.median(v) for nt, v in times.items()}
    mem = {nt: _saved_bytes(m, tokens, pos) for nt, (_, m) in models.items()}
    print(
        f"{shape_name:>22}: pre {med['pre'] * 1e3:8.2f} ms  "
        f"pre_gpas {med['pre_gpas'] * 1e3:8.2f} ms"
        f"  time ratio {med['pre_gpas'] / med['pre']:.3f}   saved activations "
        f"{mem['pre'] / 2**20:.1f} → {mem['pre_gpas'] / 2**20:.1f} MiB"
        f" (ratio {mem['pre_gpas'] / mem['pre']:.3f})"
    )
    return med["pre_gpas"] / med["pre"], mem["pre_gpas"] / mem["pre"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    init_distributed(ParallelConfig(), device=args.device)
    torch.set_grad_enabled(True)
    print(
        f"device={args.device} bf16={args.bf16} torch={torch.__version__} "
        f"threads={torch.get_num_threads()}"
    )
    for name, shape in SHAPES.items():
        run(name, shape, args.device, args.bf16, args.repeats)


if __name__ == "__main__":
    main()
