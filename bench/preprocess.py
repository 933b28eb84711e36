"""Preprocessing speed: tunepipe vs llamafactory==0.9.5 on ~50k SFT rows, same machine, same output; and a CPT
corpus of ~1 GB of text: throughput and peak memory at two corpus sizes.

    bash bench/lf_venv.sh                 # once: LLaMA-Factory 0.9.5 in a side virtualenv (/work/lf-venv)
    .venv/bin/python bench/preprocess.py [--rows 50000] [--lf-venv /work/lf-venv] [--skip-lf]
    .venv/bin/python bench/preprocess.py --cpt [--cpt-gb 0.25,1.0] [--workers 2] [--workdir /tmp/cpt-bench]
    .venv/bin/python bench/preprocess.py --encode [--rows 20000] [--repeat 3]

Encode case (`--encode`): the sft processor on the same rows in this process, once with the tokenizer backend's
public `encode_batch_fast` (BatchTokenizer's fast path) and once with the public `tokenizer(pieces)` call only;
prints the best of --repeat wall times of each, the ratio, and whether the features are identical.

CPT case (`--cpt`): a text corpus (one document per line: alpaca answers and the demo CPT texts, each made distinct
with a row number) generated under the work dir at each size (never committed), the same 32k tokenizer, cutoff_len
1024, LF's pt packing. tunepipe runs the prepare stage's own code (tunepipe.data.features.prepare_to_disk) with
`streaming: true` and `preprocessing_num_workers: --workers`, writing the Arrow dataset; LLaMA-Factory runs its
get_dataset (non-streaming: LF's streaming tokenizes during training instead, so there is nothing to time) with
the same number of workers. Printed per size and side: wall seconds, corpus MB/s, peak memory (anonymous RSS of
the process and its workers together, sampled every 0.1 s; memory-mapped Arrow pages are page cache, not counted;
pages a worker shares with the fork server count once per process, overstating both sides a little). With
`--check` the outputs are compared token for token (a sha256 over every
block) against LF run with one worker: with several, LF cuts the rows into shards and batches within each (its
datasets.map(num_proc)), a different block boundary; tunepipe's streaming keeps the batches of one stream.

Data: 80% alpaca rows (LLaMA-Factory's alpaca_en_demo) and 20% tool-call conversations (glaive_toolcall_en_demo),
each user and assistant message made distinct with a row number so no cache can skip work; qwen template;
cutoff_len 1024; a 32k byte-level BPE
tokenizer with Qwen's chat special tokens (no hub access here, so it is trained on the demo text). Both sides run as
fresh processes from the same command line (`tunepipe data export` and bench/lf_oracle.py with the same options),
end to end: imports, loading, conversion, tokenization, writing JSON Lines. The script prints both wall times, the
ratio, and whether the two outputs are identical row by row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LF_DEMO = ROOT.parent / "shared" / "data" / "llamafactory-demo"


def make_data(folder: Path, rows: int) -> None:
    alpaca = json.loads((LF_DEMO / "alpaca_en_demo.json").read_text())
    tools = json.loads((LF_DEMO / "glaive_toolcall_en_demo.json").read_text())
    n_tools = rows // 5
    out_alpaca = []
    for i in range(rows - n_tools):
        row = dict(alpaca[i % len(alpaca)])
        row["instruction"] = f"{row['instruction']} (#{i})"
        row["output"] = f"{row['output']} (#{i})"
        out_alpaca.append(row)
    out_tools = []
    for i in range(n_tools):
        row = json.loads(json.dumps(tools[i % len(tools)]))
        for message in row["conversations"]:  # function calls and tool results stay valid JSON
            if message["from"] in ("human", "gpt"):
                message["value"] = f"{message['value']} (#{i})"
        definitions = json.loads(row["tools"])
        for tool in definitions:  # distinct tool prompts too: no row may repeat another's text
            tool["description"] = f"{tool.get('description', '')} (#{i})"
        row["tools"] = json.dumps(definitions, ensure_ascii=False)
        out_tools.append(row)
    (folder / "bench_alpaca.json").write_text(json.dumps(out_alpaca, ensure_ascii=False))
    (folder / "bench_tools.json").write_text(json.dumps(out_tools, ensure_ascii=False))
    info = {
        "bench_alpaca": {"file_name": "bench_alpaca.json"},
        "bench_tools": {"file_name": "bench_tools.json", "formatting": "sharegpt",
                        "columns": {"messages": "conversations", "tools": "tools"}},
    }
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))


def make_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for name in ("alpaca_en_demo.json", "glaive_toolcall_en_demo.json", "alpaca_zh_demo.json"):
        for row in json.loads((LF_DEMO / name).read_text()):
            texts.append(json.dumps(row, ensure_ascii=False))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
    tokenizer.save_pretrained(folder)


CPU_SECONDS: dict[str, float] = {}


def timed(cmd: list[str], env: dict, label: str = "") -> float:
    """Wall seconds of one command; its CPU seconds (user + system) are kept in CPU_SECONDS[label]: on a shared
    machine wall time swings with the load, CPU time much less."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS[label] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds


