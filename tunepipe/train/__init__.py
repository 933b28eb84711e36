"""Training a stage: a fresh LoRA adapter (or all weights) on the stage's input model, with transformers / TRL.

    recipe.py     setup -> train -> save for one stage (what stages/train.py spells out)
    lora.py       params.yaml's LoRA keys -> peft.LoraConfig
    resume.py     the run fingerprint and the resume decision (continue only an identical run)
    collators.py  prepared features -> the batch layout each trainer expects (+ token accounting)
    trainers.py   thin Trainer / TRL subclasses that consume those batches
    callbacks.py  the per-step progress line, the loss curve (CSV + PNG), simulated interruption
    packing.py    sft rows by best-fit decreasing, the length-grouped row sampler
"""

import logging

# bitsandbytes (imported by PEFT / transformers whenever it is installed) warns at import that it cannot download
# an optional CPU kernel from the hub; nothing is downloaded here, and its own torch kernels are used instead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
