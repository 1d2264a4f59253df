"""LoRA adapters served side by side: one base model, many fine-tunes, requests of all of them in one batch.

A LoRA fine-tune leaves a base weight W [out, in] as it is and learns a low-rank update beside it:
    y = x W^T + s * (x A^T) B^T,      A [r, in], B [out, r], s = alpha / r (peft's scaling)
with r (8 here) far below in and out. Merging the update (W + s B A) gives every tenant a whole model of
its own: N fine-tunes cost N copies of the weights, and requests of different tenants cannot share a batch.
Unmerged, the base weights run once for the whole batch, and each token adds its own adapter's delta:
a few MB an adapter instead of a model. Computing those deltas one adapter at a time would cut the batch
into as many small matmuls as there are adapters; Punica's BGMV kernel (batched gather matrix-vector, used
by S-LoRA and vLLM) instead computes the whole batch at once, each token with its own adapter's A and B:
    shrink  u[t] = A[slot[t]] x[t]        [T, r]
    expand  d[t] = B[slot[t]] u[t]        [T, out]
On a GPU the kernel reads each token's A and B in place. In PyTorch on a CPU, gathering them first
(`A[slots]`, a [T, r, in] copy per projection: notebook 08d's exercise) is the slow part: for 1,024 tokens,
4 rank-8 adapters and SmolLM2's 576 x 576 q_proj it took 29 ms, 2.5x the projection itself (11.5 ms; one
thread, measured with other jobs on the machine). `lora_delta` does the same arithmetic for a few slots as
two plain matmuls instead: shrink with every slot's A at once (S x r columns, 32 for 4 rank-8 adapters),
zero the columns of the other slots (`slot_mask`), expand with every slot's B: 1.4 ms there. Each token's
delta sums exactly its own adapter's terms (the other slots' are exact zeros).

This file also reads an adapter as peft saves it (adapter_config.json, adapter_model.safetensors) and checks
it against the base model (`BaseShapes`), so that a wrong or damaged file is refused with a message that
says what is wrong before it reaches a batch. Which adapters sit in the stacked weights that `bgmv` reads
is lora_slots.py's business.
"""

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

# the projections an adapter may target: the attention's, which the runner computes one by one
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
WEIGHTS_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"

_uids = itertools.count(1)


class LoRAError(ValueError):
    """An adapter that cannot be served here; the message names the problem (the server's 400)."""


@dataclass(frozen=True)
class BaseShapes:
    """What an adapter must fit: the base model's layer count and each supported module's (in, out)."""

    num_layers: int
    modules: tuple[tuple[str, int, int], ...]  # (module, in_features, out_features)

    @classmethod
    def of(cls, model) -> "BaseShapes":
        attn = model.model.layers[0].self_attn
        dims = tuple(
            (m, getattr(attn, m).in_features, getattr(attn, m).out_features)
            for m in SUPPORTED_MODULES
        )
        return cls(len(model.model.layers), dims)

    def features(self, module: str) -> tuple[int, int]:
        return next((i, o) for m, i, o in self.modules if m == module)


@dataclass(eq=False)  # compared by identity: one load is one adapter, even of the same files
class LoRAAdapter:
    name: str
    path: str
    rank: int
    # (layer, module) -> (A [r, in], B [out, r] with the scaling folded in)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    uid: int = 0  # unique per load: the root of its sequences' prefix-cache keys (block_manager.py)

    def __post_init__(self):
        self.uid = next(_uids)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())

    @classmethod
    def load(cls, name: str, path: str | Path, base: BaseShapes, max_rank: int) -> "LoRAAdapter":
        """Read a peft LoRA directory and check it fits `base` and a rank of at most `max_rank`."""
        path = Path(path)
        config = read_config(path)
        rank = config.get("r")
        if not isinstance(rank, int) or not 1 <= rank <= max_rank:
            raise LoRAError(
                f"adapter {name!r} has rank {rank!r}; this engine takes ranks 1..{max_rank} "
                f"(raise --max-lora-rank)"
            )
        alpha = config.get("lora_alpha", rank)
        scaling = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
        try:
            tensors = load_file(path / WEIGHTS_FILE)
        except (SafetensorError, OSError, ValueError) as err:
            raise LoRAError(f"cannot read {path / WEIGHTS_FILE}: {err}") from err
        weights = parse_weights(name, tensors, base, rank, scaling)
        return cls(name, str(path), rank, weights)


