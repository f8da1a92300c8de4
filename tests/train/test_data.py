"""The streamed data layer: exact packed blocks, loss masks, errors, resume and sharding.

A word-level tokenizer makes every id readable: the word "n" (0 <= n < 100) is id n + 10, eos is 0.
"""

from __future__ import annotations

import json

import pytest
import torch

from lorasp_edge.errors import DataError
from lorasp_edge.train.data import PackedStream, estimate_blocks, eval_batches

EOS, USER, ASSISTANT, END = 0, 2, 3, 5
M = -100  # a masked label
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    vocab = {token: index for index, token in enumerate(special)}
    vocab.update({str(n): n + 10 for n in range(100)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(special)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def write_jsonl(path, records) -> str:
    path.write_text("".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records))
    return path


def blocks(stream) -> list[tuple[list[int], list[int]]]:
    return [(block["input_ids"].tolist(), block["labels"].tolist()) for block in stream]


def test_text_examples_pack_across_boundaries_with_eos(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "1 2 3"}, {"text": "4 5"}, "", {"text": "6 7 8 9"}])
    stream = PackedStream(data, tokenizer, seq_len=4, epochs=1)
    expected = [[11, 12, 13, EOS], [14, 15, EOS, 16], [17, 18, 19, EOS]]
    assert blocks(stream) == [(ids, ids) for ids in expected]
    assert stream.ended and stream.tokens_seen == 12 and stream.blocks_taken == 3
    assert stream.next_block() is None


def test_tail_carries_into_next_epoch_and_partial_block_is_dropped(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "1 2"}, {"text": "3 4 5"}])  # 7 tokens a pass
    stream = PackedStream(data, tokenizer, seq_len=3, epochs=2)
    ids = [block[0] for block in blocks(stream)]
    assert ids == [[11, 12, EOS], [13, 14, 15], [EOS, 11, 12], [EOS, 13, 14]]  # 14 tokens: 4 blocks, 2 dropped
    assert stream.epoch == 1


def test_prompt_completion_masks_the_prompt(tmp_path, tokenizer):
    records = [{"prompt": "1 2", "completion": "3"}, {"prompt": "4", "completion": "5 6"}, {"prompt": "7 8", "completion": ""}]
    stream = PackedStream(write_jsonl(tmp_path / "pc.jsonl", records), tokenizer, seq_len=11, epochs=1)
    assert blocks(stream) == [
        ([11, 12, 13, EOS, 14, 15, 16, EOS, 17, 18, EOS], [M, M, 13, EOS, M, 15, 16, EOS, M, M, M]),
    ]


def test_chat_trains_on_assistant_turns_only(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "9"},
        {"role": "user", "content": "1 2"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "4"},
        {"role": "assistant", "content": "5 6"},
    ]
    stream = PackedStream(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]), tokenizer, seq_len=18, epochs=1)
    system, user1, answer1 = [4, 19, END], [USER, 11, 12, END], [ASSISTANT, 13, END]
    user2, answer2 = [USER, 14, END], [ASSISTANT, 15, 16, END]
    ids = system + user1 + answer1 + user2 + answer2 + [EOS]
    labels = [M] * 7 + [M, 13, END] + [M] * 3 + [M, 15, 16, END] + [EOS]
    assert blocks(stream) == [(ids, labels)]
    plain = word_tokenizer()
    plain.chat_template = None
    with pytest.raises(DataError, match=r"chat.jsonl:1: chat 'messages' need a tokenizer with a chat template"):
        PackedStream(tmp_path / "chat.jsonl", plain, seq_len=18).next_batch(1)


