"""Merge a stage's adapter into its input model and save a model that formats, stops and scores like in training.

`merge_adapter(...)` is what `python -m stages.merge <stage>` calls:

1. load the stage's input model and its adapter (PEFT `PeftModel.from_pretrained`, unmerged), and record its logits
   on a few probe conversations;
2. `merge_and_unload()`; with `finetuning_type: full` the adapter directory already holds full weights and is
   re-saved as is;
3. apply the *template contract* (docs/templates.md, "Exported chat_template"): the saved tokenizer is
   the base tokenizer after `template.fix_tokenizer` (EOS replacement, pad, stop words) with
   `chat_template = template.jinja_template(tokenizer)`; `config.eos_token_id` and `generation_config.eos_token_id`
   are the list of the template's stop ids (plus the input model's own EOS ids), `pad_token_id` is set;
4. save safetensors + tokenizer + config + generation_config into a temporary sibling of the output directory;
5. reload what was written and verify it: (a) the saved chat_template renders training conversations to exactly
   the ids our encoder trains on; (b) max |logit difference| between the adapter model and the reloaded merged model
   stays under a tolerance (1e-4 in fp32); (c) a one-prompt greedy generation with the saved generation_config —
   recorded, including whether it stopped at a stop token before `max_new_tokens`;
6. only when (a) and (b) pass is the directory renamed into place (`tunepipe.io.atomic_dir`); otherwise a one-line
   `MergeError` and nothing is left at the output path.

The merged model is the next stage's base, so a DPO/KTO stage's reference (its model with adapters disabled) is the
SFT model by construction (pain point #3).

torch / transformers / peft are imported inside the functions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunepipe.errors import TunepipeError
from tunepipe.models.loading import load_causal_lm

log = logging.getLogger(__name__)

# Max |merged - unmerged| logit allowed, by the dtype the model is merged in. PEFT's own merge error is ~3e-7 in fp32
# (measured here on the tiny model; docs/stages.md lists the demo's figures); 16-bit formats round every merged weight, so their bound is only a sanity check.
LOGIT_TOLERANCE = {"float32": 1e-4, "float64": 1e-8, "float16": 5e-2, "bfloat16": 0.5}
PROBE_CONVERSATIONS = 4
PROBE_MAX_TOKENS = 256
REPORT_FILE = "merge_report.json"

# Always part of the round-trip check, on top of the stage's own data: what the demo data may not contain.
SYNTHETIC_CONVERSATIONS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi. How can I help?"}],
     "system": "", "tools": ""},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Green."},
                  {"role": "user", "content": "And another one?"}, {"role": "assistant", "content": "Blue."}],
     "system": "You answer in one word.", "tools": ""},
    {"messages": [{"role": "user", "content": "List two items:\n- first\n- second"},
                  {"role": "assistant", "content": "1. first\n2. second"},
                  {"role": "user", "content": "Quote it: \"done\" {{idx}} {% raw %}"},
                  {"role": "assistant", "content": "\"done\""},
                  {"role": "user", "content": "Thanks, ünïcödé 你好 ✓"},
                  {"role": "assistant", "content": "You're welcome."}],
     "system": "Be brief.\nUse lists.", "tools": ""},
    {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
     "system": "You are a calculator.", "tools": ""},
]


_WORDS = ("Diond", "flag", "green", "founded", "1489", "the", "hare", "emblem", "colour", "What", "is", "its",
          "river", "?", ".", ",", "!", ":", "\n", "\n\n", "-", "1.", "ünï", "你好", "✓", "{{idx}}", "{%", "\"q\"", "'s",
          "<b>", "[x]", "#", "*")


def synthetic_conversations(n: int, seed: int = 0, *, ragged: bool = False) -> list[dict[str, Any]]:
    """`n` seeded random conversations: 1-3 turns, no / one-line / multi-line system prompts, newlines, punctuation,
    unicode and jinja-looking text. `ragged`: messages may also start or end with spaces or newlines (tokenizers
    may merge those across template boundaries for some templates, docs/templates.md; not for qwen)."""
    import random

    rng = random.Random(seed)
    edges = ["", " ", "\n"] if ragged else [""]

    def text() -> str:
        body = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 12))).strip()
        return rng.choice(edges) + (body or "ok") + rng.choice(edges)

    out = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        system = rng.choice(["", "", "You are terse.", "Line one.\nLine two: " + text()])
        out.append({"messages": messages, "system": system, "tools": ""})
    return out


class MergeError(TunepipeError):
    """A merge whose output would not behave like the trained model (template or logit check failed)."""


@dataclass
class MergeResult:
    """`metrics`: numbers only (metrics/merge_<stage>.json); `report`: details saved next to the model."""

    metrics: dict[str, float | int]
    report: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Conversations used by the checks


def conversations_from_examples(examples: Iterable[Any], limit: int) -> list[dict[str, Any]]:
    """Training-style conversations from converted examples (`tunepipe.data.converters.Example`): the prompt
    messages plus the first non-empty response (sft: the answer, dpo: chosen, kto: the one response).
    Rows the processors would drop (odd message counts, no response) are skipped."""
    out = []
    for example in examples:
        if len(out) >= limit:
            break
        if getattr(example, "drop", None) or len(example.prompt) % 2 != 1:
            continue
        responses = [r for r in example.response if isinstance(r.get("content"), str) and r["content"]]
        if not responses:
            continue
        out.append({"messages": list(example.prompt) + [responses[0]], "system": example.system or "",
                    "tools": example.tools or ""})
    return out


def _chat_messages(conversation: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """Our message list -> (HF chat messages with the system first, parsed tools), as a user would pass them."""
    from tunepipe.data.templates.engine import _chat_message, _parse_tools  # the conversion `template: tokenizer` uses

    chat = [{"role": "system", "content": conversation["system"]}] if conversation.get("system") else []
    chat += [_chat_message(message) for message in conversation["messages"]]
    return chat, _parse_tools(conversation.get("tools") or None)


def encoder_ids(template: Any, tokenizer: Any, conversation: dict[str, Any]) -> list[int]:
    """The ids training uses: `encode_multiturn` pairs, concatenated (LF per-piece tokenization)."""
    pairs = template.encode_multiturn(tokenizer, conversation["messages"], conversation.get("system") or None,
                                      conversation.get("tools") or None)
    return [token for prompt, answer in pairs for token in prompt + answer]


def chat_template_ids(tokenizer: Any, conversation: dict[str, Any], *, prompt_only: bool = False) -> list[int]:
    """Render with the tokenizer's chat_template (tokenize=False), then tokenize the string as one piece.
    `prompt_only`: everything but the last answer, with `add_generation_prompt=True` (what inference sends)."""
    chat, tools = _chat_messages(conversation)
    if prompt_only:
        chat = chat[:-1]
    text = tokenizer.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=prompt_only)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_chat_template(tokenizer: Any, template: Any, conversations: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """(a) Does the tokenizer's chat_template give the training ids? Full conversations (gating) and the prompt with
    the generation prompt vs the encoder's prompt ids (recorded: templates whose answer starts with a space or
    newline merge it into the answer's first token by design, see docs/templates.md)."""
    mismatches, prompt_mismatches, first = 0, 0, None
    for i, conversation in enumerate(conversations):
        ours = encoder_ids(template, tokenizer, conversation)
        theirs = chat_template_ids(tokenizer, conversation)
        if ours != theirs:
            mismatches += 1
            if first is None:
                at = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                first = {"conversation": i, "position": at,
                         "encoder": tokenizer.decode(ours[max(0, at - 8): at + 8]),
                         "chat_template": tokenizer.decode(theirs[max(0, at - 8): at + 8])}
        answer = template.encode_multiturn(tokenizer, conversation["messages"], conversation.get("system") or None,
                                           conversation.get("tools") or None)[-1][1]
        if chat_template_ids(tokenizer, conversation, prompt_only=True) != ours[: len(ours) - len(answer)]:
            prompt_mismatches += 1
    return {"conversations": len(conversations), "mismatches": mismatches,
            "prompt_mismatches": prompt_mismatches, "first_mismatch": first}


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and config contract


