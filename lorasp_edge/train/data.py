"""The training data stream: read lazily, tokenized on the fly, packed into seq_len blocks.

Every example becomes token ids plus a loss mask, then an eos; examples are concatenated into one
global token sequence that is cut into blocks of exactly seq_len (no padding, an example longer
than a block spans blocks, the tail carries into the next block and across epochs):

    example 1            eos  example 2                   eos  example 3 ...
    [ block 0              ][ block 1              ][ block 2              ] ...
      rank 0                 rank 1                  rank 0                    (world_size 2)

    labels = input_ids where the loss applies, -100 where it is masked (the model shifts them)

Formats, by file suffix (one example per line, lines read whole):
- `.jsonl` / `.json`: JSON objects with `text` (all trained); `prompt` + `completion`, tokenized
  separately and concatenated so the boundary is exact (loss on the completion only); or chat
  `messages` [{role, content}], rendered with the tokenizer's chat template, loss on assistant
  turns only. An assistant turn's span is the text between the render of the turns before it with
  the generation prompt and the render up to and including it (template end markers included), so
  the template must render earlier turns as a prefix; the full text is tokenized once and a token
  is trained when it starts inside a span. Blank lines are skipped.
- `.txt`: each line is tokenized with its newline; a blank line ends a document (eos).
No BOS is added (`add_special_tokens=False`). The eos takes the mask of the example's last token:
trained after a completion or an assistant turn, masked after a prompt.

Sharding: block k of the global sequence goes to rank k % world_size, so at every step the blocks
taken by W ranks with micro_batch B are the blocks one rank takes with micro_batch B * W. The cost:
every rank reads and tokenizes the whole file and discards the other ranks' blocks (a block is a
list slice, never a tensor); tokenizing is small beside a training step.

Memory and resume: the stream holds one line, its tokens and the packing buffer (at most seq_len - 1
tokens plus one example's). `state_dict()` holds exactly that position: byte offset and number of
the next unread line, epoch, the buffer's ids and mask, the global block counter and the bad-line
count; `load_state_dict` seeks to the offset and the next batches equal those of an uninterrupted
stream. The state does not grow with the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lorasp_edge.errors import DataError

STATE_FORMAT = "lorasp-edge-data/1"
IGNORE_INDEX = -100
JSON_SUFFIXES = (".jsonl", ".json")


class _BadLine(Exception):
    """A line that cannot become an example; the message says why."""


def _encode(tokenizer, text: str) -> list[int]:
    # The Rust tokenizer directly: about 2.5x faster per line than the transformers wrapper.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def _render(tokenizer, messages: list, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:  # jinja raises many kinds; the line is what the user can fix
        raise _BadLine(f"the chat template failed: {error}") from error


def _encode_chat(tokenizer, messages) -> tuple[list[int], list[int]]:
    if not isinstance(messages, list) or not messages:
        raise _BadLine("'messages' must be a non-empty list")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise _BadLine("each message needs a string 'role' and a string 'content'")
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise _BadLine("the chat template does not render earlier turns as a prefix, so assistant turns cannot be masked")
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start <= first < end for start, end in spans)) for first, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


class PackedStream:
    """Blocks of seq_len tokens from one data file, for one data-parallel rank.

    epochs=None cycles through the file without end (the trainer stops by step count); an int
    ends the stream after that many passes, dropping the last partial block.
    """

    def __init__(
        self,
        path: str | Path,
        tokenizer,
        seq_len: int,
        *,
        skip_bad_lines: bool = False,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such data file")
        suffix = self.path.suffix.lower()
        if suffix not in JSON_SUFFIXES + (".txt",):
            raise DataError(f"{self.path}: unknown data format '{suffix}'; use .jsonl (text, prompt/completion or messages) or .txt")
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos token, which separates packed examples")
        if seq_len < 1 or not 0 <= rank < world_size or (epochs is not None and epochs < 1):
            raise ValueError(f"need seq_len >= 1, 0 <= rank < world_size, epochs >= 1: got {seq_len}, {rank}, {world_size}, {epochs}")
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.skip_bad_lines, self.rank, self.world_size, self.epochs = skip_bad_lines, rank, world_size, epochs
        self.is_text = suffix == ".txt"
        self.eos = tokenizer.eos_token_id
        self._file = None
        # The position: state_dict() holds these fields (and checks against the wrong file or world).
        self.offset, self.line, self.epoch = 0, 0, 0
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.block = 0  # next global block index
        self.blocks_taken = 0  # blocks this rank returned
        self.bad_lines = 0
        self.document_open = False  # .txt: lines read since the last eos
        self.ended = False

    @property
    def tokens_seen(self) -> int:
        """Tokens in the blocks this rank returned."""
        return self.blocks_taken * self.seq_len

    # -- reading

    def _readline(self) -> bytes:
        if self._file is None:
            self._file = open(self.path, "rb")
            self._file.seek(self.offset)
        raw = self._file.readline()
        self.offset += len(raw)
        self.line += 1 if raw else 0
        return raw

    def _next_example(self) -> tuple[list[int], list[int]] | None:
        """ids and mask of the next example in this pass, eos included; None at the end of the file."""
        while raw := self._readline():
            try:
                example = self._encode_text_line(raw) if self.is_text else self._encode_json_line(raw)
            except _BadLine as error:
                if not self.skip_bad_lines:
                    raise DataError(f"{self.path}:{self.line}: {error} (--skip-bad-lines skips such lines)") from None
                self.bad_lines += 1
                continue
            if example is not None:
                return example
        if self.document_open:  # .txt: the file's last document ends at EOF
            self.document_open = False
            return [self.eos], [1]
        return None

    def _read_example(self) -> bool:
        """Append the next example to the buffer, crossing epochs; False once the stream ends."""
        while (example := self._next_example()) is None:
            if self.epoch == 0 and self.block == 0:
                skipped = f" ({self.bad_lines} bad lines skipped)" if self.bad_lines else ""
                raise DataError(f"{self.path} holds {len(self.ids)} tokens{skipped}, fewer than one block of seq_len={self.seq_len}")
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                self.ended = True
                return False
            self.epoch, self.offset, self.line = self.epoch + 1, 0, 0
            self._file.seek(0)
        self.ids += example[0]
        self.mask += example[1]
        return True

    def _with_eos(self, ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
        return ids + [self.eos], mask + [mask[-1] if mask else 1]

    def _encode_json_line(self, raw: bytes) -> tuple[list[int], list[int]] | None:
        """ids and loss mask of one JSONL line, eos appended; None for a blank line."""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _BadLine(f"not UTF-8 ({error.reason} at byte {error.start})") from error
        if not line.strip():
            return None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise _BadLine(f"invalid JSON ({error.msg} at column {error.colno})") from error
        if not isinstance(record, dict):
            raise _BadLine(f"expected a JSON object, got {type(record).__name__}")
        if "messages" in record:
            if self.tokenizer.chat_template is None:
                raise DataError(f"{self.path}:{self.line}: chat 'messages' need a tokenizer with a chat template; this one has none")
            return self._with_eos(*_encode_chat(self.tokenizer, record["messages"]))
        if "prompt" in record or "completion" in record:
            prompt, completion = record.get("prompt"), record.get("completion")
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise _BadLine("'prompt' and 'completion' must both be strings")
            prompt_ids, completion_ids = _encode(self.tokenizer, prompt), _encode(self.tokenizer, completion)
            return self._with_eos(prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids))
        if "text" in record:
            if not isinstance(record["text"], str):
                raise _BadLine("'text' must be a string")
            ids = _encode(self.tokenizer, record["text"])
            return self._with_eos(ids, [1] * len(ids))
        raise _BadLine(f"no 'text', 'prompt'/'completion' or 'messages' key (keys: {', '.join(sorted(record)) or 'none'})")

    def _encode_text_line(self, raw: bytes) -> tuple[list[int], list[int]] | None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _BadLine(f"not UTF-8 ({error.reason} at byte {error.start})") from error
        if not text.strip():
            if not self.document_open:
                return None
            self.document_open = False
            return [self.eos], [1]
        self.document_open = True
        ids = _encode(self.tokenizer, text)
        return ids, [1] * len(ids)

    def _next_global_block(self) -> tuple[list[int], list[int]] | None:
        while len(self.ids) < self.seq_len:
            if self.ended or not self._read_example():
                return None
        ids, mask = self.ids[: self.seq_len], self.mask[: self.seq_len]
        del self.ids[: self.seq_len], self.mask[: self.seq_len]
        self.block += 1
        return ids, mask

    # -- blocks and batches

    def next_block(self) -> dict | None:
        """This rank's next block as {"input_ids", "labels"} LongTensors [seq_len]; None at the end."""
        while True:
            index = self.block
            block = self._next_global_block()
            if block is None:
                return None
            if index % self.world_size == self.rank:
                self.blocks_taken += 1
                ids, mask = block
                labels = [token if trained else IGNORE_INDEX for token, trained in zip(ids, mask)]
                return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}

    def __iter__(self):
        while (block := self.next_block()) is not None:
            yield block

    def next_batch(self, micro_batch: int) -> dict | None:
        """micro_batch blocks stacked to [micro_batch, seq_len]; None when fewer are left (the stream ended)."""
        blocks = []
        for _ in range(micro_batch):
            block = self.next_block()
            if block is None:
                return None
            blocks.append(block)
        return {key: torch.stack([block[key] for block in blocks]) for key in ("input_ids", "labels")}

    # -- position

    def state_dict(self) -> dict:
        """The exact position, JSON- and torch.save-able; its size does not grow with the file."""
        return {
            "format": STATE_FORMAT,
            "path": str(self.path),
            "file_bytes": self.path.stat().st_size,
            "seq_len": self.seq_len,
            "rank": self.rank,
            "world_size": self.world_size,
            "offset": self.offset,
            "line": self.line,
            "epoch": self.epoch,
            "block": self.block,
            "blocks_taken": self.blocks_taken,
            "bad_lines": self.bad_lines,
            "document_open": self.document_open,
            "ended": self.ended,
            "ids": list(self.ids),
            "mask": list(self.mask),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"the data position has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        saved = (state["seq_len"], state["rank"], state["world_size"])
        if saved != (self.seq_len, self.rank, self.world_size):
            raise DataError(
                f"the data position was saved with (seq_len, rank, world_size)={saved}, "
                f"this run has {(self.seq_len, self.rank, self.world_size)}"
            )
        size = self.path.stat().st_size
        if state["file_bytes"] != size:
            raise DataError(f"{self.path} has {size} bytes, but {state['file_bytes']} when the data position was saved: the file changed")
        for key in ("offset", "line", "epoch", "block", "blocks_taken", "bad_lines", "document_open", "ended"):
            setattr(self, key, state[key])
        self.ids, self.mask = list(state["ids"]), list(state["mask"])
        if self._file is not None:
            self._file.seek(self.offset)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def eval_batches(path: str | Path, tokenizer, seq_len: int, micro_batch: int, max_blocks: int = 16) -> list[dict]:
    """The first max_blocks blocks of one pass over `path`, in batches of micro_batch (the last
    may be smaller): the same list on every call and every rank."""
    stream = PackedStream(path, tokenizer, seq_len, epochs=1)
    blocks = []
    while len(blocks) < max_blocks and (block := stream.next_block()) is not None:
        blocks.append(block)
    stream.close()
    return [
        {key: torch.stack([block[key] for block in blocks[start : start + micro_batch]]) for key in ("input_ids", "labels")}
        for start in range(0, len(blocks), micro_batch)
    ]


def estimate_blocks(path: str | Path, tokenizer, seq_len: int, sample_bytes: int = 1 << 20) -> int:
    """Blocks in one pass over `path`, estimated from the first sample_bytes (whole lines) and the
    file size; exact when the file is no larger than the sample. An estimate: it assumes the rest of
    the file tokenizes like its start. Bad lines in the sample are skipped here; the training stream
    reports them, and reports empty data (this returns 0 for it)."""
    stream = PackedStream(path, tokenizer, seq_len, skip_bad_lines=True, epochs=1)
    tokens = 0
    while stream.offset < sample_bytes and (example := stream._next_example()) is not None:
        tokens += len(example[0])
    stream.close()
    file_bytes = os.path.getsize(path)
    return round(tokens * file_bytes / max(stream.offset, 1)) // seq_len
