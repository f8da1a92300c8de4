"""One data line (or one .txt line) -> an example: token ids, a loss mask, and whether it is whole.

    text                 ids = [bos] text [eos]              mask = 1 ...   continuous: may span blocks
    prompt/completion    ids = [bos] prompt completion [eos] mask = 0.. 1.. whole: never split
    messages (chat)      ids = render(messages) [eos]        mask = 1 on assistant turns, whole

The eos takes the mask of the example's last token: trained after a completion or an assistant
turn, masked after a prompt. A whole example's first token is never a target: in a packed block it
would be predicted from the previous example. BOS is added where the tokenizer adds one itself
(`tokenizer(text)` starts with it; Llama, Mistral, Gemma), so training sees what non-chat
generation feeds; a chat template writes its own BOS, so chat lines get none added.

A whole example longer than seq_len loses prompt tokens from its left (after the BOS). When that
would cut a trained token, the line is refused like a malformed one (--skip-bad-lines skips it).
A prompt of more than `long_text_chars` characters is cut to its last `long_text_chars` before it
is tokenized (the tokens kept are a block's worth at most; tokenizing all of a huge prompt only to
drop it would cost memory past the plan), and the first token of the cut text is dropped (it may
be the tail of a word).

Long text. A text longer than `long_text_chars` characters (16 tokens' worth of characters per
position of a block) is not tokenized at once: `json_line`/`text_line` return `LongText`, and the
stream encodes it piece by piece (`text_piece`), so memory follows the block, not the line. A piece
ends at the last whitespace before the limit when there is one in its second half, so words stay
whole; the tokens at a cut can differ from those of one whole encoding, as at any chunk boundary.
Text UTF-8 with a byte-order mark (as Windows editors write) reads as UTF-8.
"""

from __future__ import annotations

import json

IGNORE_INDEX = -100


# Characters of text tokenized at once, per token of a block: a piece holds a few blocks' tokens.
LONG_TEXT_CHARS_PER_TOKEN = 16


class BadLine(Exception):
    """A line that cannot become an example; the message says why."""


class LongText:
    """A text too long to tokenize at once: the stream asks `ExampleEncoder.text_piece` for it
    piece by piece. `eos`: the text ends an example (JSONL); `bos`: a BOS goes before it."""

    def __init__(self, text: str, bos: bool, eos: bool):
        self.text, self.bos, self.eos = text, bos, eos


def encode(tokenizer, text: str) -> list[int]:
    # The Rust tokenizer directly: about 2.5x faster per line than the transformers wrapper.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def bos_to_add(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one in front of plain text by itself, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos if with_special[:1] == [bos] and without[:1] != [bos] else None


def _render(tokenizer, messages: list, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:  # jinja raises many kinds; the line is what the user can fix
        raise BadLine(f"the chat template failed: {error}") from error


def encode_chat(tokenizer, messages) -> tuple[list[int], list[int]]:
    """ids and mask of a rendered conversation; a token is trained when it starts inside an
    assistant turn's span (the text between the render of the turns before it with the generation
    prompt and the render through it, so the template must render earlier turns as a prefix)."""
    if not isinstance(messages, list) or not messages:
        raise BadLine("'messages' must be a non-empty list")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise BadLine("each message needs a string 'role' and a string 'content'")
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise BadLine("the chat template does not render earlier turns as a prefix, so assistant turns cannot be masked")
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start <= first < end for start, end in spans)) for first, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


