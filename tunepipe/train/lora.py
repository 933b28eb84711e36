"""params.yaml's LoRA keys (LLaMA-Factory's names) -> peft.LoraConfig, and its one-line description for the log."""

from __future__ import annotations

from tunepipe.config import LoraParams
from tunepipe.errors import ConfigError


def lora_config(lora: LoraParams, extra_modules_to_save: list[str] | tuple[str, ...] = (), *, tied: bool = False):
    """params.yaml's LoRA keys (LF names) -> peft.LoraConfig."""
    from peft import LoraConfig

    target = lora.lora_target.strip()
    target_modules: str | list[str] = ("all-linear" if target == "all"
                                       else [t.strip() for t in target.split(",") if t.strip()])
    if not target_modules:
        raise ConfigError("empty lora_target (use 'all' or module names such as q_proj,v_proj)", key="lora_target")
    modules_to_save = [t.strip() for t in (lora.additional_target or "").split(",") if t.strip()]
    modules_to_save += [m for m in extra_modules_to_save if m not in modules_to_save]
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.lora_rank,
        lora_alpha=lora.lora_alpha if lora.lora_alpha is not None else 2 * lora.lora_rank,
        lora_dropout=lora.lora_dropout,
        target_modules=target_modules,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        modules_to_save=modules_to_save or None,
        ensure_weight_tying=tied and bool(modules_to_save),
    )



def describe(cfg) -> str:
    target = cfg.target_modules if isinstance(cfg.target_modules, str) else ",".join(sorted(cfg.target_modules))
    extras = [name for name, on in (("dora", cfg.use_dora), ("rslora", cfg.use_rslora)) if on]
    save = f" +save {','.join(cfg.modules_to_save)}" if cfg.modules_to_save else ""
    return f"LoRA r={cfg.r} alpha={cfg.lora_alpha} dropout={cfg.lora_dropout} on {target}" + \
        (f" ({'+'.join(extras)})" if extras else "") + save
