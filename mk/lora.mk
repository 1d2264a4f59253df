# The LoRA adapters of notebook 08d and benchmarks/lora.py (labkit/lora_train.py): four rank-8 adapters of
# SmolLM2-135M-Instruct trained with peft on the Austen corpus, committed under adapters/ (adapters/README.md).
# This rebuilds them: about 10 minutes each on 2 busy cores. Not part of `make test` (a 2-step smoke run of
# the same script is: tests/test_lora.py).
.PHONY: lora-adapters
lora-adapters: $(SMOLLM2_STAMP)
	$(BIN)/python -m labkit.lora_train
