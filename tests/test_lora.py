"""LoRA adapters side by side (labkit/engine/lora.py, lora_slots.py; the server's --lora-modules): the batched
delta equals a per-adapter loop; a batch mixing adapters and the base model equals each peft-merged model;
slots evict the least recently used idle adapter and never one in use; the prefix cache never shares a
block across adapters; the server lists, loads, unloads and refuses adapters as vLLM does."""

import asyncio
import copy
import json
import re

import httpx
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from labkit import load_model
from labkit.engine import LLM, LLMEngine, SamplingParams
from labkit.engine.lora import BaseShapes, LoRAAdapter, LoRAError, lora_delta, slot_mask
from labkit.engine.lora_slots import LoRASlots
from labkit.lora_checks import per_adapter_loop, reference_batched_lora_delta

PROMPTS = ["It is a truth universally acknowledged", "Mr. Darcy", "She was", "The next morning"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model_tok():
    torch.manual_seed(0)
    return load_model(device="cpu")  # the course model: 4 layers, fast


def save_adapter(model, path, seed: int, targets: list[str], rank: int, **extra):
    """A random (not zero-initialised) peft LoRA for `model`, saved to `path`."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False, **extra
    )
    get_peft_model(copy.deepcopy(model), config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(model_tok, tmp_path_factory):
    model, _ = model_tok
    root = tmp_path_factory.mktemp("lora")
    return {
        "qv": save_adapter(model, root / "qv", 1, ["q_proj", "v_proj"], 4),
        "all": save_adapter(model, root / "all", 2, ["q_proj", "k_proj", "v_proj", "o_proj"], 8),
        "rs": save_adapter(model, root / "rs", 3, ["k_proj", "o_proj"], 2, use_rslora=True),
    }


def merged(model, path):
    return PeftModel.from_pretrained(copy.deepcopy(model), str(path)).merge_and_unload()


def hf_greedy(model, tok, prompt: str, n: int) -> list[int]:
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(
        **ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
    )
    return out[0, ids["input_ids"].shape[1] :].tolist()


def lora_engine(model_tok, adapters, **options) -> LLMEngine:
    model, tok = model_tok
    engine = LLMEngine(model, tok, enable_lora=True, enforce_eager=True, **options)
    for name, path in adapters.items():
        engine.add_lora(name, path)
    return engine


def run(engine: LLMEngine, requests: list[tuple[str, str | None]], params=GREEDY, check=None):
    """(prompt, adapter) requests added at once; generated ids by request, in order."""
    for i, (prompt, lora) in enumerate(requests):
        engine.add_request(str(i), prompt, params, lora=lora)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done.setdefault(out.request_id, []).extend(out.new_token_ids)
        if check:
            check(engine)
    return [done[str(i)] for i in range(len(requests))]


# ---- the batched delta ---------------------------------------------------------------------------------
def test_batched_delta_equals_a_loop_over_adapters():
    """The engine's masked form and the exercise's gathered form (BGMV) against one adapter at a time."""
    torch.manual_seed(0)
    num_slots, rank, fan_in, fan_out, tokens = 3, 4, 32, 24, 10
    a, b = torch.randn(num_slots, rank, fan_in), torch.randn(num_slots, fan_out, rank)
    x, slots = torch.randn(tokens, fan_in), torch.randint(0, num_slots, (tokens,))
    expected = per_adapter_loop(x, a, b, slots)
    mask = slot_mask(slots, num_slots, rank, torch.float32)
    assert torch.allclose(lora_delta(x, a, b.transpose(1, 2), mask), expected, atol=1e-4)
    assert torch.allclose(reference_batched_lora_delta(x, a, b, slots), expected, atol=1e-4)


# ---- outputs equal the merged models -------------------------------------------------------------------
def test_mixed_batch_equals_each_merged_model(model_tok, adapters):
    model, tok = model_tok
    engine = lora_engine(model_tok, adapters, max_loras=3, block_size=4)
    names = [None, "qv", "all", "rs"]
    requests = [(p, n) for p in PROMPTS for n in names]  # every step mixes all four
    got = dict(zip(requests, run(engine, requests)))
    references = {None: model, **{n: merged(model, p) for n, p in adapters.items()}}
    for (prompt, lora), ids in got.items():
        assert ids == hf_greedy(references[lora], tok, prompt, GREEDY.max_tokens), (prompt, lora)
    for lora in names[1:]:  # and each adapter changes some output: else this would prove nothing
        assert any(got[p, lora] != got[p, None] for p in PROMPTS), lora


def test_llm_generate_takes_an_adapter_per_prompt(model_tok, adapters):
    model, tok = model_tok
    llm = LLM(model, tokenizer=tok, enable_lora=True, enforce_eager=True)
    llm.engine.add_lora("all", adapters["all"])
    outs = llm.generate(PROMPTS[:2], GREEDY, lora=["all", None])
    assert outs[0].outputs[0].token_ids == hf_greedy(
        merged(model, adapters["all"]), tok, PROMPTS[0], 12
    )
    assert outs[1].outputs[0].token_ids == hf_greedy(model, tok, PROMPTS[1], 12)


def test_steps_with_an_adapter_never_run_compiled(model_tok, adapters):
    """The compiled decode step has no adapter input: a step with an adapter in it runs eagerly, even
    where the compiled step would take it (here: told to take every step, and to fail if it runs)."""
    model, tok = model_tok
    engine = LLMEngine(model, tok, enable_lora=True)
    engine.add_lora("all", adapters["all"])
    compiled = engine.runner.compiled
    assert compiled is not None
    compiled.takes = lambda step: True

    def never(step):
        raise AssertionError("a step with an adapter ran compiled")

    compiled.run = never
    (got,) = run(engine, [(PROMPTS[0], "all")])
    assert got == hf_greedy(merged(model, adapters["all"]), tok, PROMPTS[0], GREEDY.max_tokens)


# ---- slots ---------------------------------------------------------------------------------------------
def test_slots_evict_the_least_recently_used_idle_adapter(model_tok, adapters):
    model, _ = model_tok
    base = BaseShapes.of(model)
    a, b, c = (LoRAAdapter.load(n, adapters[n], base, 8) for n in ("qv", "all", "rs"))
    slots = LoRASlots(base, 2, 8, torch.float32, "cpu")
    assert slots.acquire(a) != slots.acquire(b)
    assert not slots.can_acquire(c)  # both slots in use: c waits
    with pytest.raises(RuntimeError, match="can_acquire"):
        slots.acquire(c)
    slot_a = slots.slot_of(a)
    slots.release(b)
    slots.release(a)  # a idle most recently: b is the LRU one
    assert slots.acquire(c) != slot_a and slots.slot_of(b) is None
    assert slots.acquire(a) == slot_a and slots.num_loads == 3  # a was still loaded: no copy
    assert slots.users == [1, 1] and not slots.can_acquire(b)


def test_more_adapters_than_slots_in_one_run(model_tok, adapters):
    """Three adapters through one slot: each sequence waits for the slot, none is evicted while running,
    and every output equals the one with a slot per adapter."""
    requests = [(PROMPTS[0], n) for n in ("qv", "all", "rs", None, "qv")]
    roomy = run(lora_engine(model_tok, adapters, max_loras=3), requests)

    def check(engine):
        engine.loras.check_invariants(engine.scheduler.running)

    tight = lora_engine(model_tok, adapters, max_loras=1)
    assert run(tight, requests, check=check) == roomy
    assert tight.loras.num_loads >= 3


# ---- prefix cache --------------------------------------------------------------------------------------
def test_prefix_cache_never_shares_blocks_across_adapters(model_tok, adapters):
    model, tok = model_tok
    prompt = " ".join(PROMPTS * 3)  # many full blocks
    engine = lora_engine(model_tok, adapters, block_size=4)
    hits = lambda: engine.stats().prefix_cache_hits  # noqa: E731
    base = run(engine, [(prompt, None)])
    assert hits() == 0
    (other,) = run(engine, [(prompt, "all")])
    assert hits() == 0  # the base model's blocks hold other K/V: not one is reused
    assert other == hf_greedy(merged(model, adapters["all"]), tok, prompt, 12) != base[0]
    assert run(engine, [(prompt, "all")]) == [other] and hits() > 0  # the same adapter does share
    engine.block_manager.check_invariants([])


# ---- refusals ------------------------------------------------------------------------------------------
def test_bad_adapters_are_refused_with_the_reason(model_tok, adapters, tmp_path):
    model, tok = model_tok
    engine = lora_engine(model_tok, {})
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        engine.add_request("x", "hi", GREEDY, lora="nope")
    with pytest.raises(LoRAError, match="not a LoRA adapter"):
        engine.add_lora("missing", tmp_path / "missing")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text(
        (adapters["qv"] / "adapter_config.json").read_text()
    )
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(LoRAError, match="cannot read"):
        engine.add_lora("corrupt", corrupt)
    wide = copy.deepcopy(model.config)
    wide.hidden_size, wide.intermediate_size, wide.num_hidden_layers = 128, 256, 2
    other = type(model)(wide)
    with pytest.raises(LoRAError, match="another base model"):
        engine.add_lora("other", save_adapter(other, tmp_path / "other", 0, ["q_proj"], 4))
    config = json.loads((adapters["all"] / "adapter_config.json").read_text())
    assert config["r"] == 8
    with pytest.raises(LoRAError, match="max-lora-rank"):
        LLMEngine(model, tok, enable_lora=True, max_lora_rank=4).add_lora("all", adapters["all"])
    with pytest.raises(LoRAError, match="enable_lora"):
        LLMEngine(model, tok).add_lora("all", adapters["all"])
    assert engine.adapters == {}


# ---- the server: vLLM's LoRA interface -----------------------------------------------------------------
@pytest.fixture(scope="module")
def server(adapters):
    from labkit.serve.launch import ServerProcess

    qv = f"qv={adapters['qv']}"
    options = dict(enable_lora=True, lora_modules=qv, max_num_seqs=8, threads=1, enforce_eager=True)
    with ServerProcess(**options) as srv:
        yield srv


@pytest.fixture(scope="module")
def offline(model_tok, adapters):
    """The offline engine with every adapter: what the server's answers must equal."""
    model, tok = model_tok
    llm = LLM(model, tokenizer=tok, enable_lora=True, enforce_eager=True)
    for name, path in adapters.items():
        llm.engine.add_lora(name, path)
    return llm


def complete(server, model: str, prompt: str = PROMPTS[0]):
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": True,
    }
    return httpx.post(server.url + "/v1/completions", json=body, timeout=60)


