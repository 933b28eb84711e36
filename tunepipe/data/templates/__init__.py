"""Chat templates: messages -> prompt/response token ids, exactly as LLaMA-Factory 0.9.5 builds them.

`engine` renders and encodes (the `Template` classes, slots -> ids, the jinja export, the registry); `catalog`
registers the templates. Importing the package imports both, engine first, so every name is registered before
`get_template` can be called. `tests/data/test_templates.py` checks every ported template against LF itself
(opt-in `lf_parity` tests) and docs/templates.md lists what is ported.
"""

from tunepipe.data.templates.engine import (
    ROLES,
    AlpacaInputTemplate,
    Element,
    Glm47ReasoningTemplate,
    Llama2Template,
    Message,
    ReasoningTemplate,
    Template,
    TokenizerChatTemplate,
    encode_elements,
    get_template,
    parse_template,
    resolve_slots,
    template_names,
)
# after the engine, and for its side effect too: importing the catalog registers every template
from tunepipe.data.templates.catalog import ALPACA_INPUT_SYSTEM, ALPACA_SYSTEM

__all__ = [
    "ALPACA_INPUT_SYSTEM",
    "ALPACA_SYSTEM",
    "ROLES",
    "AlpacaInputTemplate",
    "Element",
    "Glm47ReasoningTemplate",
    "Llama2Template",
    "Message",
    "ReasoningTemplate",
    "Template",
    "TokenizerChatTemplate",
    "encode_elements",
    "get_template",
    "parse_template",
    "resolve_slots",
    "template_names",
]