def compare(a: Path, b: Path) -> tuple[int, int, int]:
    """(rows in a, rows in b, first differing row index or -1)."""
    with a.open() as fa, b.open() as fb:
        rows_a = rows_b = 0
        first_diff = -1
        for line_a, line_b in zip(fa, fb):
            if first_diff < 0 and json.loads(line_a) != json.loads(line_b):
                first_diff = rows_a
            rows_a += 1
            rows_b += 1
        rows_a += sum(1 for _ in fa)
        rows_b += sum(1 for _ in fb)
    return rows_a, rows_b, first_diff


# ---------------------------------------------------------------------------------------------------------------
# CPT at scale
# ---------------------------------------------------------------------------------------------------------------
def make_corpus(folder: Path, gigabytes: float) -> int:
    """folder/bench_cpt.txt of ~`gigabytes` (one document per line) + dataset_info.json; returns its size."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bench_cpt.txt"
    target = int(gigabytes * 1e9)
    if not path.exists() or abs(path.stat().st_size - target) > target * 0.01:
        texts = [row["output"].replace("\n", " ") for row in json.loads((LF_DEMO / "alpaca_en_demo.json").read_text())]
        texts += [line.strip() for line in (ROOT / "data" / "demo_cpt.txt").read_text().splitlines() if line.strip()]
        written, i = 0, 0
        with path.open("w", encoding="utf-8") as fh:
            while written < target:
                line = f"{texts[i % len(texts)]} (#{i})\n"
                fh.write(line)
                written += len(line.encode())
                i += 1
    (folder / "dataset_info.json").write_text(json.dumps({"bench_cpt": {"file_name": "bench_cpt.txt",
                                                                        "columns": {"prompt": "text"}}}))
    return path.stat().st_size


def anonymous_bytes(pid: int) -> int:
    """RssAnon of a process: its own memory, not the pages of files it maps (datasets memory-maps its Arrow files,
    and those pages, reclaimable page cache, would otherwise count as the process's memory)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measured(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak MB of the process tree's summed anonymous memory) of one command."""
    import psutil

    log = tempfile.TemporaryFile("w+")  # not a pipe: a chatty command would block on a full pipe buffer
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(anonymous_bytes(p.pid) for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    log.seek(0)
    err = log.read()
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return seconds, peak / 2**20


def ours_cpt(data: str, tokenizer: str, out: str, workers: int, cutoff: int) -> None:
    """The prepare stage's code on the corpus (run in its own process by `--cpt`)."""
    from tunepipe.data.features import DataArgs, prepare_to_disk
    from tunepipe.models.loading import load_tokenizer

    args = DataArgs(dataset_dir=data, template="qwen", cutoff_len=cutoff, streaming=True,
                    preprocessing_num_workers=workers if workers > 1 else None)
    prepare_to_disk("pt", "bench_cpt", args, load_tokenizer(tokenizer), Path(out))


def digest_of(dataset_dir: Path) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    from datasets import load_from_disk
    from lf_oracle import token_digest

    return token_digest(load_from_disk(str(dataset_dir)))


