import pytest
import torch
from transformers import LlamaForCausalLM

import labkit
from labkit.generate import generate_text
from labkit.model import resolve_model_name


def test_course_model_is_a_llama_loaded_offline(course):
    model, tokenizer = course
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.model_type == "llama"
    assert not model.training
    assert 4e6 < labkit.count_parameters(model) < 8e6
    text = "Mr. Darcy, I assure you, is all that is amiable."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_chat_template_renders_a_conversation(course):
    _, tokenizer = course
    prompt = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "A drawing-room."},
            {"role": "user", "content": "Is he handsome?"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "A drawing-room." in prompt and "Is he handsome?" in prompt


def test_sampling_is_reproducible_with_a_seed_and_greedy_is_deterministic(course):
    model, tokenizer = course
    a = generate_text(model, tokenizer, "Emma", max_new_tokens=12, temperature=0.9, seed=3)
    b = generate_text(model, tokenizer, "Emma", max_new_tokens=12, temperature=0.9, seed=3)
    assert a == b and len(a) > 0
    assert generate_text(model, tokenizer, "Emma", 12, temperature=0) == generate_text(
        model, tokenizer, "Emma", 12, temperature=0
    )


def test_prompt_longer_than_context_is_a_clear_error(course):
    model, tokenizer = course
    with pytest.raises(ValueError, match="context"):
        generate_text(model, tokenizer, "word " * 600, max_new_tokens=10)


def test_model_name_resolution(monkeypatch):
    monkeypatch.delenv("LABKIT_MODEL", raising=False)
    assert resolve_model_name(None).endswith("course_model")
    assert resolve_model_name("gpt2") == "gpt2"
    monkeypatch.setenv("LABKIT_MODEL", "facebook/opt-125m")
    assert resolve_model_name(None) == "facebook/opt-125m"


def test_missing_hub_model_offline_gives_a_helpful_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="network"):
        labkit.load_model("no-such-org/no-such-model")


def test_device_override_is_validated():
    assert labkit.pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            labkit.pick_device("cuda")
