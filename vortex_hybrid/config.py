"""`HybridConfig`: every knob of vortex-hybrid in one frozen dataclass.

A config is validated when it is built: a bad value raises `ValueError` naming the field, the value
and what is allowed, so nothing downstream (kernels, pools, scheduler) has to re-check it.

    cfg = HybridConfig(page_size=16, flow="quest", budget_ratio=0.02)
    cfg = HybridConfig(budget_tokens=512)            # or a token budget (or budget_pages)
    cfg = HybridConfig.from_json("hybrid.json")      # a path or a JSON text
    cfg.budget_for(num_pages=8192)                   # pages one head attends per step
    HybridConfig(**budget_fields("512t"))            # a budget as users write it
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import inspect
import operator
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .contracts import MAX_PAGE_SIZE

PLACEMENTS = ("hybrid", "gpu", "cpu", "offload", "dense")
"""Where attention runs (docs/runtime.md): `dense` every page in HBM, full attention; `gpu` every page
in HBM, sparse; `offload` full pages in host memory, selected ones fetched into the GPU page cache;
`cpu` host pages attended by the CPU where they are; `hybrid` the scheduler splits host pages
between CPU attention and fetches and uses what the GPU cache holds."""
STEP_SHAPES = ("auto", "split", "subbatch")
"""How a host placement's layer shares host pages (docs/runtime.md): `split` page by page (`hybrid`:
the cost model's greedy split; `offload`: every miss fetched), `subbatch` request by request (one
sub-batch's host pages attended by the CPU while the other's are fetched and attended on the GPU),
`auto` the one measured faster in the situation (`scheduler.step_shape.ShapeChooser`). `hybrid` only."""
SUMMARY_LOCATIONS = ("auto", "device", "host")

KV_DTYPES = ("bfloat16", "float16", "float32")
SUMMARY_DTYPES = ("float32", "bfloat16", "float8_e4m3fn")
"""Summary storage dtypes the cache and indexer kernels read and write (bf16 halves quest's bytes,
float8_e4m3fn halves them again: 3 mantissa bits, saturating at +-448)."""


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"HybridConfig.{name}={value!r} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
    """Any integral number (int, numpy integer, ...), not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


INT_FIELDS = ("page_size", "budget_pages", "budget_tokens", "sink_pages", "recent_pages",
              "gpu_cache_pages", "cpu_threads")
BUDGET_FIELDS = ("budget_ratio", "budget_pages", "budget_tokens")
"""The ways to give a head's budget; a config sets exactly one (none: `DEFAULT_BUDGET_RATIO`)."""
DEFAULT_BUDGET_RATIO = 0.02
TOKENS_SUFFIX = "t"
"""`budget_fields("512t")`: a token budget; a plain number is a fraction of the pages."""


def budget_fields(text: Any) -> dict[str, Any]:
    """A budget as users write it (the eval's `--budget`, lm-eval's `budget=`) as the
    `HybridConfig` field it sets: a fraction such as "0.05" -> {"budget_ratio": 0.05} (of a
    request's pages), tokens such as "512t" -> {"budget_tokens": 512} (per KV head). The value is
    checked as the config checks it; ValueError naming the text and the forms allowed."""
    s = str(text).strip()
    allowed = ("a fraction of a request's pages in (0, 1] (e.g. 0.05) or a token count per KV "
               f"head with a '{TOKENS_SUFFIX}' suffix (e.g. 512{TOKENS_SUFFIX})")
    try:
        if s.endswith(TOKENS_SUFFIX):
            tokens = int(s[:-len(TOKENS_SUFFIX)])
            if tokens >= 1:
                return {"budget_tokens": tokens}
        else:
            ratio = float(s)
            if 0.0 < ratio <= 1.0:
                return {"budget_ratio": ratio}
    except ValueError:
        pass
    raise ValueError(f"budget {s!r} is invalid: {allowed}")