def cpt_bench(args) -> None:
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tunepipe-cpt-bench-"))
    tok = work / "tokenizer"
    if not (tok / "tokenizer.json").exists():
        make_tokenizer(tok)
    if args.encode:
        encode_bench(args, data, tok)
        return
    lf_python = Path(args.lf_venv) / "bin" / "python"
    if not args.skip_lf and not lf_python.exists():
        sys.exit(f"no LLaMA-Factory venv at {args.lf_venv}: run `bash bench/lf_venv.sh` first")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"CPT corpus, template qwen, cutoff_len {args.cutoff_len}, {args.workers} worker(s) each side; work dir "
          f"{work}")
    print(f"{'corpus':>8} {'side':10} {'wall s':>8} {'MB/s':>7} {'anon MB':>8} {'blocks':>9}")
    for gigabytes in [float(x) for x in args.cpt_gb.split(",")]:
        data = work / f"corpus-{gigabytes:g}gb"
        size = make_corpus(data, gigabytes)
        out = work / f"ours-{gigabytes:g}"
        shutil.rmtree(out, ignore_errors=True)
        for cache in ("hf-ours", "hf-lf"):  # cold: neither side may reuse datasets' cache of an earlier run
            shutil.rmtree(work / cache, ignore_errors=True)
        out.mkdir()
        cmd = [sys.executable, __file__, "--ours-cpt", str(data), str(tok), str(out), str(args.workers),
               str(args.cutoff_len)]
        seconds, peak = measured(cmd, {**env, "HF_DATASETS_CACHE": str(work / "hf-ours")})
        shutil.rmtree(work / "hf-ours", ignore_errors=True)
        ours = digest_of(out / "train")
        print(f"{size / 1e9:7.2f}G {'tunepipe':10} {seconds:8.1f} {size / 1e6 / seconds:7.1f} {peak:8.0f} "
              f"{ours['rows']:9,d}", flush=True)
        if args.skip_lf:
            continue
        runs = [("LF", args.workers)] + ([("LF 1 worker", 1)] if args.check and args.workers > 1 else [])
        for label, workers in runs:
            digest_file = work / f"lf-{gigabytes:g}-{workers}.json"
            shutil.rmtree(work / "hf-lf", ignore_errors=True)
            cmd = [str(lf_python), str(ROOT / "bench" / "lf_oracle.py"), "--stage", "pt", "--dataset", "bench_cpt",
                   "--dataset-dir", str(data), "--template", "qwen", "--tokenizer", str(tok), "--cutoff-len",
                   str(args.cutoff_len), "--out", str(digest_file), "--digest",
                   "--hf-cache", str(work / "hf-lf"),
                   *(["--preprocessing-num-workers", str(workers)] if workers > 1 else [])]
            seconds, peak = measured(cmd, env)
            shutil.rmtree(work / "hf-lf", ignore_errors=True)
            lf = json.loads(digest_file.read_text())
            same = " identical to tunepipe" if lf["sha256"] == ours["sha256"] else ""
            print(f"{'':8} {label:10} {seconds:8.1f} {size / 1e6 / seconds:7.1f} {peak:8.0f} {lf['rows']:9,d}{same}",
                  flush=True)


