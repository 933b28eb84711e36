"""pt (cpt): LLaMA-Factory's PretrainDatasetProcessor: documents + EOS, packed into cutoff_len blocks (the remainder
of each batch dropped) or truncated one per row."""

from __future__ import annotations

from tunepipe.data.converters import Example
from tunepipe.data.processors.driver import DatasetProcessor
from tunepipe.data.processors.processor_utils import IGNORE_INDEX


class PretrainDatasetProcessor(DatasetProcessor):
    stage = "pt"

    def process_batch(self, batch: list[Example]) -> dict[str, list]:
        tok = self.tokenizer
        eos = "<|end_of_text|>" if self.template.name == "llama3" else tok.eos_token  # LF's literal llama3 case
        # LF crashes (IndexError) on a row without prompt; we count it as dropped
        texts = [example.prompt[0]["content"] + eos for example in self._usable(batch)]
        if not texts:
            return {}
        add_bos = bool(getattr(tok, "add_bos_token", False))
        cutoff = self.opts.cutoff_len
        if not self.opts.packing:
            if add_bos:
                texts = [tok.bos_token + text for text in texts]
            full = tok(texts, add_special_tokens=False)
            result: dict[str, list] = {k: [v[:cutoff] for v in values] for k, values in full.items()}
            for ids in full["input_ids"]:
                self.health.lengths.append(len(ids))
                if len(ids) > cutoff:
                    self.health.truncated += 1
                    self.health.lost_eos += 1
        else:
            encoded = tok(texts, add_special_tokens=False)
            self.health.lengths.extend(len(ids) for ids in encoded["input_ids"])
            result = {}
            for key, values in encoded.items():
                flat = [token for ids in values for token in ids]
                total = (len(flat) // cutoff) * cutoff  # LF drops the remainder of every batch
                result[key] = [flat[i : i + cutoff] for i in range(0, total, cutoff)]
            if add_bos:  # LF overwrites the first token of every block with BOS
                for block in result["input_ids"]:
                    block[0] = tok.bos_token_id
        pad = tok.pad_token_id
        # LF trains pt with DataCollatorForLanguageModeling: labels = input_ids with every pad id masked (which,
        # when pad == eos, masks the document separators too).
        result["labels"] = [[IGNORE_INDEX if t == pad else t for t in ids] for ids in result["input_ids"]]
        for ids, labels in zip(result["input_ids"], result["labels"]):
            self.health.tokens += len(ids)
            self.health.label_tokens += sum(1 for t in labels if t != IGNORE_INDEX)
        return result
