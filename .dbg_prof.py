import cProfile, pstats, time, torch
from vortex_hybrid import HybridAttention, HybridConfig
B, CTX, L = 8, 32768, 4
P = 16
pages = CTX // P
slots = int(0.1 * B * pages)
cfg = HybridConfig(page_size=P, flow="quest", budget_ratio=0.05, placement="hybrid", gpu_cache_pages=slots, kv_dtype="bfloat16")
attn = HybridAttention(cfg, L, 32, 8, 128, device_pages=slots + 4 * B + 64, host_pages=B * (pages + 4))
gen = torch.Generator(device="cuda").manual_seed(0)
rids = [attn.add_request(*(2 * [torch.randn(L, CTX, 8, 128, generator=gen, device="cuda", dtype=torch.bfloat16)])) for _ in range(B)]
def step():
    attn.plan(rids)
    for layer in range(L):
        q, kn, vn = (torch.randn(B, h, 128, generator=gen, device="cuda", dtype=torch.bfloat16) for h in (32, 8, 8))
        attn.run(layer, q, kn, vn)
for _ in range(4): step()
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(5): step()
torch.cuda.synchronize()
print("step ms", (time.perf_counter() - t) / 5 * 1e3)
cProfile.run("for _ in range(5): step()", "/tmp/p.prof")
st = pstats.Stats("/tmp/p.prof"); st.sort_stats("tottime").print_stats(25)
