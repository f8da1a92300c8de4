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
    assert len(single) == 60 and len(rank0) == len(rank1) == 30  # whole examples pad the ends of blocks
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
    assert states[0]["ids"] == [108, 109, 10, 11, 12, 24, EOS] and states[0]["mask"] == [0, 0, 0, 0, 0, 1, 1]
    assert states[0]["starts"] == [1, 0, 0, 0, 0, 0, 0] and states[0]["scan_offset"] == 480


def test_resume_refuses_another_world_or_a_changed_file(tmp_path, tokenizer):
    data = counting_file(tmp_path / "d.jsonl")
    stream = PackedStream(data, tokenizer, seq_len=4)
    stream.next_batch(2)
    state = stream.state_dict()
    with pytest.raises(DataError, match=r"\(seq_len, rank, world_size, shuffle_buffer, seed\)=\(4, 0, 1, 0, 0\), this run has \(4, 0, 2, 0, 0\)"):
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
    assert len(pass_blocks) == 27
    assert sum(batch["input_ids"].shape[0] for batch in eval_batches(data, tokenizer, 4, 2, max_blocks=1000)) == 27


def test_estimate_blocks_is_exact_on_small_files_and_extrapolates_uniform_ones(tmp_path, tokenizer):
    data = counting_file(tmp_path / "d.jsonl")
    assert estimate_blocks(data, tokenizer, seq_len=4) == 27  # pads included
    uniform = write_jsonl(tmp_path / "u.jsonl", [{"text": "1 2 3 4 5"}] * 1000)  # 6000 tokens
    assert estimate_blocks(uniform, tokenizer, seq_len=8, sample_bytes=2000) == 750
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    assert estimate_blocks(empty, tokenizer, seq_len=8) == 0


# -- whole examples


def test_whole_example_that_does_not_fit_starts_the_next_block_after_padding(tmp_path, tokenizer):
    records = [{"text": "1 2"}, {"prompt": "3 4", "completion": "5"}, {"prompt": "6", "completion": "7 8"}, {"text": "9"}]
    stream = PackedStream(write_jsonl(tmp_path / "d.jsonl", records), tokenizer, seq_len=6, epochs=1)
    got = [(b["input_ids"].tolist(), b["labels"].tolist(), b["position_ids"].tolist()) for b in stream]
    assert got == [
        # text (3) + the first example (4) would be 7: the example moves on, the rest is padding (eos id, masked)
        ([11, 12, EOS, EOS, EOS, EOS], [11, 12, EOS, M, M, M], [0, 1, 2, 0, 1, 2]),
        # the second example (4) does not fit beside the first either; the first token of each is never a target
        ([13, 14, 15, EOS, EOS, EOS], [M, M, 15, EOS, M, M], [0, 1, 2, 3, 0, 1]),
        # text after a whole example starts a run of its own: its first token is not a target
        ([16, 17, 18, EOS, 19, EOS], [M, 17, 18, EOS, M, EOS], [0, 1, 2, 3, 0, 1]),
    ]


def test_long_example_loses_prompt_tokens_from_the_left(tmp_path, tokenizer):
    records = [{"prompt": "1 2 3 4 5 6", "completion": "7 8"}]
    (block,) = PackedStream(write_jsonl(tmp_path / "d.jsonl", records), tokenizer, seq_len=5, epochs=1)
    assert block["input_ids"].tolist() == [15, 16, 17, 18, EOS]  # 9 tokens: the first 4 prompt tokens go
    assert block["labels"].tolist() == [M, M, 17, 18, EOS]


def test_example_whose_completion_cannot_fit_is_a_bad_line(tmp_path, tokenizer):
    records = [{"prompt": "1", "completion": "2 3 4 5 6"}, {"prompt": "7", "completion": "8"}, {"prompt": "9", "completion": "10"}]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError, match=r"d.jsonl:1: an example of 7 tokens does not fit seq_len=5, and dropping prompt tokens cannot fit it"):
        list(PackedStream(data, tokenizer, seq_len=5, epochs=1))
    stream = PackedStream(data, tokenizer, seq_len=3, skip_bad_lines=True, epochs=1)
    assert [b["input_ids"].tolist() for b in stream] == [[17, 18, EOS], [19, 20, EOS]]
    assert stream.bad_lines == 1


