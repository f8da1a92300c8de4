"""Text generation with an exported model: onnxruntime over the KV-cache decoder graph, a merged
Hugging Face folder through transformers, a GGUF file through llama.cpp (llama-cpp-python) or an
onnxruntime-genai folder through onnxruntime-genai (both optional installs); a LoRA adapter GGUF
beside a GGUF model is applied by llama.cpp at run time. Every backend only
returns logits; token choice, stopping and streaming are the same code for all of them.

    prompt -> prefill (whole prompt, empty cache) -> logits of the last position
           -> pick a token (greedy at temperature 0, else temperature + nucleus sampling)
           -> decode step (one token, the cache grows by one) -> ... until EOS or max_new_tokens

Nucleus (top-p) sampling keeps the smallest set of most likely tokens whose probabilities sum to
at least p (Holtzman et al., "The Curious Case of Neural Text Degeneration", ICLR 2020, section 3.1).
Text is streamed as it is decoded; a piece that ends inside a multi-byte character is held back
until the character completes. Prompt and new tokens must fit the model's context (config.json's
max_position_embeddings, genai_config.json's context_length, the GGUF's context_length): a longer
prompt is refused, and --max-new-tokens is cut to what fits, with a note.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorasp_edge.errors import UserError
from lorasp_edge.export.onnx_graph import ONNX_FILE
from lorasp_edge.export.onnx_runtime import BoundDecoder, OnnxDecoder

# ----------------------------------------------------------------------------- ONNX decoder


class OnnxStepper:
    """Batch-1 generation state over an `OnnxDecoder`: prefill once, then one token a step. The KV
    cache stays in onnxruntime between steps (`BoundDecoder`: I/O binding, one buffer of `capacity`
    positions per layer updated in place, no numpy copies of it)."""

    def __init__(self, decoder: OnnxDecoder, capacity: int = 2048):
        self.bound = BoundDecoder(decoder, capacity)

    def prefill(self, token_ids: list[int]) -> np.ndarray:
        self.bound.reset()
        return self.bound(list(token_ids))

    def step(self, token_id: int) -> np.ndarray:
        return self.bound([token_id])


def cache_keyword(decoder) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated until 5.40).
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


class TorchStepper:
    """The same interface over a transformers model (a merged HF folder), with its DynamicCache."""

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.length = 0

    def _forward(self, ids: list[int]) -> np.ndarray:
        import torch
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
        start = self.length
        self.length += len(ids)
        with torch.inference_mode():
            output = self.model(
                input_ids=torch.tensor([ids]),
                position_ids=torch.arange(start, self.length)[None],
                use_cache=True,
                **{cache_keyword(self.model): self.cache},
            )
        return output.logits[0, -1].float().numpy()

    def prefill(self, token_ids: list[int]) -> np.ndarray:
        self.cache, self.length = None, 0
        return self._forward(list(token_ids))

    def step(self, token_id: int) -> np.ndarray:
        return self._forward([token_id])


# ----------------------------------------------------------------------------------- sampling


def pick_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise softmax(logits / T) restricted to the top-p nucleus."""
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, top_p) + 1)]  # smallest prefix reaching top_p
    kept = probs[keep] / probs[keep].sum()
    return int(keep[rng.choice(len(keep), p=kept)])


def generate_ids(stepper, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 eos_ids: set[int] | frozenset = frozenset(), seed: int = 0) -> Iterator[int]:
    """New token ids, one at a time, as they are chosen (stops after an EOS, which is not yielded)."""
    rng = np.random.default_rng(seed)
    logits = stepper.prefill(prompt_ids)
    for index in range(max_new_tokens):
        token = pick_token(logits, temperature, top_p, rng)
        if token in eos_ids:
            return
        yield token
        if index + 1 < max_new_tokens:
            logits = stepper.step(token)


# ------------------------------------------------------------------------------- the command


