"""Text in, text out, with the sampling knobs students will later reimplement in labkit.engine."""

import torch

from .model import context_length


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 60,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> str:
    """Continue `prompt` (temperature 0 = greedy). Raises ValueError if the prompt overflows the context."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    n_prompt = inputs["input_ids"].shape[1]
    limit = context_length(model)
    if n_prompt + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {limit} tokens"
        )
    torch.manual_seed(seed)
    sampling = (
        dict(do_sample=True, temperature=temperature, top_p=top_p)
        if temperature > 0
        else dict(do_sample=False)
    )
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
    )
    return tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True)
