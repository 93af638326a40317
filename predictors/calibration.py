"""`Calibration`: per-(layer, KV head) budgets written by `python -m vortex_hybrid.profile`, read by
the runtime (`HybridConfig(flow="centroid", calibration="calib.json")`: the file's settings).

The file is versioned JSON. What the runtime reads: `budgets` (a budget ratio per layer and KV
head: that head attends max(sink + recent, ceil(ratio * pages)) pages of a request), `granularity`
(per head: "page", or "token" -- page then token: of the head's pages the CPU attends, only the
best `token_share` of their tokens, by the group's largest score; pages attended on the GPU stay
whole), `token_share`, and what the budgets depend on: the model (`model`: its `name` and the
shape fields MODEL_FIELDS) and the settings they were measured under -- `flow`, `page_size`,
`sink_pages`, `recent_pages` -- since a head's output error at a budget depends on all of them.
`check_model` compares these with what a config, a runtime or an integration uses. The rest
(error curves, head properties, the predictor, the machine, the measured summary) documents how the
budgets were chosen. `load` checks everything and raises ValueError with one line naming the
problem.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np

FORMAT = "vortex_hybrid.calibration"
VERSION = 1
GRANULARITIES = ("page", "token")
TOKEN_SHARE = 0.25
REQUIRED = ("format", "version", "model", "flow", "page_size", "sink_pages", "recent_pages",
            "error_target", "budgets", "granularity")
MODEL_FIELDS = ("num_layers", "num_q_heads", "num_kv_heads", "head_dim")
SETTINGS = {"flow": "--flow", "page_size": "--page-size", "sink_pages": "--sink",
            "recent_pages": "--recent"}
"""The settings the budgets were measured under, with the profile option that sets each."""


def model_name(name_or_path) -> str:
    """A model's name as a calibration records and compares it: the last part of the folder path or
    hub id it was loaded from (`smollm2-135m` for the built-in model, whose folder carries its
    name; `Llama-3.1-8B` for `meta-llama/Llama-3.1-8B`, `/models/Llama-3.1-8B/` or the Hugging Face
    cache's `.../models--meta-llama--Llama-3.1-8B/snapshots/<hash>`); "" when unknown (None, or a
    model built from a config)."""
    text = str(name_or_path or "").strip()
    path = PurePath(text)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.rsplit("--", 1)[-1]
    return path.name or (Path(text).resolve().name if text else "")


@dataclass
class Calibration:
    """A validated calibration (module docstring). `budgets` float64 [L, Hkv]."""
    model: dict
    flow: str
    page_size: int
    sink_pages: int
    recent_pages: int
    error_target: float
    budgets: np.ndarray
    granularity: list
    extra: dict = field(default_factory=dict)     # everything else in the file, kept as is
    token_share: float = TOKEN_SHARE

    def token_heads(self) -> np.ndarray:
        """bool [L, Hkv]: heads at token granularity."""
        return np.asarray(self.granularity) == "token"

    @property
    def num_layers(self) -> int:
        return self.budgets.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.budgets.shape[1]

    def check_model(self, where: str = "calibration", against: str = "runtime", *,
                    name=None, **used) -> None:
        """Refuse a calibration made for another model or under other settings: ValueError with one
        line naming each field that differs (the file's value, then the one `against` uses) and the
        fix. `used`: any of MODEL_FIELDS and SETTINGS, as the caller knows them; `name`: the model
        it was loaded as (`model_name` of a path or hub id), compared when both it and the file's
        name are known (files written before names were compared may lack one)."""
        unknown = sorted(set(used) - set(MODEL_FIELDS) - set(SETTINGS))
        if unknown:
            raise TypeError(f"check_model: unknown fields {unknown}")
        ours = {**{k: self.model.get(k) for k in MODEL_FIELDS},
                **{k: getattr(self, k) for k in SETTINGS}}
        bad = [k for k, v in used.items() if v is not None and ours[k] != v]
        pairs = [(k, ours[k], used[k]) for k in bad]
        theirs = model_name(self.model.get("name"))
        if model_name(name) and theirs and model_name(name) != theirs:
            pairs.insert(0, ("model", theirs, model_name(name)))
        if not pairs:
            return
        for_model = any(k not in SETTINGS for k, _, _ in pairs)
        options = " ".join(f"{SETTINGS[k]} {v}" for k, _, v in pairs if k in SETTINGS)
        fix = ("re-run python -m vortex_hybrid.profile" + (" for this model" if for_model else "")
               + (f" with {options}" if options else "")
               + ("" if for_model else ", or use the file's settings"))
        made = ", ".join(f"{k}={f!r}" for k, f, _ in pairs)
        here = ", ".join(f"{k}={u!r}" for k, _, u in pairs)
        raise ValueError(f"{where} was made with {made}, but the {against} has {here}; {fix}")

    def head_budgets(self, num_pages) -> np.ndarray:
        """int64 [L, Hkv, B]: pages each (layer, KV head) attends for requests of `num_pages`
        pages each (the runtime's rule, `HybridConfig.budget_for`, with the head's ratio)."""
        n = np.asarray(num_pages, dtype=np.float64)
        want = np.ceil(self.budgets[:, :, None] * n[None, None, :] - 1e-9).astype(np.int64)
        return np.maximum(want, self.sink_pages + self.recent_pages)

    def to_dict(self) -> dict:
        out = dict(self.extra)
        out.update(format=FORMAT, version=VERSION, model=self.model, flow=self.flow,
                   page_size=self.page_size, sink_pages=self.sink_pages,
                   recent_pages=self.recent_pages, error_target=self.error_target,
                   budgets=self.budgets.tolist(), granularity=self.granularity,
                   token_share=self.token_share)
        return out

    def save(self, path) -> None:
        """Write JSON atomically (a temporary file, then a rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, d: Any, where: str = "calibration") -> "Calibration":
        def bad(msg):
            raise ValueError(f"{where}: {msg}")
        if not isinstance(d, dict):
            bad(f"expected a JSON object, got {type(d).__name__}")
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            bad(f"missing fields {missing}")
        if d["format"] != FORMAT:
            bad(f"format {d['format']!r} is not {FORMAT!r}")
        if d["version"] != VERSION:
            bad(f"version {d['version']!r} is not supported (this vortex-hybrid reads version "
                f"{VERSION}); re-run python -m vortex_hybrid.profile")
        model = d["model"]
        if not isinstance(model, dict) or any(not _count(model.get(k), 1) for k in MODEL_FIELDS):
            bad(f"model must give positive integers {list(MODEL_FIELDS)}, got {model!r}")
        if not isinstance(model.get("name", ""), str):
            bad(f"model name {model['name']!r} must be a string")
        if not isinstance(d["flow"], str) or not d["flow"]:
            bad(f"flow {d['flow']!r} must be a flow name")
        for name, low in (("page_size", 1), ("sink_pages", 0), ("recent_pages", 1)):
            if not _count(d[name], low):
                bad(f"{name} {d[name]!r} must be an integer >= {low}")
        eps = d["error_target"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            bad(f"error_target {eps!r} must be a positive number")
        L, H = model["num_layers"], model["num_kv_heads"]
        try:
            budgets = np.asarray(d["budgets"], dtype=np.float64)
        except (TypeError, ValueError):
            bad("budgets must be a list per layer of ratios per KV head")
        if budgets.shape != (L, H):
            bad(f"budgets has shape {list(budgets.shape)}, expected [{L}, {H}] (layers, KV heads)")
        if not np.all(np.isfinite(budgets)) or np.any(budgets <= 0) or np.any(budgets > 1):
            worst = budgets[~(np.isfinite(budgets) & (budgets > 0) & (budgets <= 1))]
            bad(f"budgets must be ratios in (0, 1]; found {float(worst.flat[0])!r}")
        gran = d["granularity"]
        if not (isinstance(gran, list) and len(gran) == L and all(
                isinstance(row, list) and len(row) == H and all(g in GRANULARITIES for g in row)
                for row in gran)):
            bad(f"granularity must be [{L}][{H}] names from {list(GRANULARITIES)}")
        share = d.get("token_share", TOKEN_SHARE)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            bad(f"token_share {share!r} must be a share of tokens in (0, 1]")
        extra = {k: v for k, v in d.items() if k not in REQUIRED and k != "token_share"}
        return cls(dict(model), d["flow"], int(d["page_size"]), int(d["sink_pages"]),
                   int(d["recent_pages"]), float(eps), budgets, gran, extra, float(share))

    @classmethod
    def load(cls, path) -> "Calibration":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"calibration {str(path)!r}: cannot read it "
                             f"({exc.strerror or exc})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"calibration {str(path)!r}: not valid JSON ({exc})") from None
        return cls.from_dict(data, where=f"calibration {str(path)!r}")


def _count(v, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


__all__ = ["Calibration", "FORMAT", "GRANULARITIES", "VERSION", "model_name"]