def read_config(path: Path) -> dict:
    """adapter_config.json, refused unless it is a plain LoRA (no DoRA, no biases, no extra modules)."""
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise LoRAError(f"{path} is not a LoRA adapter: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise LoRAError(f"cannot read {path / CONFIG_FILE}: {err}") from err
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise LoRAError(f"{path / CONFIG_FILE} is not a peft LoRA config (peft_type must be LORA)")
    unsupported = {
        "use_dora": config.get("use_dora"),
        "bias": config.get("bias") not in (None, "none"),
        "modules_to_save": config.get("modules_to_save"),
    }
    if any(unsupported.values()):
        names = [k for k, v in unsupported.items() if v]
        raise LoRAError(f"{path}: {', '.join(names)} are not supported; train a plain LoRA")
    return config


def parse_weights(name: str, tensors: dict, base: BaseShapes, rank: int, scaling: float) -> dict:
    """peft's `...layers.{i}.self_attn.{module}.lora_{A,B}.weight` tensors, checked against the base."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parts = key.split(".")
        if "layers" not in parts or len(parts) < 4 or parts[-3] not in SUPPORTED_MODULES:
            raise LoRAError(
                f"adapter {name!r} has weight {key!r}; only {', '.join(SUPPORTED_MODULES)} "
                f"can be adapted here"
            )
        layer = int(parts[parts.index("layers") + 1])
        pairs.setdefault((layer, parts[-3]), {})[parts[-2]] = tensor
    if not pairs:
        raise LoRAError(f"adapter {name!r} holds no LoRA weights")
    weights = {}
    for (layer, module), ab in sorted(pairs.items()):
        if layer >= base.num_layers:
            raise LoRAError(
                f"adapter {name!r} adapts layer {layer}, but the base model has {base.num_layers} "
                f"layers: it was trained for another base model"
            )
        a, b = ab.get("lora_A"), ab.get("lora_B")
        fan_in, fan_out = base.features(module)
        if a is None or b is None or a.shape != (rank, fan_in) or b.shape != (fan_out, rank):
            got = [tuple(t.shape) if t is not None else None for t in (a, b)]
            raise LoRAError(
                f"adapter {name!r}: layer {layer} {module} has A, B shapes {got}, the base model needs "
                f"{[(rank, fan_in), (fan_out, rank)]}: it was trained for another base model"
            )
        if not (a.isfinite().all() and b.isfinite().all()):
            raise LoRAError(f"adapter {name!r}: layer {layer} {module} has inf or NaN weights")
        weights[layer, module] = (a.float(), b.float() * scaling)
    return weights


def slot_mask(slots: torch.Tensor, num_slots: int, rank: int, dtype) -> torch.Tensor:
    """[T, S * R]: 1 where a shrink column belongs to the token's slot (slot s owns columns s*R..s*R+R-1)."""
    owner = torch.arange(num_slots, device=slots.device).repeat_interleave(rank)
    return (owner[None, :] == slots[:, None]).to(dtype)


def lora_delta(x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor, mask: torch.Tensor):
    """The LoRA update of every token: x [T, in], a [S, R, in], b_t [S, R, out] (each slot's B, transposed
    and scaled), mask [T, S * R] (slot_mask) -> [T, out]."""
    num_slots, rank, _ = a.shape
    shrunk = x @ a.reshape(num_slots * rank, -1).T  # [T, S * R]: every slot's shrink
    return (shrunk * mask) @ b_t.reshape(num_slots * rank, -1)  # only the token's own slot expands


@dataclass
class LoRABatch:
    """A step's tokens that have an adapter: their flat indices [T'] (None: every token has one) and
    which shrink columns are theirs (slot_mask, [T', S * R])."""

    rows: torch.Tensor | None
    mask: torch.Tensor