@dataclass
class GenerateSettings:
    model: Path = field(metadata={"help": "an export folder, its onnx*/, genai*/, gguf/ or hf/ subfolder, a .gguf file, or any folder with model.onnx"})
    prompt: str = ""
    max_new_tokens: int = field(default=128, metadata={"help": "stop after this many new tokens"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass, (0, 1]"})
    chat: bool = field(default=False, metadata={"help": "wrap the prompt in the tokenizer's chat template"})
    seed: int = 0
    threads: int | None = field(default=None, metadata={"help": "runtime CPU threads; None = the runtime's default"})

    def problems(self) -> list[str]:
        found = []
        if self.max_new_tokens < 1:
            found.append(f"--max-new-tokens must be >= 1, not {self.max_new_tokens}")
        if self.temperature < 0:
            found.append(f"--temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            found.append(f"--top-p must be in (0, 1], not {self.top_p}")
        if not self.prompt:
            found.append("--prompt is empty")
        if self.threads is not None and self.threads < 1:
            found.append(f"--threads must be >= 1, not {self.threads}")
        return found


@dataclass
class GenerationResult:
    text: str
    backend: str  # "onnxruntime", "onnxruntime-genai", "llama.cpp" or "transformers"
    model_dir: str
    prompt_tokens: int
    new_tokens: int
    token_ids: list[int]
    prefill_seconds: float
    total_seconds: float

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of the whole generation (prefill included)."""
        return self.new_tokens / self.total_seconds if self.total_seconds > 0 else 0.0


GENAI_CONFIG = "genai_config.json"


def resolve_model_dir(path: Path) -> tuple[Path, str]:
    """The folder (or .gguf file) to load and its backend. An export root prefers its fp32 ONNX
    model, then its genai folder, its GGUF file, its merged HF folder."""
    from lorasp_edge.export.llamacpp import is_adapter

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        if is_adapter(path):
            raise UserError(f"{path}: is a LoRA adapter GGUF; pass the base model GGUF beside it (the adapter there is applied)")
        return path, "llama.cpp"
    if not path.is_dir():
        raise UserError(f"{path}: no such model folder or .gguf file")
    for candidate in (path, path / "onnx"):
        if (candidate / ONNX_FILE).is_file() and not (candidate / GENAI_CONFIG).is_file():
            return candidate, "onnxruntime"
    for candidate in (path, path / "genai"):
        if (candidate / GENAI_CONFIG).is_file():
            return candidate, "onnxruntime-genai"
    for candidate in (path, path / "gguf"):
        found = [file for file in sorted(candidate.glob("*.gguf")) if not is_adapter(file)] if candidate.is_dir() else []
        if len(found) == 1:
            return found[0], "llama.cpp"
        if len(found) > 1:
            raise UserError(f"{candidate}: holds {len(found)} .gguf model files; name one with --model")
    for candidate in (path, path / "hf"):
        if (candidate / "config.json").is_file() and any(candidate.glob("*.safetensors")):
            return candidate, "transformers"
    raise UserError(
        f"{path}: not an ONNX model (model.onnx), an onnxruntime-genai folder (genai_config.json), "
        "a .gguf file, or a Hugging Face folder (config.json + *.safetensors)"
    )


def load_tokenizer_for(model_path: Path, backend: str):
    """The Hugging Face tokenizer beside the model; a GGUF file carries its own (transformers reads it)."""
    from transformers import AutoTokenizer

    try:
        if backend == "llama.cpp":
            return AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        raise UserError(f"{model_path}: no usable tokenizer ({str(error).splitlines()[0]})") from None


def load_stepper(model_dir: Path, backend: str, threads: int | None = None, length: int = 2048):
    """The backend's stepper; `length` (prompt + new tokens) sizes the KV cache of onnxruntime, llama.cpp and genai."""
    if backend == "onnxruntime":
        return OnnxStepper(OnnxDecoder(model_dir / ONNX_FILE, threads), capacity=length)
    if backend == "llama.cpp":
        from lorasp_edge.export.llamacpp import LlamaCppModel

        return LlamaCppModel(model_dir, context=length, threads=threads, lora=adapter_beside(model_dir))
    if backend == "onnxruntime-genai":
        from lorasp_edge.export.genai import GenaiModel

        return GenaiModel(model_dir, threads=threads, max_length=length)
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise UserError(f"{model_dir}: transformers cannot load it ({str(error).splitlines()[0]})") from None
    return TorchStepper(model.eval())


def adapter_beside(model_path: Path) -> Path | None:
    """The LoRA adapter GGUF in a GGUF model's folder (as `export --adapter-only` writes it), which
    llama.cpp then applies at run time like `llama-cli --lora`; None when there is none."""
    from lorasp_edge.export.llamacpp import is_adapter

    found = [file for file in sorted(model_path.parent.glob("*.gguf")) if file != model_path and is_adapter(file)]
    if len(found) > 1:
        raise UserError(f"{model_path.parent}: holds {len(found)} LoRA adapter GGUF files; keep the one to apply")
    return found[0] if found else None


def context_length(model_path: Path, backend: str) -> tuple[int, str] | None:
    """The most tokens (prompt + new) the model was built for, and where that number is written;
    None when the folder does not say."""
    import json

    try:
        if backend == "llama.cpp":
            import gguf

            fields = gguf.GGUFReader(str(model_path)).fields
            architecture = fields["general.architecture"].contents()
            return int(fields[f"{architecture}.context_length"].contents()), f"n_ctx_train, {architecture}.context_length in {model_path.name}"
        if backend == "onnxruntime-genai":
            return int(json.loads((model_path / GENAI_CONFIG).read_text())["model"]["context_length"]), f"context_length in {GENAI_CONFIG}"
        config = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError, IndexError):  # unreadable or unstated: the runtime reports what it finds
        return None
    config = config.get("text_config") or config
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(config.get(key), int):
            return config[key], f"{key} in config.json"
    return None


def fit_to_context(prompt_tokens: int, max_new_tokens: int, context: tuple[int, str] | None, note: Callable[[str], None]) -> int:
    """`max_new_tokens`, cut (with a note) so that the prompt and the new tokens fit the context;
    UserError when the prompt alone leaves no room."""
    if context is None:
        return max_new_tokens
    limit, source = context
    if prompt_tokens >= limit:
        than = "longer than" if prompt_tokens > limit else "as long as"
        raise UserError(f"--prompt is {prompt_tokens} tokens, {than} the model's context of {limit} tokens ({source}): shorten the prompt")
    if prompt_tokens + max_new_tokens > limit:
        note(f"--max-new-tokens {max_new_tokens} cut to {limit - prompt_tokens}: the prompt's {prompt_tokens} tokens and the new ones "
             f"must fit the model's context of {limit} tokens")
        return limit - prompt_tokens
    return max_new_tokens


def eos_token_ids(model_dir: Path, tokenizer) -> set[int]:
    import json

    ids = set()
    generation_config = (model_dir.parent if model_dir.is_file() else model_dir) / "generation_config.json"
    if generation_config.is_file():
        value = json.loads(generation_config.read_text()).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat: this model's tokenizer has no chat template")
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded)


class TextStream:
    """Turns token ids into text pieces, holding back a piece that ends mid-character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece, self.sent = text[len(self.sent):], text
        return piece


def generate(settings: GenerateSettings, on_text: Callable[[str], None] | None = None,
             on_note: Callable[[str], None] | None = None) -> GenerationResult:
    """Generate from `settings.prompt`, calling `on_text` with each new piece of text as it is decoded
    and `on_note` with a line about a setting changed to fit (--max-new-tokens past the context)."""
    problems = settings.problems()
    if problems:
        raise UserError("; ".join(problems))
    model_dir, backend = resolve_model_dir(settings.model)
    tokenizer = load_tokenizer_for(model_dir, backend)
    prompt_ids = encode_prompt(tokenizer, settings.prompt, settings.chat)
    max_new_tokens = fit_to_context(len(prompt_ids), settings.max_new_tokens, context_length(model_dir, backend), on_note or (lambda line: None))
    stepper = load_stepper(model_dir, backend, settings.threads, len(prompt_ids) + max_new_tokens)
    stream = TextStream(tokenizer)
    emit = on_text or (lambda piece: None)

    start = time.perf_counter()
    prefill_seconds = 0.0
    for token in generate_ids(stepper, prompt_ids, max_new_tokens, settings.temperature, settings.top_p,
                              eos_token_ids(model_dir, tokenizer), settings.seed):
        if not stream.ids:
            prefill_seconds = time.perf_counter() - start
        piece = stream.push(token)
        if piece:
            emit(piece)
    total_seconds = time.perf_counter() - start
    tail = stream.finish()
    if tail:
        emit(tail)
    return GenerationResult(
        text=stream.sent, backend=backend, model_dir=str(model_dir), prompt_tokens=len(prompt_ids),
        new_tokens=len(stream.ids), token_ids=list(stream.ids), prefill_seconds=prefill_seconds, total_seconds=total_seconds,
    )