def expected_text(offline, model: str, prompt: str = PROMPTS[0]) -> str:
    lora = None if model == "course" else model
    return offline.generate([prompt], GREEDY, lora=lora)[0].outputs[0].text


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_server_lists_and_serves_lora_modules(server, offline, adapters):
    cards = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert cards["course"]["parent"] is None
    assert cards["qv"]["parent"] == "course" and cards["qv"]["root"] == str(adapters["qv"])
    assert httpx.get(server.url + "/v1/models/qv").json()["parent"] == "course"
    for model in ("course", "qv"):
        body = complete(server, model).json()
        assert body["model"] == model
        assert body["choices"][0]["text"] == expected_text(offline, model)
    assert complete(server, "qv").json()["choices"] != complete(server, "course").json()["choices"]


def test_server_loads_and_unloads_adapters(server, offline, adapters):
    load = {"lora_name": "all", "lora_path": str(adapters["all"])}
    r = httpx.post(server.url + "/v1/load_lora_adapter", json=load)
    assert r.status_code == 200 and "all" in r.text
    assert complete(server, "all").json()["choices"][0]["text"] == expected_text(offline, "all")
    assert (
        "already served"
        in error_of(httpx.post(server.url + "/v1/load_lora_adapter", json=load), 400)["message"]
    )
    unload = {"lora_name": "all"}
    assert httpx.post(server.url + "/v1/unload_lora_adapter", json=unload).status_code == 200
    assert error_of(complete(server, "all"), 404)["code"] == "model_not_found"
    assert error_of(httpx.post(server.url + "/v1/unload_lora_adapter", json=unload), 404)
    ids = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    assert ids == ["course", "qv"]


