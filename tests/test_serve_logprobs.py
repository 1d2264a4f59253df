"""logprobs, echo and n over HTTP, in OpenAI's (and vLLM's) shapes, and checked against a plain
transformers forward pass of the same model: the numbers lm-eval-harness scores a model with."""

import json

import httpx
import openai
import pytest
import torch

from labkit.serve.launch import ServerProcess

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


@pytest.fixture(scope="module")
def server():
    with ServerProcess(threads=1, max_num_seqs=8) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(course):
    """log-softmax of a transformers forward pass over TEXT: [len(ids), vocab], and the ids."""
    model, tok = course
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(-1), ids


def post(server, path, body) -> dict:
    r = httpx.post(server.url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_prompt_logprobs_equal_a_transformers_forward(server, reference):
    ref, ids = reference
    body = {"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 3, "temperature": 0}
    choice = post(server, "/v1/completions", body)["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None
    got = torch.tensor(lp["token_logprobs"][1:])
    want = torch.cat([ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])], ref[-1].max()[None]])
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    for i in range(
        1, len(ids) + 1
    ):  # the 3 most likely tokens at each position, and the chosen one
        top = lp["top_logprobs"][i]
        best = sorted(top.values(), reverse=True)[:3]
        assert torch.allclose(torch.tensor(best), ref[i - 1].topk(3).values, atol=1e-4)
        assert top[lp["tokens"][i]] == pytest.approx(lp["token_logprobs"][i])
    assert choice["text"].startswith(TEXT)
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)


def test_scoring_only_request_max_tokens_0(server, reference):
    ref, ids = reference
    body = {"prompt": TEXT, "max_tokens": 0, "echo": True, "logprobs": 0}
    r = post(server, "/v1/completions", body)
    lp = r["choices"][0]["logprobs"]
    assert r["choices"][0]["text"] == TEXT and r["usage"]["completion_tokens"] == 0
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1:]), want, atol=1e-4)


def test_completion_logprobs_of_generated_tokens(server, reference):
    ref, ids = reference
    r = post(
        server, "/v1/completions", {"prompt": ids, "max_tokens": 4, "logprobs": 2, "temperature": 0}
    )
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 4
    assert "".join(lp["tokens"]) == r["choices"][0]["text"]
    assert lp["token_logprobs"][0] == pytest.approx(ref[-1].max().item(), abs=1e-4)
    assert all(
        len(t) in (2, 3) for t in lp["top_logprobs"]
    )  # the top 2, plus the chosen one if not in them


def test_chat_logprobs_shape(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(
        model="course",
        messages=[{"role": "user", "content": "Will you dance?"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy: the best one
    assert "".join(i.token for i in content) == r.choices[0].message.content


def test_n_choices_greedy_identical_and_streamed_by_index(server):
    body = {"prompt": TEXT, "max_tokens": 6, "temperature": 0, "n": 3, "ignore_eos": True}
    r = post(server, "/v1/completions", body)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert len({c["text"] for c in r["choices"]}) == 1
    assert r["usage"]["completion_tokens"] == 18
    sampled = post(server, "/v1/completions", {**body, "temperature": 1.0, "seed": 1})
    assert len(sampled["choices"]) == 3
    texts = {i: "" for i in range(2)}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={**body, "n": 2, "stream": True}, timeout=60
    ) as s:
        data = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    reasons = {}
    for event in map(json.loads, data[:-1]):
        for c in event["choices"]:
            texts[c["index"]] += c["text"]
            reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
    assert texts == {0: r["choices"][0]["text"], 1: r["choices"][0]["text"]}
    assert reasons == {0: "length", 1: "length"}
    chat = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    c = chat.chat.completions.create(
        model="course", messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=4
    )
    assert [ch.index for ch in c.choices] == [0, 1]
