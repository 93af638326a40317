import torch, traceback
from vortex_hybrid import HybridAttention, HybridConfig
cfg = HybridConfig(page_size=4, flow="quest", budget_pages=4, budget_ratio=None, sink_pages=1, recent_pages=2, placement="gpu", gpu_cache_pages=256, kv_dtype="float32")
attn = HybridAttention(cfg, 2, 4, 2, 8, device_pages=67, host_pages=256)
live = []
def step():
    attn.plan(live)
    for layer in range(2):
        attn.run(layer, *(torch.randn(len(live), h, 8).cuda() for h in (4, 2, 2)))
try:
    live.append(attn.add_request(torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8)))
    for _ in range(3): step(); print("step ok", [attn.kv.seq_len(r) for r in live])
    live.append(attn.add_request(torch.randn(2, 8, 2, 8), torch.randn(2, 8, 2, 8)))
    for _ in range(3): step(); print("step ok", [attn.kv.seq_len(r) for r in live])
except Exception:
    traceback.print_exc()
