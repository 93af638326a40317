"""One copy of the KV with the plugin (real SGLang 0.5.17 on the CPU): SGLang's
`max_total_num_tokens` (its admission) follows the runtime's capacity, SGLang's pool holds slot ids
only and prefill runs through a small staging area, the start-up line says what the user got, a
request beyond capacity is refused while another completes, and a request the runtime refuses at
its post-prefill sync is aborted by the scheduler (not the engine)."""

from __future__ import annotations

import json
import re
import types

import pytest
import torch
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from test_sglang_backend import World, cfg_for
from test_sglang_engine import PAGE, prompts
from vortex_hybrid.integrations.sglang import sizing
from vortex_hybrid.integrations.sglang.shutdown import shut_down

LINE = re.compile(r"vortex_hybrid: placement (\w+); KV in HBM ([\d.]+) GiB \(runtime ([\d.]+) GiB, "
                  r"prefill staging ([\d.]+) GiB\), in host memory ([\d.]+) GiB; capacity (\d+) "
                  r"tokens(?:, (\d+) requests)?; GPU cache (\d+) pages")
MEMORY = {"gpu_memory_gib": 0.01, "host_memory_gib": 0.02}


def engine(model, placement: str, **memory):
    import sglang as sgl
    cfg = {"placement": placement, "budget_ratio": 1.0, **(memory or MEMORY)}
    if placement in ("offload", "hybrid"):
        cfg["gpu_cache_pages"] = 8
    return sgl.Engine(model_path=str(model), device="cpu", attention_backend="vortex_hybrid",
                      sampling_backend="pytorch", disable_cuda_graph=True, dtype="float32",
                      skip_tokenizer_init=True, page_size=PAGE, chunked_prefill_size=32,
                      max_prefill_tokens=64, random_seed=0, log_level="info",
                      vortex_hybrid_config=json.dumps(cfg))


def start_up(model, placement: str, capfd, **memory) -> tuple[re.Match, int]:
    """The start-up line and SGLang's max_total_num_tokens of an engine in `placement`."""
    llm = engine(model, placement, **memory)
    manager = llm.tokenizer_manager
    shut_down(llm)
    # this engine served no request: once unreachable it is the collector's, and with its
    # sockets open, finalizing its ZMQ context would hang this process (shutdown.py)
    assert manager.recv_from_detokenizer.closed and manager.send_to_scheduler.closed
    err = capfd.readouterr().err
    line = LINE.search(err)
    assert line, err[-3000:]
    total = re.search(r"max_total_num_tokens=(\d+)", err)
    assert total, err[-3000:]
    return line, int(total.group(1))


def test_sglang_admits_by_the_runtimes_capacity_and_keeps_no_second_copy(tiny_model, capfd):
    """Same HBM for both: `gpu` holds the KV in HBM only; `hybrid` adds the host store, so SGLang
    admits more tokens. SGLang's own pool holds no K/V (its no-op pool), and the staging area is
    small against the KV the runtime holds."""
    gpu, gpu_total = start_up(tiny_model, "gpu", capfd)
    hyb, hyb_total = start_up(tiny_model, "hybrid", capfd)
    assert (gpu.group(1), hyb.group(1)) == ("gpu", "hybrid")
    assert gpu_total == int(gpu.group(6)) and hyb_total == int(hyb.group(6))
    assert hyb_total > 2 * gpu_total, (gpu_total, hyb_total)
    assert float(gpu.group(5)) == 0 and float(hyb.group(5)) >= 0.019
    assert int(hyb.group(8)) == 8 and int(hyb.group(7)) > 0
    for line in (gpu, hyb):
        staging, runtime = float(line.group(4)), float(line.group(3)) + float(line.group(5))
        assert staging < runtime / 4, line.group(0)


def test_a_request_beyond_capacity_is_refused_while_another_completes(tiny_model, capfd):
    """Capacity 80 tokens (dense, 20 pages of 2 KiB): a 100-token prompt is refused with an error to
    its client, the short one gives torch_native's tokens (its output at full budget)."""
    from test_sglang_engine import run_engine
    short = prompts()[0][1]
    want = run_engine(tiny_model, "torch_native")[1]
    llm = engine(tiny_model, "dense", gpu_memory_gib=0.00004)
    try:
        params = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
        with pytest.raises(ValueError, match=r"Input length \(100 tokens\) exceeds the maximum"):
            llm.generate(input_ids=prompts()[0][0], sampling_params=params)
        out = llm.generate(input_ids=short, sampling_params=params)
    finally:
        shut_down(llm)
    total = int(re.search(r"max_total_num_tokens=(\d+)", capfd.readouterr().err).group(1))
    assert total == 80
    assert out["output_ids"] == want


def test_a_request_the_runtime_refuses_at_sync_is_marked_and_the_others_go_on():
    """World (real SGLang pools, no engine) with a runtime of few pages: a prefill the runtime
    cannot take is marked for abort (`sizing.FAILED`) instead of raising, the batch's other
    request is synced, and decode serves it as torch_native does (the refused row gets zeros)."""
    world = World(cfg_for("gpu"), 11, runtime_tokens=8)     # pool_sizes: 2 + 2 * 4 + 8 pages
    a, b = world.new_row(), world.new_row()
    world.step([a, b], [100, 5])
    gens = world.req_pool.req_generation.tolist() if hasattr(world.req_pool, "req_generation") \
        else [0] * 4
    assert (a, gens[a]) in sizing.FAILED and "device pages" in sizing.FAILED[(a, gens[a])]
    assert world.ours.stats()["requests"] == 1
    _, want, got = world.step([a, b], [1, 1], ForwardMode.DECODE)
    for layer in range(len(want)):
        torch.testing.assert_close(got[layer][1], want[layer][1], rtol=1e-5, atol=1e-5)
        assert not got[layer][0].any()
    world.free_row(a)
    assert not [k for k in sizing.FAILED if k[0] == a]


def test_the_scheduler_hook_aborts_the_marked_request_only():
    from sglang.srt.managers.schedule_batch import FINISH_ABORT
    reqs = [types.SimpleNamespace(rid=f"r{i}", req_pool_idx=i, to_finish=None,
                                  finished=lambda: False) for i in range(2)]
    sched = types.SimpleNamespace(req_to_token_pool=types.SimpleNamespace(
        req_generation=torch.tensor([3, 4])))
    sizing.FAILED[(1, 4)] = "a prefill of 100 tokens needs 25 device pages; 10 of 18 are free"
    seen = []
    sizing.abort_failed(lambda s, b, r: seen.append(r), sched, types.SimpleNamespace(reqs=reqs),
                        "result")
    assert seen == ["result"] and reqs[0].to_finish is None
    assert isinstance(reqs[1].to_finish, FINISH_ABORT)
    assert "25 device pages" in reqs[1].to_finish.message and not sizing.FAILED
