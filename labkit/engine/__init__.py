"""labkit.engine: a small LLM serving engine in the style of nano-vllm / vLLM. Read in this order:

config.py         EngineConfig: every engine setting and its default, validated once
sampling.py       SamplingParams and turning logits into tokens (greedy, temperature, top-k, top-p, seed)
structured.py     constrained decoding: a grammar (JSON schema, regex, choice) as a token mask per step
kv_cache.py       what the KV cache costs (bytes per token) and the paged storage
block_manager.py  paged KV bookkeeping: blocks, block tables, prefix caching
sequence.py       a request inside the engine
scheduler.py      continuous batching: who runs this step, preemption when blocks run out
attention_reference.py  paged attention one sequence at a time: gather, then textbook attention (the reference)
attention.py      paged attention in plain PyTorch: decode reads the blocks in place, prefill gathers them
fast_layers.py    fused, pre-packed projections and norms for the runner
compiled_decode.py  the decode step compiled once per padded batch size (Inductor; CUDA graphs on a GPU)
model_runner.py   one forward pass over a flat batch of prefill and decode tokens
outputs.py        after the forward pass: prompt logprobs, sampling, n>1 forks, stop checks, StepOutput
speculative.py    speculative decoding: prompt-lookup drafts, verified k at a time in one forward pass
engine.py         LLMEngine: add_request / step / abort_request / stats
llm.py            LLM(...).generate(prompts, SamplingParams(...)), shaped like vLLM's
baselines.py      what the engine is compared with: no cache, HF generate, static batching
"""

from .config import EngineConfig
from .engine import EngineStats, LLMEngine, StepOutput
from .llm import LLM, CompletionOutput, RequestOutput
from .sampling import SamplingParams, TokenLogprob
from .structured import StructuredOutputsParams

__all__ = [
    "LLM",
    "LLMEngine",
    "EngineConfig",
    "SamplingParams",
    "StructuredOutputsParams",
    "StepOutput",
    "TokenLogprob",
    "EngineStats",
    "RequestOutput",
    "CompletionOutput",
]