def test_server_refuses_bad_adapters_and_the_batch_carries_on(
    server, offline, model_tok, adapters, tmp_path
):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text(
        (adapters["rs"] / "adapter_config.json").read_text()
    )
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    model, _ = model_tok
    wide = copy.deepcopy(model.config)
    wide.hidden_size, wide.intermediate_size = 128, 256
    other = save_adapter(type(model)(wide), tmp_path / "other", 0, ["q_proj"], 4)

    async def traffic():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            body = {"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            good = [
                client.post("/v1/completions", json={**body, "model": m})
                for m in ("course", "qv") * 2
            ]
            bad = [
                client.post("/v1/completions", json={**body, "model": "nope"}),
                client.post(
                    "/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(corrupt)}
                ),
                client.post(
                    "/v1/load_lora_adapter", json={"lora_name": "o", "lora_path": str(other)}
                ),
                client.post(
                    "/v1/load_lora_adapter", json={"lora_name": "m", "lora_path": str(tmp_path)}
                ),
            ]
            return await asyncio.gather(*good), await asyncio.gather(*bad)

    good, (unknown, damaged, foreign, missing) = asyncio.run(traffic())
    for r, model in zip(good, ("course", "qv") * 2):
        assert r.json()["choices"][0]["text"] == expected_text(offline, model, PROMPTS[1])
    assert error_of(unknown, 404)["code"] == "model_not_found"
    assert "cannot read" in error_of(damaged, 400)["message"]
    assert "another base model" in error_of(foreign, 400)["message"]
    assert "not a LoRA adapter" in error_of(missing, 400)["message"]
    metrics = httpx.get(server.url + "/metrics").text
    assert re.search(
        r'labkit:lora_requests_total\{lora_name="qv",model_name="course"\} [1-9]', metrics
    )
    assert 'labkit:lora_generation_tokens_total{lora_name="",model_name="course"}' in metrics


# ---- the adapters' training (make lora-adapters), as a smoke run ---------------------------------------
def test_a_short_training_run_saves_an_adapter_the_engine_serves(smollm2, tmp_path):
    from labkit.lora_train import BASE_NAME, TASKS, train

    record = train(TASKS["shout"], tmp_path / "shout", steps=2, rank=2, seed=0, eval_windows=1)
    assert len(record["losses"]) == 2 and record["heldout_perplexity"]["adapter"] > 0
    config = json.loads((tmp_path / "shout" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE_NAME and config["r"] == 2
    model, tok = smollm2
    engine = LLMEngine(model, tok, enable_lora=True, enforce_eager=True)
    assert engine.add_lora("shout", tmp_path / "shout").rank == 2
