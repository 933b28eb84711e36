"""The template catalog: every chat template `get_template` knows, one `_register(...)` call each.

The LLaMA-Factory templates come first, in the order of LF 0.9.5's `data/template.py`: by name (LF keeps a few
neighbours out of order, e.g. deepseekr1 before deepseekcoder; they are sorted here), so each registration can be
read beside its LF original. Then the community formats LF 0.9.5 does not ship, then "tokenizer" (the model's own
chat_template). Importing this module is what fills the registry; the package `__init__` does it.

Adding a template: one `_register(...)` call, at its place by name; what it leaves out gets LF
`register_template`'s defaults (see `engine._register`), and `cls=` picks a `Template` subclass only when the
rendering itself differs. Then its test in tests/data/test_templates.py: `template_names()` already puts every
template into the jinja round trips, and an LF template into the opt-in `lf_parity` comparison with LF itself;
a community template, which LF cannot check, needs its exact strings in `test_community_templates` and its name
in the `LF_TEMPLATE_NAMES` exclusions. docs/templates.md lists every template with its strings.
"""

from tunepipe.data.formatters import BOS, EOS, Token
from tunepipe.data.templates.engine import (
    _REGISTRY,
    AlpacaInputTemplate,
    Glm47ReasoningTemplate,
    Llama2Template,
    ReasoningTemplate,
    TokenizerChatTemplate,
    _fixed,
    _fn,
    _register,
    _str,
    _tools,
)


# ---------------------------------------------------------------------------------------------------------------
# Templates ported from LLaMA-Factory 0.9.5: every text-only template (no multimodal plugin), plus llama4,
# mistral_small and gemma3 for text rows. Strings are transcribed from LF and must stay byte-identical.

_register(
    "aeva",
    user=_str("<|user|>\n{{content}}<|assistant|>"),
    assistant=_str("\n{{content}}"),
    system=_str("<|system|>\n{{content}}"),
    function=_fn("{{content}}", tool_format="glm4_moe"),
    observation=_str("<|observation|>\n{{content}}<|assistant|>"),
    tools=_tools("glm4_moe"),
    prefix=_fixed("[gMASK]<sop>"),
    default_system=(
        "You are an AI assistant named Aeva created by Zongzhi Lou. Your answer should be "
        "friendly, unbiased, faithful, informative and detailed."
    ),
    stop_words=["<|user|>", "<|observation|>"],
    thought_words=("<think>", "</think>"),
    efficient_eos=True,
    cls=Glm47ReasoningTemplate,
)

_register(
    "alpaca",
    user=_str("### Instruction:\n{{content}}\n\n### Response:\n"),
    assistant=_str("{{content}}", EOS, "\n\n"),
    default_system=(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    ),
    replace_jinja_template=True,
)

_register(
    "bailing",
    user=_str("<role>HUMAN</role>{{content}}<role>ASSISTANT</role>"),
    system=_str("<role>SYSTEM</role>{{content}}"),
    observation=_str("<role>OBSERVATION</role>{{content}}<role>ASSISTANT</role>"),
    stop_words=["<|endoftext|>"],
    efficient_eos=True,
)

_register(
    "bailing_v2",
    user=_str("<role>HUMAN</role>{{content}}<|role_end|><role>ASSISTANT</role>"),
    assistant=_str("{{content}}<|role_end|>"),
    system=_str("<role>SYSTEM</role>{{content}}<|role_end|>"),
    function=_fn("{{content}}<|role_end|>", tool_format="ling"),
    observation=_str(
        "<role>OBSERVATION</role>\n<tool_response>\n{{content}}\n</tool_response><|role_end|><role>ASSISTANT</role>"
    ),
    tools=_tools("ling"),
    stop_words=["<|endoftext|>"],
    efficient_eos=True,
)

_register(
    "breeze",
    user=_str("[INST] {{content}} [/INST] "),
    prefix=_fixed(BOS),
    efficient_eos=True,
)

_register(
    "chatglm3",
    user=_str(Token("<|user|>"), "\n", "{{content}}", Token("<|assistant|>")),
    assistant=_str("\n", "{{content}}"),
    system=_str(Token("<|system|>"), "\n", "{{content}}"),
    function=_fn("{{content}}", tool_format="glm4"),
    observation=_str(Token("<|observation|>"), "\n", "{{content}}", Token("<|assistant|>")),
    tools=_tools("glm4"),
    prefix=_fixed(Token("[gMASK]"), Token("sop")),
    stop_words=["<|user|>", "<|observation|>"],
    efficient_eos=True,
)