def test_bos_is_added_per_example_where_the_tokenizer_adds_one(tmp_path):
    from tokenizers import processors

    bos_tokenizer = word_tokenizer()
    bos_tokenizer.add_special_tokens({"bos_token": "<|system|>"})  # id 4 plays BOS
    bos_tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|system|> $A", special_tokens=[("<|system|>", 4)])
    assert bos_tokenizer("1")["input_ids"] == [4, 11]
    records = [{"text": "1 2"}, {"prompt": "3", "completion": "4"}, {"messages": [{"role": "user", "content": "5"}, {"role": "assistant", "content": "6"}]}]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    (block,) = PackedStream(data, bos_tokenizer, seq_len=15, epochs=1)
    chat = [USER, 15, END, ASSISTANT, 16, END, EOS]  # the template writes its own BOS (this one writes none): none added
    ids = block["input_ids"].tolist()
    assert ids[:4] == [4, 11, 12, EOS] and ids[4:8] == [4, 13, 14, EOS] and ids[8:15] == chat
    plain = PackedStream(data, word_tokenizer(), seq_len=12, epochs=1)
    assert next(iter(plain))["input_ids"].tolist()[:6] == [11, 12, EOS, 13, 14, EOS]


def test_file_without_any_target_is_refused_naming_its_first_line(tmp_path, tokenizer):
    from lorasp_edge.train.data import check_targets

    no_targets = [{"prompt": "1 2", "completion": ""}, {"messages": [{"role": "user", "content": "3"}]}]
    data = write_jsonl(tmp_path / "d.jsonl", ["", *no_targets])
    with pytest.raises(DataError, match=r"d.jsonl: no example has a token to train on at seq_len=8 \(first such line: 2\)"):
        check_targets(data, tokenizer, seq_len=8)
    check_targets(write_jsonl(tmp_path / "ok.jsonl", [*no_targets, {"prompt": "1", "completion": "2"}]), tokenizer, seq_len=8)


# -- shuffling


def order(data, tokenizer, seed, epochs=1, shuffle_buffer=8):
    stream = PackedStream(data, tokenizer, seq_len=1, epochs=epochs, shuffle_buffer=shuffle_buffer, seed=seed)
    return [int(block["input_ids"][0]) - 10 for block in stream if int(block["input_ids"][0]) != EOS]


def test_seed_and_epoch_change_the_order_and_a_seed_reproduces_it(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": str(n)} for n in range(30)])
    assert order(data, tokenizer, seed=0, shuffle_buffer=0) == list(range(30))
    first = order(data, tokenizer, seed=0)
    assert sorted(first) == list(range(30)) and first != list(range(30))  # a permutation, not file order
    assert order(data, tokenizer, seed=0) == first
    assert order(data, tokenizer, seed=1) != first
    two_epochs = order(data, tokenizer, seed=0, epochs=2)
    assert two_epochs[:30] == first and sorted(two_epochs[30:]) == list(range(30)) and two_epochs[30:] != first
    # A buffer of 8 moves a line at most 7 places earlier than file order.
    assert all(position >= n - 7 for position, n in enumerate(first))


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_shuffled_resume_at_every_batch_gives_the_uninterrupted_batches(tmp_path, tokenizer, suffix):
    data = counting_file(tmp_path / "d.jsonl")
    if suffix == ".txt":
        data = tmp_path / "d.txt"
        data.write_text("".join(f"{i} {i + 1}\n" + ("\n" if i % 3 == 0 else "") for i in range(40)))
    settings = dict(seq_len=7, epochs=3, shuffle_buffer=5, seed=3)
    reference = batch_lists(PackedStream(data, tokenizer, **settings), 30, micro_batch=2)
    assert reference[-1] is None
    assert reference != batch_lists(PackedStream(data, tokenizer, **{**settings, "shuffle_buffer": 0}), 30, micro_batch=2)
    for killed_after in range(len(reference)):
        first = PackedStream(data, tokenizer, **settings)
        consumed = batch_lists(first, killed_after, micro_batch=2)
        resumed = PackedStream(data, tokenizer, **settings)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert consumed + batch_lists(resumed, len(reference) - killed_after, micro_batch=2) == reference, killed_after


def test_shuffle_state_is_bounded_by_the_buffer_not_the_file(tmp_path, tokenizer):
    small = counting_file(tmp_path / "small.jsonl", lines=50)
    large = counting_file(tmp_path / "large.jsonl", lines=20_000)
    sizes = []
    for data in (small, large):
        stream = PackedStream(data, tokenizer, seq_len=16, shuffle_buffer=40, seed=0)
        stream.next_batch(4)
        state = stream.state_dict()
        assert len(state["pending"]) <= 40
        sizes.append(len(json.dumps({**state, "path": "", "file_bytes": 0, "ids": [], "mask": [], "starts": [], "pending": []})))
    assert abs(sizes[0] - sizes[1]) < 64  # only the offsets' digits differ
