"""The optimizer's part of a checkpoint, and the megatron-core 0.16.1 internals it needs
working around."""

from __future__ import annotations

# The distributed optimizer's state in a layout-free form: it reloads under another TP/PP/DP
# layout. (megatron-core 0.16.1 removed "fully_sharded_model_space"; "dp_reshardable" fails to
# load with torch's Adam. "fully_reshardable" needs the workaround in load_optimizer_state.)
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def optimizer_sharded_state_dict(optimizer, model_sd: dict, *, is_loading: bool = False):
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIM_METADATA)


def materialize_optimizer_state(optimizer) -> None:
    """A fresh distributed optimizer has no Adam state (nor step) to load into; megatron-core
    fills it with a zero-gradient step first, the values being replaced by the load."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if (
            hasattr(sub, "_init_optimizer_states_with_dummy_values")
            and inner is not None
            and len(inner.state) == 0
        ):
            sub._init_optimizer_states_with_dummy_values()


def load_optimizer_state(optimizer, state: dict) -> None:
    """optimizer.load_state_dict, working around a megatron-core 0.16.1 issue: with torch's Adam
    (no Apex/TE) the distributed optimizer's fully-reshardable load copies every per-parameter
    state key, including "step", which that format does not store. The per-parameter "step"
    (restored from the param groups by the first half of the load) is set aside while the
    parameter states are copied in, then put back — one tensor per parameter, since that first
    half hands every parameter the same step tensor, which torch's Adam increments in place
    once per parameter."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    param_state = state.get("param_state") if len(subs) == 1 else None
    distributed = hasattr(subs[0], "load_parameter_state_from_fully_reshardable")
    if not (
        distributed
        and param_state is not None
        and state.get("param_state_sharding_type") == "fully_reshardable"
    ):
        optimizer.load_state_dict(state)
        return
    sub = subs[0]
    rest = {k: v for k, v in state.items() if k not in ("param_state", "param_state_sharding_type")}
    sub.load_state_dict(rest)
    steps = {p: st.pop("step") for p, st in sub.optimizer.state.items() if "step" in st}
    try:
        sub.load_parameter_state_from_fully_reshardable(param_state)
    finally:
        for p, step in steps.items():
            sub.optimizer.state[p]["step"] = step.clone()