_register(
    "chatml",
    user=_str("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    assistant=_str("{{content}}<|im_end|>\n"),
    system=_str("<|im_start|>system\n{{content}}<|im_end|>\n"),
    observation=_str("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    stop_words=["<|im_end|>", "<|im_start|>"],
    replace_eos=True,
    replace_jinja_template=True,
)

_register(
    "chatml_de",
    user=_str("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    assistant=_str("{{content}}<|im_end|>\n"),
    system=_str("<|im_start|>system\n{{content}}<|im_end|>\n"),
    observation=_str("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    default_system="Du bist ein freundlicher und hilfsbereiter KI-Assistent.",
    stop_words=["<|im_end|>", "<|im_start|>"],
    replace_eos=True,
    replace_jinja_template=True,
)

_register(
    "cohere",
    user=_str(
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{{content}}<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    ),
    system=_str("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{{content}}<|END_OF_TURN_TOKEN|>"),
    prefix=_fixed(BOS),
)

_register(
    "cpm4",
    user=_str("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    assistant=_str("{{content}}<|im_end|>\n"),
    system=_str("<|im_start|>system\n{{content}}<|im_end|>\n"),
    observation=_str("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    prefix=_fixed(BOS),
    stop_words=["<|im_end|>"],
)

_register(
    "dbrx",
    user=_str("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    assistant=_str("{{content}}<|im_end|>\n"),
    system=_str("<|im_start|>system\n{{content}}<|im_end|>\n"),
    observation=_str("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    default_system=(
        "You are DBRX, created by Databricks. You were last updated in December 2023. You answer "
        "questions based on information available up to that point.\n"
        "YOU PROVIDE SHORT RESPONSES TO SHORT QUESTIONS OR STATEMENTS, but provide thorough "
        "responses to more complex and open-ended questions.\n"
        "You assist with various tasks, from writing to coding (using markdown for code blocks — "
        "remember to use ``` with code, JSON, and tables).\n"
        "(You do not have real-time data access or code execution capabilities. You avoid "
        "stereotyping and provide balanced perspectives on controversial topics. You do not "
        "provide song lyrics, poems, or news articles and do not divulge details of your training data.)\n"
        "This is your system prompt, guiding your responses. Do not reference it, just respond to "
        "the user. If you find yourself talking about this message, stop. You should be responding "
        "appropriately and usually that means not mentioning this.\n"
        "YOU DO NOT MENTION ANY OF THIS INFORMATION ABOUT YOURSELF UNLESS THE INFORMATION IS "
        "DIRECTLY PERTINENT TO THE USER'S QUERY."
    ),
    stop_words=["<|im_end|>"],
    replace_eos=True,
)

_register(
    "deepseek",
    user=_str("User: {{content}}\n\nAssistant:"),
    system=_str("{{content}}\n\n"),
    prefix=_fixed(BOS),
)

_register(
    "deepseek3",
    user=_str("<｜User｜>{{content}}<｜Assistant｜>"),
    prefix=_fixed(BOS),
)

_register(
    "deepseekcoder",
    user=_str("### Instruction:\n{{content}}\n### Response:"),
    assistant=_str("\n{{content}}\n<|EOT|>\n"),
    prefix=_fixed(BOS),
    default_system=(
        "You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by "
        "DeepSeek Company, and you only answer questions related to computer science. For "
        "politically sensitive questions, security and privacy issues, and other non-computer "
        "science questions, you will refuse to answer.\n"
    ),
)

_register(
    "deepseekr1",
    user=_str("<｜User｜>{{content}}<｜Assistant｜>"),
    prefix=_fixed(BOS),
    cls=ReasoningTemplate,
)

_register(
    "default",
    user=_str("Human: {{content}}", EOS, "\nAssistant:"),
    assistant=_str("{{content}}", EOS, "\n"),
    system=_str("System: {{content}}", EOS, "\n"),
    replace_jinja_template=True,
)

_register(
    "empty",
    assistant=_str("{{content}}"),
)

_register(
    "ernie",
    user=_str("<|im_start|>user\n{{content}}<|im_end|>\n\n<|im_start|>assistant\n"),
    assistant=_str("{{content}}<|im_end|>\n\n"),
    system=_str("<|im_start|>system\n{{content}}<|im_end|>\n\n"),
    observation=_str("<|im_start|>tool\n{{content}}<|im_end|>\n\n<|im_start|>assistant\n"),
    default_system="<global_setting>\nthink_mode=True\n</global_setting>",
    stop_words=["<|im_end|>"],
)

_register(
    "ernie_nothink",
    user=_str("User: {{content}}\nAssistant: "),
    assistant=_str("{{content}}<|end_of_sentence|>"),
    system=_str("{{content}}\n"),
    prefix=_fixed("<|begin_of_sentence|>"),
    stop_words=["<|end_of_sentence|>"],
)

_register(
    "exaone",
    user=_str("[|user|]{{content}}\n[|assistant|]"),
    assistant=_str("{{content}}", EOS, "\n"),
    system=_str("[|system|]{{content}}[|endofturn|]\n"),
)

_register(
    "falcon",
    user=_str("User: {{content}}\nFalcon:"),
    assistant=_str("{{content}}\n"),
    efficient_eos=True,
)

_register(
    "falcon_h1",
    user=_str("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    assistant=_str("{{content}}<|im_end|>\n"),
    system=_str("<|im_start|>system\n{{content}}<|im_end|>\n"),
    observation=_str("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    prefix=_fixed(BOS),
    stop_words=["<|im_end|>", "<|end_of_text|>"],
)

_register(
    "fewshot",
    assistant=_str("{{content}}\n\n"),
    efficient_eos=True,
    replace_jinja_template=True,
)

_register(
    "gemma",
    user=_str("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n"),
    assistant=_str("{{content}}<end_of_turn>\n"),
    system=_str("{{content}}\n\n"),
    observation=_str("<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n"),
    prefix=_fixed(BOS),
    stop_words=["<end_of_turn>"],
    replace_eos=True,
    cls=Llama2Template,
)

_register(
    "gemma2",
    user=_str("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n"),
    assistant=_str("{{content}}<end_of_turn>\n"),
    system=_str("{{content}}\n\n"),
    observation=_str("<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n"),
    prefix=_fixed(BOS),
    stop_words=["<eos>", "<end_of_turn>"],
    efficient_eos=True,
    cls=Llama2Template,
)

_register(
    "gemma3",
    user=_str("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n"),
    assistant=_str("{{content}}<end_of_turn>\n"),
    system=_str("{{content}}\n\n"),
    observation=_str("<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n"),
    prefix=_fixed(BOS),
    stop_words=["<end_of_turn>"],
    replace_eos=True,
    cls=Llama2Template,
)

_register(
    "glm4",
    user=_str("<|user|>\n{{content}}<|assistant|>"),
    assistant=_str("\n{{content}}"),
    system=_str("<|system|>\n{{content}}"),
    function=_fn("{{content}}", tool_format="glm4"),
    observation=_str("<|observation|>\n{{content}}<|assistant|>"),
    tools=_tools("glm4"),
    prefix=_fixed("[gMASK]<sop>"),
    stop_words=["<|user|>", "<|observation|>"],
    efficient_eos=True,
)

_register(
    "glm4_7",
    user=_str("<|user|>\n{{content}}<|assistant|>"),
    assistant=_str("\n{{content}}"),
    system=_str("<|system|>\n{{content}}"),
    function=_fn("{{content}}", tool_format="glm4_moe"),
    observation=_str("<|observation|>\n{{content}}<|assistant|>"),
    tools=_tools("glm4_moe"),
    prefix=_fixed("[gMASK]<sop>"),
    stop_words=["<|user|>", "<|observation|>"],
    thought_words=("<think>", "</think>"),
    efficient_eos=True,
    cls=Glm47ReasoningTemplate,
)

_register(
    "glm4_moe",
    user=_str("<|user|>\n{{content}}<|assistant|>"),
    assistant=_str("\n{{content}}"),
    system=_str("<|system|>\n{{content}}"),
    function=_fn("{{content}}", tool_format="glm4_moe"),
    observation=_str("<|observation|>\n{{content}}<|assistant|>"),
    tools=_tools("glm4_moe"),
    prefix=_fixed("[gMASK]<sop>"),
    stop_words=["<|user|>", "<|observation|>"],
    efficient_eos=True,
    cls=ReasoningTemplate,
)

_register(
    "glmz1",
    user=_str("<|user|>\n{{content}}<|assistant|>"),
    assistant=_str("\n{{content}}"),
    system=_str("<|system|>\n{{content}}"),
    function=_fn("{{content}}", tool_format="glm4"),
    observation=_str("<|observation|>\n{{content}}<|assistant|>"),
    tools=_tools("glm4"),
    prefix=_fixed("[gMASK]<sop>"),
    stop_words=["<|user|>", "<|observation|>"],
    efficient_eos=True,
    cls=ReasoningTemplate,
)

_register(
    "gpt_oss",
    user=_str("<|start|>user<|message|>{{content}}<|end|><|start|>assistant"),
    system=_str("<|start|>system<|message|>{{content}}<|end|>"),
    default_system="You are ChatGPT, a large language model trained by OpenAI.",
    thought_words=("<|channel|>analysis<|message|>", "<|end|><|start|>assistant<|channel|>final<|message|>"),
    efficient_eos=True,
    cls=ReasoningTemplate,
)

_register(
    "granite3",
    user=_str(
        "<|start_of_role|>user<|end_of_role|>{{content}}<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
    ),
    assistant=_str("{{content}}<|end_of_text|>\n"),
    system=_str("<|start_of_role|>system<|end_of_role|>{{content}}<|end_of_text|>\n"),
)

_register(
    "granite4",
    user=_str(
        "<|start_of_role|>user<|end_of_role|>{{content}}<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
    ),
    assistant=_str("{{content}}<|end_of_text|>\n"),
    system=_str("<|start_of_role|>system<|end_of_role|>{{content}}<|end_of_text|>\n"),
    observation=_str("<|start_of_role|>tool<|end_of_role|>{{content}}<|end_of_text|>\n<|start_of_role|>assistant\n"),
    default_system="You are Granite, developed by IBM. You are a helpful AI assistant.",
    stop_words=["<|end_of_text|>"],
)

_register(
    "hunyuan",
    user=_str("{{content}}<|extra_0|>"),
    assistant=_str("{{content}}<|eos|>"),
    system=_str("{{content}}<|extra_4|>"),
    prefix=_fixed("<|startoftext|>"),
    stop_words=["<|eos|>"],
)

_register(
    "hunyuan_small",
    user=_str("<｜hy_User｜>{{content}}<｜hy_place▁holder▁no▁8｜>"),
    assistant=_str("{{content}}<｜hy_place▁holder▁no▁2｜>"),
    system=_str("{{content}}<｜hy_place▁holder▁no▁3｜>"),
    prefix=_fixed("<｜hy_begin▁of▁sentence｜>"),
    stop_words=["<｜hy_place▁holder▁no▁2｜>"],
)

_register(
    "hy3",
    user=_str("<｜hy_User｜>{{content}}<｜hy_Assistant｜>"),
    assistant=_str("{{content}}<｜hy_eos｜>"),
    prefix=_fixed(BOS),
    stop_words=["<｜hy_eos｜>"],
    thought_words=("<think>", "</think>"),
    replace_eos=True,
    cls=ReasoningTemplate,
)

_register(
    "index",
    user=_str("reserved_0{{content}}reserved_1"),
    system=_str("<unk>{{content}}"),
    efficient_eos=True,
)

_register(
    "intern2",
    user=_str("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    assistant=_str("{{content}}<|im_end|>\n"),
    system=_str("<|im_start|>system\n{{content}}<|im_end|>\n"),
    prefix=_fixed(BOS),
    default_system=(
        "You are an AI assistant whose name is InternLM (书生·浦语).\n"
        "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI "
        "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
        "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the "
        "user such as English and 中文."
    ),
    stop_words=["<|im_end|>"],
)

_register(
    "lfm2",
    user=_str("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    assistant=_str("{{content}}<|im_end|>\n"),
    system=_str("<|im_start|>system\n{{content}}<|im_end|>\n"),
    function=_fn("{{content}}<|im_end|>\n", tool_format="lfm2"),
    observation=_str(
        "<|im_start|>tool\n<|tool_response_start|>{{content}}<|tool_response_end|><|im_end|>\n<|im_start|>assistant\n"
    ),
    tools=_tools("lfm2"),
    default_system="You are a helpful AI assistant.",
    stop_words=["<|im_end|>"],
    tool_call_words=("<|tool_call_start|>", "<|tool_call_end|>"),
    replace_eos=True,
)

_register(
    "llama2",
    user=_str(BOS, "[INST] {{content}} [/INST]"),
    system=_str("<<SYS>>\n{{content}}\n<</SYS>>\n\n"),
    cls=Llama2Template,
)

_register(
    "llama2_zh",
    user=_str(BOS, "[INST] {{content}} [/INST]"),
    system=_str("<<SYS>>\n{{content}}\n<</SYS>>\n\n"),
    default_system="You are a helpful assistant. 你是一个乐于助人的助手。",
    cls=Llama2Template,
)

_register(
    "llama3",
    user=_str(
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "{{content}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    assistant=_str("{{content}}<|eot_id|>"),
    system=_str("<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>"),
    function=_fn("{{content}}<|eot_id|>", tool_format="llama3"),
    observation=_str(
        "<|start_header_id|>ipython<|end_header_id|>\n\n"
        "{{content}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    tools=_tools("llama3"),
    prefix=_fixed(BOS),
    stop_words=["<|eot_id|>", "<|eom_id|>"],
    replace_eos=True,
)

_register(
    "llama4",
    user=_str("<|header_start|>user<|header_end|>\n\n{{content}}<|eot|><|header_start|>assistant<|header_end|>\n\n"),
    assistant=_str("{{content}}<|eot|>"),
    system=_str("<|header_start|>system<|header_end|>\n\n{{content}}<|eot|>"),
    function=_fn("{{content}}<|eot|>", tool_format="llama3"),
    observation=_str(
        "<|header_start|>ipython<|header_end|>\n\n{{content}}<|eot|><|header_start|>assistant<|header_end|>\n\n"
    ),
    tools=_tools("llama3"),
    prefix=_fixed(BOS),
    stop_words=["<|eot|>", "<|eom|>"],
    replace_eos=True,
)

_register(
    "mimo",
    user=_str("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    assistant=_str("{{content}}<|im_end|>\n"),
    system=_str("<|im_start|>system\n{{content}}<|im_end|>\n"),
    function=_fn("{{content}}<|im_end|>\n", tool_format="qwen"),
    observation=_str(
        "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ),
    tools=_tools("qwen"),
    default_system="You are a helpful assistant.",
    stop_words=["<|im_end|>"],
    replace_eos=True,
    cls=ReasoningTemplate,
)

_register(
    "mimo_v2",
    user=_str("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    assistant=_str("{{content}}<|im_end|>\n"),
    system=_str("<|im_start|>system\n{{content}}<|im_end|>\n"),
    function=_fn("{{content}}<|im_end|>\n", tool_format="qwen"),
    observation=_str(
        "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ),
    tools=_tools("qwen"),
    default_system="You are MiMo, a helpful AI assistant engineered by Xiaomi.",
    stop_words=["<|im_end|>"],
    thought_words=("<think>", "</think>"),
    replace_eos=True,
    cls=ReasoningTemplate,
)

_register(
    "minimax1",
    user=_str(
        "<beginning_of_sentence>user name=user\n"
        "{{content}}<end_of_sentence>\n"
        "<beginning_of_sentence>ai name=assistant\n"
    ),
    assistant=_str("{{content}}<end_of_sentence>\n"),
    system=_str("<beginning_of_sentence>system ai_setting=assistant\n{{content}}<end_of_sentence>\n"),
    function=_fn("{{content}}<end_of_sentence>\n", tool_format="minimax1"),
    observation=_str(
        "<beginning_of_sentence>tool name=tools\n"
        "{{content}}<end_of_sentence>\n"
        "<beginning_of_sentence>ai name=assistant\n"
    ),
    tools=_tools("minimax1"),
    default_system="You are a helpful assistant.",
    stop_words=["<end_of_sentence>"],
)

_register(
    "minimax2",
    user=_str("]~b]user\n{{content}}[e~[\n]~b]ai\n"),
    assistant=_str("{{content}}[e~[\n"),
    system=_str("]~!b[]~b]system\n{{content}}[e~[\n"),
    function=_fn("{{content}}[e~[\n", tool_format="minimax2"),
    observation=_str("]~b]tool\n<response>{{content}}</response>[e~[\n]~b]ai\n"),
    tools=_tools("minimax2"),
    default_system="You are a helpful assistant. Your name is MiniMax-M2.1 and is built by MiniMax.",
    stop_words=["[e~["],
    cls=ReasoningTemplate,
)

_register(
    "ministral",
    user=_str("[INST]{{content}}[/INST]"),
    system=_str("{{content}}\n\n"),
    function=_fn("[TOOL_CALLS]{{content}}", EOS, tool_format="mistral"),
    observation=_str('[TOOL_RESULTS]{"content": {{content}}}[/TOOL_RESULTS]'),
    tools=_tools("mistral"),
    prefix=_fixed(BOS),
    cls=Llama2Template,
)

_register(
    "mistral",
    user=_str("[INST] {{content}}[/INST]"),
    assistant=_str(" {{content}}", EOS),
    system=_str("{{content}}\n\n"),
    function=_fn("[TOOL_CALLS] {{content}}", EOS, tool_format="mistral"),
    observation=_str('[TOOL_RESULTS] {"content": {{content}}}[/TOOL_RESULTS]'),
    tools=_tools("mistral"),
    prefix=_fixed(BOS),
    cls=Llama2Template,
)

_register(
    "mistral_small",
    user=_str("[INST]{{content}}[/INST]"),
    system=_str("[SYSTEM_PROMPT]{{content}}[/SYSTEM_PROMPT]"),
    function=_fn("[TOOL_CALLS]{{content}}", EOS, tool_format="mistral"),
    observation=_str('[TOOL_RESULTS]{"content": {{content}}}[/TOOL_RESULTS]'),
    tools=_tools("mistral"),
    prefix=_fixed(BOS),
)

_register(
    "moonlight",
    user=_str("<|im_user|>user<|im_middle|>{{content}}<|im_end|><|im_assistant|>assistant<|im_middle|>"),
    assistant=_str("{{content}}<|im_end|>"),
    system=_str("<|im_system|>system<|im_middle|>{{content}}<|im_end|>"),
    default_system="You are a helpful assistant provided by Moonshot-AI.",
    stop_words=["<|im_end|>"],
    replace_eos=True,
)

_register(
    "olmo",
    user=_str("<|user|>\n{{content}}<|assistant|>\n"),
    prefix=_fixed(EOS),
)

_register(
    "openchat",
    user=_str("GPT4 Correct User: {{content}}", EOS, "GPT4 Correct Assistant:"),
    prefix=_fixed(BOS),
)

_register(
    "openchat-3.6",
    user=_str(
        "<|start_header_id|>GPT4 Correct User<|end_header_id|>\n\n"
        "{{content}}<|eot_id|><|start_header_id|>GPT4 Correct Assistant<|end_header_id|>\n\n"
    ),
    prefix=_fixed(BOS),
    stop_words=["<|eot_id|>"],
)

_register(
    "opencoder",
    user=_str("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    assistant=_str("{{content}}<|im_end|>\n"),
    system=_str("<|im_start|>system\n{{content}}<|im_end|>\n"),
    observation=_str("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    default_system="You are OpenCoder, created by OpenCoder Team.",
    stop_words=["<|im_end|>"],
)

_register(
    "phi",
    user=_str("<|user|>\n{{content}}<|end|>\n<|assistant|>\n"),
    assistant=_str("{{content}}<|end|>\n"),
    system=_str("<|system|>\n{{content}}<|end|>\n"),
    stop_words=["<|end|>"],
    replace_eos=True,
)

_register(
    "phi4",
    user=_str("<|im_start|>user<|im_sep|>{{content}}<|im_end|><|im_start|>assistant<|im_sep|>"),
    assistant=_str("{{content}}<|im_end|>"),
    system=_str("<|im_start|>system<|im_sep|>{{content}}<|im_end|>"),
    stop_words=["<|im_end|>"],
    replace_eos=True,
)

_register(
    "phi4_mini",
    user=_str("<|user|>{{content}}<|end|><|assistant|>"),
    assistant=_str("{{content}}<|end|>"),
    system=_str("<|system|>{{content}}<|end|>"),
    tools=_str("<|tool|>{{content}}<|/tool|>"),
    stop_words=["<|end|>"],
    replace_eos=True,
)

_register(
    "phi_small",
    user=_str("<|user|>\n{{content}}<|end|>\n<|assistant|>\n"),
    assistant=_str("{{content}}<|end|>\n"),
    system=_str("<|system|>\n{{content}}<|end|>\n"),
    # LF writes its prefix as the set {"<|endoftext|>"}, which is neither BOS nor EOS and so encodes to nothing
    stop_words=["<|end|>"],
    replace_eos=True,
)

_register(
    "qwen",
    user=_str("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    assistant=_str("{{content}}<|im_end|>\n"),
    system=_str("<|im_start|>system\n{{content}}<|im_end|>\n"),
    function=_fn("{{content}}<|im_end|>\n", tool_format="qwen"),
    observation=_str(
        "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ),
    tools=_tools("qwen"),
    default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    stop_words=["<|im_end|>"],
    replace_eos=True,
)

_register(
    "qwen3",
    user=_str("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    assistant=_str("{{content}}<|im_end|>\n"),
    system=_str("<|im_start|>system\n{{content}}<|im_end|>\n"),
    function=_fn("{{content}}<|im_end|>\n", tool_format="qwen"),
    observation=_str(
        "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ),
    tools=_tools("qwen"),
    stop_words=["<|im_end|>"],
    replace_eos=True,
    cls=ReasoningTemplate,
)

_register(
    "qwen3_nothink",
    user=_str("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    assistant=_str("{{content}}<|im_end|>\n"),
    system=_str("<|im_start|>system\n{{content}}<|im_end|>\n"),
    function=_fn("{{content}}<|im_end|>\n", tool_format="qwen"),
    observation=_str(
        "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ),
    tools=_tools("qwen"),
    stop_words=["<|im_end|>"],
    replace_eos=True,
)

_register(
    "sailor",
    user=_str("<|im_start|>question\n{{content}}<|im_end|>\n<|im_start|>answer\n"),
    assistant=_str("{{content}}<|im_end|>\n"),
    system=_str("<|im_start|>system\n{{content}}<|im_end|>\n"),
    default_system=(
        "You are an AI assistant named Sailor created by Sea AI Lab. Your answer should be "
        "friendly, unbiased, faithful, informative and detailed."
    ),
    stop_words=["<|im_end|>"],
)

_register(
    "seed_coder",
    user=_str(BOS, "user\n{{content}}", EOS, BOS, "assistant\n"),
    system=_str(BOS, "system\n{{content}}", EOS),
    default_system=(
        "You are an AI programming assistant, utilizing the Seed-Coder model, developed by "
        "ByteDance Seed, and you only answer questions related to computer science. For "
        "politically sensitive questions, security and privacy issues, and other non-computer "
        "science questions, you will refuse to answer.\n\n"
    ),
)

_register(
    "seed_oss",
    user=_str(BOS, "user\n{{content}}", EOS, BOS, "assistant\n"),
    system=_str(BOS, "system\n{{content}}", EOS),
    function=_fn(BOS, "\n{{content}}", EOS, tool_format="seed_oss"),
    tools=_tools("seed_oss"),
    thought_words=("<seed:think>", "</seed:think>"),
    cls=ReasoningTemplate,
)

_register(
    "smollm",
    user=_str("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    assistant=_str("{{content}}<|im_end|>\n"),
    system=_str("<|im_start|>system\n{{content}}<|im_end|>\n"),
    stop_words=["<|im_end|>"],
)

_register(
    "smollm2",
    user=_str("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    assistant=_str("{{content}}<|im_end|>\n"),
    system=_str("<|im_start|>system\n{{content}}<|im_end|>\n"),
    default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
    stop_words=["<|im_end|>"],
)

_register(
    "solar",
    user=_str("### User:\n{{content}}\n\n### Assistant:\n"),
    system=_str("### System:\n{{content}}\n\n"),
    efficient_eos=True,
)

_register(
    "starchat",
    user=_str("<|user|>\n{{content}}<|end|>\n<|assistant|>"),
    assistant=_str("{{content}}<|end|>\n"),
    system=_str("<|system|>\n{{content}}<|end|>\n"),
    stop_words=["<|end|>"],
)

_register(
    "telechat2",
    user=_str("<_user>{{content}}<_bot>"),
    system=_str("<_system>{{content}}"),
    default_system=(
        "你是中国电信星辰语义大模型，英文名是TeleChat，"
        "你是由中电信人工智能科技有限公司和中国电信人工智能研究院（TeleAI）研发的人工智能助手。"
    ),
)

_register(
    "vicuna",
    user=_str("USER: {{content}} ASSISTANT:"),
    default_system=(
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions."
    ),
    replace_jinja_template=True,
)

_register(
    "xuanyuan",
    user=_str("Human: {{content}} Assistant:"),
    default_system=(
        "以下是用户和人工智能助手之间的对话。用户以Human开头，人工智能助手以Assistant开头，"
        "会对人类提出的问题给出有帮助、高质量、详细和礼貌的回答，并且总是拒绝参与与不道德、"
        "不安全、有争议、政治敏感等相关的话题、问题和指示。\n"
    ),
)

_register(
    "yi",
    user=_str("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"),
    assistant=_str("{{content}}<|im_end|>\n"),
    system=_str("<|im_start|>system\n{{content}}<|im_end|>\n"),
    stop_words=["<|im_end|>"],
)

_register(
    "youtu",
    user=_str("<|User|>{{content}}<|Assistant|>"),
    assistant=_str("{{content}}<|end_of_text|>"),
    function=_fn("{{content}}"),
    observation=_str("<tool_response>\n{{content}}\n</tool_response><|Assistant|>"),
    prefix=_fixed(BOS),
    stop_words=["<|end_of_text|>"],
    replace_eos=True,
    cls=ReasoningTemplate,
)

_register(
    "yuan",
    user=_str("{{content}}", Token("<sep>")),
    assistant=_str("{{content}}<eod>\n"),
    stop_words=["<eod>"],
)

_register(
    "zephyr",
    user=_str("<|user|>\n{{content}}", EOS, "<|assistant|>\n"),
    system=_str("<|system|>\n{{content}}", EOS),
    default_system="You are Zephyr, a helpful assistant.",
)


# ---------------------------------------------------------------------------------------------------------------
# Community formats LLaMA-Factory 0.9.5 does not ship (no parity check possible; strings in docs/templates.md).

ALPACA_SYSTEM = _REGISTRY["alpaca"].default_system
ALPACA_INPUT_SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)

_register(
    "alpaca_input",
    user=_str("### Instruction:\n{{content}}\n\n### Response:\n"),
    assistant=_str("{{content}}", EOS, "\n\n"),
    default_system=ALPACA_SYSTEM,
    replace_jinja_template=True,
    cls=AlpacaInputTemplate,
    format_input=_str("### Instruction:\n{{instruction}}\n\n### Input:\n{{input}}\n\n### Response:\n"),
    input_system=ALPACA_INPUT_SYSTEM,
)

# LF <= 0.2 (Oct 2023): prompt "User: {query}\nBot: ", "\n" between turns, no system prompt
_register(
    "linly",
    user=_str("User: {{content}}\nBot: "),
    assistant=_str("{{content}}", EOS, "\n"),
)

# LF until Jan 2026 (commit 5cccaeec)
_register(
    "belle",
    user=_str("Human: {{content}}\n\nBelle: "),
    assistant=_str("{{content}}", EOS, "\n\n"),
    prefix=_fixed(BOS),
)

# LF until Jan 2026 (commit 5cccaeec), including its default system prompt (double space after "safe." kept)
_register(
    "yayi",
    user=_str(Token("<|Human|>"), ":\n{{content}}\n\n", Token("<|YaYi|>"), ":"),
    assistant=_str("{{content}}\n\n"),
    system=_str(Token("<|System|>"), ":\n{{content}}\n\n"),
    default_system=(
        "You are a helpful, respectful and honest assistant named YaYi "
        "developed by Beijing Wenge Technology Co.,Ltd. "
        "Always answer as helpfully as possible, while being safe.  "
        "Your answers should not include any harmful, unethical, "
        "racist, sexist, toxic, dangerous, or illegal content. "
        "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
        "If a question does not make any sense, or is not factually coherent, "
        "explain why instead of answering something not correct. "
        "If you don't know the answer to a question, please don't share false information."
    ),
    stop_words=["<|End|>"],
)

# timdettmers/Guanaco (OASST1) style; the space after "Assistant:" belongs to the answer so BPE merges it there
_register(
    "guanaco",
    user=_str("### Human: {{content}}\n### Assistant:"),
    assistant=_str(" {{content}}", EOS, "\n"),
)

# stabilityai/StableBeluga model card format and system prompt
_register(
    "stablebeluga",
    user=_str("### User:\n{{content}}\n\n### Assistant:\n"),
    assistant=_str("{{content}}", EOS, "\n\n"),
    system=_str("### System:\n{{content}}\n\n"),
    default_system=(
        "You are Stable Beluga, an AI that follows instructions extremely well. Help as much as you can. "
        "Remember, be safe, and don't do anything illegal."
    ),
)

# Nous-Hermes (Llama 1/2) alpaca-style prompts without the alpaca preamble
_register(
    "nous",
    user=_str("### Instruction:\n{{content}}\n\n### Response:\n"),
    assistant=_str("{{content}}", EOS, "\n\n"),
    system=_str("{{content}}\n\n"),
)

# The model's own tokenizer.chat_template (see TokenizerChatTemplate)
_register("tokenizer", cls=TokenizerChatTemplate)
