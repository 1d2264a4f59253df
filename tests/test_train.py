import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from labkit.train import lr_at, main


def test_a_short_training_run_produces_a_loadable_llama(tmp_path):
    main(
        [
            "--out",
            str(tmp_path),
            "--steps",
            "3",
            "--batch",
            "2",
            "--seq-len",
            "64",
            "--eval-every",
            "3",
        ]
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.model_type == "llama" and model.dtype == torch.float16
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert len(log["train"]) == 3 and log["heldout"][-1][0] == 3
    assert len(tokenizer) == model.config.vocab_size


def test_learning_rate_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 1000, 1e-3, 100) for s in range(1000)]
    assert lrs[0] < lrs[99] == 1e-3 and lrs[-1] < 2e-4 and min(lrs[100:]) >= 1e-4