def test_chat_mask_with_byte_level_bpe_covers_reply_and_end_marker(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["what is two plus two", "two plus two is four", "four is the answer"] * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": " four is the answer"}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    total = len(tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)) + 1
    (block,) = PackedStream(data, tokenizer, seq_len=total, epochs=1)
    trained = [token for token in block["labels"].tolist() if token != M]
    assert tokenizer.decode(trained) == " four is the answer<|end|>\n<|endoftext|>"
    assert tokenizer.decode(block["input_ids"].tolist()).startswith("<|user|>what is two plus two<|end|>\n<|assistant|>")


def test_txt_lines_keep_newlines_and_blank_lines_end_documents(tmp_path, tokenizer):
    data = tmp_path / "notes.txt"
    data.write_text("1 2\n3\n\n\n4 5\n")  # the word tokenizer drops the newlines; EOF closes the last document
    ids = [11, 12, 13, EOS, 14, 15, EOS]
    assert blocks(PackedStream(data, tokenizer, seq_len=7, epochs=2)) == [(ids, ids), (ids, ids)]


def test_txt_line_tokens_include_the_newline(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=270, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["ab\ncd\n"] * 5, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    data = tmp_path / "t.txt"
    data.write_text("ab\ncd")
    line_ids = [tokenizer.encode(text, add_special_tokens=False) for text in ("ab\n", "cd")]
    assert line_ids[0] != tokenizer.encode("ab", add_special_tokens=False)  # the newline is a token of its own
    expected = line_ids[0] + line_ids[1] + [tokenizer.eos_token_id]
    (block,) = PackedStream(data, tokenizer, seq_len=len(expected), epochs=1)
    assert block["input_ids"].tolist() == expected


@pytest.mark.parametrize(
    "bad, problem",
    [
        ("{not json", "invalid JSON"),
        ('{"text": 5}', "'text' must be a string"),
        ('{"prompt": "1"}', "'prompt' and 'completion' must both be strings"),
        ('{"title": "1"}', "no 'text', 'prompt'/'completion' or 'messages' key (keys: title)"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"messages": [{"role": "user"}]}', "each message needs a string 'role' and a string 'content'"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, tokenizer, bad, problem):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"text": "1 2"}, "", bad, {"text": "3"}])
    with pytest.raises(DataError) as caught:
        list(PackedStream(data, tokenizer, seq_len=2, epochs=1))
    assert str(caught.value).startswith(f"{data}:3: {problem}")


def test_skip_bad_lines_counts_them(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"text": "1 2"}, "{not json", {"text": "3"}, '{"text": null}', {"text": "4"}])
    data.write_bytes(data.read_bytes() + b'{"text": "\xff"}\n')
    stream = PackedStream(data, tokenizer, seq_len=7, skip_bad_lines=True, epochs=1)
    assert [ids for ids, _ in blocks(stream)] == [[11, 12, EOS, 13, EOS, 14, EOS]]
    assert stream.bad_lines == 3


def test_empty_and_too_short_data_are_errors(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=f"^{empty} holds 0 tokens, fewer than one block of seq_len=4$"):
        PackedStream(empty, tokenizer, seq_len=4).next_batch(1)
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "1 2"}, {"text": "3"}])
    with pytest.raises(DataError, match="short.jsonl holds 5 tokens, fewer than one block of seq_len=8$"):
        PackedStream(short, tokenizer, seq_len=8).next_batch(1)  # epochs=None must not cycle forever
    all_bad = write_jsonl(tmp_path / "bad.jsonl", ["{", "{"])
    with pytest.raises(DataError, match=r"holds 0 tokens \(2 bad lines skipped\)"):
        PackedStream(all_bad, tokenizer, seq_len=4, skip_bad_lines=True).next_batch(1)
    table = tmp_path / "table.csv"
    table.write_text("1,2\n")
    with pytest.raises(DataError, match="unknown data format '.csv'"):
        PackedStream(table, tokenizer, seq_len=4)
    with pytest.raises(DataError, match="no such data file"):
        PackedStream(tmp_path / "missing.jsonl", tokenizer, seq_len=4)


def counting_file(path, lines: int = 23):
    """Lines of varied length, alternating text and prompt/completion (so buffers hold masks)."""
    records = []
    for i in range(lines):
        words = " ".join(str((i * 7 + k) % 100) for k in range(1 + i % 5))
        records.append({"text": words} if i % 2 else {"prompt": words, "completion": str(i % 100)})
    return write_jsonl(path, records)


def batch_lists(stream, count: int, micro_batch: int) -> list:
    out = []
    for _ in range(count):
        batch = stream.next_batch(micro_batch)
        out.append(None if batch is None else (batch["input_ids"].tolist(), batch["labels"].tolist()))
    return out


@pytest.mark.parametrize("suffix, rank, world_size", [(".jsonl", 0, 1), (".jsonl", 1, 2), (".txt", 0, 1)])
def test_resume_at_every_batch_gives_the_uninterrupted_batches(tmp_path, tokenizer, suffix, rank, world_size):
    data = counting_file(tmp_path / "d.jsonl")
    if suffix == ".txt":  # documents of 1-3 lines
        data = tmp_path / "d.txt"
        data.write_text("".join(f"{i} {i + 1}\n" + ("\n" if i % 3 == 0 else "") for i in range(40)))
    settings = dict(seq_len=7, rank=rank, world_size=world_size, epochs=3)
    reference = batch_lists(PackedStream(data, tokenizer, **settings), 30, micro_batch=3)
    assert reference[-1] is None and reference[5] is not None  # crosses epochs and reaches the end
    for killed_after in range(len(reference)):
        first = PackedStream(data, tokenizer, **settings)
        consumed = batch_lists(first, killed_after, micro_batch=3)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = PackedStream(data, tokenizer, **settings)
        resumed.load_state_dict(state)
        assert consumed + batch_lists(resumed, len(reference) - killed_after, micro_batch=3) == reference, killed_after


