"""A bounded number of adapter slots, filled and emptied at run time (S-LoRA's adapter memory).

The batched delta (lora.py's `lora_delta`) reads stacked weights: per layer and module one A [slots, rank, in]
and one B, transposed, [slots, rank, out], allocated once for `max_loras` slots at the engine's `max_lora_rank` (a smaller
rank is zero-padded, which adds exact zeros). Registered adapters wait in host memory (for S-LoRA, the CPU;
on this CPU engine, plain tensors); one is copied into a slot when a sequence that needs it starts running.
With every slot taken, the least recently used slot that no running sequence needs is overwritten; a slot
in use is never taken, so a sequence whose adapter cannot get a slot waits (the scheduler's FIFO, like a
sequence waiting for KV blocks).

Invariants (check_invariants, called by the tests): a slot's user count equals the running sequences that
name its adapter; an adapter sits in at most one slot; every running sequence's adapter has a slot; the
LRU order lists exactly the slots nobody uses.
"""

from collections import OrderedDict

import torch

from .lora import BaseShapes, LoRAAdapter


class LoRASlots:
    def __init__(self, base: BaseShapes, max_loras: int, max_rank: int, dtype, device):
        self.max_loras, self.max_rank, self.dtype = max_loras, max_rank, dtype
        self.a: dict[tuple[int, str], torch.Tensor] = {}  # (layer, module) -> [S, R, in]
        self.b: dict[tuple[int, str], torch.Tensor] = {}  # (layer, module) -> B^T [S, R, out]
        for layer in range(base.num_layers):
            for module, fan_in, fan_out in base.modules:
                self.a[layer, module] = torch.zeros(
                    max_loras, max_rank, fan_in, dtype=dtype, device=device
                )
                self.b[layer, module] = torch.zeros(
                    max_loras, max_rank, fan_out, dtype=dtype, device=device
                )
        self.adapter: list[LoRAAdapter | None] = [None] * max_loras  # what each slot holds
        self.users = [0] * max_loras  # running sequences that use each slot
        self.idle: OrderedDict[int, None] = OrderedDict.fromkeys(range(max_loras))  # LRU first
        self.num_loads = 0  # adapters copied into a slot (a hit costs nothing)

    def slot_of(self, adapter: LoRAAdapter) -> int | None:
        return next((s for s, a in enumerate(self.adapter) if a is adapter), None)

    def running_slot(self, adapter: LoRAAdapter) -> int:
        """The slot of an adapter that running sequences use (the runner's lookup for each step)."""
        slot = self.slot_of(adapter)
        if slot is None or not self.users[slot]:
            raise RuntimeError(f"adapter {adapter.name!r} runs without a slot; acquire() it first")
        return slot

    def can_acquire(self, adapter: LoRAAdapter) -> bool:
        """Is the adapter in a slot already, or is some slot idle (nobody running uses it)?"""
        return self.slot_of(adapter) is not None or bool(self.idle)

    def acquire(self, adapter: LoRAAdapter) -> int:
        """One more running sequence uses `adapter`: its slot, loading it into the LRU idle slot first
        if it has none (an empty slot is idle from the start, so empty slots go first)."""
        slot = self.slot_of(adapter)
        if slot is None:
            if not self.idle:
                raise RuntimeError("acquire() with every slot in use; call can_acquire() first")
            slot = next(iter(self.idle))
            self._load(slot, adapter)
        self.users[slot] += 1
        self.idle.pop(slot, None)
        return slot

    def release(self, adapter: LoRAAdapter) -> None:
        """A sequence that used `adapter` stopped running: the slot stays loaded, idle once unused."""
        slot = self.slot_of(adapter)
        assert slot is not None and self.users[slot] > 0, f"{adapter.name} released twice"
        self.users[slot] -= 1
        if self.users[slot] == 0:
            self.idle[slot] = None  # the most recently used end

    def evict(self, adapter: LoRAAdapter) -> None:
        """Empty the adapter's slot now if nobody uses it (an unload); else it empties when taken."""
        slot = self.slot_of(adapter)
        if slot is not None and self.users[slot] == 0:
            self.adapter[slot] = None
            self.idle.move_to_end(slot, last=False)

    def _load(self, slot: int, adapter: LoRAAdapter) -> None:
        for key, a in self.a.items():
            a[slot].zero_()
            self.b[key][slot].zero_()
        for key, (a, b) in adapter.weights.items():
            self.a[key][slot, : adapter.rank] = a
            self.b[key][slot, : adapter.rank] = b.T
        self.adapter[slot] = adapter
        self.num_loads += 1

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.a.values(), *self.b.values()))

    def check_invariants(self, running: list) -> None:
        counts = [0] * self.max_loras
        for seq in running:
            if seq.lora is not None:
                slot = self.slot_of(seq.lora)
                assert slot is not None, f"{seq.request_id} runs without its adapter in a slot"
                counts[slot] += 1
        assert counts == self.users, f"slot users {self.users}, running sequences {counts}"
        loaded = [a for a in self.adapter if a is not None]
        assert len(loaded) == len(set(map(id, loaded))), "an adapter sits in two slots"
        assert set(self.idle) == {s for s in range(self.max_loras) if self.users[s] == 0}, (
            "the LRU order must list exactly the unused slots"
        )
