"""labkit.workers: code that must run in another virtual environment, and the client that drives it.

vLLM pins its own torch; GPTQModel, llm-compressor and torchao pin transformers versions the course's
venv must not get. So each lives in a venv of its own (built by mk/*.mk), and labkit runs it there as a
subprocess, a *worker*, that imports labkit's own code (by PYTHONPATH) so its numbers compare with ours.

venvs.py         where those venvs live (.venv-vllm, .venv-quant): the one place that names them
protocol.py      the one wire format: JSON request lines in, marked JSON answer lines out
client.py        WorkerProcess: start a worker in a venv, send requests, read answers
quant_worker.py  GPTQModel / llm-compressor / torchao on the course model   (runs in .venv-quant)
quant_client.py  run_library(task, ...): one quant_worker request from the main venv
bench_worker.py  one offline workload through labkit's engine or vLLM        (runs in either venv)
bench_client.py  run_offline / PairedRunner: bench_worker runs from the main venv
vllm_probe.py    whether the installed vLLM can run GPTQ on this machine       (worker and client)
llama_worker.py  llama.cpp's batch-1 decode on a GGUF file                   (runs in .venv-llama)
llama_client.py  decode_speed(...): llama_worker from the main venv
"""
