"""Helpers shared by the multi-process tests: launch ranks, build a layout, train a few steps."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import traceback

import torch
import torch.multiprocessing as mp

from megatron_ext.platform.distributed import free_port
from tests.helpers import cpu_share

# Ranks start from a fork server that imported torch, megatron-core and the project once: a
# rank then starts in milliseconds instead of the ~5 s of CPU each import costs a spawned one
# (a few hundred ranks over the suite). The server is a fresh interpreter, forked from before
# any process group, thread pool or test state exists.
START_METHOD = "forkserver"
multiprocessing.get_context(START_METHOD).set_forkserver_preload(
    ["torch", "megatron.core", "megatron_ext.training.trainer", "tests.helpers.dist_workers"]
)


def _entry(rank, world_size, port, fn, args, kwargs, result_dir):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        result = fn(*args, **kwargs)
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_ranks(fn, world_size: int, args, tmp_path, kwargs=None) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned gloo ranks; return each rank's
    result."""
    result_dir = str(tmp_path / f"ranks_{fn.__name__}_{free_port()}")
    os.makedirs(result_dir)
    try:
        with cpu_share.exclusive() if world_size > 1 else contextlib.nullcontext():
            mp.start_processes(
                _entry,
                args=(world_size, free_port(), fn, args, kwargs or {}, result_dir),
                nprocs=world_size,
                join=True,
                start_method=START_METHOD,
            )
    except Exception as err:
        errors = [
            open(os.path.join(result_dir, f)).read()
            for f in sorted(os.listdir(result_dir))
            if f.endswith(".err")
        ]
        raise AssertionError("rank failed:\n" + "\n".join(errors)) from err
    return [
        torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False)
        for r in range(world_size)
    ]


def synthetic_batches(
    seed: int,
    num_batches: int,
    global_batch: int,
    seq_length: int,
    vocab: int,
    pad_fraction: float = 0.2,
):
    """Deterministic global batches with right padding (loss mask 0 on pads)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        tokens = torch.randint(0, vocab, (global_batch, seq_length + 1), generator=gen)
        lengths = torch.randint(
            int(seq_length * (1 - pad_fraction)), seq_length + 1, (global_batch,), generator=gen
        )
        mask = (torch.arange(seq_length)[None, :] < lengths[:, None]).float()
        batches.append(
            dict(
                tokens=tokens[:, :-1].contiguous(),
                labels=tokens[:, 1:].contiguous(),
                loss_mask=mask,
            )
        )
    return batches


def micro_batches(global_batch: dict, dp_rank: int, dp_size: int, micro_batch_size: int):
    """Split a global batch into this DP rank's micro-batches (contiguous slice per rank)."""
    n = global_batch["tokens"].shape[0]
    per_rank = n // dp_size
    out = []
    for start in range(dp_rank * per_rank, (dp_rank + 1) * per_rank, micro_batch_size):
        mb = {k: v[start : start + micro_batch_size] for k, v in global_batch.items()}
        seq = mb["tokens"].shape[1]
        mb["position_ids"] = torch.arange(seq).unsqueeze(0).expand(micro_batch_size, -1)
        out.append(mb)
    return out


# --- layouts ---------------------------------------------------------------------------------

PARITY_STEPS = 5
GLOBAL_BATCH = 4
MICRO_BATCH = 1
# Adam moves every gate by ≈ lr per step: 0.015 over PARITY_STEPS. Higher rates make the tiny
# Sandwich-LN models chaotic: at 5e-3 the gradient norms of TP 2 + SP and of one process are
# 1.4e-4 apart by step 5 from fp32 rounding alone (measured), which no bound could tell from a bug.
PARITY_LR = 3e-3
# Layer l's gate starts at PARITY_GATES[l % 4]: away from 0, so that every gate path (c ≠ 1,
# both signs of SiLU(g)) is exercised from the first step.
PARITY_GATES = (0.3, -0.5, 0.8, -0.2)
# Adam's first steps move a weight by ≈ lr·g/(|g| + eps): for gradient entries near zero, the
# fp32 rounding noise of a different summation order (~1e-7 of the tensor's largest entry) is
# amplified by lr/eps. At eps 1e-8 that alone moves a few weights of a layout by 1e-3 relative
# and the runs drift apart within a few steps (measured: Sandwich-LN, TP 2, lr 1e-2); at 1e-6
# the amplification stays below the parity tolerance, and every entry of |g| > 1e-5 (gates,
# norms, nearly all weights) still gets a sign-like Adam update.
PARITY_ADAM_EPS = 1e-6