def encode_bench(args, data: Path, tok: Path) -> None:
    """BatchTokenizer's fast path against the public call, on the processor's real pieces (see --encode)."""
    import numpy as np

    from tunepipe.data.features import DataArgs, load_examples, load_template
    from tunepipe.data.processors import BatchTokenizer, Processor, ProcessorOptions
    from tunepipe.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tok))
    data_args = DataArgs(dataset_dir=str(data), template="qwen", cutoff_len=args.cutoff_len)
    template = load_template(data_args, tokenizer, stage="sft")
    examples = load_examples(["bench_alpaca", "bench_tools"], data_args, "sft", np.random.RandomState(0), [], {})
    best, outputs = {}, {}
    for _ in range(args.repeat):
        for label, fast in (("encode_batch_fast", True), ("tokenizer(pieces)", False)):
            processor = Processor("sft", template, tokenizer, ProcessorOptions(cutoff_len=args.cutoff_len))
            processor.batch = BatchTokenizer(tokenizer, fast=fast)
            start = time.perf_counter()
            outputs[label] = processor.process(examples)
            best[label] = min(best.get(label, float("inf")), time.perf_counter() - start)
    fast_s, public_s = best["encode_batch_fast"], best["tokenizer(pieces)"]
    print(f"sft processor, {len(examples)} rows, qwen, cutoff_len {args.cutoff_len}, best of {args.repeat}")
    print(f"encode_batch_fast (backend)  {fast_s:8.2f} s")
    print(f"tokenizer(pieces) (public)   {public_s:8.2f} s")
    print(f"gain                         {public_s / fast_s:8.2f} x; identical features: "
          f"{'yes' if outputs['encode_batch_fast'] == outputs['tokenizer(pieces)'] else 'NO'}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--ours-cpt":
        data, tok, out, workers, cutoff = sys.argv[2:7]
        ours_cpt(data, tok, out, int(workers), int(cutoff))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50000)
    parser.add_argument("--cutoff-len", type=int, default=1024)
    parser.add_argument("--lf-venv", default=os.getenv("LF_VENV", "/work/lf-venv"))
    parser.add_argument("--skip-lf", action="store_true", help="only time tunepipe")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--cpt", action="store_true", help="the CPT corpus case instead of SFT rows")
    parser.add_argument("--cpt-gb", default="0.25,1.0", help="--cpt: corpus sizes in GB")
    parser.add_argument("--workers", type=int, default=2, help="--cpt: preprocessing_num_workers, both sides")
    parser.add_argument("--check", action="store_true", help="--cpt: also LF with one worker, to compare tokens")
    parser.add_argument("--encode", action="store_true", help="BatchTokenizer's fast path vs the public call")
    parser.add_argument("--repeat", type=int, default=3, help="--encode: runs of each, the best one counts")
    args = parser.parse_args()
    if args.cpt:
        cpt_bench(args)
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="tunepipe-bench-"))
    data, tok = work / "data", work / "tokenizer"
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "dataset_info.json").exists():
        make_data(data, args.rows)
    if not (tok / "tokenizer.json").exists():
        make_tokenizer(tok)
    if args.encode:
        encode_bench(args, data, tok)
        return
    common = ["--stage", "sft", "--dataset", "bench_alpaca,bench_tools", "--dataset-dir", str(data),
              "--template", "qwen", "--tokenizer", str(tok), "--cutoff-len", str(args.cutoff_len)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def cold(name: str) -> dict:
        """Each run starts without `datasets`' cache (which would skip reading the JSON again)."""
        cache = work / name
        shutil.rmtree(cache, ignore_errors=True)
        return {**env, "HF_DATASETS_CACHE": str(cache)}

    ours = timed([str(ROOT / ".venv" / "bin" / "tunepipe"), "data", "export", *common, "--out",
                  str(work / "tunepipe.jsonl")], cold("hf-cache"), "ours")
    print(f"rows: {args.rows} (80% alpaca, 20% tool calls), template qwen, cutoff_len {args.cutoff_len}")
    print(f"tunepipe data export       {ours:8.1f} s   (CPU {CPU_SECONDS['ours']:.1f} s)")
    if args.skip_lf:
        return
    lf_python = Path(args.lf_venv) / "bin" / "python"
    if not lf_python.exists():
        sys.exit(f"no LLaMA-Factory venv at {args.lf_venv}: run `bash bench/lf_venv.sh` first")
    lf_command = [str(lf_python), str(ROOT / "bench" / "lf_oracle.py"), *common, "--out", str(work / "lf.jsonl")]
    # LLaMA-Factory as shipped (tokenizers' thread pool on, the library default), and with the pool off, which
    # suits its one-call-per-piece tokenization better: we report against both.
    lf = timed(lf_command, cold("hf-cache-lf"), "lf")
    lf_serial = timed(lf_command, {**cold("hf-cache-lf"), "TOKENIZERS_PARALLELISM": "false"}, "lf_serial")
    rows_ours, rows_lf, first_diff = compare(work / "tunepipe.jsonl", work / "lf.jsonl")
    print(f"llamafactory 0.9.5         {lf:8.1f} s   (CPU {CPU_SECONDS['lf']:.1f} s; default environment)")
    print(f"llamafactory 0.9.5         {lf_serial:8.1f} s   (CPU {CPU_SECONDS['lf_serial']:.1f} s; "
          "TOKENIZERS_PARALLELISM=false)")
    print(f"speed-up, wall             {lf / ours:8.2f} x / {lf_serial / ours:.2f} x")
    print(f"speed-up, CPU              {CPU_SECONDS['lf'] / CPU_SECONDS['ours']:8.2f} x / "
          f"{CPU_SECONDS['lf_serial'] / CPU_SECONDS['ours']:.2f} x")
    same = rows_ours == rows_lf and first_diff < 0
    print(f"identical output           {'yes' if same else 'NO'} ({rows_ours} vs {rows_lf} examples"
          + (f", first difference at example {first_diff})" if first_diff >= 0 else ")"))
    print(f"work dir: {work}")


if __name__ == "__main__":
    main()
