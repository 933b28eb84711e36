"""Token-level parity harness: `tunepipe data export` vs LLaMA-Factory 0.9.5's own pipeline (bench/lf_oracle.py).

Run with the project venv; the LF side runs in the side venv built by bench/lf_venv.sh:

    .venv/bin/python bench/parity.py -j 2                 # the whole matrix (~260 cases), table, exit 1 on a diff
    .venv/bin/python bench/parity.py --cases 'sft/*qwen*'  # a subset (fnmatch globs or substrings, comma-separated)
    .venv/bin/python bench/parity.py --list               # case names only (--sample: the live-test sample)
    .venv/bin/python bench/parity.py -j 2 --write-golden tests/data/golden   # also (re)write the golden records
    .venv/bin/python bench/parity.py --ours cli ...       # our side through the real `tunepipe data export`

Our side runs by default as `--ours batch`: prepare() + exactly the export command's row serialization, many cases
per process (what tests/data/test_parity_golden.py runs); `--ours cli` runs the command itself per case (slower).
Cost: ~10-20 s per case for LF (a fresh process each: LF mutates its global templates), ~0.2 s for ours in batch.

Every case is run through both pipelines with the same CLI (`--stage --dataset --dataset-dir --template --tokenizer
--cutoff-len [...]`) and compared row by row: same row count, same keys in the same order, same values (compared as
canonical JSON, so `true` is not `1`). The table shows, per case, the rows, how many are identical, and the first
difference: example index, column, position, and both sides' ids around it decoded with the tokenizer.

Inputs: LF demo data (../shared/data/llamafactory-demo), synthetic edge-case datasets written by
`write_synthetic()` (deterministic), tokenizers bench/_tokenizers/{bpe_plain,bpe_bos} and the embedded `tiny`
tokenizer (built deterministically by tunepipe.models into .cache/parity/; the tokenizer files alone, see
`tiny_tokenizer_dir`). The template axis is every template both tunepipe and LF 0.9.5 have, less those LF cannot
run with these tokenizers (see `common_templates`).

LF outputs are cached under .cache/parity/lf/ keyed by the case arguments and the bytes of every input (oracle,
dataset folder, tokenizer), so a rerun only recomputes our side (`--no-lf-cache` to disable).

Golden records (`--write-golden DIR`): DIR/parity_golden.json.gz, one record per case with LF's output as the
truth (merged into the file; the whole matrix also prunes stale records) — the symbolic case arguments,
row count, columns, sha256 of every row's canonical JSON (`json.dumps(row, separators=(",", ":"),
ensure_ascii=False)`) and the first 2 rows in full; plus whether we matched when it was written. Cases whose LF
output is not reproducible (llama3's tool prompt embeds today's date; `tiny_model`) are not written. tests/data/
test_parity_golden.py replays them in-process without LF; tests/data/test_parity_lf.py runs a sample live.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEMO_DIR = SHARED / "data" / "llamafactory-demo"
BENCH_TOKENIZERS = ROOT / "bench" / "_tokenizers"
CACHE = ROOT / ".cache" / "parity"
ORACLE = ROOT / "bench" / "lf_oracle.py"
DEFAULT_LF_VENV = Path(os.environ.get("LF_VENV", "/work/lf-venv"))
OURS_PYTHON = Path(sys.executable)
TOKENIZER_NAMES = ("bpe_plain", "bpe_bos", "tiny")
IGNORE = -100
GOLDEN_VERSION = 1

# Templates named in the brief / the contract (they get more than one dataset each).
KEY_TEMPLATES = ("default", "empty", "alpaca", "vicuna", "llama2", "llama2_zh", "llama3", "mistral", "qwen",
                 "chatml", "openchat", "zephyr", "qwen3", "qwen3_nothink", "gemma", "phi4", "deepseek3")
# Their tool prompt embeds datetime.now(): LF ids change daily, so tool-data cases with them are never golden.
DATED_TOOL_TEMPLATES = ("llama3", "llama4")


# ------------------------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    """One export, in `tunepipe data export` / lf_oracle terms. `data` and `tokenizer` are symbolic."""

    stage: str
    dataset: str
    template: str
    tokenizer: str  # bpe_plain | bpe_bos | tiny
    cutoff_len: int
    data: str = "demo"  # demo (LF demo folder) | synth (write_synthetic)
    opts: dict[str, Any] = field(default_factory=dict)  # packing, neat_packing, ..., see OPTION_FLAGS
    golden: bool = True  # reproducible from the repo + ../shared (False: LF output depends on the date)
    sample: bool = False  # in the live LF sample (tests/data/test_parity_lf.py)
    tag: str = ""  # disambiguates otherwise equal names

    @property
    def slow(self) -> bool:
        """Whole datasets (full tag, pretraining corpora without max_samples): `slow` in the golden test."""
        return self.tag == "full" or (self.stage == "pt" and self.data == "demo" and "max_samples" not in self.opts
                                      and self.dataset != "identity")

    @property
    def name(self) -> str:
        parts = [self.stage, self.dataset.replace(",", "+"), self.template, self.tokenizer, f"c{self.cutoff_len}"]
        for key, value in self.opts.items():
            flag = OPTION_FLAGS[key]
            if isinstance(value, bool):
                parts.append(flag if value else flag.replace("--", "--no-"))
            else:
                parts.append(f"{flag}={value}")
        if self.tag:
            parts.append(self.tag)
        return "/".join(p.lstrip("-") for p in parts)

    def args(self) -> dict[str, Any]:
        """The symbolic arguments (what a golden record stores)."""
        return {"stage": self.stage, "dataset": self.dataset, "data": self.data, "template": self.template,
                "tokenizer": self.tokenizer, "cutoff_len": self.cutoff_len, "opts": dict(self.opts)}

    @classmethod
    def from_args(cls, args: dict[str, Any], **extra) -> "Case":
        return cls(stage=args["stage"], dataset=args["dataset"], template=args["template"],
                   tokenizer=args["tokenizer"], cutoff_len=args["cutoff_len"], data=args["data"],
                   opts=dict(args["opts"]), **extra)

    def cli(self, dataset_dir: Path, tokenizer_path: Path) -> list[str]:
        """Flags shared by `tunepipe data export` and bench/lf_oracle.py (no --out)."""
        argv = ["--stage", self.stage, "--dataset", self.dataset, "--dataset-dir", str(dataset_dir),
                "--template", self.template, "--tokenizer", str(tokenizer_path), "--cutoff-len", str(self.cutoff_len)]
        for key, value in self.opts.items():
            flag = OPTION_FLAGS[key]
            if value is True:
                argv.append(flag)
            elif value is False:
                if key != "packing":
                    raise ValueError(f"{key}=False is the default; leave it out")
                argv.append("--no-packing")
            elif value is not None:
                argv += [flag, str(value)]
        return argv


OPTION_FLAGS = {
    "packing": "--packing", "neat_packing": "--neat-packing", "train_on_prompt": "--train-on-prompt",
    "mask_history": "--mask-history", "max_samples": "--max-samples", "seed": "--seed",
    "mix_strategy": "--mix-strategy", "interleave_probs": "--interleave-probs", "tool_format": "--tool-format",
    "default_system": "--default-system", "preprocessing_batch_size": "--preprocessing-batch-size",
}


def common_templates(lf_python: Path) -> tuple[list[str], list[str]]:
    """(templates both tunepipe and LF 0.9.5 have, sorted; those of them LF cannot run with our test tokenizers:
    `{"token": ...}` slots such as chatglm3's [gMASK] that the tokenizer lacks, and multimodal plugins (gemma3,
    llama4, mistral_small) that insist on a processor even for text — LF crashes on both)."""
    from tunepipe.data.templates import template_names

    ours = set(template_names())
    code = ("import os, json; os.environ['HF_HUB_OFFLINE']='1'\n"
            "from llamafactory.data.template import TEMPLATES\n"
            "def toks(t):\n"
            "    fs = [getattr(t, n, None) for n in dir(t) if n.startswith('format_')]\n"
            "    if type(t.mm_plugin).__name__ != 'BasePlugin': return True\n"
            "    return any(isinstance(s, dict) for f in fs for s in (getattr(f, 'slots', None) or []))\n"
            "print(json.dumps({n: toks(t) for n, t in TEMPLATES.items()}))")
    out = subprocess.run([str(lf_python), "-c", code], capture_output=True, text=True, check=True,
                         env=_env(), cwd=ROOT)
    lf = json.loads(out.stdout.strip().splitlines()[-1])
    common = sorted(ours & set(lf))
    return common, [t for t in common if lf[t]]


def _template_kind(template: str) -> str:
    """Rough template class from our own registry: 'reasoning', 'eff' (efficient_eos) or ''."""
    try:
        from tunepipe.data.templates import get_template

        tmpl = get_template(template)
    except Exception:  # noqa: BLE001 - only used to pick a covering dataset
        return ""
    if getattr(tmpl, "efficient_eos", False):
        return "eff"
    if "reason" in type(tmpl).__name__.lower() or getattr(tmpl, "reasoning", False):
        return "reasoning"
    return ""


def build_matrix(templates: list[str], skip: list[str] | tuple[str, ...] = ()) -> list[Case]:
    """The covering set of cases (see the module doc). Deterministic for a given template list; templates in
    `skip` keep their place in the tokenizer rotation but get no case."""
    cases: list[Case] = []
    toks = TOKENIZER_NAMES

    def add(*args, **kwargs) -> None:
        cases.append(Case(*args, **kwargs))

    def n(k: int) -> dict[str, Any]:
        return {"max_samples": k}

    # 1. Template sweep: every common template on multi-turn tool data (user/assistant/function/observation,
    #    tools in the system prompt), plus one more dataset/stage per template (rotating), key ones get more.
    for i, t in enumerate(templates):
        if t in skip:
            continue
        glaive = "glaive_toolcall_en_demo" if i % 2 == 0 else "glaive_toolcall_zh_demo"
        add("sft", glaive, t, toks[i % 3], 1024, opts=n(16), golden=t not in DATED_TOOL_TEMPLATES,
            sample=t in ("qwen", "mistral"))
        kind = _template_kind(t)
        if t in KEY_TEMPLATES:
            add("sft", "alpaca_en_demo" if i % 2 else "alpaca_zh_demo", t, toks[(i + 1) % 3], 128, opts=n(40),
                sample=t in ("llama2", "default"))
            if i % 2:
                add("dpo", "dpo_en_demo" if i % 4 == 1 else "dpo_zh_demo", t, toks[(i + 2) % 3], 128, opts=n(24),
                    sample=t == "llama3")
            else:
                add("kto", "kto_en_demo", t, toks[(i + 2) % 3], 128, opts=n(24), sample=t == "gemma")
        elif kind == "reasoning":  # encode_oneturn's thought stripping / empty-CoT rule
            add("dpo", "dpo_en_demo", t, toks[(i + 1) % 3], 256, opts=n(16))
        elif kind == "eff":  # efficient_eos: EOS appended to responses
            add("kto", "kto_en_demo", t, toks[(i + 1) % 3], 96, opts=n(16))

    # 2. Truncation: tiny and medium cutoffs, single- and multi-turn (turn budget, dropped later turns).
    for t, tok in (("default", "bpe_plain"), ("qwen", "tiny"), ("llama2", "bpe_bos"), ("mistral", "bpe_bos"),
                   ("llama3", "bpe_plain"), ("qwen3", "tiny")):
        add("sft", "alpaca_en_demo", t, tok, 32, opts=n(40))
        add("sft", "glaive_toolcall_en_demo", t, tok, 96, opts=n(24), golden=t not in DATED_TOOL_TEMPLATES)
    add("sft", "alpaca_zh_demo", "qwen", "bpe_plain", 16, opts=n(40))
    add("dpo", "dpo_en_demo", "qwen", "tiny", 32, opts=n(40))
    add("dpo", "dpo_zh_demo", "llama2", "bpe_bos", 1024, opts=n(40))
    add("kto", "kto_en_demo", "default", "bpe_plain", 32, opts=n(40))
    add("kto", "kto_en_demo", "qwen3", "tiny", 1024, opts=n(40))

    # 3. SFT options: packing (cutoff-1, knapsack, pads), neat packing (masks, packing_params), train_on_prompt,
    #    mask_history (last-turn budget priority), small preprocessing batches (packing is per batch).
    for ds, t, tok, cut in (("glaive_toolcall_en_demo", "qwen", "bpe_plain", 256),
                            ("alpaca_en_demo", "llama3", "bpe_bos", 128),
                            ("identity", "default", "tiny", 512),
                            ("glaive_toolcall_zh_demo", "mistral", "bpe_bos", 512)):
        k = 60
        add("sft", ds, t, tok, cut, opts={"max_samples": k}, sample=False)
        add("sft", ds, t, tok, cut, opts={"packing": True, "max_samples": k}, sample=t == "qwen")
        add("sft", ds, t, tok, cut, opts={"neat_packing": True, "max_samples": k}, sample=t == "default")
        add("sft", ds, t, tok, cut, opts={"train_on_prompt": True, "max_samples": k})
        add("sft", ds, t, tok, min(cut, 96), opts={"mask_history": True, "max_samples": k}, sample=t == "mistral")
    add("sft", "alpaca_en_demo", "qwen", "tiny", 1024, opts={"packing": True, "max_samples": 80})  # many per pack
    add("sft", "alpaca_en_demo", "llama2", "bpe_bos", 1024, opts={"neat_packing": True, "max_samples": 80})
    add("sft", "glaive_toolcall_en_demo", "qwen", "bpe_plain", 128,
        opts={"packing": True, "max_samples": 50, "preprocessing_batch_size": 16})
    add("sft", "alpaca_zh_demo", "chatml", "tiny", 256,
        opts={"neat_packing": True, "max_samples": 50, "preprocessing_batch_size": 7})
    add("sft", "glaive_toolcall_zh_demo", "llama2", "bpe_bos", 64, opts={"mask_history": True, "max_samples": 40})
    add("sft", "glaive_toolcall_en_demo", "qwen3", "tiny", 128, opts={"mask_history": True, "max_samples": 40})
    add("sft", "glaive_toolcall_en_demo", "qwen3", "tiny", 256, opts={"train_on_prompt": True, "max_samples": 30})
    add("sft", "glaive_toolcall_en_demo", "qwen3_nothink", "bpe_plain", 256, opts={"packing": True,
                                                                                   "max_samples": 40})

    # 4. Tool formats on glaive: the template's own vs an explicit override.
    for ds in ("glaive_toolcall_en_demo", "glaive_toolcall_zh_demo"):
        for t, tok in (("default", "bpe_plain"), ("qwen", "tiny"), ("chatml", "bpe_bos"), ("mistral", "bpe_plain")):
            for fmt in ("default", "qwen"):
                add("sft", ds, t, tok, 1024, opts={"tool_format": fmt, "max_samples": 20},
                    sample=(t, fmt) == ("default", "qwen") and ds.endswith("en_demo"))
    add("sft", "glaive_toolcall_en_demo", "qwen", "tiny", 1024, opts={"tool_format": "glm4", "max_samples": 20})
    add("sft", "glaive_toolcall_en_demo", "qwen", "bpe_plain", 1024,
        opts={"tool_format": "mistral", "max_samples": 20})

    # 5. default_system overrides ('' = none).
    add("sft", "alpaca_en_demo", "qwen", "bpe_plain", 128, opts={"default_system": "", "max_samples": 20})
    add("sft", "alpaca_en_demo", "vicuna", "bpe_bos", 128,
        opts={"default_system": "You are a pirate.", "max_samples": 20})
    add("sft", "glaive_toolcall_en_demo", "default", "tiny", 512,
        opts={"default_system": "Be brief.", "max_samples": 20})

    # 6. Pretraining: packing default (full cutoff, per-batch remainder dropped, BOS overwrite), --no-packing
    #    (per-doc truncation), explicit --packing (cutoff-1 rule), llama3's literal EOS, template-replaced EOS.
    add("pt", "c4_demo", "default", "bpe_plain", 128, sample=True)
    add("pt", "c4_demo", "default", "bpe_bos", 128, opts=n(120))
    add("pt", "c4_demo", "default", "bpe_bos", 256, opts={"packing": True})
    add("pt", "c4_demo", "default", "bpe_bos", 256, opts={"packing": False, "max_samples": 60}, sample=True)
    add("pt", "c4_demo", "qwen", "tiny", 1024, opts={"packing": False, "max_samples": 60})
    add("pt", "c4_demo", "llama3", "bpe_plain", 512)
    add("pt", "c4_demo", "qwen", "tiny", 64, opts={"preprocessing_batch_size": 50})
    add("pt", "wiki_demo", "default", "bpe_bos", 1024)
    add("pt", "wiki_demo", "default", "bpe_plain", 32, opts={"packing": False})
    add("pt", "wiki_demo", "chatml", "bpe_bos", 512, opts={"packing": True})
    add("pt", "wiki_demo", "llama3", "tiny", 128, opts={"packing": False})
    add("pt", "identity", "default", "bpe_bos", 64)
    add("pt", "c4_demo,wiki_demo", "default", "tiny", 256)
    add("pt", "c4_demo,wiki_demo", "default", "bpe_bos", 256,
        opts={"mix_strategy": "interleave_under", "interleave_probs": "0.6,0.4", "seed": 3})

    # 7. Mixing several datasets: concat order, interleave under/over with and without probabilities and seeds.
    mix = "alpaca_en_demo,identity"
    add("sft", mix, "qwen", "bpe_plain", 128, opts={"max_samples": 30})
    add("sft", mix, "qwen", "bpe_plain", 128, opts={"mix_strategy": "interleave_under", "max_samples": 30})
    add("sft", mix, "default", "bpe_bos", 128,
        opts={"mix_strategy": "interleave_under", "interleave_probs": "0.3,0.7", "max_samples": 40},
        sample=True)
    add("sft", mix, "default", "bpe_bos", 128,
        opts={"mix_strategy": "interleave_under", "interleave_probs": "0.3,0.7", "seed": 7, "max_samples": 40})
    add("sft", mix, "llama3", "tiny", 128,
        opts={"mix_strategy": "interleave_over", "interleave_probs": "0.8,0.2", "max_samples": 20})
    add("sft", mix, "llama3", "tiny", 128,
        opts={"mix_strategy": "interleave_over", "interleave_probs": "0.5,0.5", "seed": 1234, "max_samples": 20})
    add("sft", mix, "qwen", "tiny", 128, opts={"mix_strategy": "interleave_over", "max_samples": 15})
    add("sft", "glaive_toolcall_en_demo,alpaca_zh_demo", "qwen", "bpe_plain", 256, opts={"max_samples": 20})
    add("sft", "glaive_toolcall_en_demo,identity", "mistral", "bpe_bos", 256,
        opts={"packing": True, "max_samples": 30})
    add("dpo", "dpo_en_demo,dpo_zh_demo", "qwen", "tiny", 256,
        opts={"mix_strategy": "interleave_under", "interleave_probs": "0.5,0.5", "max_samples": 20})
    add("sft", "identity,identity", "default", "bpe_plain", 64)  # a repeated name is loaded once

    # 8. max_samples edges; a few full datasets.
    add("sft", "identity", "qwen", "bpe_plain", 128, opts={"max_samples": 500})  # > rows: all 91
    add("sft", "identity", "qwen", "bpe_plain", 128, opts={"max_samples": 1})
    add("sft", "alpaca_en_demo", "qwen", "tiny", 1024, tag="full")
    add("sft", "glaive_toolcall_en_demo", "chatml", "bpe_plain", 2048, tag="full")
    add("sft", "alpaca_zh_demo", "default", "bpe_bos", 512, opts={"packing": True}, tag="full")
    add("dpo", "dpo_en_demo", "llama3", "bpe_bos", 512, tag="full")
    add("kto", "kto_en_demo", "default", "tiny", 512, tag="full")

    # 9. The tiny *model* directory as the CLI resolves `--tokenizer tiny` (config.json beside the tokenizer):
    #    token ids then depend on the transformers version (see tiny_tokenizer_dir), so never golden.
    add("sft", "alpaca_en_demo", "qwen", "tiny_model", 256, opts=n(40), golden=False)
    add("pt", "c4_demo", "default", "tiny_model", 256, opts=n(60), golden=False)

    # 10. Synthetic edge datasets (write_synthetic).
    def syn(*args, **kwargs) -> None:
        add(*args, data="synth", **kwargs)

    syn("sft", "synth_sharegpt_mixed", "qwen", "bpe_plain", 256, sample=True)
    syn("sft", "synth_sharegpt_mixed", "default", "bpe_bos", 64)
    syn("sft", "synth_sharegpt_mixed", "llama2", "tiny", 512)
    syn("sft", "synth_sharegpt_mixed", "mistral", "bpe_bos", 512, opts={"mask_history": True})
    syn("sft", "synth_oversample", "qwen", "tiny", 128, sample=True)
    syn("sft", "synth_oversample", "qwen", "tiny", 128, opts={"seed": 7})
    syn("sft", "synth_subsample", "default", "bpe_plain", 128)
    syn("sft", "synth_oversample,synth_subsample", "default", "bpe_plain", 128, opts={"seed": 11})
    syn("sft", "synth_subsample,synth_oversample", "default", "bpe_plain", 128,
        opts={"mix_strategy": "interleave_over", "seed": 5})
    syn("sft", "synth_oversample", "default", "bpe_plain", 128, opts={"max_samples": 7})
    syn("sft", "synth_alpaca_history", "default", "bpe_plain", 256, sample=True)
    syn("sft", "synth_alpaca_history", "llama2", "bpe_bos", 256)
    syn("sft", "synth_alpaca_history", "alpaca", "tiny", 256)
    syn("sft", "synth_alpaca_history", "qwen", "tiny", 40)
    syn("sft", "synth_alpaca_history", "qwen", "tiny", 48, opts={"mask_history": True})
    syn("sft", "synth_alpaca_history", "gemma", "bpe_plain", 256, opts={"train_on_prompt": True})
    syn("sft", "synth_alpaca_history", "default", "bpe_bos", 128, opts={"neat_packing": True})
    syn("pt", "synth_alpaca_history", "default", "bpe_bos", 32, opts={"packing": False})
    # synth_openai's tools differ in shape (datasets<=4.0 null-fills the union of keys; LF's default tool format
    # then crashes on the nulls, so only formats that dump the JSON); synth_openai_uniform's tools share one shape.
    syn("sft", "synth_openai", "qwen", "tiny", 1024, sample=True)
    syn("sft", "synth_openai", "mistral", "bpe_bos", 1024)
    syn("sft", "synth_openai", "llama3", "bpe_plain", 1024, golden=False)
    syn("sft", "synth_openai_uniform", "default", "bpe_plain", 1024, sample=True)
    syn("sft", "synth_openai_uniform", "chatml", "bpe_bos", 96)
    syn("sft", "synth_openai_uniform", "qwen3", "tiny", 512, opts={"mask_history": True})
    syn("sft", "synth_hermes_like", "qwen", "bpe_plain", 128, sample=True)
    syn("kto", "synth_kto", "qwen", "tiny", 128, sample=True)
    syn("kto", "synth_kto", "default", "bpe_plain", 64, opts={"preprocessing_batch_size": 3})
    syn("kto", "synth_kto_alpaca", "llama2", "bpe_bos", 128)
    syn("kto", "synth_kto_alpaca", "qwen3", "tiny", 128, opts={"preprocessing_batch_size": 4})
    syn("dpo", "synth_ranking_alpaca", "qwen", "bpe_plain", 128, sample=True)
    syn("dpo", "synth_ranking_alpaca", "llama3", "bpe_bos", 24)
    syn("dpo", "synth_ranking_alpaca", "qwen3", "tiny", 256)
    syn("dpo", "synth_ranking_sharegpt", "default", "bpe_plain", 256)
    syn("dpo", "synth_ranking_sharegpt", "chatml", "tiny", 32)

    names = [c.name for c in cases]
    dupes = {x for x in names if names.count(x) > 1}
    if dupes:
        raise AssertionError(f"duplicate case names: {sorted(dupes)}")
    return cases


def select(cases: list[Case], patterns: str | None) -> list[Case]:
    """Comma-separated patterns: fnmatch globs when they contain *?[, else substrings."""
    if not patterns:
        return cases
    pats = [p.strip() for p in patterns.split(",") if p.strip()]

    def hit(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) if any(ch in p for ch in "*?[") else p in name for p in pats)

    return [c for c in cases if hit(c.name)]


# ------------------------------------------------------------------------------------------------ synthetic data
def synthetic_datasets() -> tuple[dict[str, Any], dict[str, Any]]:
    """(dataset_info entries, {file name: JSON value}) of the synthetic edge-case datasets. Every row is one LF
    0.9.5 processes without crashing; broken rows are the kind LF drops (and we count)."""
    tool_weather = {"name": "get_weather", "description": "Weather for a city",
                    "parameters": {"type": "object",
                                   "properties": {"city": {"type": "string", "description": "City name"},
                                                  "unit": {"type": "string", "description": "Unit",
                                                           "enum": ["C", "F"]}},
                                   "required": ["city"]}}
    tool_add = {"name": "add", "description": "Add two numbers",
                "parameters": {"type": "object",
                               "properties": {"a": {"type": "number", "description": "first"},
                                              "b": {"type": "number", "description": "second"}},
                               "required": ["a", "b"]}}
    tools_text = json.dumps([tool_weather, tool_add], ensure_ascii=False)

    def sg(*turns: tuple[str, str]) -> list[dict[str, str]]:
        return [{"from": role, "value": text} for role, text in turns]

    sharegpt_mixed = [
        {"conversations": sg(("human", "Hi there"), ("gpt", "Hello! How can I help?")),
         "system": "You are terse.", "tools": ""},
        {"conversations": sg(("gpt", "I speak first"), ("human", "that is wrong")),  # bad role order
         "system": "", "tools": ""},
        {"conversations": sg(("system", "Tag system wins."), ("human", "Q1"), ("gpt", "A1"), ("human", "Q2"),
                             ("gpt", "A2")), "system": "Column system loses.", "tools": ""},
        {"conversations": sg(("human", "odd"), ("gpt", "count"), ("human", "dangling")),  # odd count
         "system": "", "tools": ""},
        {"conversations": sg(("human", "What's the weather in Paris?"),
                             ("function_call", json.dumps({"name": "get_weather",
                                                           "arguments": {"city": "Paris", "unit": "C"}})),
                             ("observation", json.dumps({"temp": 21, "sky": "clear"})),
                             ("gpt", "It is 21°C and clear in Paris.")),
         "system": "", "tools": tools_text},
        {"conversations": sg(("human", "unknown"), ("bot", "tag")), "system": "", "tools": ""},  # unknown tag
        {"conversations": sg(("human", "Q"), ("system", "late system"), ("human", "Q2"), ("gpt", "A")),
         "system": "", "tools": ""},  # system not first
        {"conversations": [], "system": "", "tools": ""},  # no messages: dropped by the processor
        {"conversations": sg(("human", "Empty tools list"), ("gpt", "still a system block")),
         "system": "", "tools": "[]"},
        {"conversations": sg(("human", "Unicode ✓ — ünïcødé 你好 🙂"), ("gpt", "Ça va 👍, 谢谢")),
         "tools": ""},  # system missing -> null
        {"conversations": sg(("human", "Add 2 and 3, then 4 and 5"),
                             ("function_call", json.dumps([{"name": "add", "arguments": {"a": 2, "b": 3}},
                                                           {"name": "add", "arguments": {"a": 4, "b": 5}}])),
                             ("observation", "5\n9"), ("gpt", "5 and 9."), ("human", "Thanks"), ("gpt", "Welcome")),
         "system": "Use tools.", "tools": tools_text},
        {"conversations": sg(("human", "{{content}} and {{idx}} are literal here"), ("gpt", "ok {{content}}")),
         "system": "", "tools": ""},
        {"conversations": sg(("human", "long " * 60), ("gpt", "answer " * 80), ("human", "more " * 30),
                             ("gpt", "fin " * 40)), "system": "", "tools": ""},
    ]
    base_alpaca = [{"instruction": f"Task {i}: say {w}", "input": "" if i % 3 else f"context {i}",
                    "output": f"{w} " * (1 + i % 4)}
                   for i, w in enumerate(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta",
                                          "iota", "kappa", "lambda", "mu"])]
    history = [
        {"instruction": "Final question?", "input": "with input", "output": "Final answer.",
         "history": [["first q", "first a"], ["second q", "second a"]], "system": "SYS"},
        {"instruction": "No history", "input": "", "output": "Plain.", "history": [], "system": ""},
        {"instruction": "Null history", "input": "x", "output": "Null ok.", "history": None, "system": None},
        {"instruction": "", "input": "", "output": "Both empty: row kept.", "history": None, "system": ""},
        {"instruction": "Summarize", "input": "word " * 40, "output": "summary " * 30,
         "history": [["h" * 30, "r" * 30], ["tell me " * 10, "told " * 20]], "system": "Be concise.\n\n"},
        {"instruction": "No output column value", "input": "", "output": None, "history": None, "system": ""},
        {"instruction": "Last", "input": "", "output": "End.", "history": [["only q", "only a"]],
         "system": "S2"},
    ]

    def msg(role: str, content: str | None, **kw) -> dict[str, Any]:
        return {"role": role, "content": content, **kw}

    def call(cid: str, name: str, args: dict) -> dict[str, Any]:
        return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}

    wrapped = [{"type": "function", "function": tool_weather}, {"type": "function", "function": tool_add}]
    openai_rows = [
        {"messages": [msg("user", "Hi"), msg("assistant", "Hello.")], "tools": None},  # no system, no tools
        {"messages": [msg("system", "You are kind."), msg("user", "Q"), msg("assistant", "A")], "tools": None},
        {"messages": [msg("system", "detailed thinking on"), msg("user", "Think"), msg("assistant", "Done")],
         "tools": None},
        {"messages": [msg("system", "Use tools."), msg("user", "Weather in Rome and Oslo?"),
                      msg("assistant", None, tool_calls=[call("c1", "get_weather", {"city": "Rome"}),
                                                         call("c2", "get_weather", {"city": "Oslo"})]),
                      msg("tool", "Rome: 25C"), msg("tool", "Oslo: 3C"),
                      msg("assistant", "Rome is warm, Oslo is cold.")], "tools": wrapped},
        {"messages": [msg("user", "2+3?"), msg("assistant", "", tool_calls=[call("c3", "add", {"a": 2, "b": 3})]),
                      msg("tool", "5")], "tools": wrapped[1:]},  # trailing tool message is dropped
        {"messages": [msg("user", "a"), msg("user", "b")], "tools": None},  # broken: dropped
        {"messages": [msg("user", "Ask"), msg("assistant", "Sure"), msg("user", "Again"), msg("assistant", "Ok")],
         "tools": []},
    ]
    def search_tool(name: str, what: str) -> dict[str, Any]:
        return {"type": "function", "function": {
            "name": name, "description": f"Search {what}",
            "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "Query"}},
                           "required": ["query"]}}}

    def qcall(cid: str, name: str, query: str) -> dict[str, Any]:
        return call(cid, name, {"query": query})

    openai_uniform = [
        {"messages": [msg("system", "Answer with tools."), msg("user", "Find cats and dogs"),
                      msg("assistant", None, tool_calls=[qcall("u1", "web", "cats"), qcall("u2", "web", "dogs")]),
                      msg("tool", "cats: many"), msg("tool", "dogs: more"), msg("assistant", "Both are popular."),
                      msg("user", "And birds?"), msg("assistant", None, tool_calls=[qcall("u3", "wiki", "birds")]),
                      msg("tool", "birds: fly"), msg("assistant", "Birds fly.")],
         "tools": [search_tool("web", "the web"), search_tool("wiki", "Wikipedia")]},
        {"messages": [msg("user", "No tools here"), msg("assistant", "Fine.")], "tools": None},
        {"messages": [msg("system", "Short."), msg("user", "Lookup x"),
                      msg("assistant", "", tool_calls=[qcall("u4", "wiki", "x")]), msg("tool", "x is a letter"),
                      msg("assistant", "x is a letter.")], "tools": [search_tool("wiki", "Wikipedia")]},
        {"messages": [msg("user", "Empty tool list"), msg("assistant", "ok")], "tools": []},
    ]
    kto_rows = [
        {"messages": [msg("user", "Good q"), msg("assistant", "Good a")], "label": True},
        {"messages": [msg("user", "Bad q"), msg("assistant", "Bad a")], "label": False},
        {"messages": [msg("user", "Untagged"), msg("assistant", "no bool tag")], "label": None},  # dropped
        {"messages": [msg("user", "After untagged"), msg("assistant", "pairs with previous")], "label": True},
        {"messages": [msg("user", "h1"), msg("assistant", "r1"), msg("user", "multi"), msg("assistant", "turn")],
         "label": False},
        {"messages": [msg("user", "Long " * 50), msg("assistant", "reply " * 50)], "label": True},
        {"messages": [msg("user", "q7"), msg("assistant", "a7")], "label": False},
        {"messages": [msg("user", "q8"), msg("assistant", "a8")], "label": True},
    ]
    kto_alpaca = [{"instruction": f"Rate {i}", "input": "", "output": f"answer {i} " * (i + 1),
                   "tag": (None if i == 2 else bool(i % 2))} for i in range(9)]
    ranking_alpaca = [
        {"instruction": "Pick", "input": "one", "chosen": "good", "rejected": "bad", "system": ""},
        {"instruction": "Longer", "input": "", "chosen": "fine " * 30, "rejected": "worse " * 5, "system": "S"},
        {"instruction": "Non-str chosen", "input": "", "chosen": None, "rejected": "r", "system": ""},  # dropped
        {"instruction": "Prompt " * 40, "input": "ctx " * 20, "chosen": "c " * 10, "rejected": "r " * 25,
         "system": ""},
        {"instruction": "你好", "input": "", "chosen": "您好！", "rejected": "嗯", "system": "礼貌"},
    ]
    ranking_sharegpt = [
        {"conversations": sg(("human", "Pick one")), "chosen": {"from": "gpt", "value": "Good"},
         "rejected": {"from": "gpt", "value": "Bad"}},
        {"conversations": sg(("human", "h"), ("gpt", "r"), ("human", "Follow-up " * 20)),
         "chosen": {"from": "gpt", "value": "Chosen " * 15}, "rejected": {"from": "gpt", "value": "Rej " * 40}},
        {"conversations": sg(("human", "Even"), ("gpt", "count")),  # even count: broken for ranking
         "chosen": {"from": "gpt", "value": "x"}, "rejected": {"from": "gpt", "value": "y"}},
        {"conversations": sg(("system", "Sys in tag"), ("human", "Q")),
         "chosen": {"from": "gpt", "value": "A+"}, "rejected": {"from": "gpt", "value": "A-"}},
    ]
    # JSON Lines whose columns look like a Hermes agent trace to datasets>=5 (id/source/model/system_prompt/messages).
    hermes_like = [
        {"id": f"h{i}", "source": "synthetic", "model": "none", "system_prompt": sys_prompt,
         "messages": [msg("user", q), msg("assistant", a)]}
        for i, (sys_prompt, q, a) in enumerate([("Be nice.", "Hi", "Hello!"), ("", "2+2?", "4"),
                                                 ("Answer in French.", "Thanks", "De rien.")])]
    alpaca_cols = {"prompt": "instruction", "query": "input", "response": "output"}
    info = {
        "synth_sharegpt_mixed": {"file_name": "sharegpt_mixed.json", "formatting": "sharegpt",
                                 "columns": {"messages": "conversations", "system": "system", "tools": "tools"}},
        "synth_oversample": {"file_name": "alpaca12.json", "num_samples": 20},
        "synth_subsample": {"file_name": "alpaca12.json", "num_samples": 5},
        "synth_alpaca_history": {"file_name": "alpaca_history.json",
                                 "columns": {**alpaca_cols, "history": "history", "system": "system"}},
        "synth_openai": {"file_name": "openai.json", "formatting": "openai",
                         "columns": {"messages": "messages", "tools": "tools"},
                         "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                  "assistant_tag": "assistant", "observation_tag": "tool",
                                  "function_tag": "function_call", "system_tag": "system"}},
        "synth_openai_uniform": {"file_name": "openai_uniform.json", "formatting": "openai",
                                 "columns": {"messages": "messages", "tools": "tools"},
                                 "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                          "assistant_tag": "assistant", "observation_tag": "tool",
                                          "function_tag": "function_call", "system_tag": "system"}},
        "synth_hermes_like": {"file_name": "hermes_like.jsonl", "formatting": "sharegpt",
                              "columns": {"messages": "messages", "system": "system_prompt"},
                              "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                       "assistant_tag": "assistant"}},
        "synth_kto": {"file_name": "kto.json", "formatting": "sharegpt",
                      "columns": {"messages": "messages", "kto_tag": "label"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant"}},
        "synth_kto_alpaca": {"file_name": "kto_alpaca.json", "columns": {**alpaca_cols, "kto_tag": "tag"}},
        "synth_ranking_alpaca": {"file_name": "ranking_alpaca.json", "ranking": True,
                                 "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen",
                                             "rejected": "rejected", "system": "system"}},
        "synth_ranking_sharegpt": {"file_name": "ranking_sharegpt.json", "ranking": True, "formatting": "sharegpt",
                                   "columns": {"messages": "conversations", "chosen": "chosen",
                                               "rejected": "rejected"}},
    }
    files = {"sharegpt_mixed.json": sharegpt_mixed, "alpaca12.json": base_alpaca, "alpaca_history.json": history,
             "openai.json": openai_rows, "openai_uniform.json": openai_uniform, "hermes_like.jsonl": hermes_like,
             "kto.json": kto_rows, "kto_alpaca.json": kto_alpaca,
             "ranking_alpaca.json": ranking_alpaca, "ranking_sharegpt.json": ranking_sharegpt}
    return info, files


def write_synthetic(directory: Path) -> Path:
    """Write the synthetic datasets + dataset_info.json into `directory` (created); return it."""
    info, files = synthetic_datasets()
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        if name.endswith(".jsonl"):
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in value)
        else:
            text = json.dumps(value, ensure_ascii=False, indent=1)
        (directory / name).write_text(text, encoding="utf-8")
    (directory / "dataset_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return directory


def synthetic_digest() -> str:
    info, files = synthetic_datasets()
    return hashlib.sha256(json.dumps([info, files], sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ inputs
# The `tiny` axis builds the embedded model's recipe on a frozen copy of the corpus the golden records were written
# with, so that new demo data (a new shipped tokenizer) does not silently retire 81 parity cases.
PARITY_TINY_CORPUS = Path(__file__).resolve().parent / "parity_assets" / "tiny_corpus.jsonl"


def tiny_model_dir(cache_dir: Path = CACHE) -> Path:
    """The embedded `tiny` model's recipe on the frozen parity corpus (built deterministically on first use)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tunepipe.models.tiny import resolve_model_path

    return Path(resolve_model_path("tiny", cache_dir=cache_dir, corpus_files=[PARITY_TINY_CORPUS]))


def tiny_tokenizer_dir(cache_dir: Path = CACHE) -> Path:
    """The tiny model's tokenizer files alone (no config.json). With the model's config.json beside them,
    transformers 5.23's AutoTokenizer picks Qwen2Tokenizer by model_type and swaps in Qwen2's pre-tokenizer regex,
    while LF's transformers 5.6 honours tokenizer.json: the `tiny` axis compares the data pipelines on the same
    tokenizer; `tiny_model` (the model dir) shows that difference."""
    model = tiny_model_dir(cache_dir)
    target = Path(cache_dir) / f"{model.name}-tokenizer"
    if not (target / "tokenizer.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache_dir))
        for name in TOKENIZER_FILES:
            if (model / name).is_file():
                shutil.copyfile(model / name, tmp / name)
        tmp.chmod(0o755)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def tokenizer_paths(cache_dir: Path = CACHE, needed: set[str] | None = None) -> dict[str, Path]:
    paths = {"bpe_plain": BENCH_TOKENIZERS / "bpe_plain", "bpe_bos": BENCH_TOKENIZERS / "bpe_bos"}
    if needed is None or "tiny" in needed:
        paths["tiny"] = tiny_tokenizer_dir(cache_dir)
    if needed is None or "tiny_model" in needed:
        paths["tiny_model"] = tiny_model_dir(cache_dir)
    return paths


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json")


def tokenizer_fingerprint(path: Path) -> str:
    """sha256 over the tokenizer files (what decides token ids), 16 hex chars."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        file = Path(path) / name
        if file.is_file():
            h.update(name.encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
    return h.hexdigest()[:16]


def dir_digest(path: Path) -> str:
    h = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
    return h.hexdigest()[:16]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONHASHSEED": "0"})
    env.update(extra or {})
    return env


# ------------------------------------------------------------------------------------------------ running
def canonical(row: dict[str, Any]) -> str:
    return json.dumps(row, separators=(",", ":"), ensure_ascii=False)


def row_sha(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def read_rows(path: Path) -> list[str]:
    """Canonical JSON lines (key order preserved) of a .jsonl file."""
    with open(path, encoding="utf-8") as fh:
        return [canonical(json.loads(line)) for line in fh if line.strip()]


def export_ours_inprocess(case: Case, dataset_dir: Path, tokenizer_path: Path) -> list[str]:
    """Our pipeline in this process, serialized exactly as `tunepipe data export` does (canonical JSON lines)."""
    from tunepipe.data.features import DataArgs, prepare
    from tunepipe.models.loading import load_tokenizer

    opts = dict(case.opts)
    args = DataArgs(dataset_dir=str(dataset_dir), template=case.template, cutoff_len=case.cutoff_len,
                    packing=opts.pop("packing", None), **opts)
    rows: list[str] = []

    def write(columns: dict[str, list]) -> None:  # the export command streams batch by batch, so do we
        keys = list(columns)
        rows.extend(canonical(dict(zip(keys, row))) for row in zip(*columns.values()))

    prepare(case.stage, case.dataset, args, load_tokenizer(str(tokenizer_path)), on_train_batch=write)
    return rows


@dataclass
class Side:
    rows: list[str] | None = None
    error: str | None = None
    seconds: float = 0.0
    cached: bool = False


def _tail(text: str, lines: int = 6) -> str:
    keep = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(keep[-lines:])


def run_lf(case: Case, dataset_dir: Path, tokenizer_path: Path, lf_python: Path, work: Path,
           cache: Path | None) -> Side:
    argv = case.cli(dataset_dir, tokenizer_path)
    key = None
    if cache is not None:
        payload = {"argv": case.cli(Path("DATA"), Path("TOK")), "oracle": hashlib.sha256(ORACLE.read_bytes())
                   .hexdigest(), "data": dir_digest(dataset_dir), "tok": tokenizer_fingerprint(tokenizer_path),
                   "lf": str(lf_python)}
        if any(t in case.template for t in DATED_TOOL_TEMPLATES):
            payload["date"] = time.strftime("%Y-%m-%d")
        key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
        hit = cache / f"{key}.jsonl"
        if hit.is_file():
            return Side(rows=read_rows(hit), cached=True)
        err = cache / f"{key}.err"
        if err.is_file():
            return Side(error=err.read_text(encoding="utf-8"), cached=True)
    out = work / "lf.jsonl"
    start = time.perf_counter()
    proc = subprocess.run([str(lf_python), str(ORACLE), *argv, "--out", str(out)], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=900)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        error = f"LF oracle exit {proc.returncode}: {_tail(proc.stderr)}"
        if cache is not None and key is not None:
            cache.mkdir(parents=True, exist_ok=True)
            (cache / f"{key}.err").write_text(error, encoding="utf-8")
        return Side(error=error, seconds=seconds)
    rows = read_rows(out)
    if cache is not None and key is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{key}.tmp"
        tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, cache / f"{key}.jsonl")
    return Side(rows=rows, seconds=seconds)


def run_ours(case: Case, dataset_dir: Path, tokenizer_path: Path, work: Path, mode: str) -> Side:
    """One case on our side in its own process: `tunepipe data export` (cli) or prepare() (api)."""
    out = work / "ours.jsonl"
    if mode == "cli":
        exe = OURS_PYTHON.parent / "tunepipe"
        cmd = [str(exe), "data", "export", *case.cli(dataset_dir, tokenizer_path), "--out", str(out)]
    else:
        spec = [{"args": case.args(), "dataset_dir": str(dataset_dir), "tokenizer": str(tokenizer_path),
                 "out": str(out)}]
        (work / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        cmd = [str(OURS_PYTHON), str(Path(__file__).resolve()), "--_export-ours", str(work / "spec.json")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env=_env({"HF_DATASETS_CACHE": str(work / "hf_ours")}))
    seconds = time.perf_counter() - start
    err = Path(str(out) + ".err")
    if err.is_file():
        return Side(error=err.read_text(encoding="utf-8"), seconds=seconds)
    if proc.returncode != 0 or not out.is_file():
        return Side(error=f"tunepipe exit {proc.returncode}: {_tail(proc.stderr)}", seconds=seconds)
    return Side(rows=read_rows(out), seconds=seconds)


def run_ours_batch(specs: list[dict[str, Any]], work: Path, on_done=None) -> None:
    """Several cases in ONE process (prepare() + the CLI's serialization, as the golden test does): saves the
    ~3 s of imports per case. Writes each spec's `out` (or `out`.err)."""
    spec_file = work / f"batch-{hashlib.sha256(json.dumps(specs).encode()).hexdigest()[:8]}.json"
    spec_file.write_text(json.dumps(specs), encoding="utf-8")
    with open(Path(str(spec_file) + ".log"), "w", encoding="utf-8") as log:
        proc = subprocess.Popen([str(OURS_PYTHON), str(Path(__file__).resolve()), "--_export-ours", str(spec_file)],
                                stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT,
                                env=_env({"HF_DATASETS_CACHE": str(work / "hf_ours")}))
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("DONE ") and on_done:
                _, index, seconds = line.split()
                on_done(int(index), float(seconds))
        proc.wait()
    if proc.returncode != 0:  # a crash of the worker itself: mark what is missing
        tail = _tail(Path(str(spec_file) + ".log").read_text(encoding="utf-8"))
        for spec in specs:
            if not Path(spec["out"]).is_file() and not Path(spec["out"] + ".err").is_file():
                Path(spec["out"] + ".err").write_text(f"batch worker exit {proc.returncode}: {tail}", "utf-8")


def _side_from_files(out: Path, seconds: float = 0.0) -> Side:
    err = Path(str(out) + ".err")
    if err.is_file():
        return Side(error=err.read_text(encoding="utf-8"), seconds=seconds)
    if not out.is_file():
        return Side(error="no output", seconds=seconds)
    return Side(rows=read_rows(out), seconds=seconds)


# ------------------------------------------------------------------------------------------------ comparing
class Decoder:
    """Turns ids into readable text with the case's tokenizer (after our template fix, so added tokens decode)."""

    def __init__(self, case: Case, tokenizer_path: Path):
        self.tok = None
        try:
            from tunepipe.models.loading import load_tokenizer

            self.tok = load_tokenizer(str(tokenizer_path))
            try:
                from tunepipe.data.templates import get_template

                get_template(case.template).fix_tokenizer(self.tok)
            except Exception:  # noqa: BLE001 - decoding is best effort
                pass
        except Exception:  # noqa: BLE001
            self.tok = None

    def piece(self, token_id: Any) -> str:
        if token_id == IGNORE:
            return "·"
        if not isinstance(token_id, int) or isinstance(token_id, bool) or self.tok is None:
            return repr(token_id)
        try:
            return self.tok.decode([token_id])
        except Exception:  # noqa: BLE001
            return f"<{token_id}?>"

    def text(self, ids: list[Any]) -> str:
        if self.tok is None:
            return repr(ids)
        out, run = [], []
        for tid in ids:  # decode runs of real ids together (multi-byte characters), show -100 as ·
            if isinstance(tid, int) and not isinstance(tid, bool) and tid != IGNORE:
                run.append(tid)
                continue
            if run:
                out.append(self._decode(run))
                run = []
            out.append(self.piece(tid))
        if run:
            out.append(self._decode(run))
        return repr("".join(out))

    def _decode(self, ids: list[int]) -> str:
        try:
            return self.tok.decode(ids)
        except Exception:  # noqa: BLE001
            return "".join(self.piece(i) for i in ids)


def _first_path_diff(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """First differing location between two JSON values (type-strict: True is not 1)."""
    if type(a) is not type(b):
        return path, a, b
    if isinstance(a, dict):
        if list(a) != list(b):
            return path + "{keys}", list(a), list(b)
        for k in a:
            d = _first_path_diff(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_path_diff(x, y, f"{path}[{i}]")
            if d:
                return d
        if len(a) != len(b):
            return f"{path}[len]", len(a), len(b)
        return None
    return None if a == b else (path, a, b)


def describe_row_diff(ours: str, lf: str, decoder: Decoder | None) -> str:
    o, l_ = json.loads(ours), json.loads(lf)
    if list(o) != list(l_):
        return f"keys: ours {list(o)} vs LF {list(l_)}"
    for col in l_:
        if canonical(o[col]) == canonical(l_[col]):
            continue
        a, b = o[col], l_[col]
        if isinstance(a, list) and isinstance(b, list) and all(isinstance(x, int) for x in a + b):
            pos = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y or type(x) is not type(y)),
                       min(len(a), len(b)))
            lo, hi = max(0, pos - 8), pos + 12
            msg = f"col {col} pos {pos} (len ours {len(a)} / LF {len(b)}): ids ours {a[lo:hi]} vs LF {b[lo:hi]}"
            if decoder is not None and decoder.tok is not None and not col.startswith(("attention", "position",
                                                                                      "kl_attention")):
                msg += (f"\n      ours[{lo}:{hi}] {decoder.text(a[lo:hi])}"
                        f"\n      LF  [{lo}:{hi}] {decoder.text(b[lo:hi])}")
            return msg
        d = _first_path_diff(a, b)
        where = d[0] if d else ""
        show_a, show_b = (d[1], d[2]) if d else (a, b)
        return f"col {col}{where}: ours {str(show_a)[:200]} vs LF {str(show_b)[:200]}"
    return "rows differ only in serialization"


@dataclass
class Result:
    case: Case
    ours: Side
    lf: Side
    identical: int = 0
    first_diff: str = ""

    @property
    def ok(self) -> bool:
        return (self.ours.error is None and self.lf.error is None and self.ours.rows is not None
                and self.lf.rows is not None and len(self.ours.rows) == len(self.lf.rows)
                and self.identical == len(self.lf.rows))

    @property
    def status(self) -> str:
        if self.lf.error:
            return "LF-ERROR"
        if self.ours.error:
            return "OURS-ERROR"
        return "ok" if self.ok else "DIFF"


def compare(case: Case, ours: Side, lf: Side, tokenizer_path: Path | None) -> Result:
    res = Result(case, ours, lf)
    if ours.error or lf.error or ours.rows is None or lf.rows is None:
        res.first_diff = (lf.error or ours.error or "no output").splitlines()[-1][:300]
        return res
    res.identical = sum(1 for a, b in zip(ours.rows, lf.rows) if a == b)
    first = next((i for i, (a, b) in enumerate(zip(ours.rows, lf.rows)) if a != b), None)
    notes = []
    if len(ours.rows) != len(lf.rows):
        notes.append(f"row count ours {len(ours.rows)} vs LF {len(lf.rows)}")
    if first is not None:
        decoder = Decoder(case, tokenizer_path) if tokenizer_path is not None else None
        notes.append(f"example {first}: {describe_row_diff(ours.rows[first], lf.rows[first], decoder)}")
    elif len(ours.rows) != len(lf.rows):
        notes.append(f"first {min(len(ours.rows), len(lf.rows))} rows identical")
    res.first_diff = "; ".join(notes)
    return res


def run_cases(cases: list[Case], *, lf_python: Path, jobs: int = 1, cache: Path | None = CACHE / "lf",
              ours_mode: str = "batch", synth_dir: Path | None = None, progress=None) -> list[Result]:
    """Run and compare `cases`; results in the order given. `progress(kind, case, detail)` is told about each
    finished LF run (kind "lf") and each finished case (kind "case", detail = its Result)."""
    tmp = tempfile.TemporaryDirectory(prefix="parity_")
    work_root = Path(tmp.name)
    try:
        if synth_dir is None:
            synth_dir = write_synthetic(work_root / "synth")
        tokenizers = tokenizer_paths(needed={c.tokenizer for c in cases})
        dirs = {"demo": DEMO_DIR, "synth": synth_dir}
        works = []
        for i, case in enumerate(cases):
            (work_root / f"case{i:04d}").mkdir()
            works.append(work_root / f"case{i:04d}")
        pool_size = max(1, jobs)

        def lf_one(i: int) -> Side:
            case = cases[i]
            side = run_lf(case, dirs[case.data], tokenizers[case.tokenizer], lf_python, works[i], cache)
            if progress:
                progress("lf", case, side)
            return side

        with ThreadPoolExecutor(max_workers=pool_size) as pool:
            lf_sides = list(pool.map(lf_one, range(len(cases))))

        results: list[Result | None] = [None] * len(cases)

        def finish(i: int, ours: Side) -> None:
            case = cases[i]
            results[i] = compare(case, ours, lf_sides[i], tokenizers[case.tokenizer])
            if progress:
                progress("case", case, results[i])

        if ours_mode == "batch":
            specs = [{"args": c.args(), "dataset_dir": str(dirs[c.data]), "tokenizer": str(tokenizers[c.tokenizer]),
                      "out": str(works[i] / "ours.jsonl"), "index": i} for i, c in enumerate(cases)]
            chunks = [specs[k::pool_size] for k in range(pool_size) if specs[k::pool_size]]

            def on_done(i: int, seconds: float) -> None:
                finish(i, _side_from_files(works[i] / "ours.jsonl", seconds))

            with ThreadPoolExecutor(max_workers=pool_size) as pool:
                list(pool.map(lambda chunk: run_ours_batch(chunk, work_root, on_done), chunks))
            for i in range(len(cases)):  # anything the worker never reported (it crashed)
                if results[i] is None:
                    finish(i, _side_from_files(works[i] / "ours.jsonl"))
        else:
            def ours_one(i: int) -> None:
                case = cases[i]
                finish(i, run_ours(case, dirs[case.data], tokenizers[case.tokenizer], works[i], ours_mode))

            with ThreadPoolExecutor(max_workers=pool_size) as pool:
                list(pool.map(ours_one, range(len(cases))))
        return [r for r in results if r is not None]
    finally:
        tmp.cleanup()


# ------------------------------------------------------------------------------------------------ golden
GOLDEN_FILE = "parity_golden.json.gz"


def load_golden(directory: Path) -> dict[str, dict[str, Any]]:
    """name -> record of the golden file in `directory` ({} if there is none)."""
    import gzip

    path = Path(directory) / GOLDEN_FILE
    if not path.is_file():
        return {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        data = json.load(fh)
    return {r["name"]: r for r in data["records"]}


def golden_record(res: Result, tokenizers: dict[str, Path]) -> dict[str, Any]:
    case, rows = res.case, res.lf.rows or []
    record = {
        "version": GOLDEN_VERSION,
        "name": case.name,
        "args": case.args(),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizers[case.tokenizer]),
        "rows": len(rows),
        "columns": list(json.loads(rows[0])) if rows else [],
        "sha256": [row_sha(r) for r in rows],
        "head": [json.loads(r) for r in rows[:2]],
        "ours_identical_when_written": res.ok,
        "fast": not case.slow,
    }
    if case.data == "synth":
        record["synth_digest"] = synthetic_digest()
    if not res.ok:
        record["known_diff"] = res.first_diff[:2000]
    return record


def write_golden(results: list[Result], directory: Path, tokenizers: dict[str, Path], prune: bool) -> int:
    """Merge the records of `results` into DIR/parity_golden.json.gz (one gzipped JSON, byte-reproducible);
    `prune` (the whole matrix ran) drops records of cases that are no longer in it."""
    import gzip

    directory.mkdir(parents=True, exist_ok=True)
    records = {} if prune else load_golden(directory)
    written = 0
    for res in results:
        if not res.case.golden or res.lf.error or res.lf.rows is None:
            continue
        records[res.case.name] = golden_record(res, tokenizers)
        written += 1
    body = ",\n".join(json.dumps(records[name], ensure_ascii=False, separators=(",", ":"))
                      for name in sorted(records))
    text = f'{{"version":{GOLDEN_VERSION},"records":[\n{body}\n]}}\n'
    tmp = directory / f".{GOLDEN_FILE}.tmp"
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    os.replace(tmp, directory / GOLDEN_FILE)
    return written


# ------------------------------------------------------------------------------------------------ CLI
def _fmt_row(res: Result, width: int) -> str:
    lf_n = len(res.lf.rows) if res.lf.rows is not None else "-"
    ours_n = len(res.ours.rows) if res.ours.rows is not None else "-"
    rows = f"{ours_n}/{lf_n}"
    ident = f"{res.identical}" if res.lf.rows is not None and res.ours.rows is not None else "-"
    line = f"{res.case.name:<{width}}  {rows:>9}  {ident:>5}  {res.status:<10}"
    if not res.ok and res.first_diff:
        line += "  " + res.first_diff
    return line


def _export_ours_main(spec_file: str) -> int:
    """Worker: run each spec in this process; `DONE i` on stdout after each (errors go to `out`.err)."""
    import logging
    import traceback

    logging.basicConfig(level=logging.WARNING)
    specs = json.loads(Path(spec_file).read_text(encoding="utf-8"))
    for spec in specs:
        out = Path(spec["out"])
        start = time.perf_counter()
        try:
            rows = export_ours_inprocess(Case.from_args(spec["args"]), Path(spec["dataset_dir"]),
                                         Path(spec["tokenizer"]))
            tmp = out.with_suffix(".tmp")
            tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
            os.replace(tmp, out)
        except Exception as err:  # noqa: BLE001 - reported per case
            detail = traceback.format_exc(limit=-3)
            Path(str(out) + ".err").write_text(f"tunepipe {type(err).__name__}: {err}\n{detail}", "utf-8")
        print(f"DONE {spec.get('index', 0)} {time.perf_counter() - start:.3f}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_export-ours"]:  # internal: the worker of `--ours batch|api`
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return _export_ours_main(argv[1])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lf-venv", type=Path, default=DEFAULT_LF_VENV, help="side venv with llamafactory==0.9.5")
    ap.add_argument("--cases", default=None, help="comma-separated fnmatch globs or substrings of case names")
    ap.add_argument("--write-golden", type=Path, default=None, metavar="DIR",
                    help="write golden records (LF's output) for the selected reproducible cases")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="cases run in parallel (each runs 1 process)")
    ap.add_argument("--ours", choices=["batch", "api", "cli"], default="batch",
                    help="batch (default): prepare() + the CLI's row serialization, many cases per process (what "
                         "the golden test runs); api: the same, one process per case; cli: `tunepipe data export` "
                         "per case (slowest: ~3 s of imports each)")
    ap.add_argument("--no-lf-cache", action="store_true", help="always rerun the LF oracle")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    ap.add_argument("--sample", action="store_true", help="only the live-LF sample cases")
    args = ap.parse_args(argv)

    lf_python = args.lf_venv / "bin" / "python"
    if not lf_python.is_file():
        print(f"error: no LF venv at {args.lf_venv} (build it with bench/lf_venv.sh)", file=sys.stderr)
        return 2
    if not DEMO_DIR.is_dir():
        print(f"error: LF demo data not found at {DEMO_DIR}", file=sys.stderr)
        return 2
    templates, token_slot_templates = common_templates(lf_python)
    all_cases = build_matrix(templates, skip=token_slot_templates)
    cases = select(all_cases, args.cases)
    if args.sample:
        cases = [c for c in cases if c.sample]
    if args.list:
        print("\n".join(c.name for c in cases))
        print(f"{len(cases)} cases ({len(templates)} common templates)", file=sys.stderr)
        return 0
    if not cases:
        print("error: no case matches", file=sys.stderr)
        return 2

    width = min(90, max(len(c.name) for c in cases))
    print(f"{len(cases)} cases, {len(templates)} common templates ({len(token_slot_templates)} left out: LF needs "
          f"special tokens or a processor our test tokenizers lack: {', '.join(token_slot_templates)}), "
          f"ours via {args.ours}, jobs {args.jobs}", file=sys.stderr)
    done = [0]
    start = time.perf_counter()

    def progress(kind: str, case: Case, detail: Any) -> None:
        if kind == "lf":
            if not detail.cached or detail.error:
                print(f"[LF {time.perf_counter() - start:5.0f}s] {'error' if detail.error else 'ran'} "
                      f"{detail.seconds:4.1f}s {case.name}", file=sys.stderr, flush=True)
            return
        done[0] += 1
        print(f"[{done[0]}/{len(cases)} {time.perf_counter() - start:5.0f}s] {detail.status:<10} {case.name}",
              file=sys.stderr, flush=True)

    results = run_cases(cases, lf_python=lf_python, jobs=args.jobs, cache=None if args.no_lf_cache else CACHE / "lf",
                        ours_mode=args.ours, progress=progress)
    print(f"{'case':<{width}}  {'rows o/LF':>9}  {'ident':>5}  status      first diff")
    for res in results:
        print(_fmt_row(res, width))
    bad = [r for r in results if not r.ok]
    counts = {s: sum(1 for r in results if r.status == s) for s in ("ok", "DIFF", "OURS-ERROR", "LF-ERROR")}
    print(f"\n{len(results)} cases: {counts['ok']} identical, {counts['DIFF']} differ, {counts['OURS-ERROR']} "
          f"tunepipe errors, {counts['LF-ERROR']} LF errors  ({time.perf_counter() - start:.0f}s)")
    if args.write_golden:
        n = write_golden(results, args.write_golden, tokenizer_paths(needed={c.tokenizer for c in cases}),
                         prune=args.cases is None and not args.sample)
        size = (args.write_golden / GOLDEN_FILE).stat().st_size
        print(f"wrote {n} golden records to {args.write_golden / GOLDEN_FILE} ({size / 1e6:.2f} MB)")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
