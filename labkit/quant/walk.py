"""Walking a transformer the way layer-wise quantizers do: block by block, linear by linear.

GPTQ and AWQ both quantize one decoder block at a time, feeding calibration text through the blocks
already processed, so each block sees the inputs it will really get. We find the blocks (the longest
ModuleList: `model.layers` in Llama, `transformer.h` in GPT-2), the linear layers inside them (nn.Linear,
and GPT-2's Conv1D, which stores its weight transposed), and capture what flows into them with hooks.
"""

from contextlib import contextmanager

import torch
import torch.nn as nn
from tqdm.auto import tqdm

try:  # GPT-2 style models use Conv1D: y = x @ W + b with W [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

LINEAR_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


def find_blocks(model) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the repeated decoder blocks: the ModuleList with the most parameters."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[2]:
                best = (name, mod, size)
    if best is None:
        raise ValueError("could not find the model's decoder blocks (no nn.ModuleList)")
    return best[0], best[1]


def find_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    return {
        f"{prefix}{name}": m for name, m in module.named_modules() if isinstance(m, LINEAR_TYPES)
    }


def output_head(model) -> tuple[str, nn.Module] | None:
    """The output projection (lm_head), which in the course model shares its weight with the embedding."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    for name, m in model.named_modules():
        if m is head:
            return name, m
    return None


def get_weight(layer: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features], whatever the layer type (a copy for Conv1D)."""
    w = layer.weight.data
    return w.t() if Conv1D and isinstance(layer, Conv1D) else w


def set_weight(layer: nn.Module, w: torch.Tensor) -> None:
    """Write a [out, in] weight back in place (in place, so a tied embedding sees the same values)."""
    if Conv1D and isinstance(layer, Conv1D):
        w = w.t()
    layer.weight.data.copy_(w.to(layer.weight.dtype))


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
    store = {name: [] for name in modules}
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
    groups, last_x, done = [], None, set()
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


@torch.no_grad()
def untie_output_head(model) -> tuple[str, nn.Module]:
    """Give the output head its own copy of a weight tied to the input embedding; return (name, head).

    Quantizing the head then changes only the output projection: the embedding lookup keeps its float
    weights (one row per token read, so it costs no compute), as GPTQModel and llm-compressor do for
    lm_head. The price is storing both matrices.
    """
    head = output_head(model)
    if head is None:
        raise ValueError("this model has no output embedding layer to quantize")
    name, layer = head
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and emb.weight is layer.weight:
        layer.weight = nn.Parameter(
            layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad
        )
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    return name, layer


def quantizable_layers(
    model, include_head: bool = False
) -> list[tuple[int | None, dict[str, nn.Module]]]:
    """[(block index, {full name: linear})] in forward order; the output head (block None, untied) last if asked."""
    blocks_name, blocks = find_blocks(model)
    out = [(i, find_linears(block, f"{blocks_name}.{i}.")) for i, block in enumerate(blocks)]
    if include_head:
        name, head = untie_output_head(model)
        out.append((None, {name: head}))
    return out