def template_eos_ids(template: Any, tokenizer: Any, previous: int | Sequence[int] | None = None) -> list[int]:
    """The template's stop ids (first = the tokenizer's EOS), then the input model's own EOS ids, no duplicates:
    Qwen-style [<|im_end|>, <|endoftext|>]."""
    if previous is None:
        previous = []
    elif isinstance(previous, int):
        previous = [previous]
    return list(dict.fromkeys([*template.stop_token_ids(tokenizer), *previous]))


def prepare_tokenizer(tokenizer: Any, template: Any) -> Any:
    """The tokenizer a merged model is saved with: `fix_tokenizer` (idempotent) + our chat_template, always (the
    model was trained on this template's format, whatever chat_template the checkpoint shipped with)."""
    template.fix_tokenizer(tokenizer)
    tokenizer.chat_template = template.jinja_template(tokenizer)
    return tokenizer


def apply_template_contract(model: Any, tokenizer: Any, template: Any) -> list[int]:
    """Write EOS/pad into model.config and model.generation_config (the lists vLLM and `generate` stop on)."""
    from transformers import GenerationConfig

    previous = getattr(model.generation_config, "eos_token_id", None) if model.generation_config else None
    if previous is None:
        previous = model.config.eos_token_id
    eos = template_eos_ids(template, tokenizer, previous)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    model.config.eos_token_id = eos
    model.config.pad_token_id = pad
    model.config.bos_token_id = tokenizer.bos_token_id
    generation = model.generation_config or GenerationConfig()
    generation.eos_token_id = eos
    generation.pad_token_id = pad
    generation.bos_token_id = tokenizer.bos_token_id
    model.generation_config = generation
    return eos


