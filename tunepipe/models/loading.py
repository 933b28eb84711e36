"""Loading tokenizers and causal LMs: the one place every stage, the CLI and the tests load them.

torch / transformers are imported inside the functions: the CLI imports this module.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tunepipe.errors import ConfigError

# bitsandbytes (imported by PEFT whenever it is installed) warns on every import that it cannot download an optional
# CPU kernel from the hub; nothing is downloaded here, and its own torch kernels are used instead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """AutoTokenizer as LLaMA-Factory loads it: fast, special tokens not split, right padding.

    A directory whose tokenizer_config.json declares the generic fast class (`PreTrainedTokenizerFast`, the tiny
    model, or its transformers-5 name `TokenizersBackend`) is loaded as exactly that: transformers >= 5.2x would
    otherwise pick a model-specific class from config.json (Qwen2Tokenizer), which swaps the pre-tokenizer and
    changes ids — and LLaMA-Factory's transformers (5.6) does not.
    `trust_remote_code` stays off unless the user opts in (params.yaml), since it runs code from the model dir.
    """
    kwargs = dict(split_special_tokens=False, padding_side="right", trust_remote_code=trust_remote_code)
    config = Path(path) / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class") in \
            ("PreTrainedTokenizerFast", "TokenizersBackend"):
        from transformers import PreTrainedTokenizerFast  # not via the Auto classes: those import torch (~1.5 s)

        kwargs.pop("trust_remote_code")
        return PreTrainedTokenizerFast.from_pretrained(path, **kwargs)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, use_fast=True, **kwargs)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def attention_implementation(flash_attn: str = "auto") -> str:
    """params' `flash_attn` (LF's key) -> transformers' attn_implementation, checked before any work.

    auto: FlashAttention-2 when the flash_attn package is installed and a CUDA GPU is there, else sdpa (both
    isolate packed examples). fa2 where it cannot run is a one-line error, not a silent fallback."""
    from transformers.utils import is_flash_attn_2_available

    if flash_attn in ("disabled", "eager"):
        return "eager"
    if flash_attn == "sdpa":
        return "sdpa"
    fa2 = cuda_available() and is_flash_attn_2_available()
    if flash_attn == "fa2":
        if not fa2:
            why = "no CUDA GPU on this machine" if not cuda_available() else "the flash_attn package is not installed"
            raise ConfigError(f"fa2 needs FlashAttention-2 on a CUDA GPU, and {why}; use sdpa or auto",
                              key="flash_attn")
        return "flash_attention_2"
    return "flash_attention_2" if fa2 else "sdpa"


def check_liger(enabled: bool) -> None:
    """enable_liger_kernel needs liger-kernel's Triton kernels, which run on CUDA GPUs only: refused up front."""
    if not enabled:
        return
    if not cuda_available():
        raise ConfigError("Liger's Triton kernels need a CUDA GPU and this machine has none; set it to false",
                          key="enable_liger_kernel")
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("the liger-kernel package is not installed (pip install liger-kernel)",
                          key="enable_liger_kernel")


def quantization_config(bits: int | None, method: str = "bnb", *, compute_dtype: Any = None) -> Any:
    """QLoRA's BitsAndBytesConfig for `quantization_bit` (LF's keys): 4-bit NF4 with double quantization (LF's
    defaults), or 8-bit; None when not quantizing. A machine where bitsandbytes cannot run is refused here, before
    any data or model is loaded."""
    if bits is None:
        return None
    if method != "bnb":
        raise ConfigError(f"{method!r} is not supported (bnb)", key="quantization_method")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{bits}-bit training needs bitsandbytes, which is not installed on this machine "
                          "(pip install bitsandbytes)", key="quantization_bit")
    try:
        import bitsandbytes  # noqa: F401  (its import fails where no backend can run)
    except Exception as err:  # noqa: BLE001 - any import failure means the backend cannot run here
        raise ConfigError(f"{bits}-bit training needs bitsandbytes, which cannot run on this machine "
                          f"({_first_line(err)})", key="quantization_bit") from None
    import torch
    from transformers import BitsAndBytesConfig

    compute_dtype = compute_dtype or (torch.bfloat16 if cuda_available() else torch.float32)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage=compute_dtype)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def apply_liger(model: Any) -> str:
    """Patch a loaded model in place with Liger's kernels (liger_kernel's own per-architecture entry point)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)
    return type(model).__name__


def load_causal_lm(path: str | Path, *, dtype: Any = None, trust_remote_code: bool = False,
                   attn_implementation: str | None = None, quantization: Any = None,
                   liger: bool = False) -> Any:
    """A causal LM from a local directory or hub id, in eval mode, without transformers' loading bars.

    `dtype=None` means fp32 on CPU (exact, and small models gain nothing from 16 bits there) and the checkpoint's
    own dtype on a GPU. `attn_implementation` (see attention_implementation), `quantization` (a
    BitsAndBytesConfig, see quantization_config) and `liger` (Liger kernels) are the loading options of training
    and evaluation. A local path that holds no model is a one-line error naming it."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    local = Path(path)
    if (local.is_absolute() or local.exists()) and not (local / "config.json").is_file():
        raise ConfigError(f"no model in {path} (config.json missing: did the stage that writes it run?)")
    if dtype is None:
        dtype = "auto" if torch.cuda.is_available() else torch.float32
    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars on every load; callers log one line instead
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **kwargs)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if liger:
        apply_liger(model)
    return model.eval()
