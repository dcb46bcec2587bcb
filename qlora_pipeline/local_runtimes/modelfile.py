"""The Ollama Modelfile: the training chat template rewritten as Ollama's Go template, and its stop token.

Ollama renders `TEMPLATE` with Go's text/template over the conversation (`.Messages`, each with `.Role` and
`.Content`) and tokenizes the text with the GGUF file's own BOS rule. So the Go template is the training template
with its leading BOS left out (llama.cpp adds the BOS token, as training had it), and for each role the text around
the message. Those pieces are read off the training template itself, by rendering it over marker messages; a
template that is not "the same wrapper around every message of a role" gets no Modelfile rather than an
approximate one (turn_text raises; the export goes on without it).
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_pipeline.errors import PipelineError

MARKERS = {
    "system": ["\x01system\x01"],
    "user": ["\x01user-1\x01", "\x01user-2\x01"],
    "assistant": ["\x01assistant-1\x01"],
}


@dataclass(frozen=True)
class TurnText:
    """The text the training template writes around each message, by role."""

    bos: str  # what the template writes first (the BOS token's text), left to llama.cpp's add_bos
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation_prompt: str  # what starts the model's answer (add_generation_prompt)
    system: tuple[str, str] | None = None  # None: the template writes no system message

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as these pieces write it, BOS included: must equal the training template's text."""
        text = self.bos
        for message in messages:
            before, after = getattr(self, message["role"]) or ("", "")
            text += before + message["content"] + after
        return text + (self.generation_prompt if add_generation_prompt else "")


def leading_bos(render, bos_token: str | None) -> str:
    """The BOS token's text where the training template writes it first (then llama.cpp must add the BOS token, as
    training had it), else ''."""
    text = render([{"role": "user", "content": MARKERS["user"][0]}], False)
    return bos_token if bos_token and text.startswith(bos_token) else ""


def turn_text(render, bos: str, template_name: str) -> TurnText:
    """The pieces of the training template. `render(messages, add_generation_prompt)` is the training rendering
    (PromptTemplate.render with the export's tokenizer); `bos` what it writes first (`leading_bos`)."""
    user_1, user_2 = ({"role": "user", "content": m} for m in MARKERS["user"])
    assistant_1 = {"role": "assistant", "content": MARKERS["assistant"][0]}
    one_user = render([user_1], False)
    user = _around(one_user[len(bos) :], user_1["content"], template_name)
    generation_prompt = render([user_1], True)[len(one_user) :]
    assistant = _around(render([user_1, assistant_1], False)[len(one_user) :], assistant_1["content"], template_name)
    system = _system_text(render, bos, one_user, template_name)
    pieces = TurnText(bos, user, assistant, generation_prompt, system)
    conversation = [user_1, assistant_1, user_2]
    if system:
        conversation.insert(0, {"role": "system", "content": MARKERS["system"][0]})
    if pieces.render(conversation) != render(conversation, True):
        raise PipelineError(
            f"template '{template_name}': it does not write every message of a role the same way, so it cannot be "
            f"written as an Ollama template (the GGUF files carry it as their chat template all the same)"
        )
    return pieces


def _system_text(render, bos: str, one_user: str, template_name: str) -> tuple[str, str] | None:
    """The text around a system message, or None where the template drops it or refuses the role."""
    system = {"role": "system", "content": MARKERS["system"][0]}
    try:
        text = render([system, {"role": "user", "content": MARKERS["user"][0]}], False)
    except Exception:  # noqa: BLE001 -- a template may raise on a role it does not know
        return None
    user_part = one_user[len(bos) :]
    if system["content"] not in text or not text.endswith(user_part):
        return None
    return _around(text[len(bos) : len(text) - len(user_part)], system["content"], template_name)


def _around(text: str, content: str, template_name: str) -> tuple[str, str]:
    before, found, after = text.partition(content)
    if not found:
        raise PipelineError(f"template '{template_name}': a message's content does not appear in what it renders")
    return before, after


def go_template(pieces: TurnText) -> str:
    """Ollama's TEMPLATE: every message with its role's text, then the generation prompt. No BOS: llama.cpp adds
    it from the GGUF file's add_bos_token, as training did."""
    roles = [("user", pieces.user), ("assistant", pieces.assistant)]
    if pieces.system:
        roles.insert(0, ("system", pieces.system))
    for text in (*(t for _, around in roles for t in around), pieces.generation_prompt):
        if "{{" in text or "}}" in text or '"""' in text:
            raise PipelineError(f"the template text {text!r} cannot be written into a Modelfile TEMPLATE")
    branches = "{{ else if ".join(
        f'eq .Role "{role}" }}}}{before}{{{{ .Content }}}}{after}' for role, (before, after) in roles
    )
    return f"{{{{ range .Messages }}}}{{{{ if {branches}{{{{ end }}}}{{{{ end }}}}{pieces.generation_prompt}"


def modelfile_text(gguf_name: str, pieces: TurnText, stop: str) -> str:
    """The Modelfile beside the GGUF files; `ollama create NAME -f Modelfile` reads it. No SYSTEM line: the
    training templates add no system prompt of their own."""
    lines = [
        "# Ollama: ollama create <name> -f Modelfile   (FROM may name any of the GGUF files in this folder)",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{go_template(pieces)}"""',
        f'PARAMETER stop "{stop}"',
    ]
    return "\n".join(lines) + "\n"


def template_of(modelfile: str) -> str:
    """The TEMPLATE of a Modelfile written by `modelfile_text`."""
    start = modelfile.index('TEMPLATE """') + len('TEMPLATE """')
    return modelfile[start : modelfile.index('"""', start)]