class ExampleEncoder:
    """Turns raw lines into (ids, mask, whole) for one tokenizer and seq_len."""

    def __init__(self, tokenizer, seq_len: int):
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.eos = tokenizer.eos_token_id
        self.bos = bos_to_add(tokenizer)
        self.long_text_chars = max(4096, LONG_TEXT_CHARS_PER_TOKEN * seq_len)

    def text_piece(self, long: LongText, start: int) -> tuple[tuple[list[int], list[int], bool], int]:
        """The example of the piece of `long` from character `start`, and where the next one starts
        (len(text) after the last piece)."""
        text, end = long.text, min(len(long.text), start + self.long_text_chars)
        if end < len(text):
            cut = max(text.rfind(" ", start + self.long_text_chars // 2, end), text.rfind("\n", start + self.long_text_chars // 2, end))
            end = cut + 1 if cut > 0 else end
        ids = encode(self.tokenizer, text[start:end])
        mask = [1] * len(ids)
        if start == 0 and long.bos:
            ids, mask = self._with_bos(ids, mask)
        if end == len(text) and long.eos:
            ids, mask = self._with_eos(ids, mask)
        return (ids, mask, False), end

    def _with_eos(self, ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
        return ids + [self.eos], mask + [mask[-1] if mask else 1]

    def _with_bos(self, ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
        return ([self.bos] + ids, [0] + mask) if self.bos is not None else (ids, mask)

    def json_line(self, raw: bytes) -> tuple[list[int], list[int], bool] | LongText | None:
        """The example of one JSONL line; LongText for a long text; None for a blank line."""
        try:
            line = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise BadLine(f"not UTF-8 ({error.reason} at byte {error.start})") from error
        if not line.strip():
            return None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise BadLine(f"invalid JSON ({error.msg} at column {error.colno})") from error
        if not isinstance(record, dict):
            raise BadLine(f"expected a JSON object, got {type(record).__name__}")
        if "messages" in record:
            if self.tokenizer.chat_template is None:
                raise NoChatTemplate()
            return self._whole(*self._with_eos(*encode_chat(self.tokenizer, record["messages"])))
        if "prompt" in record or "completion" in record:
            prompt, completion = record.get("prompt"), record.get("completion")
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise BadLine("'prompt' and 'completion' must both be strings")
            cut = len(prompt) > self.long_text_chars
            prompt_ids = encode(self.tokenizer, prompt[-self.long_text_chars:])[int(cut):]
            completion_ids = encode(self.tokenizer, completion)
            ids, mask = self._with_bos(prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids))
            return self._whole(*self._with_eos(ids, mask))
        if "text" in record:
            if not isinstance(record["text"], str):
                raise BadLine("'text' must be a string")
            if len(record["text"]) > self.long_text_chars:
                return LongText(record["text"], bos=True, eos=True)
            ids = encode(self.tokenizer, record["text"])
            return (*self._with_eos(*self._with_bos(ids, [1] * len(ids))), False)
        raise BadLine(f"no 'text', 'prompt'/'completion' or 'messages' key (keys: {', '.join(sorted(record)) or 'none'})")

    def text_line(self, raw: bytes, first_in_document: bool) -> tuple[list[int], list[int], bool] | LongText:
        """One non-blank .txt line, newline included (continuous; BOS before a document's first line)."""
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise BadLine(f"not UTF-8 ({error.reason} at byte {error.start})") from error
        if len(text) > self.long_text_chars:
            return LongText(text, bos=first_in_document, eos=False)
        ids = encode(self.tokenizer, text)
        mask = [1] * len(ids)
        if first_in_document:
            ids, mask = self._with_bos(ids, mask)
        return ids, mask, False

    def _whole(self, ids: list[int], mask: list[int]) -> tuple[list[int], list[int], bool]:
        """Fit a whole example into seq_len by dropping prompt tokens from the left (after BOS)."""
        excess = len(ids) - self.seq_len
        if excess > 0:
            head = 1 if self.bos is not None and ids[:1] == [self.bos] else 0
            if any(mask[head : head + excess]):
                trained = len(ids) - mask.index(1)
                raise BadLine(
                    f"an example of {len(ids)} tokens does not fit seq_len={self.seq_len}, and dropping prompt tokens "
                    f"cannot fit it ({trained} tokens from its first trained token on)"
                )
            ids, mask = ids[:head] + ids[head + excess :], mask[:head] + mask[head + excess :]
        return ids, [0] + mask[1:], True


class NoChatTemplate(Exception):
    """Chat data with a tokenizer that has no template: a problem with the run, not with one line."""
