"""Model architectures as data: what the planner needs to know about a model without its weights.

A model is named by a catalog id (`lorasp_edge/catalog/<id>.json`: the Hugging Face `config.json`
fields that set the shapes, the hub id, and the published parameter count with its source) or by a
local folder holding a `config.json`. From those fields alone:

    decoder linears   per layer, llama family:  q (h -> H d), k, v (h -> K d), o (H d -> h),
                      gate, up (h -> i), down (i -> h)        h hidden, H heads, K kv heads, d head dim
    embeddings        V h  (+ V h for an untied lm_head; GPT-2 adds its position table)
    norms, biases     the rest; they stay in float when the linears are quantized

`Architecture.parameters()` counts them; tests hold each catalog entry to its published count
(within 1%) and to the count of the transformers model built from the same config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lorasp_edge.errors import UserError
from lorasp_edge.families import FAMILIES, Family, family

CATALOG_DIR = Path(__file__).parent / "catalog"
DEFAULT_MODEL = "smollm2-135m"
SUPPORTED = tuple(FAMILIES)


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder layer: PEFT target name (the module's short name) and shape."""

    name: str
    d_in: int
    d_out: int
    bias: bool = False

    @property
    def weight_params(self) -> int:
        return self.d_in * self.d_out


@dataclass(frozen=True)
class Architecture:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    max_positions: int | None = None
    checkpoint_dtype: str = "float32"  # dtype of the weights on disk (config "dtype" / "torch_dtype")

    @classmethod
    def from_config(cls, config: dict, source: str = "config") -> "Architecture":
        """Read the shape fields of a Hugging Face `config.json` dict."""
        model_type = config.get("model_type")
        checkpoint_dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
        fam = family(model_type, source)
        names = fam.config_names
        try:
            hidden = int(config[names.hidden_size])
            heads = int(config[names.num_heads])
            intermediate = config.get(names.intermediate_size)
            if intermediate is None and names.intermediate_factor is None:
                raise KeyError(names.intermediate_size)
            return cls(
                model_type=model_type,
                hidden_size=hidden,
                intermediate_size=int(intermediate or names.intermediate_factor * hidden),
                num_layers=int(config[names.num_layers]),
                num_heads=heads,
                num_kv_heads=int(config.get(names.num_kv_heads) or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab_size=int(config["vocab_size"]),
                # transformers' default differs by family: Gemma and GPT-2 tie unless told otherwise.
                tie_embeddings=bool(config.get("tie_word_embeddings", fam.tie_embeddings)),
                max_positions=config.get(names.max_positions, names.default_positions),
                checkpoint_dtype=checkpoint_dtype,
            )
        except KeyError as error:
            raise UserError(f"{source}: config is missing field {error.args[0]!r}") from None
        except (TypeError, ValueError) as error:
            raise UserError(f"{source}: config has a malformed shape field ({error})") from None

    # --------------------------------------------------------------------------- structure

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def family(self) -> Family:
        return family(self.model_type)

    def linears(self) -> list[Linear]:
        """The linear layers of one decoder layer, as PEFT sees them (short name, d_in, d_out)."""
        fam, sizes = self.family, (self.hidden_size, self.intermediate_size, self.q_size, self.kv_size)
        return [Linear(name, fam.width(d_in, *sizes), fam.width(d_out, *sizes), fam.has_bias(name)) for name, d_in, d_out in fam.linears]

    def module_names(self) -> list[str]:
        """Distinct linear short names in forward order: the possible LoRA targets."""
        return list(dict.fromkeys(linear.name for linear in self.linears()))

    @property
    def norms_per_layer(self) -> int:
        return self.family.norms_per_layer

    def layer_float_params(self) -> int:
        """Parameters of one decoder layer that are not linear weights: norms and biases."""
        h = self.hidden_size
        norm = 2 * h if self.family.norm_kind == "layer" else h  # LayerNorm has a bias, RMSNorm not
        biases = sum(linear.d_out for linear in self.linears() if linear.bias)
        qk_norm = 2 * self.head_dim if self.family.qk_norm else 0
        return self.norms_per_layer * norm + biases + qk_norm

    def parameters(self) -> dict[str, int]:
        """Parameter counts by part; `total` is what `model.num_parameters()` reports."""
        h, v = self.hidden_size, self.vocab_size
        embedding = v * h + (self.max_positions * h if self.family.learned_positions else 0)
        lm_head = 0 if self.tie_embeddings else v * h
        linear = self.num_layers * sum(linear.weight_params for linear in self.linears())
        final_norm = 2 * h if self.family.norm_kind == "layer" else h
        float_other = self.num_layers * self.layer_float_params() + final_norm
        return {
            "embedding": embedding,
            "lm_head": lm_head,
            "linear": linear,
            "norms_and_biases": float_other,
            "total": embedding + lm_head + linear + float_other,
        }


@dataclass(frozen=True)
class ModelInfo:
    """What `--model` named: a catalog entry or a local folder."""

    name: str
    architecture: Architecture
    hf_id: str | None = None
    published_params: int | None = None
    published_source: str | None = None
    path: str | None = None


@lru_cache(maxsize=None)
def _catalog() -> dict[str, dict]:
    entries = {}
    for path in sorted(CATALOG_DIR.glob("*.json")):
        entry = json.loads(path.read_text())
        entries[entry["id"]] = entry
    return entries


def catalog_ids() -> list[str]:
    return list(_catalog())


def catalog_entry(model_id: str) -> dict:
    return _catalog()[model_id]


def canonical_model_name(name: str) -> str:
    """A local folder as an absolute path (so a plan, a run, its adapter and its export find it from
    any working directory); a bundled alias, catalog id or hub id as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def model_info(name: str | None) -> ModelInfo:
    """A catalog id (case-insensitive; also its hub id) or a local folder with a config.json."""
    name = name or DEFAULT_MODEL
    entries = _catalog()
    key = name.lower()
    by_hub_id = {entry["hf_id"].lower(): model_id for model_id, entry in entries.items()}
    model_id = key if key in entries else by_hub_id.get(key)
    if model_id is not None:
        entry = entries[model_id]
        return ModelInfo(
            name=model_id,
            architecture=Architecture.from_config(entry["config"], source=f"catalog entry {model_id}"),
            hf_id=entry["hf_id"],
            published_params=entry["published_params"],
            published_source=entry["published_source"],
        )
    path = Path(name).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise UserError(f"model '{name}': folder has no config.json")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"{config_path}: not a readable JSON file ({error})") from None
        if not isinstance(config, dict):
            raise UserError(f"{config_path}: expected a JSON object")
        return ModelInfo(name=canonical_model_name(name), architecture=Architecture.from_config(config, source=str(config_path)), path=str(path))
    if path.exists():
        raise UserError(f"model '{name}': not a folder (expected a Hugging Face model folder with config.json)")
    raise UserError(f"unknown model '{name}': use a local folder with config.json or one of: {', '.join(entries)}")