def _check_flow(flow: str, extra: Mapping[str, Any]) -> None:
    """The flow name (or file.py:name) loads and takes `extra` as its options; ValueError if not."""
    from .vflow.registry import load_flow       # lazy: vflow is heavier than a config
    cls = type(load_flow(flow))
    params = [n for n, p in inspect.signature(cls.__init__).parameters.items()
              if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in extra:
        if key not in params:
            close = difflib.get_close_matches(str(key), params, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            allowed = f"its options are {params}" if params else "it takes no options"
            raise ValueError(f"HybridConfig.extra has {key!r}{hint}, which flow {flow!r} does not "
                             f"take: {allowed}")
    try:
        load_flow(flow, **dict(extra))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"HybridConfig.extra={dict(extra)!r} is invalid for flow {flow!r}: {exc}") \
            from None


@dataclass(frozen=True)
class HybridConfig:
    """All settings of the hybrid sparse-attention runtime.

    Budget: exactly one of `budget_ratio` (a fraction of the request's pages), `budget_pages` (a
    fixed page count) or `budget_tokens` (a token count, rounded up to whole pages); with none set,
    `budget_ratio` is `DEFAULT_BUDGET_RATIO`. Either way the budget never drops below
    `sink_pages + recent_pages` and a head never reads more than the request's pages (`budget_for`).
    """

    page_size: int = 16
    """Tokens per page; a power of two in [1, 1024]."""
    flow: str = "quest"
    """A registered flow name, or `path/to/file.py:name` for a user's flow (loaded and checked at
    construction)."""
    budget_pages: Optional[int] = None
    """Pages per (request, KV head) per step, sink and recent included; an integer >= sink_pages +
    recent_pages, or None (another budget field is used)."""
    budget_ratio: Optional[float] = None
    """Fraction of the request's pages attended per (request, KV head) per step, in (0, 1]; or None
    (another budget field is used). Set to DEFAULT_BUDGET_RATIO (2%) when no budget field is set."""
    budget_tokens: Optional[int] = None
    """Tokens per (request, KV head) per step, sink and recent included: a positive integer,
    rounded up to whole pages and raised to sink_pages + recent_pages pages when below; or None
    (another budget field is used)."""
    sink_pages: int = 1
    """First pages always attended (attention sinks); >= 0."""
    recent_pages: int = 2
    """Last pages always attended, the partly filled tail page among them; >= 1."""
    placement: str = "hybrid"
    """One of PLACEMENTS."""
    step_shape: str = "auto"
    """One of STEP_SHAPES (the `hybrid` placement's choice; other placements have one shape)."""
    gpu_memory_gib: Optional[float] = None
    """GiB of HBM the runtime takes for KV (`runtime.memory_model`): the whole device pool in
    `dense`/`gpu`; tail pages, summaries and every remaining page as GPU cache slots in the host
    placements. None: the free GPU memory when the runtime is built, less `gpu_reserve_gib`
    (without CUDA, where the GPU side runs on the CPU: a 0.5 GiB stand-in). A value that does not
    leave `gpu_reserve_gib` free is refused when the runtime is built."""
    gpu_reserve_gib: float = 4.0
    """GiB of free GPU memory the runtime leaves for activations, CUDA graphs and workspaces."""
    gpu_cache_pages: Optional[int] = None
    """Slots of the GPU page cache (pages kept in HBM) of `offload` and `hybrid`: None for every
    page `gpu_memory_gib` holds beside the tail pages and summaries; a number to override it (it
    must fit)."""
    cache_prefill: bool = True
    """`offload` / `hybrid`: a prefill's pages also go into free GPU cache slots (copied from the
    KV at hand, most recent pages first; while the batch fits the cache, the pages its decode
    steps fill too, copied on the device), so a cache with room starts warm and, while HBM holds
    every page, no step reads host memory. False: pages enter the cache only when a step fetches
    them."""
    cached_steps: bool = True
    """`offload` / `hybrid`: a step whose requests' host pages are all in the GPU page cache, in
    every layer, runs `cached`: each layer selects and attends over the cache's slots as `gpu`
    attends its pool (one CUDA graph a layer; no cache bookkeeping, fetch or CPU part), so while
    HBM holds the batch the host placements decode at `gpu`'s pace. With `cache_prefill`, the
    pages decode steps fill enter free slots too while the batch fits. False: every step splits."""
    compile_cache_step: bool = False
    """`offload` / `hybrid`: run a split layer's page-cache work (which misses to fetch, the
    cache's step: hits, LRU and quota ranking, evictions; the head table with the fetches: ~100
    small kernels a layer) as three `torch.compile`d functions, which Inductor fuses into a few
    kernels; each batch shape compiles once (seconds) on its first step. Same results as eager;
    a function whose compilation fails runs eagerly from then on, with a warning
    (`vortex_hybrid.compiled`)."""
    fetch_share: float = 1.0
    """`hybrid`: the most a layer's page cache may fetch in one step, as a share of the step's
    selected head-pages (the cache's step works over that many entries and ranks
    `WINDOW_FACTOR` times as many slots for eviction, so a smaller share makes every layer's
    bookkeeping cheaper); misses beyond it are attended by the CPU. 1.0 (default): every miss may
    be fetched. `offload` always may fetch every miss (it has no CPU path)."""
    fetch_programs: Optional[int] = None
    """Host placements on CUDA: the most GPU programs a layer's fetch (`gpu_kernels.gather_pages`,
    reading pinned host pages over PCIe) uses for each of K and V, each looping over pages. None
    (default): one program per head-page of the step's fetch plan. A few hundred leave most SMs to
    the GPU work that runs beside the fetch (micro-batches with `overlap_back`)."""
    host_memory_gib: Optional[float] = None
    """GiB of host memory for the host store of the host placements (`dense` and `gpu` have none):
    `HybridAttention` allocates as many pages as fit in it, all layers' K and V in `kv_dtype`
    (pinned at its exact size with CUDA: `kv.page_pool.pinned_zeros`). None: 90% of the available
    host memory (psutil) when the runtime is built. More than is available is refused before
    anything is allocated; an explicit `host_pages` must fit in it when it is set. SGLang's backend
    sizes the pool for every page of SGLang's KV pool unless this is set."""
    kv_dtype: str = "bfloat16"
    """Storage dtype of K and V pages; one of KV_DTYPES."""
    summary_dtype: str = "bfloat16"
    """Storage dtype of page summaries; one of SUMMARY_DTYPES (kernels compute in float32 either
    way). On the device, summaries of every host page take HBM beside the GPU page cache:
    "bfloat16" (default) halves and "float8_e4m3fn" quarters float32's bytes, leaving that much
    more HBM to cache slots, and the indexers read that many fewer bytes a step; selection quality
    measured unchanged (docs/BENCHMARKS.md). "float32" keeps the summaries exact (quest's score
    then bounds the page's products)."""
    summary_location: str = "auto"
    """Where summaries live: "device" (HBM), "host" (pinned memory; the CPU indexer scores them
    there), or "auto" (the device when they take at most a quarter of its free memory)."""
    cpu_threads: Optional[int] = None
    """Numba threads of the CPU kernels, set (for the whole process) when a host-placement
    `HybridAttention` is built. None: one fewer than the cores (`os.cpu_count() - 1`, at least 1),
    so the thread driving the GPU keeps a core. Either way capped at Numba's pool
    (`NUMBA_NUM_THREADS` when numba was imported; every core by default). Outside a runtime,
    `cpu_kernels.set_cpu_threads(cfg)` reads None as `resolved_cpu_threads()` does."""
    calibration: Optional[str] = None
    """Path of a calibration JSON written by `python -m vortex_hybrid.profile`: a budget ratio per
    (layer, KV head) that replaces the budget field (`budget_ratio`, `budget_pages` or
    `budget_tokens`) for sparse selection (a head attends max(sink + recent, ceil(ratio * pages))).
    Its flow, page_size, sink_pages and recent_pages must equal this config's (the budgets were
    measured under them; the profile's default flow is "centroid", this config's "quest"), and its
    model's shape the runtime's
    (`Calibration.check_model`). None: uniform budgets."""
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """Flow options (e.g. {"channels": 16} for double_sparsity): the flow's constructor arguments,
    checked against them at construction."""

    def __post_init__(self) -> None:
        for name in INT_FIELDS:                 # numpy integers and the like become plain ints
            value = getattr(self, name)
            if _is_int(value) and type(value) is not int:
                object.__setattr__(self, name, operator.index(value))
        ps = self.page_size
        if not _is_int(ps) or ps < 1 or ps > MAX_PAGE_SIZE or ps & (ps - 1):
            _fail("page_size", ps, f"a power of two from 1 to {MAX_PAGE_SIZE} (e.g. 16)")
        if not isinstance(self.flow, str) or not self.flow.strip():
            _fail("flow", self.flow, "a registered flow name such as 'quest' or 'path/to/file.py:name'")
        for name in ("sink_pages", "recent_pages", "gpu_cache_pages"):
            value = getattr(self, name)
            if (value is not None or name != "gpu_cache_pages") and (not _is_int(value) or value < 0):
                _fail(name, value, "a non-negative integer" +
                      (", or None" if name == "gpu_cache_pages" else ""))
        for name in ("cache_prefill", "cached_steps", "compile_cache_step"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")
        fp = self.fetch_programs
        if fp is not None and (not _is_int(fp) or fp < 1):
            _fail("fetch_programs", fp, "a positive integer (e.g. 256), or None")
        f = self.fetch_share
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0.0 < f <= 1.0) \
                or math.isnan(f):
            _fail("fetch_share", f, "a fraction in (0, 1], e.g. 0.25 for a quarter of a step's "
                  "selected head-pages")
        if self.recent_pages < 1:
            _fail("recent_pages", self.recent_pages,
                  "at least 1 (the partly filled last page is always attended)")
        given = [name for name in BUDGET_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            _fail(given[1], getattr(self, given[1]),
                  f"{given[0]}={getattr(self, given[0])!r} is set too; set exactly one of "
                  f"{', '.join(BUDGET_FIELDS)} (the others None)")
        if not given:
            object.__setattr__(self, "budget_ratio", DEFAULT_BUDGET_RATIO)
        if self.budget_tokens is not None and (not _is_int(self.budget_tokens)
                                               or self.budget_tokens < 1):
            _fail("budget_tokens", self.budget_tokens,
                  "a positive integer (tokens per KV head, rounded up to whole pages), or None")
        if self.budget_pages is not None:
            floor = self.sink_pages + self.recent_pages
            if not _is_int(self.budget_pages) or self.budget_pages < floor:
                _fail("budget_pages", self.budget_pages,
                      f"an integer >= sink_pages + recent_pages = {floor}")
        if self.budget_ratio is not None:
            r = self.budget_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 < r <= 1.0) \
                    or math.isnan(r):
                _fail("budget_ratio", r, "a fraction in (0, 1], e.g. 0.02 for 2% of the pages")
        if self.placement not in PLACEMENTS:
            _fail("placement", self.placement, f"one of {list(PLACEMENTS)}")
        for name in ("host_memory_gib", "gpu_memory_gib", "gpu_reserve_gib"):
            h = getattr(self, name)
            if h is None and name != "gpu_reserve_gib":
                continue
            if isinstance(h, bool) or not isinstance(h, (int, float)) or math.isnan(h) or \
                    math.isinf(h) or h < 0 or (h == 0 and name != "gpu_reserve_gib"):
                _fail(name, h, "a non-negative finite number of GiB" if name == "gpu_reserve_gib"
                      else "a positive finite number of GiB, or None")
        if self.kv_dtype not in KV_DTYPES:
            _fail("kv_dtype", self.kv_dtype, f"one of {list(KV_DTYPES)}")
        if self.summary_dtype not in SUMMARY_DTYPES:
            _fail("summary_dtype", self.summary_dtype, f"one of {list(SUMMARY_DTYPES)}")
        if self.step_shape not in STEP_SHAPES:
            _fail("step_shape", self.step_shape, f"one of {list(STEP_SHAPES)}")
        if self.summary_location not in SUMMARY_LOCATIONS:
            _fail("summary_location", self.summary_location, f"one of {list(SUMMARY_LOCATIONS)}")
        if self.cpu_threads is not None and (not _is_int(self.cpu_threads) or self.cpu_threads < 1):
            _fail("cpu_threads", self.cpu_threads, "a positive integer, or None")
        if self.calibration is not None:
            self.load_calibration()
        if not isinstance(self.extra, Mapping):
            _fail("extra", self.extra, "a mapping of flow options")
        try:
            _check_flow(self.flow, self.extra)
        except ValueError as exc:
            msg = str(exc)
            raise ValueError(msg if msg.startswith("HybridConfig") else
                             f"HybridConfig.flow={self.flow!r} is invalid: {msg}") from None

    # ---- derived values -------------------------------------------------------------------------
    def budget_for(self, num_pages: int) -> int:
        """The budget of one (request, KV head) whose request holds `num_pages` pages: the width of
        its selection (`budget_pages`; `ceil(budget_tokens / page_size)`; or `ceil(budget_ratio *
        num_pages)`), never below `sink_pages + recent_pages` (what `select_pages`, the top-k
        kernels and the indexers require). A request with `num_pages <= budget` attends all its
        pages (the rest of the selection is -1 padding): min(budget, num_pages) pages are read."""
        if not _is_int(num_pages) or num_pages < 0:
            raise ValueError(f"num_pages={num_pages!r} must be a non-negative integer")
        if self.budget_pages is not None:
            budget = self.budget_pages
        elif self.budget_tokens is not None:
            budget = -(-self.budget_tokens // self.page_size)
        else:
            budget = math.ceil(self.budget_ratio * num_pages)
        return max(budget, self.sink_pages + self.recent_pages)

    def load_calibration(self):
        """The `calibration` file loaded and checked against this config
        (`vortex_hybrid.predictors.Calibration`), or None; ValueError with one line if it is
        unreadable, invalid, or made under other settings."""
        if self.calibration is None:
            return None
        if not isinstance(self.calibration, (str, os.PathLike)):
            _fail("calibration", self.calibration, "a path to a calibration JSON file, or None")
        from .predictors.calibration import Calibration     # lazy: numpy, only when used
        try:
            cal = Calibration.load(self.calibration)
        except ValueError as exc:
            raise ValueError(f"HybridConfig.calibration: {exc}") from None
        cal.check_model(f"HybridConfig.calibration {str(self.calibration)!r}", "config",
                        flow=self.flow, page_size=self.page_size, sink_pages=self.sink_pages,
                        recent_pages=self.recent_pages)
        return cal

    def resolved_cpu_threads(self) -> int:
        """Thread count for CPU kernels called outside a runtime (`cpu_kernels.set_cpu_threads`):
        the field, else NUMBA_NUM_THREADS, else every core. `HybridAttention` reads None as the
        cores less one instead (`cpu_threads`)."""
        if self.cpu_threads is not None:
            return self.cpu_threads
        env = os.environ.get("NUMBA_NUM_THREADS")
        if env and env.isdigit() and int(env) > 0:
            return int(env)
        return os.cpu_count() or 1

    # ---- serialisation --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HybridConfig":
        """Build from a mapping; unknown keys raise `ValueError` naming the key and the known ones."""
        if not isinstance(data, Mapping):
            raise ValueError(f"HybridConfig.from_dict expects a mapping, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"HybridConfig: unknown key {key!r}{hint}; known keys: {known}")
        return cls(**dict(data))

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> "HybridConfig":
        """Build from a JSON file path or a JSON text (a string that starts with '{')."""
        text = str(source)
        if not text.lstrip().startswith(("{", "[")):
            try:
                with open(source, encoding="utf-8") as fh:
                    text = fh.read()
            except OSError as exc:
                raise ValueError(f"HybridConfig.from_json: cannot read {text!r} "
                                 f"({exc.strerror or exc}); pass a JSON file path or a JSON "
                                 "object text") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"HybridConfig.from_json: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"HybridConfig.from_json: the JSON is a {type(data).__name__}; "
                             "expected an object of config fields, e.g. {\"flow\": \"quest\"}")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["extra"] = dict(self.extra)
        return out

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The config as JSON text; also written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        return text
