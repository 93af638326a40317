"""A whole `sgl.Engine` (real SGLang 0.5.17 on the CPU) with a tiny random Llama: greedy output with
`vortex_hybrid` at full budget equals SGLang's `torch_native` token for token, in the `gpu`
placement (the device side is the torch reference on the CPU) and in `hybrid`; at a sparse budget
it equals a float64 transformers run of the model attending exactly the flow's selection
(tests/hf_reference.py); the HTTP server serves with the backend. The batches exercise chunked
prefill (chunks of 32 tokens), shared prefixes (the second batch shares prefixes with the first;
recomputed, since the plugin turns SGLang's radix cache off: docs/sglang.md) and requests joining a
running batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from vortex_hybrid.integrations.sglang.shutdown import shut_down

SEED = 5
PAGE = 4
NEW = 10


def prompts() -> tuple[list[list[int]], list[list[int]]]:
    import random
    rng = random.Random(SEED)
    long = [256] + [rng.randrange(256) for _ in range(99)]
    first = [long, [256] + [rng.randrange(256) for _ in range(11)]]
    second = [long[:64] + [rng.randrange(256) for _ in range(20)], long + [1, 2, 3, 4, 5],
              [256] + [rng.randrange(256) for _ in range(45)]]
    return first, second


def run_engine(model, backend: str, config: str | None = None) -> list[list[int]]:
    """Greedy outputs of both batches, one engine."""
    import sglang as sgl
    print(f"seed {SEED}; backend {backend}; config {config}")
    kw = {} if config is None else {"vortex_hybrid_config": config}
    llm = sgl.Engine(model_path=str(model), device="cpu", attention_backend=backend,
                     sampling_backend="pytorch", disable_cuda_graph=True, dtype="float32",
                     skip_tokenizer_init=True, max_total_tokens=4096, page_size=PAGE,
                     chunked_prefill_size=32, random_seed=0, **kw)
    try:
        params = {"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True}
        out = []
        for batch in prompts():
            out += [o["output_ids"] for o in llm.generate(input_ids=batch, sampling_params=params)]
        return out
    finally:
        shut_down(llm)


@pytest.fixture(scope="module")
def torch_native(tiny_model) -> list[list[int]]:
    return run_engine(tiny_model, "torch_native")


@pytest.mark.parametrize("placement", ["gpu", "hybrid", "hybrid/triton prefill"])
def test_full_budget_output_equals_torch_native_token_for_token(tiny_model, torch_native,
                                                                placement, monkeypatch):
    """"triton prefill": the prefill runs SGLang's triton backend (its choice on CUDA; here under
    the Triton interpreter) instead of torch_native."""
    placement, _, prefill = placement.partition("/")
    if prefill:
        monkeypatch.setenv("VORTEX_HYBRID_SGLANG_PREFILL", "triton")
    cfg = json.dumps({"placement": placement, "budget_ratio": 1.0, "gpu_cache_pages": 8})
    ours = run_engine(tiny_model, "vortex_hybrid", cfg)
    assert ours == torch_native


def reference_greedy(model, cfg, prompt: list[int], dense: bool = False) -> list[int]:
    """NEW greedy tokens of the float64 transformers `model` attending, at each decode step, the
    pages cfg's flow selects (tests/hf_reference.py; dense: every page); EOS ignored."""
    import torch
    from transformers import DynamicCache

    from hf_reference import sparse_reference
    out = []
    with sparse_reference(model, cfg, dense), torch.no_grad():
        cache = DynamicCache(config=model.config)
        logits = model(torch.tensor([prompt]), past_key_values=cache).logits[0, -1]
        for _ in range(NEW):
            out.append(int(logits.argmax()))
            logits = model(torch.tensor([[out[-1]]]), past_key_values=cache).logits[0, -1]
    return out


def test_a_sparse_budget_decodes_like_the_float64_reference_over_the_flows_selection(tiny_model,
                                                                                      torch_native):
    """A budget of 8 pages (1 sink, 2 recent, 5 chosen) where the prompts hold 3-27 pages, through
    chunked prefill, prefix-cache hits and joining requests: greedy tokens equal those of a float64
    transformers run of the same model whose decode attends exactly the flow's selection over each
    request's KV; dense attention's tokens differ."""
    import torch
    from transformers import LlamaForCausalLM

    from vortex_hybrid import HybridConfig
    fields = {"placement": "hybrid", "budget_pages": 8, "budget_ratio": None, "gpu_cache_pages": 4}
    ours = run_engine(tiny_model, "vortex_hybrid", json.dumps(fields))
    cfg = HybridConfig(page_size=PAGE, kv_dtype="float32", **fields)
    ref = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float64,
                                           attn_implementation="sdpa").eval()
    batch = [p for batch in prompts() for p in batch]
    want = [reference_greedy(ref, cfg, p) for p in batch]
    assert ours == want, f"seed {SEED}:\n{ours}\n{want}"
    assert want != [reference_greedy(ref, cfg, p, dense=True) for p in batch], "cannot tell dense"
    assert want != torch_native, "the sparse budget gives dense tokens: the test cannot tell"


def test_the_http_server_serves_with_the_backend(tiny_model, torch_native, tmp_path):
    """`python -m sglang.launch_server ... --attention-backend vortex_hybrid --vortex-hybrid-config
    FILE` serves /generate; at full budget its output equals torch_native's engine."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"placement": "gpu", "budget_ratio": 1.0}))
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", str(tiny_model),
         "--device", "cpu", "--attention-backend", "vortex_hybrid", "--vortex-hybrid-config",
         str(cfg), "--sampling-backend", "pytorch", "--disable-cuda-graph", "--dtype", "float32",
         "--skip-tokenizer-init", "--max-total-tokens", "4096", "--page-size", str(PAGE),
         "--chunked-prefill-size", "32", "--random-seed", "0", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True)
    try:
        body = json.dumps({"input_ids": prompts()[0][0], "sampling_params":
                           {"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True}}).encode()
        deadline, reply = time.time() + 180, None
        while reply is None:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "the server did not answer in 180 s"
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=body,
                                             headers={"Content-Type": "application/json"})
                reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
            except OSError:
                time.sleep(1)
        assert reply["output_ids"] == torch_native[0]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()


def test_shut_down_closes_the_tokenizer_managers_sockets_even_with_messages_queued():
    """`shut_down` (vortex_hybrid.integrations.sglang.shutdown): after the engine's own shutdown,
    the tokenizer manager's ZMQ sockets are closed at once (linger 0: a message queued for the
    stopped scheduler does not hold them), so collecting the manager later cannot block. Here a
    stand-in engine over real `zmq.asyncio` sockets; the real engines' sockets are checked in
    test_sglang_kv_once.py."""
    import threading
    import types

    import zmq
    import zmq.asyncio
    context = zmq.asyncio.Context(2)
    manager = types.SimpleNamespace(recv_from_detokenizer=context.socket(zmq.PULL),
                                    send_to_scheduler=context.socket(zmq.PUSH), other=1)
    manager.send_to_scheduler.connect("ipc:///tmp/vh-test-no-scheduler-here")
    manager.send_to_scheduler.send(b"a request", zmq.NOBLOCK)   # queued: no peer will take it
    stopped = []
    engine = types.SimpleNamespace(tokenizer_manager=manager, shutdown=lambda: stopped.append(1))
    done = threading.Thread(target=shut_down, args=(engine,), daemon=True)
    done.start()
    done.join(timeout=30)
    assert not done.is_alive(), "shut_down blocked on the queued message"
    assert stopped == [1] and context.closed
    assert manager.recv_from_detokenizer.closed and manager.send_to_scheduler.closed
