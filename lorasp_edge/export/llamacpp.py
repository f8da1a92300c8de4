"""llama.cpp through llama-cpp-python: what GGUF verification, `generate` and the benchmarks run.

llama-cpp-python is optional (it builds llama.cpp from source: `pip install lorasp-edge[gguf]`).
`available()` says whether it is importable; `LlamaCppModel` raises UserError when it is not.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from lorasp_edge.errors import UserError

INSTALL_HINT = "pip install llama-cpp-python (builds llama.cpp from source; minutes)"


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def is_adapter(path: str | Path) -> bool:
    """Whether a GGUF file is a LoRA adapter (general.type 'adapter') rather than a model."""
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).fields.get("general.type")
    except (ValueError, IndexError, KeyError, OSError):  # a damaged file: loading it reports the problem
        return False
    return field is not None and field.contents() == "adapter"


class LlamaCppModel:
    """One llama.cpp context over a GGUF file (and a LoRA adapter GGUF applied at run time, as
    `llama-cli --lora` does); logits for every position of an evaluated sequence. `use_mmap=False`
    reads the weights into llama.cpp's own buffers instead of mapping the file: where its CPU backend
    copies the weights anyway (it did on an AMX CPU), a mapping keeps both resident."""

    def __init__(self, path: str | Path, context: int = 512, threads: int | None = None, lora: str | Path | None = None,
                 use_mmap: bool = True, extra_buffers: bool = True):
        """`extra_buffers=False` keeps every weight in llama.cpp's plain CPU buffer: no repacking into
        the AVX512/AMX kernels' layouts (llama_model_params.use_extra_bufts), which are faster where
        they work and crash where they do not (ggml-org/llama.cpp issue #20824: a segfault in
        ggml_backend_amx_mul_mat)."""
        if not available():
            raise UserError(f"{path}: running a GGUF file needs llama-cpp-python: {INSTALL_HINT}")
        import llama_cpp

        self.path = Path(path)
        kwargs = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
        if not extra_buffers:
            kwargs["use_extra_bufts"] = False
        if lora is not None:
            kwargs["lora_path"] = str(lora)
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(self.path), n_ctx=context, n_batch=min(context, 512), logits_all=True, verbose=False, use_mmap=use_mmap, **kwargs,
            )
        except (ValueError, RuntimeError) as error:
            with_lora = f" with the adapter {lora}" if lora is not None else ""
            raise UserError(f"{self.path}: llama.cpp cannot load it{with_lora} ({str(error).splitlines()[0]})") from None
        self.context = context
        self.length = 0

    @property
    def vocab_size(self) -> int:
        return self.llm.n_vocab()

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) logits of one sequence, from an empty cache."""
        if len(ids) > self.context:
            raise UserError(f"{len(ids)} tokens do not fit llama.cpp's context of {self.context}")
        self.llm.reset()
        self.llm.eval(list(ids))
        self.length = len(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    # the stepper interface of lorasp_edge.generate: prefill once, then one token a step
    def prefill(self, token_ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(list(token_ids))
        self.length = len(token_ids)
        return np.array(self.llm.scores[self.length - 1], dtype=np.float32)

    def step(self, token_id: int) -> np.ndarray:
        if self.length + 1 > self.context:
            raise UserError(f"generation passed llama.cpp's context of {self.context} tokens")
        self.llm.eval([token_id])
        self.length += 1
        return np.array(self.llm.scores[self.length - 1], dtype=np.float32)

    def greedy(self, prompt: list[int], count: int) -> list[int]:
        """`count` raw-argmax tokens after `prompt`, each chosen from llama.cpp's own logits."""
        tokens: list[int] = []
        logits = self.prefill(prompt)
        for index in range(count):
            tokens.append(int(np.argmax(logits)))
            if index + 1 < count:
                logits = self.step(tokens[-1])
        return tokens

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
