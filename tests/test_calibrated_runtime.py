"""The runtime with a calibration: each (request, KV head) attends the pages the flow selects at
that head's own budget, in every sparse placement, against the float64 reference; and the file's
checks at the config and runtime boundaries."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vortex_hybrid import HybridAttention, HybridConfig, reference, vflow
from vortex_hybrid.predictors.calibration import FORMAT, VERSION, Calibration

L, HQ, HKV, D, P = 2, 4, 2, 8, 4
RATIOS = [[0.05, 0.5], [1.0, 0.1]]          # per layer, per KV head


def calibration_file(tmp_path, ratios=RATIOS, granularity=None, **over) -> str:
    data = {"format": FORMAT, "version": VERSION,
            "model": {"num_layers": L, "num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": D},
            "flow": "quest", "page_size": P, "sink_pages": 1, "recent_pages": 2,
            "error_target": 0.1, "budgets": ratios,
            "granularity": granularity or [["page"] * len(row) for row in ratios]}
    data.update(over)
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(data))
    return str(path)


def make(placement: str, path: str) -> HybridAttention:
    cfg = HybridConfig(page_size=P, flow="quest", budget_ratio=0.05, sink_pages=1, recent_pages=2,
                       placement=placement, gpu_cache_pages=4, kv_dtype="float32", calibration=path)
    return HybridAttention(cfg, L, HQ, HKV, D, device_pages=80, host_pages=256)


def head_reference(q, k, v, ratios_of_layer) -> torch.Tensor:
    """float64 output of q [1, Hq, D] where KV head h attends the quest selection at its budget."""
    T = k.shape[0]
    n = -(-T // P)
    pad = n * P - T
    kp = torch.cat([k, torch.zeros(pad, HKV, D)]).reshape(n, P, HKV, D).transpose(1, 2)
    vp = torch.cat([v, torch.zeros(pad, HKV, D)]).reshape(n, P, HKV, D).transpose(1, 2)
    table = torch.arange(n, dtype=torch.int32)[None]
    lens = torch.tensor([T], dtype=torch.int32)
    budgets = [max(3, math.ceil(r * n - 1e-9)) for r in ratios_of_layer]
    width = max(budgets)
    sel = torch.full((1, HKV, width), -1, dtype=torch.int32)
    for h, b in enumerate(budgets):
        sel[0, h, :b] = vflow.select_pages("quest", q, kp.contiguous(), table, lens, b, 1, 2)[0, h]
    o, _ = reference.sparse_decode_attention(q.double(), kp.double().contiguous(),
                                             vp.double().contiguous(), table, lens, sel)
    return o[0].float()


@pytest.mark.parametrize("placement", ["gpu", "cpu", "offload", "hybrid"])
@pytest.mark.parametrize("seed", [0, 1])
def test_each_head_attends_its_own_budget(tmp_path, placement, seed):
    print(f"seed={seed}")
    attn = make(placement, calibration_file(tmp_path))
    gen = torch.Generator().manual_seed(seed)
    lens = [70, 45, 101]
    kv = {}
    for T in lens:
        k, v = torch.randn(L, T, HKV, D, generator=gen), torch.randn(L, T, HKV, D, generator=gen)
        kv[attn.add_request(k.to(attn.device), v.to(attn.device))] = [k, v]
    rids = list(kv)
    widths = set()
    for _ in range(6):                        # pages fill; budgets move with the page counts
        attn.plan(rids)
        widths.add(attn._step.width)
        grown = {r: ([], []) for r in rids}
        for layer in range(L):
            q, kn, vn = (torch.randn(len(rids), h, D, generator=gen) for h in (HQ, HKV, HKV))
            o = attn.run(layer, q.to(attn.device), kn.to(attn.device), vn.to(attn.device)).cpu()
            for b, rid in enumerate(rids):
                k = torch.cat([kv[rid][0][layer], kn[b:b + 1]])
                v = torch.cat([kv[rid][1][layer], vn[b:b + 1]])
                grown[rid][0].append(k)
                grown[rid][1].append(v)
                want = head_reference(q[b:b + 1], k, v, RATIOS[layer])
                err = ((o[b] - want).norm() / want.norm()).item()
                assert err < 1e-4, (placement, layer, b, err)
        for rid, (ks, vs) in grown.items():
            kv[rid] = [torch.stack(ks), torch.stack(vs)]
    assert max(widths) >= 26                  # layer 1's full-budget head reads every page


MODEL = {"num_layers": L, "num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": D}


@pytest.mark.parametrize("field, other", [("num_layers", 3), ("num_q_heads", 8),
                                          ("num_kv_heads", 1), ("head_dim", 16)])
def test_a_calibration_for_another_model_shape_is_refused_by_the_runtime(tmp_path, field, other):
    model = dict(MODEL, **{field: other})
    ratios = [[0.1] * model["num_kv_heads"]] * model["num_layers"]
    path = calibration_file(tmp_path, ratios=ratios, model=model)
    HybridConfig(page_size=P, flow="quest", calibration=path)      # the config cannot know shapes
    with pytest.raises(ValueError) as err:
        make("gpu", path)
    msg = str(err.value)
    assert f"was made with {field}={other}, but the runtime has {field}={MODEL[field]};" in msg
    assert msg.endswith("re-run python -m vortex_hybrid.profile for this model")
    assert "\n" not in msg and msg.count("=") == 2                # only the field that differs


@pytest.mark.parametrize("field, other, option", [("flow", "centroid", "--flow quest"),
                                                  ("page_size", 8, "--page-size 4"),
                                                  ("sink_pages", 0, "--sink 1"),
                                                  ("recent_pages", 3, "--recent 2")])
def test_a_calibration_made_under_other_settings_is_refused_by_the_config(tmp_path, field, other,
                                                                         option):
    path = calibration_file(tmp_path, **{field: other})
    with pytest.raises(ValueError) as err:
        make("gpu", path)
    msg = str(err.value)
    ours = getattr(HybridConfig(page_size=P, flow="quest"), field)
    assert f"was made with {field}={other!r}, but the config has {field}={ours!r};" in msg
    assert msg.endswith(f"re-run python -m vortex_hybrid.profile with {option}, or use the file's "
                        "settings")
    assert "\n" not in msg


def test_a_matching_calibration_is_accepted_and_a_mismatch_names_every_field(tmp_path):
    named = dict(MODEL, name="Llama-3.1-8B")
    attn = make("gpu", calibration_file(tmp_path, model=named))
    assert attn.head_budgets is not None
    cal = attn.calibration
    cal.check_model(**MODEL, page_size=P, flow="quest", sink_pages=1, recent_pages=2,
                    name="/models/Llama-3.1-8B/")               # a name: the path's last part
    cal.check_model(name="/hf/hub/models--meta-llama--Llama-3.1-8B/snapshots/0a1b2c")
    cal.check_model(name=None)                                  # unknown: not compared
    with pytest.raises(ValueError, match="was made with model='Llama-3.1-8B', num_q_heads=4, "
                       "head_dim=8, but the runtime has model='Llama-3-8B', num_q_heads=8, "
                       "head_dim=16; re-run python -m vortex_hybrid.profile for this model$"):
        cal.check_model(**dict(MODEL, num_q_heads=8, head_dim=16), name="meta-llama/Llama-3-8B")
    unnamed = Calibration.load(calibration_file(tmp_path))     # a file without a model name
    unnamed.check_model(**MODEL, name="Llama-3-8B")


@pytest.mark.parametrize("change, message", [
    ({"version": 99}, "version 99 is not supported"),
    ({"format": "x"}, "format 'x'"),
    ({"budgets": [[0.1, -0.2], [0.1, 0.1]]}, "ratios in \\(0, 1\\]; found -0.2"),
    ({"budgets": [[0.1, 0.1]]}, "shape \\[1, 2\\], expected \\[2, 2\\]"),
    ({"error_target": -1}, "error_target -1"),
    ({"granularity": [["tokens", "page"], ["page", "page"]]}, "granularity"),
    ({"token_share": 0}, "token_share 0"),
    ({"sink_pages": -1}, "sink_pages -1"),
])
def test_a_bad_calibration_is_one_line_naming_the_problem(tmp_path, change, message):
    path = calibration_file(tmp_path, **change)
    with pytest.raises(ValueError, match=message) as err:
        HybridConfig(page_size=P, flow="quest", sink_pages=1, recent_pages=2, calibration=path)
    assert "\n" not in str(err.value)


def test_missing_fields_corrupt_json_and_missing_file_are_named(tmp_path):
    data = json.loads(open(calibration_file(tmp_path)).read())
    del data["budgets"], data["flow"]
    (tmp_path / "m.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"missing fields \['flow', 'budgets'\]"):
        Calibration.load(tmp_path / "m.json")
    (tmp_path / "c.json").write_text('{"format": "vortex_hybrid.calibration", "vers')
    with pytest.raises(ValueError, match="not valid JSON"):
        Calibration.load(tmp_path / "c.json")
    with pytest.raises(ValueError, match="cannot read"):
        HybridConfig(calibration=str(tmp_path / "nope.json"))


def test_round_trip_keeps_every_field(tmp_path):
    cal = Calibration.load(calibration_file(tmp_path, note={"why": "kept"}))
    cal.save(tmp_path / "again.json")
    again = Calibration.load(tmp_path / "again.json")
    assert again.to_dict() == cal.to_dict()
    assert again.extra == {"note": {"why": "kept"}}
    assert again.head_budgets([10, 100]).tolist() == [[[3, 5], [5, 50]], [[10, 100], [3, 10]]]


def token_reference(q, k, v, ratios_of_layer, token_heads, dev_pages, k_tokens, P=P):
    """float64 output where every head selects its quest pages at its budget; token heads keep
    those on the device (`dev_pages`) whole and, of the others, the k_tokens tokens with the
    group's largest scaled score (ties toward the lower position)."""
    T = k.shape[0]
    n = -(-T // P)
    pad = n * P - T
    kp = torch.cat([k, torch.zeros(pad, HKV, D)]).reshape(n, P, HKV, D).transpose(1, 2)
    table = torch.arange(n, dtype=torch.int32)[None]
    lens = torch.tensor([T], dtype=torch.int32)
    G = HQ // HKV
    out = torch.zeros(HQ, D, dtype=torch.float64)
    qd, kd, vd = q[0].double(), k.double(), v.double()
    for h, r in enumerate(ratios_of_layer):
        b = max(3, math.ceil(r * n - 1e-9))
        sel = vflow.select_pages("quest", q, kp.contiguous(), table, lens, b, 1, 2)[0, h]
        pages = [p for p in sel.tolist() if p >= 0]
        keep = torch.zeros(T, dtype=torch.bool)
        if token_heads[h]:
            host = [p for p in pages if p not in dev_pages]
            cand = torch.tensor([t for p in host for t in range(p * P, min((p + 1) * P, T))],
                                dtype=torch.long)
            if len(cand):
                score = (qd[h * G:(h + 1) * G] @ kd[cand, h].T * D ** -0.5).amax(0)
                order = sorted(range(len(cand)), key=lambda i: (-score[i].item(), cand[i].item()))
                keep[cand[order[:k_tokens]]] = True
            pages = [p for p in pages if p in dev_pages]
        for p in pages:
            keep[p * P:min((p + 1) * P, T)] = True
        for g in range(h * G, (h + 1) * G):
            w = torch.softmax((kd[keep, h] @ qd[g]) * D ** -0.5, 0)
            out[g] = w @ vd[keep, h]
    return out.float()


@pytest.mark.parametrize("share", [1.0, 0.3])
def test_token_heads_attend_their_best_host_tokens(tmp_path, share):
    """cpu placement; head 0 of each layer at token granularity. share 1.0 keeps every token (the
    page reference); 0.3 keeps the best tokens of the host pages."""
    gran = [["token", "page"], ["token", "page"]]
    path = calibration_file(tmp_path, granularity=gran, token_share=share)
    attn = make("cpu", path)
    gen = torch.Generator().manual_seed(3)
    lens = [70, 101]
    kv = {}
    for T in lens:
        k, v = torch.randn(L, T, HKV, D, generator=gen), torch.randn(L, T, HKV, D, generator=gen)
        kv[attn.add_request(k.to(attn.device), v.to(attn.device))] = [k, v]
    rids = list(kv)
    for _ in range(3):
        attn.plan(rids)
        dev = attn._step.dev_table.cpu()
        grown = {r: ([], []) for r in rids}
        for layer in range(L):
            q, kn, vn = (torch.randn(len(rids), h, D, generator=gen) for h in (HQ, HKV, HKV))
            o = attn.run(layer, q.to(attn.device), kn.to(attn.device), vn.to(attn.device)).cpu()
            # k_tokens as the runtime counts it: the most host pages any row's token head has
            host_counts = []
            for b, rid in enumerate(rids):
                k = torch.cat([kv[rid][0][layer], kn[b:b + 1]])
                n = -(-k.shape[0] // P)
                dev_pages = {p for p in range(n) if dev[b, p] >= 0}
                kp = torch.cat([k, torch.zeros(n * P - k.shape[0], HKV, D)]).reshape(
                    n, P, HKV, D).transpose(1, 2).contiguous()
                bud = max(3, math.ceil(RATIOS[layer][0] * n - 1e-9))
                sel = vflow.select_pages("quest", q[b:b + 1], kp,
                                         torch.arange(n, dtype=torch.int32)[None],
                                         torch.tensor([k.shape[0]], dtype=torch.int32), bud, 1,
                                         2)[0, 0]
                host_counts.append(sum(1 for p in sel.tolist() if p >= 0 and p not in dev_pages))
            k_tokens = math.ceil(share * max(host_counts) * P)
            for b, rid in enumerate(rids):
                k = torch.cat([kv[rid][0][layer], kn[b:b + 1]])
                v = torch.cat([kv[rid][1][layer], vn[b:b + 1]])
                grown[rid][0].append(k)
                grown[rid][1].append(v)
                n = -(-k.shape[0] // P)
                dev_pages = {p for p in range(n) if dev[b, p] >= 0}
                want = token_reference(q[b:b + 1], k, v, RATIOS[layer], [True, False], dev_pages,
                                       k_tokens)
                if share == 1.0:
                    assert torch.allclose(want, head_reference(q[b:b + 1], k, v, RATIOS[layer]),
                                          atol=1e-5)
                err = ((o[b] - want).norm() / want.norm()).item()
                assert err < 1e-4, (share, layer, b, err)
        for rid, (ks, vs) in grown.items():
            kv[rid] = [torch.stack(ks), torch.stack(vs)]


def test_the_calibrated_reuse_seeds_the_gpu_page_cache(tmp_path):
    """A request's reuse estimate, before its own is measured, is the calibration's per-layer
    mean over heads (what quotas and the hybrid split's fetch cost read); 1 without one."""
    reuse = [[0.2, 0.4], [0.9, 0.7]]
    attn = make("hybrid", calibration_file(tmp_path, properties={"reuse": reuse}))
    rid = attn.add_request(torch.randn(L, 40, HKV, D, device=attn.device),
                           torch.randn(L, 40, HKV, D, device=attn.device))
    cache = attn._cache
    r = cache.index_of(rid)
    assert cache.reuse[:, r].tolist() == pytest.approx([0.3, 0.8])
    attn.remove_request(rid)
    assert cache.reuse[:, r].tolist() == pytest.approx([0.3, 0.8])
    cfg = HybridConfig(page_size=P, flow="quest", placement="hybrid", gpu_cache_pages=4,
                       kv_dtype="float32")
    plain = HybridAttention(cfg, L, HQ, HKV, D, device_pages=80, host_pages=256)
    assert plain._cache.reuse[:, 0].tolist() == [1.0, 1.0]
    from vortex_hybrid.scheduler.gpu_page_cache import GpuPageCache
    with pytest.raises(ValueError, match="prior_reuse must be 2 shares"):
        GpuPageCache(2, 4, torch.device("cpu"), prior_reuse=[0.5, 1.5])
