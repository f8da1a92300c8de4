"""The training data stream: read lazily, shuffled in a bounded buffer, packed into seq_len blocks.

Units and order. A unit is one JSONL line, or one .txt document (lines up to a blank line). A
scanner walks the file and keeps the byte offsets of the next `shuffle_buffer` units; each draw
takes one at random (seeded by the seed and the epoch) and reads it back by offset. Memory holds
offsets, not lines, so it stays flat with file size; shuffle_buffer <= 1 keeps file order.

Packing. Examples (examples.py) go into one token sequence cut into blocks of exactly seq_len:

    text, .txt       continuous: ... eos | next text ...      may span blocks (as pretraining does)
    prompt/completion, chat
                     whole: never split; when one does not fit the rest of a block, that rest is
                     padded (labels -100) and the example starts the next block

    [ text ....... eos text .. ][ ..text eos | whole 1  | whole 2   | pad ][ whole 3 ...
      positions 0 1 2 ...          0 1 2 ...   0 1 2 ..   0 1 2 ...  0 1 ..

Position ids restart at every whole example (and at a pad run or text after one); transformers
builds a block-diagonal causal mask from such position ids when no attention mask is given
(masking_utils.find_packed_sequence_indices), so packed examples do not attend to each other.
Blocks of text alone have positions 0..seq_len-1, which is today's continuous packing.

Sharding: block k of the global sequence goes to rank k % world_size, so at every step the blocks
taken by W ranks with micro_batch B are the blocks one rank takes with micro_batch B * W. Every rank
reads and tokenizes the whole file (same seed, same order) and discards the other ranks' blocks.

Long lines. A text longer than a few blocks' worth of characters (examples.py, LongText) is
tokenized piece by piece through a cursor (its line's offset and the next character), so one
huge line costs a piece in memory, not the line's tokens; the cursor is part of the position.

Resume: `state_dict()` is the exact position: scanner offset, the buffered unit offsets, the
shuffle RNG, the open .txt document, the packing buffer, the block counter. `load_state_dict`
restores it and the next batches equal those of an uninterrupted stream. Its size is bounded by
shuffle_buffer and seq_len, not by the file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from lorasp_edge.errors import DataError
from lorasp_edge.train.examples import (
    IGNORE_INDEX,
    BadLine,
    ExampleEncoder,
    LongText,
    NoChatTemplate,
)

STATE_FORMAT = "lorasp-edge-data/2"
JSON_SUFFIXES = (".jsonl", ".json")

__all__ = ["IGNORE_INDEX", "PackedStream", "check_targets", "estimate_blocks", "eval_batches"]


def _positions(starts: list[int]) -> list[int]:
    positions, position = [], -1
    for index, start in enumerate(starts):
        position = 0 if start or index == 0 else position + 1
        positions.append(position)
    return positions


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
        shuffle_buffer: int = 0,
        seed: int = 0,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such data file")
        suffix = self.path.suffix.lower()
        if suffix not in JSON_SUFFIXES + (".txt",):
            raise DataError(f"{self.path}: unknown data format '{suffix}'; use .jsonl (text, prompt/completion or messages) or .txt")
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos token, which separates packed examples")
        if seq_len < 1 or not 0 <= rank < world_size or (epochs is not None and epochs < 1) or shuffle_buffer < 0:
            raise ValueError(f"need seq_len >= 1, 0 <= rank < world_size, epochs >= 1, shuffle_buffer >= 0: got {seq_len}, {rank}, {world_size}, {epochs}, {shuffle_buffer}")
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.skip_bad_lines, self.rank, self.world_size, self.epochs = skip_bad_lines, rank, world_size, epochs
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.is_text = suffix == ".txt"
        self.encoder = ExampleEncoder(tokenizer, seq_len)
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self._scan_file = self._read_file = None
        self._read_at_offset = None  # where _read_file stands, to skip needless seeks
        # The position: state_dict() holds these fields.
        self.epoch = 0
        self.scan_offset, self.scan_line, self.scan_done = 0, 0, False
        self.pending: list[list[int]] = []  # [offset, line] of buffered units
        self._rng = self._epoch_rng(0)
        self.doc_open, self.doc_first, self.doc_offset, self.doc_line = False, False, 0, 0  # .txt cursor
        self.long_offset, self.long_line, self.long_char, self.long_first = -1, 0, 0, False  # long text cursor
        self._long: LongText | None = None  # the long text itself (read again after a resume)
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.starts: list[int] = []  # 1 where a position run starts
        self.after_whole = False
        self.block = 0  # next global block index
        self.blocks_taken = 0  # blocks this rank returned
        self.bad_lines = 0
        self.ended = False
        self.example_line = 0  # line of the example read last

    @property
    def tokens_seen(self) -> int:
        """Tokens in the blocks this rank returned."""
        return self.blocks_taken * self.seq_len

    def _epoch_rng(self, epoch: int) -> random.Random | None:
        # A string seed is hashed (sha512) by random.Random: the same stream on every platform and run.
        return random.Random(f"lorasp-edge:{self.seed}:{epoch}") if self.shuffle_buffer > 1 else None

    # -- units: scanner and shuffle buffer

    def _scan_unit(self) -> list[int] | None:
        """[offset, line] of the next unit in file order, skipping blank lines; None at EOF."""
        if self._scan_file is None:
            self._scan_file = open(self.path, "rb")
            self._scan_file.seek(self.scan_offset)
        file = self._scan_file
        while raw := file.readline():
            start, line = self.scan_offset, self.scan_line + 1
            self.scan_offset, self.scan_line = self.scan_offset + len(raw), line
            if not raw.strip():
                continue
            if self.is_text:  # the document runs to the next blank line or EOF
                while (more := file.readline()) :
                    self.scan_offset, self.scan_line = self.scan_offset + len(more), self.scan_line + 1
                    if not more.strip():
                        break
            return [start, line]
        return None

    def _next_unit(self) -> list[int] | None:
        size = max(1, self.shuffle_buffer)
        while len(self.pending) < size and not self.scan_done:
            unit = self._scan_unit()
            if unit is None:
                self.scan_done = True
            else:
                self.pending.append(unit)
        if not self.pending:
            return None
        if self._rng is None:
            return self.pending.pop(0)
        index = self._rng.randrange(len(self.pending))
        self.pending[index], self.pending[-1] = self.pending[-1], self.pending[index]
        return self.pending.pop()

    def _read_at(self, offset: int) -> bytes:
        if self._read_file is None:
            self._read_file = open(self.path, "rb")
        if self._read_at_offset != offset:
            self._read_file.seek(offset)
        raw = self._read_file.readline()
        self._read_at_offset = offset + len(raw)
        return raw

    # -- examples

    def _bad(self, error: Exception, line: int) -> None:
        if not self.skip_bad_lines:
            raise DataError(f"{self.path}:{line}: {error} (--skip-bad-lines skips such lines)") from None
        self.bad_lines += 1

    def _next_example(self) -> tuple[list[int], list[int], bool] | None:
        """(ids, mask, whole) of the next example in this pass, eos included; None at its end."""
        while True:
            if self.long_offset >= 0:  # the next piece of a long text
                if self._long is None:  # after a resume: its line is read and decoded again
                    raw = self._read_at(self.long_offset)
                    self._long = self.encoder.text_line(raw, self.long_first) if self.is_text else self.encoder.json_line(raw)
                example, self.long_char = self.encoder.text_piece(self._long, self.long_char)
                if self.long_char >= len(self._long.text):
                    self.long_offset, self.long_char, self._long = -1, 0, None
                self.example_line = self.long_line
                return example
            if self.doc_open:  # .txt: the next line of the open document
                line_offset = self.doc_offset
                raw = self._read_at(self.doc_offset)
                self.doc_offset, self.doc_line = self.doc_offset + len(raw), self.doc_line + 1
                if not raw.strip():  # a blank line or EOF ends the document
                    self.doc_open = False
                    return [self.eos], [1], False
                try:
                    example = self.encoder.text_line(raw, self.doc_first)
                except BadLine as error:
                    self._bad(error, self.doc_line)
                    continue
                if isinstance(example, LongText):
                    self._open_long(example, line_offset, self.doc_line, self.doc_first)
                    self.doc_first = False
                    continue
                self.doc_first, self.example_line = False, self.doc_line
                return example
            unit = self._next_unit()
            if unit is None:
                return None
            offset, line = unit
            if self.is_text:
                self.doc_open, self.doc_first, self.doc_offset, self.doc_line = True, True, offset, line - 1
                continue
            try:
                example = self.encoder.json_line(self._read_at(offset))
            except BadLine as error:
                self._bad(error, line)
                continue
            except NoChatTemplate:
                raise DataError(f"{self.path}:{line}: chat 'messages' need a tokenizer with a chat template; this one has none") from None
            if isinstance(example, LongText):
                self._open_long(example, offset, line, True)
                continue
            if example is not None:
                self.example_line = line
                return example

    def _open_long(self, long: LongText, offset: int, line: int, first: bool) -> None:
        self.long_offset, self.long_line, self.long_char, self.long_first, self._long = offset, line, 0, first, long

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.scan_offset, self.scan_line, self.scan_done, self.pending = epoch, 0, 0, False, []
        self._rng = self._epoch_rng(epoch)
        if self._scan_file is not None:
            self._scan_file.seek(0)

    def _read_example(self) -> bool:
        """Append the next example to the buffer, crossing epochs; False once the stream ends."""
        while (example := self._next_example()) is None:
            if self.epoch == 0 and self.block == 0:
                skipped = f" ({self.bad_lines} bad lines skipped)" if self.bad_lines else ""
                raise DataError(f"{self.path} holds {len(self.ids)} tokens{skipped}, fewer than one block of seq_len={self.seq_len}")
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                self.ended = True
                return False
            self._start_epoch(self.epoch + 1)
        self._append(*example)
        return True

    def _append(self, ids: list[int], mask: list[int], whole: bool) -> None:
        if whole:
            fill = len(self.ids) % self.seq_len  # the buffer starts at a block boundary
            if fill and fill + len(ids) > self.seq_len:
                pad = self.seq_len - fill
                self.ids += [self.pad] * pad
                self.mask += [0] * pad
                self.starts += [1] + [0] * (pad - 1)
            self.starts += [1] + [0] * (len(ids) - 1)
        else:
            self.starts += [int(self.after_whole)] + [0] * (len(ids) - 1)
        if self.starts[-len(ids)]:  # a run's first token would be predicted from the run before it
            mask = [0] + mask[1:]
        self.ids += ids
        self.mask += mask
        self.after_whole = whole

    def _next_global_block(self) -> tuple[list[int], list[int], list[int]] | None:
        while len(self.ids) < self.seq_len:
            if self.ended or not self._read_example():
                return None
        n = self.seq_len
        block = self.ids[:n], self.mask[:n], self.starts[:n]
        del self.ids[:n], self.mask[:n], self.starts[:n]
        self.block += 1
        return block

    # -- blocks and batches

    def next_block(self) -> dict | None:
        """This rank's next block as {"input_ids", "labels", "position_ids"} LongTensors [seq_len]; None at the end."""
        while True:
            index = self.block
            block = self._next_global_block()
            if block is None:
                return None
            if index % self.world_size == self.rank:
                self.blocks_taken += 1
                ids, mask, starts = block
                labels = [token if trained else IGNORE_INDEX for token, trained in zip(ids, mask)]
                return {
                    "input_ids": torch.tensor(ids, dtype=torch.long),
                    "labels": torch.tensor(labels, dtype=torch.long),
                    "position_ids": torch.tensor(_positions(starts), dtype=torch.long),
                }

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
        return _stack(blocks)

    # -- position

    FIELDS = (
        "epoch", "scan_offset", "scan_line", "scan_done", "doc_open", "doc_first", "doc_offset", "doc_line",
        "after_whole", "block", "blocks_taken", "bad_lines", "ended",
    )
    # Fields added after STATE_FORMAT 2 was first written: a position saved without them had none open.
    LATER_FIELDS = {"long_offset": -1, "long_line": 0, "long_char": 0, "long_first": False}

    def state_dict(self) -> dict:
        """The exact position, JSON- and torch.save-able; its size is bounded by shuffle_buffer and seq_len."""
        rng = self._rng.getstate() if self._rng is not None else None
        return {
            "format": STATE_FORMAT,
            "path": str(self.path),
            "file_bytes": self.path.stat().st_size,
            "seq_len": self.seq_len,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle_buffer": self.shuffle_buffer,
            "seed": self.seed,
            **{key: getattr(self, key) for key in (*self.FIELDS, *self.LATER_FIELDS)},
            "pending": [list(unit) for unit in self.pending],
            "rng": None if rng is None else [rng[0], list(rng[1]), rng[2]],
            "ids": list(self.ids),
            "mask": list(self.mask),
            "starts": list(self.starts),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"the data position has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        saved = (state["seq_len"], state["rank"], state["world_size"], state["shuffle_buffer"], state["seed"])
        ours = (self.seq_len, self.rank, self.world_size, self.shuffle_buffer, self.seed)
        if saved != ours:
            raise DataError(f"the data position was saved with (seq_len, rank, world_size, shuffle_buffer, seed)={saved}, this run has {ours}")
        size = self.path.stat().st_size
        if state["file_bytes"] != size:
            raise DataError(f"{self.path} has {size} bytes, but {state['file_bytes']} when the data position was saved: the file changed")
        for key in self.FIELDS:
            setattr(self, key, state[key])
        for key, default in self.LATER_FIELDS.items():
            setattr(self, key, state.get(key, default))
        self._long = None
        self.pending = [list(unit) for unit in state["pending"]]
        self._rng = self._epoch_rng(self.epoch)
        if state["rng"] is not None:
            self._rng.setstate((state["rng"][0], tuple(state["rng"][1]), state["rng"][2]))
        self.ids, self.mask, self.starts = list(state["ids"]), list(state["mask"]), list(state["starts"])
        self.close()  # reopened at the restored offsets

    def close(self) -> None:
        for name in ("_scan_file", "_read_file"):
            if getattr(self, name) is not None:
                getattr(self, name).close()
                setattr(self, name, None)
        self._read_at_offset = None


def _stack(blocks: list[dict]) -> dict:
    return {key: torch.stack([block[key] for block in blocks]) for key in blocks[0]}


def eval_batches(path: str | Path, tokenizer, seq_len: int, micro_batch: int, max_blocks: int = 16) -> list[dict]:
    """The first max_blocks blocks of one pass over `path` in file order, in batches of micro_batch
    (the last may be smaller): the same list on every call and every rank."""
    stream = PackedStream(path, tokenizer, seq_len, epochs=1)
    blocks = []
    while len(blocks) < max_blocks and (block := stream.next_block()) is not None:
        blocks.append(block)
    stream.close()
    return [_stack(blocks[start : start + micro_batch]) for start in range(0, len(blocks), micro_batch)]


def estimate_blocks(path: str | Path, tokenizer, seq_len: int, sample_bytes: int = 1 << 20) -> int:
    """Blocks in one pass over `path`, estimated from the first sample_bytes (whole lines) and the
    file size; exact when the file is no larger than the sample. An estimate: it assumes the rest of
    the file tokenizes (and pads) like its start. Bad lines in the sample are skipped here; the
    training stream reports them, and reports empty data (this returns 0 for it)."""
    stream = PackedStream(path, tokenizer, seq_len, skip_bad_lines=True, epochs=1)
    while stream.scan_offset < sample_bytes and (example := stream._next_example()) is not None:
        stream._append(*example)
    read = stream.scan_offset
    stream.close()
    file_bytes = os.path.getsize(path)
    return round(len(stream.ids) * file_bytes / max(read, 1)) // seq_len


def check_targets(path: str | Path, tokenizer, seq_len: int, skip_bad_lines: bool = False) -> None:
    """Refuse a file in which no example has a trained token at this seq_len, naming its first line.
    Reads until the first example with a target: normally the first line."""
    stream = PackedStream(path, tokenizer, seq_len, skip_bad_lines=skip_bad_lines, epochs=1)
    first_without = None
    try:
        while (example := stream._next_example()) is not None:
            ids, mask, whole = example
            if any(mask) if whole else len(ids) > 0:
                return
            first_without = first_without or stream.example_line
    finally:
        stream.close()
    if first_without is not None:
        raise DataError(
            f"{stream.path}: no example has a token to train on at seq_len={seq_len} (first such line: {first_without}); "
            "prompt/completion needs a non-empty completion, chat an assistant turn"
        )