def set_gates(chunks, values) -> None:
    """Set layer l's GPAS gate to ``values[l % len(values)]`` (global layer index)."""
    import torch

    with torch.no_grad():
        for chunk in chunks:
            for layer in chunk.decoder.layers:
                if getattr(layer, "gpas_gate", None) is not None:
                    layer.gpas_gate.fill_(values[(layer.layer_number - 1) % len(values)])


def train_layout(
    layout: dict,
    norm_types,
    ckpt_root=None,
    steps: int = PARITY_STEPS,
    initial_gates=None,
    export_root=None,
    *,
    global_batch: int = GLOBAL_BATCH,
    micro_batch: int = MICRO_BATCH,
    lr: float = PARITY_LR,
    adam_eps: float = PARITY_ADAM_EPS,
    bf16: bool = False,
    snapshot: bool = False,
    snapshot_step: int = 1,
    fp64_reference: bool = False,
    rounding_twin_seed=None,
    config_overrides=None,
):
    """Train each norm type ``steps`` iterations under ``layout`` from the same seeded init.

    Returns {norm_type: {...}} with per-step ``losses`` (from the last pipeline stage),
    ``grad_norms`` and ``gate_grad_norms`` (every rank), ``eval_loss`` and ``buckets`` (gradient
    buckets of the first model chunk). ``snapshot`` adds this rank's shards of every gradient at
    step ``snapshot_step`` and of every parameter at the end (see :func:`merge_snapshots`);
    ``fp64_reference`` (one process only) adds, per step, the relative fp32 error of every
    gradient and of the gates' joint gradient norm, measured against a float64 evaluation at
    that step's parameters. ``rounding_twin_seed`` (one process only) makes this run a
    rounding twin: before every step each weight is moved by one fp32 rounding of a dot product
    (:func:`perturb_by_rounding`), as a layout's other summation order moves it, so the twin's
    distance from the plain run measures how far rounding alone carries the trajectory by each
    step. With ``ckpt_root`` the trained weights are saved to
    ``ckpt_root/<norm_type>``; with ``export_root`` as a weights-only checkpoint with its run
    configuration (what the Hugging Face export reads). ``initial_gates`` moves the gates away
    from 0 before training.
    """
    import dataclasses

    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import OptimizerConfig

    from megatron_ext.checkpoint.save_load import save_checkpoint
    from megatron_ext.checkpoint.weights import save_model
    from megatron_ext.config import ParallelConfig
    from megatron_ext.models.gpt import build_model_chunks, build_transformer_config
    from megatron_ext.models.presets import model_preset
    from megatron_ext.platform.distributed import init_distributed
    from megatron_ext.training.model_setup import sync_params, wrap_model
    from megatron_ext.training.optimizer import build_optimizer
    from megatron_ext.training.step import evaluate_loss, train_step

    parallel = ParallelConfig(**layout)
    init_distributed(parallel, device="cpu", num_layers=4, seed=1234)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    num_micro = global_batch // (dp_size * micro_batch)
    results = {}
    for norm_type in norm_types:
        cfg = model_preset("tiny4", norm_type=norm_type)
        tc = build_transformer_config(
            cfg, parallel, use_cpu=True, bf16=bf16, **(config_overrides or {})
        )
        chunks = build_model_chunks(cfg, tc, seed=99)
        if initial_gates is not None:
            set_gates(chunks, initial_gates)
        model = wrap_model(chunks, tc, parallel)
        optimizer = build_optimizer(
            model,
            OptimizerConfig(
                optimizer="adam",
                lr=lr,
                min_lr=0.0,
                weight_decay=0.0,
                adam_beta1=0.9,
                adam_beta2=0.999,
                adam_eps=adam_eps,
                clip_grad=0.0,
                bf16=bf16,
                params_dtype=tc.params_dtype,
                use_distributed_optimizer=parallel.use_distributed_optimizer,
            ),
        )
        # One training batch, seen every step (so the loss must fall), and one held-out batch.
        train_batch, eval_batch = synthetic_batches(
            seed=5,
            num_batches=2,
            global_batch=global_batch,
            seq_length=cfg.seq_length,
            vocab=cfg.vocab_size,
        )
        losses, grad_norms, gate_grad_norms = [], [], []
        out = {}
        twin_gen = None
        if rounding_twin_seed is not None:
            twin_gen = torch.Generator().manual_seed(rounding_twin_seed)
        for step in range(1, steps + 1):
            if twin_gen is not None:
                perturb_by_rounding(cfg, model, twin_gen)
            mbs = micro_batches(train_batch, dp_rank, dp_size, micro_batch)
            if fp64_reference:
                out.setdefault("fp32_grad_error", []).append(
                    fp32_gradient_error(
                        cfg, tc, model, micro_batches(train_batch, 0, 1, micro_batch)
                    )
                )
            result = train_step(
                [iter(mbs) for _ in model],
                model,
                optimizer,
                num_microbatches=num_micro,
                seq_length=cfg.seq_length,
                micro_batch_size=micro_batch,
                clip_grad=1.0,
                clip_gate_grad=0.01,
            )
            losses.append(result.loss)
            grad_norms.append(result.grad_norm)
            gate_grad_norms.append(result.gate_grad_norm)
            if snapshot and step == snapshot_step:
                materialize_full_grads(model, parallel)
                out["snapshot"] = local_snapshot(model, "grad")
        out.update(
            losses=losses,
            grad_norms=grad_norms,
            gate_grad_norms=gate_grad_norms,
            buckets=len(model[0].bucket_groups),
            last_stage=ps.is_pipeline_last_stage(ignore_virtual=True),
        )
        if snapshot:
            sync_params(model)
            out["final"] = local_snapshot(model, "param")
        mbs = micro_batches(eval_batch, dp_rank, dp_size, micro_batch)
        out["eval_loss"] = evaluate_loss(
            [iter(mbs) for _ in model],
            model,
            num_microbatches=num_micro,
            seq_length=cfg.seq_length,
            micro_batch_size=micro_batch,
        )
        sync_params(model)  # the last step's parameters, on every rank
        if ckpt_root is not None:
            save_model(model, os.path.join(ckpt_root, norm_type))
        if export_root is not None:
            run_state = {"iteration": steps, "config": {"model": dataclasses.asdict(cfg)}}
            save_checkpoint(
                os.path.join(export_root, norm_type), steps, model, None, None, run_state
            )
        results[norm_type] = out
    return results