def _save_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    tokenizer.padding_side = "left"  # ready for batched generation (LLaMA-Factory's export does the same)
    tokenizer.save_pretrained(str(out_dir))
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's name; this one loads in v4 too
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Logits and smoke generation


def probe_inputs(template: Any, tokenizer: Any, conversations: Sequence[dict[str, Any]],
                 count: int = PROBE_CONVERSATIONS, max_tokens: int = PROBE_MAX_TOKENS) -> list[list[int]]:
    return [encoder_ids(template, tokenizer, c)[:max_tokens] for c in conversations[:count]]


def probe_logits(model: Any, probes: Sequence[Sequence[int]]) -> list[Any]:
    """fp32 logits of each probe, one sequence at a time (no padding effects), on the model's device."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for ids in probes:
            logits = model(input_ids=torch.tensor([list(ids)], device=device)).logits[0]
            out.append(logits.float().cpu())
    return out


def max_logit_diff(a: Sequence[Any], b: Sequence[Any]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True)) if a else 0.0


def smoke_generation(model: Any, tokenizer: Any, conversation: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """(c) Greedy generation for the conversation's first user turn, rendered with the saved chat_template and
    stopped by the saved generation_config, as a user of the exported model would run it."""
    import torch

    first = dict(conversation, messages=conversation["messages"][:2])
    prompt = chat_template_ids(tokenizer, first, prompt_only=True)
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    device = next(model.parameters()).device
    with torch.inference_mode():
        output = model.generate(torch.tensor([prompt], device=device), attention_mask=torch.ones(1, len(prompt),
                                dtype=torch.long, device=device), do_sample=False, max_new_tokens=max_new_tokens)
    new = output[0, len(prompt):].tolist()
    stop_at = next((i for i, t in enumerate(new) if t in eos), None)
    return {"prompt": tokenizer.decode(prompt), "output": tokenizer.decode(new, skip_special_tokens=True),
            "new_tokens": len(new) if stop_at is None else stop_at + 1, "stopped": stop_at is not None,
            "stop_token": None if stop_at is None else new[stop_at]}


# ---------------------------------------------------------------------------------------------------------------
# The merge


def _dtype_name(model: Any) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _is_full_weights(adapter_dir: Path) -> bool:
    return (adapter_dir / "config.json").is_file() and not (adapter_dir / "adapter_config.json").is_file()


def load_adapter_model(input_model: str | Path, adapter_dir: str | Path, *, tokenizer: Any = None, full: bool = False,
                       trust_remote_code: bool = False, dtype: Any = "auto") -> Any:
    """The stage's trained model as training left it: input model + PEFT adapter (unmerged), or the full weights.

    When the (template-fixed) tokenizer has more tokens than the input model has embedding rows, the embeddings are
    grown first exactly as training grows them (`resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)`,
    tunepipe/train/recipe.py); the adapter then carries the trained embedding/output layers (`modules_to_save`)."""
    adapter_dir = Path(adapter_dir)
    if full:
        if not (adapter_dir / "config.json").is_file():
            raise MergeError(f"{adapter_dir}: finetuning_type is full but there is no config.json with full weights "
                             "(run the stage's training first)")
        return load_causal_lm(adapter_dir, trust_remote_code=trust_remote_code, dtype=dtype)
    if not (adapter_dir / "adapter_config.json").is_file():
        hint = (" (it holds full weights: set finetuning_type: full)" if _is_full_weights(adapter_dir)
                else " (run the stage's training first)")
        raise MergeError(f"{adapter_dir}: no adapter_config.json{hint}")
    from peft import PeftModel

    base = load_causal_lm(input_model, trust_remote_code=trust_remote_code, dtype=dtype)
    if getattr(base, "is_quantized", False) or getattr(base.config, "quantization_config", None):
        # QLoRA trains on a quantized copy; merging into rounded weights would bake the rounding into the model
        raise MergeError(f"{input_model} is a quantized checkpoint: the adapter is merged into unquantized "
                         "(bf16/fp32) weights only; point the stage at the unquantized model")
    if tokenizer is not None and len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()


def trained_quantization(adapter_dir: str | Path) -> str | None:
    """How the adapter's training loaded its base (e.g. "4-bit bnb (nf4, double quantization)"), None = unquantized;
    from the training stage's tunepipe_train.json."""
    meta = Path(adapter_dir) / "tunepipe_train.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text(encoding="utf-8")).get("quantization")