def test_two_ranks_take_alternate_blocks_of_the_one_rank_sequence(tmp_path, tokenizer):
    data = counting_file(tmp_path / "d.jsonl", lines=60)
    single = blocks(PackedStream(data, tokenizer, seq_len=5, epochs=1))
    rank0, rank1 = (blocks(PackedStream(data, tokenizer, seq_len=5, rank=r, world_size=2, epochs=1)) for r in (0, 1))
    assert len(single) == 54 and len(rank0) == len(rank1) == 27
    assert [block for pair in zip(rank0, rank1) for block in pair] == single
    # Per step: two ranks at micro_batch 2 take the blocks one rank takes at micro_batch 4.
    one = PackedStream(data, tokenizer, seq_len=5, epochs=None)
    ranks = [PackedStream(data, tokenizer, seq_len=5, rank=r, world_size=2, epochs=None) for r in (0, 1)]
    for _ in range(40):  # across epochs
        step = one.next_batch(4)["input_ids"]
        shards = torch.cat([stream.next_batch(2)["input_ids"] for stream in ranks])
        assert sorted(map(tuple, step.tolist())) == sorted(map(tuple, shards.tolist()))


def test_state_does_not_grow_with_file_size(tmp_path, tokenizer):
    small = counting_file(tmp_path / "small.jsonl", lines=50)
    large = counting_file(tmp_path / "large.jsonl", lines=50_000)
    states = []
    for data in (small, large):
        stream = PackedStream(data, tokenizer, seq_len=16)
        stream.next_batch(4)
        states.append(stream.state_dict())
    # A file 1000 times larger: the same state but for its path and size.
    same_but_path_and_size = [{**state, "path": None, "file_bytes": None} for state in states]
    assert same_but_path_and_size[0] == same_but_path_and_size[1]
    assert states[0]["ids"] == [11, 12, 24, EOS] and states[0]["mask"] == [0, 0, 1, 1] and states[0]["offset"] == 480


def test_resume_refuses_another_world_or_a_changed_file(tmp_path, tokenizer):
    data = counting_file(tmp_path / "d.jsonl")
    stream = PackedStream(data, tokenizer, seq_len=4)
    stream.next_batch(2)
    state = stream.state_dict()
    with pytest.raises(DataError, match=r"\(seq_len, rank, world_size\)=\(4, 0, 1\), this run has \(4, 0, 2\)"):
        PackedStream(data, tokenizer, seq_len=4, world_size=2).load_state_dict(state)
    with data.open("a") as file:
        file.write('{"text": "1"}\n')
    with pytest.raises(DataError, match="the file changed"):
        PackedStream(data, tokenizer, seq_len=4).load_state_dict(state)


def test_next_batch_stacks_and_ends_on_a_short_batch(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "1 2 3 4 5 6 7 8 9"}])  # 10 tokens
    stream = PackedStream(data, tokenizer, seq_len=2, epochs=1)
    batch = stream.next_batch(2)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].tolist() == [[11, 12], [13, 14]]
    assert stream.next_batch(2)["labels"].tolist() == [[15, 16], [17, 18]]
    assert stream.next_batch(2) is None and stream.ended and stream.tokens_seen == 10


def test_eval_batches_are_finite_and_deterministic(tmp_path, tokenizer):
    data = counting_file(tmp_path / "d.jsonl")
    first = eval_batches(data, tokenizer, seq_len=4, micro_batch=2, max_blocks=5)
    assert [batch["input_ids"].shape for batch in first] == [(2, 4), (2, 4), (1, 4)]
    again = eval_batches(data, tokenizer, seq_len=4, micro_batch=2, max_blocks=5)
    assert all(torch.equal(a[key], b[key]) for a, b in zip(first, again) for key in ("input_ids", "labels"))
    pass_blocks = blocks(PackedStream(data, tokenizer, seq_len=4, epochs=1))
    assert len(pass_blocks) == 25
    assert sum(batch["input_ids"].shape[0] for batch in eval_batches(data, tokenizer, 4, 2, max_blocks=1000)) == 25


def test_estimate_blocks_is_exact_on_small_files_and_extrapolates_uniform_ones(tmp_path, tokenizer):
    data = counting_file(tmp_path / "d.jsonl")
    assert estimate_blocks(data, tokenizer, seq_len=4) == 25
    uniform = write_jsonl(tmp_path / "u.jsonl", [{"text": "1 2 3 4 5"}] * 1000)  # 6000 tokens
    assert estimate_blocks(uniform, tokenizer, seq_len=8, sample_bytes=2000) == 750
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    assert estimate_blocks(empty, tokenizer, seq_len=8) == 0