# --- full gradients and parameters of a layout -----------------------------------------------


def materialize_full_grads(model, parallel) -> None:
    """Make every DP rank hold the whole reduced gradient in its buffer.

    The distributed optimizer reduce-scatters: after a step each rank's gradient buffer holds
    the reduced (and clipped) values only in its own shard of each bucket. Gather the shards.
    """
    import torch
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    if not parallel.use_distributed_optimizer:
        return
    for chunk in model:
        for group in chunk.bucket_groups:
            comm = group.intra_distributed_optimizer_instance_group
            size, rank = comm.size(), comm.rank()
            for bucket in group.buckets:
                mine = shard_buffer(bucket.grad_data, size)[rank].clone()
                torch.distributed.all_gather_into_tensor(bucket.grad_data, mine, group=comm)


def _global_name(gpt, name: str) -> str:
    """``decoder.layers.<local i>.…`` → ``decoder.layers.<global layer index>.…``."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(gpt.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def local_snapshot(model, what: str) -> dict:
    """This rank's parameters (``what="param"``) or gradients (``"grad"``) by global name, with
    how TP split each one."""
    from megatron.core import parallel_state as ps

    from megatron_ext.models.gpt import unwrap_model

    tensors = {}
    for chunk in model:
        gpt = unwrap_model(chunk)
        for name, p in gpt.named_parameters():
            value = p if what == "param" else p.main_grad
            tensors[_global_name(gpt, name)] = {
                "value": value.detach().float().clone(),
                "partition_dim": (
                    p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
                ),
                "swiglu": name.endswith("linear_fc1.weight"),
            }
    return {
        "tensors": tensors,
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
    }


def merge_snapshots(snapshots) -> dict:
    """Full (single-process-shaped) tensors from every rank's snapshot.

    Tensor-parallel shards are concatenated along their partition dimension (SwiGLU's fc1 holds
    [gate; up] per rank, so halves are joined separately); replicated tensors must be identical
    on every TP rank (a missing all-reduce of a sequence-parallel gradient shows up here); every
    data-parallel rank must hold the same reduced gradient.
    """
    import torch

    by_name: dict = {}
    for snap in snapshots:
        for name, t in snap["tensors"].items():
            by_name.setdefault(name, []).append((snap["dp_rank"], snap["tp_rank"], t))
    full = {}
    for name, entries in by_name.items():
        per_dp: dict = {}
        for dp_rank, tp_rank, t in entries:
            per_dp.setdefault(dp_rank, {})[tp_rank] = t
        fulls = [_join_tp(name, shards) for _, shards in sorted(per_dp.items())]
        for other in fulls[1:]:
            assert torch.equal(other, fulls[0]), f"{name} differs across DP ranks"
        full[name] = fulls[0]
    return full


def _join_tp(name: str, shards: dict):
    import torch

    parts = [shards[r]["value"] for r in sorted(shards)]
    dim = shards[min(shards)]["partition_dim"]
    if dim is None:
        for other in parts[1:]:
            assert torch.equal(other, parts[0]), f"{name} differs across TP ranks"
        return parts[0]
    if shards[min(shards)]["swiglu"]:
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)


#: fp32's unit roundoff: the relative size of one rounding.
FP32_ROUNDOFF = 2.0**-24


def rounding_scale(cfg) -> float:
    """The relative rounding error of one fp32 dot product of the model's largest fan-in n:
    n additions carry about √n roundings."""
    return FP32_ROUNDOFF * max(cfg.hidden_size, cfg.ffn_hidden_size) ** 0.5


def perturb_by_rounding(cfg, model, gen) -> None:
    """Multiply every weight by 1 ± :func:`rounding_scale` (random signs from ``gen``)."""
    import torch

    from megatron_ext.models.gpt import unwrap_model

    scale = rounding_scale(cfg)
    with torch.no_grad():
        for chunk in model:
            for _, p in sorted(unwrap_model(chunk).named_parameters()):
                signs = torch.randn(p.shape, generator=gen).sign().to(p.dtype)
                p.mul_(1 + scale * signs)


def fp32_gradient_error(cfg, tc, model, mbs, perturbations: int = 3) -> dict:
    """The fp32 rounding noise of every gradient at the model's current weights, relative to
    the gradient (and the same for the gates' joint gradient norm, key ``gate_grad_norm``).

    Two float64 measurements, the larger counts: (1) ‖g_fp32 − g_fp64‖ from the same weights;
    (2) how far the float64 gradient moves when every weight is perturbed by the rounding of
    one fp32 dot product (relative √n·2⁻²⁴, n the model's largest fan-in: n additions carry
    about √n roundings; random signs), the largest of ``perturbations`` draws. (1) alone is one
    sample of a random walk and can be small by luck; (2) measures the gradient's sensitivity
    to rounding-sized changes of the activations, which is what a different summation order in
    a parallel layout perturbs (a gate gradient, one sum over a whole activation with
    cancellation, is 100× more sensitive than a weight gradient).

    The loss is the schedule's (mean over micro-batches of per-micro-batch token means) with
    plain autograd; the cross-entropy is computed here in the model's own precision
    (megatron-core's casts logits to float32). One process only.
    """
    import torch

    from megatron_ext.models.gpt import unwrap_model

    trained = {n: p.detach() for n, p in unwrap_model(model[0]).named_parameters()}
    exact = _plain_gradients(cfg, tc, trained, mbs, torch.float64)
    samples = [_plain_gradients(cfg, tc, trained, mbs, torch.float32)]
    gen = torch.Generator().manual_seed(0)
    scale = rounding_scale(cfg)
    for _ in range(perturbations):
        perturbed = {
            n: w.double() * (1 + scale * torch.randn(w.shape, generator=gen).sign())
            for n, w in trained.items()
        }
        samples.append(_plain_gradients(cfg, tc, perturbed, mbs, torch.float64))

    def noise(values) -> float:
        ref = values(exact)
        return max(
            ((values(s) - ref).norm() / ref.norm().clamp(min=1e-300)).item() for s in samples
        )

    errors = {n: noise(lambda g, n=n: g[n]) for n in exact}
    gates = [n for n in exact if n.endswith("gpas_gate")]
    if gates:
        errors["gate_grad_norm"] = noise(
            lambda g: torch.stack([g[n] for n in gates]).norm().reshape(1)
        )
    return errors


def _plain_gradients(cfg, tc, weights: dict, mbs, dtype) -> dict:
    """Gradients of the schedule's loss by plain autograd, in ``dtype``, at ``weights``."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    from megatron_ext.models.gpt import build_model

    config = dataclasses.replace(
        tc, params_dtype=dtype, pipeline_dtype=dtype, attention_softmax_in_fp32=False
    )
    gpt = build_model(cfg, config, initialize=False)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            p.copy_(weights[name].to(dtype))
    total = 0.0
    for mb in mbs:
        logits = gpt(mb["tokens"], mb["position_ids"], None)
        per_token = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), mb["labels"].reshape(-1), reduction="none"
        )
        mask = mb["loss_mask"].reshape(-1).to(dtype)
        total = total + (per_token * mask).sum() / mask.sum() / len(mbs)
    total.backward()
    return {n: p.grad.detach().double() for n, p in gpt.named_parameters()}


def run_cli(argv: list) -> int:
    """Run pretrain_gpas.py's main in this (spawned) rank."""
    from megatron_ext.cli import pretrain as pretrain_gpas

    return pretrain_gpas.main(list(argv))