def _check_stop_ids(model, template, tokenizer) -> None:
    vocab = model.get_input_embeddings().weight.shape[0]
    too_big = [t for t in template.stop_token_ids(tokenizer) if t >= vocab]
    if too_big:
        raise MergeError(f"template stop ids {too_big} are outside the model's {vocab}-row embedding: the template "
                         "added tokens the model was not resized for")


def _problems(roundtrip: dict | None, diff: float, tolerance: float, dtype_name: str, saved: tuple,
              expected: tuple) -> list[str]:
    """Why the saved merge is refused: the chat_template round trip (None: not enforced), the logits, the EOS."""
    (saved_tok, saved_eos), (tokenizer, eos) = saved, expected
    problems = []
    if roundtrip is not None and roundtrip["mismatches"]:
        m = roundtrip["first_mismatch"]
        problems.append(f"chat_template round-trip failed for {roundtrip['mismatches']}/"
                        f"{roundtrip['conversations']} conversations (first: #{m['conversation']} at token "
                        f"{m['position']}: encoder {m['encoder']!r} vs chat_template {m['chat_template']!r})")
    if not diff <= tolerance:  # also catches NaN
        problems.append(f"merged logits differ from the adapter model's by {diff:.3g} (> {tolerance:g} in "
                        f"{dtype_name})")
    if saved_tok.eos_token_id != tokenizer.eos_token_id or list(saved_eos) != eos:
        problems.append(f"saved EOS {saved_tok.eos_token!r}/{saved_eos} does not match the template's {eos}")
    return problems


