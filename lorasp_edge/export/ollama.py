"""A Modelfile beside the GGUF, so that `ollama create NAME -f Modelfile` works.

Ollama's TEMPLATE is a Go template, the tokenizer's chat template Jinja. Rather than translate
Jinja, the Jinja template is rendered on conversations whose contents are unique markers, and the
text around each marker gives the wrapper of each role:

    [system S, user U, assistant A]  ->  sys_prefix S sys_suffix  user_prefix U user_suffix  asst_prefix A asst_suffix
    [user U] + generation prompt      ->  ... user_prefix U user_suffix asst_prefix

The wrappers are then reassembled into a Go template and checked: the same reassembly, done in
Python, must give exactly the Jinja template's text on a three-turn conversation with a system
message and on one without (where a template's default system message shows up). When a chat
template does not fit this shape (roles with other wrappers, content rewritten), the Modelfile
leaves TEMPLATE out, says so in a comment, and Ollama falls back to its own detection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from jinja2 import TemplateError

SYSTEM, USER, ASSISTANT, USER2 = "\x01S\x01", "\x01U\x01", "\x01A\x01", "\x01V\x01"  # contents that no template rewrites


@dataclass
class ChatPieces:
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    default_system: str | None  # the system message the template adds when none is given

    def render(self, system: str | None, messages: list[tuple[str, str]]) -> str:
        """What the Go template below produces (Ollama passes the system message as .System)."""
        system = system if system is not None else self.default_system
        text = f"{self.system_prefix}{system}{self.system_suffix}" if system else ""
        for role, content in messages:
            if role == "user":
                text += f"{self.user_prefix}{content}{self.user_suffix}"
            elif role == "assistant":
                text += f"{self.assistant_prefix}{content}{self.assistant_suffix}"
        return text + self.assistant_prefix

    def go_template(self) -> str:
        return (
            "{{ if .System }}" + self.system_prefix + "{{ .System }}" + self.system_suffix + "{{ end }}"
            "{{ range .Messages }}{{ if eq .Role \"user\" }}" + self.user_prefix + "{{ .Content }}" + self.user_suffix
            + "{{ else if eq .Role \"assistant\" }}" + self.assistant_prefix + "{{ .Content }}" + self.assistant_suffix
            + "{{ end }}{{ end }}" + self.assistant_prefix
        )


def _render(tokenizer, messages: list[tuple[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [{"role": role, "content": content} for role, content in messages], tokenize=False, add_generation_prompt=generation_prompt,
    )


def _split(text: str, *markers: str) -> list[str] | None:
    """The text before, between and after the markers, or None when they are not there in order once."""
    pieces, rest = [], text
    for marker in markers:
        if rest.count(marker) != 1:
            return None
        before, rest = rest.split(marker)
        pieces.append(before)
    return [*pieces, rest]


def chat_pieces(tokenizer) -> ChatPieces | None:
    """Each role's wrapper, read off the rendered chat template; None when it does not fit the shape."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        full = _split(_render(tokenizer, [("system", SYSTEM), ("user", USER), ("assistant", ASSISTANT)], False), SYSTEM, USER, ASSISTANT)
        more = _split(_render(tokenizer, [("system", SYSTEM), ("user", USER), ("assistant", ASSISTANT), ("user", USER2)], True), ASSISTANT, USER2)
        plain = _render(tokenizer, [("user", USER)], False)
        prompted = _render(tokenizer, [("user", USER)], True)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError):  # a template may refuse a role order
        return None
    if full is None or more is None or not prompted.startswith(plain):
        return None
    system_prefix, system_user, user_assistant, assistant_suffix = full
    tail = more[1]  # after A: assistant_suffix, user_prefix
    if not tail.startswith(assistant_suffix):
        return None
    user_prefix = tail[len(assistant_suffix):]
    assistant_prefix = prompted[len(plain):]
    if not system_user.endswith(user_prefix) or not user_assistant.endswith(assistant_prefix):
        return None
    pieces = ChatPieces(
        system_prefix, system_user[: len(system_user) - len(user_prefix)], user_prefix,
        user_assistant[: len(user_assistant) - len(assistant_prefix)], assistant_prefix, assistant_suffix, None,
    )
    # A default system message: whatever the template puts before the user turn when none is given.
    lead = _split(plain, USER)
    if lead is None or not lead[0].endswith(user_prefix):
        return None
    default = lead[0][: len(lead[0]) - len(user_prefix)]
    if default:
        if not (default.startswith(pieces.system_prefix) and default.endswith(pieces.system_suffix)):
            return None
        pieces.default_system = default[len(pieces.system_prefix): len(default) - len(pieces.system_suffix)]
    return pieces if _reproduces(tokenizer, pieces) else None


def _reproduces(tokenizer, pieces: ChatPieces) -> bool:
    """The Go template's text equals the Jinja template's, with and without a system message."""
    turns = [("user", "Hi there."), ("assistant", "Hello! How can I help?"), ("user", "Name a colour.")]
    for system in ("Answer briefly.", None):
        messages = ([("system", system)] if system else []) + turns
        if pieces.render(system, turns) != _render(tokenizer, messages, True):
            return False
    return "{{" not in "".join(vars(pieces)[key] or "" for key in vars(pieces))


def stop_words(tokenizer, eos_ids: set[int], pieces: ChatPieces | None) -> list[str]:
    """EOS tokens and the special tokens that end a turn in the chat template."""
    words = [tokenizer.convert_ids_to_tokens(index) for index in sorted(eos_ids)]
    if pieces is not None:
        for token in tokenizer.all_special_tokens + [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]:
            if token and token in pieces.user_suffix + pieces.assistant_suffix and token not in words:
                words.append(token)
    return words


def modelfile(gguf_name: str, tokenizer, eos_ids: set[int], generation_config, adapter: str | None = None) -> tuple[str, bool]:
    """The Modelfile's text and whether it carries a TEMPLATE derived from the chat template.
    `adapter` names a LoRA adapter GGUF beside the base, applied by Ollama's ADAPTER instruction."""
    pieces = chat_pieces(tokenizer)
    lines = [f"FROM ./{gguf_name}", *([f"ADAPTER ./{adapter}"] if adapter else []), ""]
    if pieces is not None:
        lines += [f'TEMPLATE """{pieces.go_template()}"""']
        if pieces.default_system:
            lines += [f"SYSTEM {json.dumps(pieces.default_system)}"]
    else:
        lines += ["# No TEMPLATE: the chat template could not be expressed as per-role wrappers; Ollama detects one itself."]
    for word in stop_words(tokenizer, eos_ids, pieces):
        lines.append(f"PARAMETER stop {json.dumps(word)}")
    sampling = bool(getattr(generation_config, "do_sample", False))
    lines.append(f"PARAMETER temperature {getattr(generation_config, 'temperature', 1.0) if sampling else 0}")
    if sampling and getattr(generation_config, "top_p", None) is not None:
        lines.append(f"PARAMETER top_p {generation_config.top_p}")
    if sampling and getattr(generation_config, "top_k", None) is not None:
        lines.append(f"PARAMETER top_k {generation_config.top_k}")
    return "\n".join(lines) + "\n", pieces is not None
