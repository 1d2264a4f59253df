"""`LLM(...).generate(prompts, SamplingParams(...))`: the offline API, shaped like vLLM's.

Notebook code switches engines with one line:
    from labkit.engine import LLM, SamplingParams      # or: from vllm import LLM, SamplingParams
"""

from dataclasses import dataclass, field

import torch

from ..model import load_model
from .config import EngineConfig
from .engine import LLMEngine, StepOutput
from .sampling import SamplingParams, TokenLogprob

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "auto": None,
}


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    cumulative_logprob: float | None = None  # with logprobs: the sum of the tokens' logprobs
    logprobs: list[TokenLogprob] | None = None  # one per token, when SamplingParams.logprobs is set


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)  # n of them, by index
    finished: bool = True
    prompt_logprobs: list[TokenLogprob | None] | None = (
        None  # when SamplingParams.prompt_logprobs is set
    )


class LLM:
    def __init__(
        self,
        model=None,
        tokenizer=None,
        config: EngineConfig | None = None,
        dtype="float32",
        device: str | None = None,
        max_model_len: int | None = None,
        **engine_kwargs,
    ):
        """model: None (the course model), a hub id / local path, or an already loaded model (then pass its
        tokenizer too). config: an EngineConfig; remaining keyword arguments are its fields (block_size,
        num_blocks, max_num_seqs, seed, ...). `max_model_len` caps the context like vLLM's; `enforce_eager=True` runs every step eagerly,
        as in vLLM (by default plain decode steps compile once hot: compiled_decode.py)."""
        if model is None or isinstance(model, str):
            if isinstance(dtype, str):
                if dtype not in _DTYPES:
                    raise ValueError(
                        f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}"
                    )
                dtype = _DTYPES[dtype] or torch.float32
            model, tok = load_model(model, device=device, dtype=dtype)
            tokenizer = tokenizer or tok
        elif tokenizer is None:
            raise ValueError("pass tokenizer=... together with an already loaded model")
        self.engine = LLMEngine(model, tokenizer, config, **engine_kwargs)
        if max_model_len is not None:
            if not 0 < max_model_len <= self.engine.max_context:
                raise ValueError(
                    f"max_model_len must be in 1..{self.engine.max_context} (the model's context), "
                    f"got {max_model_len}"
                )
            self.engine.max_context = max_model_len
        self.llm_engine = VLLMStyleEngine(self.engine)
        self.tokenizer = tokenizer
        self._ids = 0

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora: str | list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts to completion with continuous batching; outputs come back in prompt order.
        lora: an adapter registered with `llm.engine.add_lora` for every prompt, or one per prompt
        (None: the base model)."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            sampling_params
            if isinstance(sampling_params, list)
            else [sampling_params] * len(prompts)
        )
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        loras = lora if isinstance(lora, list) else [lora] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(loras)} adapters for {len(prompts)} prompts")
        order, outputs = [], {}
        for prompt, p, adapter in zip(prompts, params, loras):
            rid = str(self._ids)
            self._ids += 1
            # vLLM's {"prompt_token_ids": [...]} / {"prompt": "..."} forms
            if isinstance(prompt, dict):
                prompt = prompt.get("prompt_token_ids") or prompt.get("prompt")
            self.engine.add_request(rid, prompt, p, lora=adapter)
            prompt_ids = list(self.engine.requests[rid][0].token_ids)
            order.append(rid)
            outputs[rid] = RequestOutput(
                rid, prompt if isinstance(prompt, str) else None, prompt_ids
            )
        samples: dict[tuple[str, int], list[StepOutput]] = {}  # (request, index) -> its outputs
        while self.engine.has_unfinished_requests():
            for step_out in self.engine.step():
                samples.setdefault((step_out.request_id, step_out.index), []).append(step_out)
                if step_out.prompt_logprobs is not None:
                    outputs[step_out.request_id].prompt_logprobs = step_out.prompt_logprobs
        for rid, p in zip(order, params):
            for index in range(p.n):
                outputs[rid].outputs.append(self._completion(index, samples[rid, index], p))
        return [outputs[rid] for rid in order]

    def _completion(self, index: int, steps: list[StepOutput], params: SamplingParams):
        """One sample's CompletionOutput from its StepOutputs."""
        ids = [t for s in steps for t in s.new_token_ids]
        reason = steps[-1].finish_reason
        logprobs = None
        if params.logprobs is not None:
            logprobs = [lp for s in steps for lp in s.logprobs or []]
        cumulative = sum(lp.logprob for lp in logprobs) if logprobs is not None else None
        text = self.detokenize(ids, params, reason)
        return CompletionOutput(index, text, ids, reason, cumulative, logprobs)

    def detokenize(self, ids: list[int], params: SamplingParams, reason: str | None) -> str:
        """Text as vLLM returns it: special tokens, a final stop token and a matched stop string left out."""
        if reason == "stop" and ids and params.stop_token_ids and ids[-1] in params.stop_token_ids:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if reason == "stop" and params.stop:
            cut = [text.find(s) for s in params.stop if s in text]
            if cut:
                text = text[: min(cut)]
        return text


class VLLMStyleEngine:
    """`llm.llm_engine`, with vLLM's step-level interface: step() returns RequestOutput objects carrying the
    *cumulative* token ids of each request (each sample, for n > 1) that advanced. Lets one script drive either engine by hand."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._tokens: dict[tuple[str, int], list[int]] = {}  # (request, sample index) -> its tokens
        self._prompts: dict[str, str | list[int]] = {}  # request -> its prompt

    def add_request(self, request_id: str, prompt, params: SamplingParams) -> None:
        self.engine.add_request(request_id, prompt, params)
        self._prompts[request_id] = prompt

    def abort_request(self, request_ids) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            self.engine.abort_request(rid)

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        outs = []
        for o in self.engine.step():
            ids = self._tokens.setdefault((o.request_id, o.index), [])
            ids += o.new_token_ids
            prompt = self._prompts[o.request_id]
            outs.append(
                RequestOutput(
                    o.request_id,
                    prompt if isinstance(prompt, str) else None,
                    [],
                    [CompletionOutput(o.index, "", list(ids), o.finish_reason)],
                    o.finished,
                )
            )
            if o.finished:
                del self._tokens[o.request_id, o.index]
                if o.request_id not in self.engine.requests:
                    del self._prompts[o.request_id]
        return outs