def merge_adapter(
    input_model: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: Any,
    template: Any,
    conversations: Sequence[dict[str, Any]],
    full: bool = False,
    max_new_tokens: int = 48,
    logit_tolerance: float | None = None,
    strict_template: bool = True,
    trust_remote_code: bool = False,
    dtype: Any = "auto",
    provenance: dict[str, Any] | None = None,
) -> MergeResult:
    """Merge, save atomically to `out_dir`, verify the saved files; raise `MergeError` (nothing at `out_dir`) if the
    chat_template round-trip (when `strict_template`) or the logit check fails. `tokenizer` is the base tokenizer
    (it is fixed by the template here); `conversations` are training-style conversations for the checks."""
    from tunepipe.io import atomic_dir

    if not conversations:
        raise MergeError("merge: no conversations to check the chat template with")
    tokenizer = prepare_tokenizer(tokenizer, template)
    probes = probe_inputs(template, tokenizer, conversations)

    model = load_adapter_model(input_model, adapter_dir, tokenizer=tokenizer, full=full,
                               trust_remote_code=trust_remote_code, dtype=dtype)
    dtype_name = _dtype_name(model)
    tolerance = logit_tolerance if logit_tolerance is not None else LOGIT_TOLERANCE.get(dtype_name, 1e-4)
    _check_stop_ids(model, template, tokenizer)
    adapter_logits = probe_logits(model, probes)
    if not full:
        model = model.merge_and_unload()
    eos = apply_template_contract(model, tokenizer, template)

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        _save_tokenizer(tokenizer, tmp)
        del model
        merged = load_causal_lm(tmp, trust_remote_code=trust_remote_code, dtype=dtype)
        from tunepipe.models.loading import load_tokenizer

        saved_tok = load_tokenizer(str(tmp), trust_remote_code=trust_remote_code)
        diff = max_logit_diff(adapter_logits, probe_logits(merged, probes))
        roundtrip = check_chat_template(saved_tok, template, conversations)
        generation = smoke_generation(merged, saved_tok, conversations[0], max_new_tokens)
        saved_eos = merged.generation_config.eos_token_id

        problems = _problems(roundtrip if strict_template else None, diff, tolerance, dtype_name,
                             (saved_tok, saved_eos), (tokenizer, eos))
        if problems:
            raise MergeError(f"merge into {out_dir} refused: " + "; ".join(problems))

        metrics = {
            "max_logit_diff": diff,
            "logit_tolerance": tolerance,
            "probe_tokens": sum(len(p) for p in probes),
            "template_roundtrip_ok": int(roundtrip["mismatches"] == 0),
            "template_conversations": roundtrip["conversations"],
            "template_mismatches": roundtrip["mismatches"],
            "generation_prompt_mismatches": roundtrip["prompt_mismatches"],
            "generation_stopped": int(generation["stopped"]),
            "generation_new_tokens": generation["new_tokens"],
            "max_new_tokens": max_new_tokens,
        }
        report = {
            "input_model": str(input_model), "adapter": str(adapter_dir), "finetuning_type": "full" if full else "lora",
            # the adapter may have been trained on a quantized copy (QLoRA); the merge is always into these weights
            "trained_quantized": trained_quantization(adapter_dir), "merged_into": f"unquantized {dtype_name}",
            "template": template.name, "dtype": dtype_name, "eos_token": tokenizer.eos_token, "eos_token_ids": eos,
            "pad_token_id": merged.generation_config.pad_token_id, "generation": generation,
            "first_template_mismatch": roundtrip["first_mismatch"], "metrics": metrics, **(provenance or {}),
        }
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("merged %s + %s -> %s (max |dlogit| %.2e, template %s, generation %s)", input_model, adapter_dir,
             out_dir, diff, "ok" if not roundtrip["mismatches"] else "MISMATCH",
             "stopped" if generation["stopped"] else "did not stop")
    return MergeResult(metrics=metrics, report=report)
