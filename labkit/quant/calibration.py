"""Calibration: feeding text through a model and capturing what flows into its layers.

Layer-wise quantizers need each layer's real inputs. Hooks capture them (`capture_inputs`, `hooked`);
`block_inputs` records what the first decoder block receives and `run_block` feeds one block's outputs to
the next, so quantizing block i never re-runs blocks 0..i-1 from the embedding; `sequential_groups` orders a
block's linears as its forward pass calls them.
"""

from contextlib import contextmanager

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .layers import find_blocks


class _Stop(Exception):
    pass


@contextmanager
def hooked(modules: dict[str, nn.Module], fn, stop_after: nn.Module | None = None):
    """Call fn(name, x) with each module's input x, flattened to [tokens, features], on every forward.

    With stop_after, the forward pass is cut short after that module ran: no need to compute the rest
    of the model (and the 8192-wide output layer) just to see what flows into one block.
    """
    handles = [
        m.register_forward_hook(
            lambda mod, args, out, name=name: fn(
                name, args[0].detach().reshape(-1, args[0].shape[-1])
            )
        )
        for name, m in modules.items()
    ]
    if stop_after is not None:

        def stop(mod, args, out):
            raise _Stop

        handles.append(stop_after.register_forward_hook(stop))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_inputs(modules: dict[str, nn.Module], stop_after: nn.Module | None = None):
    """Collect every input of each module: {name: [tensor [tokens, features], ...]}."""
    store: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    with hooked(modules, lambda name, x: store[name].append(x), stop_after):
        yield store


@torch.no_grad()
def run_calibration(
    model, calib: torch.Tensor, batch_size: int = 8, desc: str | None = None
) -> None:
    """Feed calibration ids [n, seq] through the model in batches (hooks collect what they need)."""
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(calib), batch_size), desc=desc, disable=desc is None, leave=False):
        try:
            model(input_ids=calib[i : i + batch_size].to(device), use_cache=False)
        except _Stop:
            pass


@torch.no_grad()
def block_inputs(model, calib: torch.Tensor, batch_size: int = 8) -> list[tuple[tuple, dict]]:
    """What the first decoder block receives, (args, kwargs) per calibration batch.

    Layer-wise quantizers then run one block at a time on these, feeding each block's outputs to the
    next, instead of re-running the whole model from the embedding for every block.
    """
    _, blocks = find_blocks(model)
    seen = []

    def grab(mod, args, kwargs):
        seen.append((args, kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run_calibration(model, calib, batch_size)
    finally:
        handle.remove()
    return seen


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """Run one block on every cached input; return its outputs packaged as the next block's inputs.

    A hook that stops the pass early (hooked(stop_after=...)) is fine: that batch then yields nothing.
    """
    outs = []
    for args, kwargs in inputs:
        try:
            y = block(*args, **kwargs)
        except _Stop:
            continue
        y = y[0] if isinstance(y, (tuple, list)) else y
        outs.append(((y, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": y}))
    return outs


@torch.no_grad()
def sequential_groups(block: nn.Module, linears: dict[str, nn.Module], inputs) -> list[list[str]]:
    """The block's linears in the order its forward pass calls them, those reading the same input together.

    In a Llama block: [q, k, v], [o], [gate, up], [down]. "True sequential" GPTQ quantizes one group at a
    time, so o_proj's Hessian is computed from the outputs of the already-quantized q/k/v, and so on.
    """
    calls = []
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: calls.append((name, args[0])))
        for name, m in linears.items()
    ]
    try:
        run_block(block, inputs[:1])
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_x, done = None, set()
    for name, x in calls:
        if name in done:
            continue
        if groups and x is last_x:
            groups[-1].append(name)
        else:
            groups.append([name])
        done.add(name)
        last_x = x
    groups += [
        [n] for n in linears if n not in done
    ]  # never called on this input: still quantize it
    return groups
