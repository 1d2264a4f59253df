"""What the engine is measured against: generation without a KV cache, and static batching.

- `generate_no_cache`: every new token re-runs the model over the *whole* sequence so far, so token t
  costs O(t) matmul work and O(t^2) attention: total cost grows quadratically with length.
- `static_batch_generate`: the classic batch. B requests start together; the batch keeps running until its
  *longest* request is done, and the finished ones keep occupying (and computing) their slots - exactly
  what `model.generate` on a padded batch does. New requests wait for the whole batch to end.
"""

import torch

from .sampling import SamplingParams


@torch.inference_mode()
def generate_no_cache(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding, recomputing everything every step (use_cache=False)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    for _ in range(max_new_tokens):
        logits = model(ids, use_cache=False).logits[0, -1]
        ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt_ids) :].tolist()


@torch.inference_mode()
def hf_generate_sequential(
    model, tokenizer, prompts: list[str], max_new_tokens: list[int]
) -> list[list[int]]:
    """One request at a time through `model.generate` (KV cache on, greedy, fixed lengths)."""
    device = next(model.parameters()).device
    outs = []
    for prompt, n in zip(prompts, max_new_tokens):
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        out = model.generate(
            **enc,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        outs.append(out[0, enc["input_ids"].shape[1] :].tolist())
    return outs


def static_batch_generate(
    model,
    tokenizer,
    prompts: list,
    max_new_tokens: int | list[int],
    batch_size: int = 16,
    engine=None,
    on_batch=None,
) -> list[list[int]]:
    """Greedy, fixed-length generation in static batches, on labkit's engine (same kernels as continuous
    batching, so only the scheduling policy differs). Every member of a batch runs for the batch's longest
    `max_new_tokens`; each request's own tokens are then cut to its length."""
    from .engine import LLMEngine

    lengths = (
        max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    )
    if len(lengths) != len(prompts):
        raise ValueError(f"got {len(lengths)} lengths for {len(prompts)} prompts")
    engine = engine or LLMEngine(model, tokenizer, max_num_seqs=batch_size)
    results: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(range(start, min(start + batch_size, len(prompts))))
        longest = max(lengths[i] for i in batch)
        for i in batch:
            engine.add_request(
                f"static-{i}",
                prompts[i],
                SamplingParams(temperature=0, max_tokens=longest, ignore_eos=True),
            )
        done = engine.run_to_completion()
        results += [done[f"static-{i}"][: lengths[i]] for i in batch]
        if on_batch is not None:
            on_batch(batch, longest)
    return results
