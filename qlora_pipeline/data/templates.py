"""Prompt templates: how an (instruction, input, output) row becomes a prompt and a completion.

Every template is a Jinja chat template, rendered by the tokenizer's own `apply_chat_template`. Training renders
the prompt with `add_generation_prompt=True` and the full exchange without it; the completion is what the full
exchange adds. The export stores the same chat template, so at inference `apply_chat_template(...,
add_generation_prompt=True)` yields exactly the prompt tokens the model was trained on.

The templates write `{{ bos_token }}` themselves and the text is tokenized with `add_special_tokens=False`, so each
example carries exactly one BOS (tokenizing the rendered text with special tokens on would add a second one).
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_pipeline.errors import DataError

# Starling-LM-7B-alpha's own chat template (OpenChat 3.5 format), as shipped in its tokenizer_config.json.
STARLING_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ 'GPT4 Correct ' + message['role'].title() + ': ' + "
    "message['content'] + '<|end_of_turn|>'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'GPT4 Correct Assistant:' }}{% endif %}"
)
STARLING_END_OF_TURN = "<|end_of_turn|>"

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
# The Stanford Alpaca format; the response ends with the tokenizer's EOS so the model learns to stop.
ALPACA_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '" + ALPACA_PREAMBLE.replace("\n", "\\n") + "### Instruction:\\n' + "
    "message['content'] + '\\n\\n### Response:\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    chat_template: str | None  # None: use the tokenizer's own chat_template
    input_separator: str  # between instruction and input in the user turn
    end_token: str | None  # the token that closes an answer; None: the tokenizer's EOS

    def user_content(self, instruction: str, input_text: str | None) -> str:
        return f"{instruction}{self.input_separator}{input_text}" if input_text else instruction

    def messages(self, instruction: str, input_text: str | None, output: str | None = None) -> list[dict]:
        turns = [{"role": "user", "content": self.user_content(instruction, input_text)}]
        if output is not None:
            turns.append({"role": "assistant", "content": output})
        return turns

    def chat_template_for(self, tokenizer) -> str:
        if self.chat_template is not None:
            return self.chat_template
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"template 'tokenizer': the tokenizer of {tokenizer.name_or_path!r} has no chat_template; "
                f"use template: starling or alpaca"
            )
        return tokenizer.chat_template

    def end_token_for(self, tokenizer) -> str:
        return self.end_token or tokenizer.eos_token

    def render(self, tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template_for(tokenizer),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def prompt_and_completion(
        self, tokenizer, instruction: str, input_text: str | None, output: str
    ) -> tuple[str, str]:
        """The prompt text (what inference sees) and the completion text (what the model learns to write)."""
        prompt = self.render(tokenizer, self.messages(instruction, input_text), add_generation_prompt=True)
        full = self.render(tokenizer, self.messages(instruction, input_text, output), add_generation_prompt=False)
        if not full.startswith(prompt):
            raise DataError(
                f"template '{self.name}': the rendered prompt is not a prefix of the rendered exchange, so the "
                f"prompt cannot be masked from the loss; prompt ends {prompt[-40:]!r}, "
                f"exchange has {full[: len(prompt)][-40:]!r}"
            )
        return prompt, full[len(prompt) :]


TEMPLATES: dict[str, PromptTemplate] = {
    "starling": PromptTemplate("starling", STARLING_CHAT_TEMPLATE, "\n\n", STARLING_END_OF_TURN),
    "alpaca": PromptTemplate("alpaca", ALPACA_CHAT_TEMPLATE, "\n\n### Input:\n", None),
    "tokenizer": PromptTemplate("tokenizer", None, "\n\n", None),
}


def get_template(name: str) -> PromptTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise DataError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}") from None
