"""QuantScheme: what a quantized weight looks like, in one frozen object every quantizer takes.

    scheme = QuantScheme(bits=4, group_size=64)                  # 4-bit, symmetric, groups of 64 columns
    scheme = QuantScheme(3, granularity="channel", symmetric=False)
    rtn_quantize_model(model, scheme)
    gptq_quantize_model(model, calib, scheme.replace(act_order=True))

Bits, granularity, group size, symmetric and act-order used to travel as four or five loose arguments,
in two positional orders; now they travel together and are checked once, here: the scheme checks itself
on construction, and against a model's layers before a quantizer does any work (check_layers: does the
group size divide every layer's in_features?). The error that names the group sizes that fit is here.
The loose forms keep working (as_scheme): `rtn_quantize_model(model, 4, 64)` builds QuantScheme(4, 64).
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

GRANULARITIES = ("tensor", "channel", "group")
# the group sizes checkpoints use (vLLM's GPTQ/AWQ kernels need one that divides in_features)
COMMON_GROUP_SIZES = (32, 64, 128, 256)


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    return bits


@dataclass(frozen=True)
class QuantScheme:
    """bits: 2..8. granularity: one (scale, zero) per 'tensor', per output 'channel' (row), or per 'group'
    of group_size consecutive input columns (None or -1: per channel). symmetric: zero fixed at the middle
    of the grid (0.0 exact) vs fitted to [min, max]. act_order: GPTQ's column order (most active inputs
    first); the other methods ignore it."""

    bits: int = 4
    group_size: int | None = 128
    granularity: str = "group"
    symmetric: bool = True
    act_order: bool = False

    def __post_init__(self):
        check_bits(self.bits)
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        gs = self.group_size
        if gs not in (None, -1) and (isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0):
            raise ValueError(
                f"group_size must be a positive integer (or -1 for per-channel), got {gs!r}"
            )
        for name in ("symmetric", "act_order"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def replace(self, **changes) -> "QuantScheme":
        return replace(self, **changes)

    @property
    def grouped(self) -> bool:
        """Groups of group_size columns (not one range per row or per tensor)."""
        return self.granularity == "group" and self.group_size not in (None, -1)

    def columns_per_group(self, in_features: int) -> int:
        """Columns sharing one (scale, zero) in a layer with in_features inputs: 0 for per-tensor,
        in_features for per-channel; a group size that does not divide in_features is an error."""
        if self.granularity == "tensor":
            return 0
        if not self.grouped or self.group_size is None:  # (grouped: never None)
            return in_features
        if in_features % self.group_size:
            raise ValueError(
                f"group_size {self.group_size} does not divide in_features {in_features}; "
                f"pick a divisor of {in_features} (e.g. 32, 64, 128) or per-channel (-1)"
            )
        return self.group_size

    def check_layers(self, in_features: dict[str, int]) -> None:
        """Fail before any work when group_size does not divide some layer's in_features ({layer name:
        in_features}, layers.layer_in_features): say which layer, and which group sizes fit this model.
        SmolLM2's hidden size is 576 = 4.5 x 128, so the usual 128 cannot split its rows into whole groups."""
        if not self.grouped or self.group_size is None:
            return
        bad = next((name for name, n in in_features.items() if n % self.group_size), None)
        if bad is None:
            return
        valid = fitting_group_sizes(in_features.values())
        choices = (
            ", ".join(map(str, valid))
            if valid
            else f"a divisor of {math.gcd(*in_features.values())}"
        )
        raise ValueError(
            f"group_size {self.group_size} does not divide the in_features ({in_features[bad]}) of "
            f"{bad}; for this model (in_features {sorted(set(in_features.values()))}) use {choices}, "
            "or -1 for one group per output channel"
        )


def fitting_group_sizes(in_features: Iterable[int]) -> list[int]:
    """The common group sizes that divide every one of in_features (SmolLM2's layers: 32 and 64)."""
    common = math.gcd(*in_features)
    return [g for g in COMMON_GROUP_SIZES if common % g == 0]


SCHEME_FIELDS = ("group_size", "granularity", "symmetric", "act_order")


def as_scheme(scheme: "QuantScheme | int", **loose) -> QuantScheme:
    """The scheme a quantizer was called with. A QuantScheme is taken as it is. An int is the bits of the
    form from before QuantScheme, with the other fields as loose arguments (`rtn_quantize_model(model,
    4, 64, symmetric=False)`): that form keeps working. A loose argument that changes a default beside a
    QuantScheme would be silently ignored, so it is an error."""
    changed = {k: v for k, v in loose.items() if v != getattr(QuantScheme, k)}
    if not isinstance(scheme, QuantScheme):
        return QuantScheme(scheme, **changed)
    if changed:
        raise TypeError(
            f"{sorted(changed)} belong in the QuantScheme: pass scheme.replace(...) instead"
        )
    return scheme


def pop_scheme_fields(options: dict) -> dict:
    """The scheme's fields taken out of a quantizer's loose keyword arguments (the rest are its own)."""
    return {k: options.pop(k) for k in SCHEME_FIELDS if k in options}
