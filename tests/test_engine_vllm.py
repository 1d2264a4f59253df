"""Real vLLM (from .venv-vllm, built by `make vllm` / `make test`) runs our workload script and agrees with
labkit's engine. Skipped, with the reason, where that venv does not exist."""

import pytest

from labkit.engine.vllm_runner import run_offline, vllm_available
from labkit.engine.workload import mixed_workload

ok, why = vllm_available()


@pytest.mark.skipif(not ok, reason=why)
def test_vllm_and_labkit_run_the_same_script_and_agree():
    workload = mixed_workload(6, seed=1, short=(8, 24), long=(32, 40))
    vllm = run_offline("vllm", workload, max_num_seqs=4)
    labkit = run_offline("labkit", workload, max_num_seqs=4)
    assert vllm["output_tokens"] == labkit["output_tokens"] == sum(n for _, n in workload)
    assert [len(t) for t in vllm["token_ids"]] == [n for _, n in workload]
    # same float32 weights, greedy: the first tokens must agree (later ones may drift on a near-tie)
    assert (
        sum(a[:8] == b[:8] for a, b in zip(vllm["token_ids"], labkit["token_ids"]))
        >= len(workload) - 1
    )
    assert vllm["version"]
