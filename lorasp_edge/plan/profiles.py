"""Device profiles: how much memory a device gives a training process, and what runs there.

One YAML file per device in the repository's top-level `profiles/`, installed with the package:
`lorasp_edge/plan/profiles` links to it, and a wheel carries the files there (one copy in the repository):

    name: raspberry-pi-5-8gb
    device_kind: cpu            # cpu | cuda | mps
    unified_memory: false       # cuda only: GPU and host process share the memory (Jetson)
    memory: 8GiB                # physical memory (device memory for a discrete GPU)
    reserved: 0.15              # share the OS, driver and other programs keep
    bf16: false                 # whether bf16 compute is fast and exact there
    quant_bits: [4, 8, 16]      # frozen-base formats that run there (bitsandbytes backends)

The budget a profile gives is memory x (1 - reserved). `--profile` also takes a path to such a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorasp_edge.errors import UserError


def _profile_dir() -> Path:
    """The repository's profiles/ (linked as lorasp_edge/plan/profiles; a wheel holds the files there)."""
    return Path(__file__).parent / "profiles"


DEVICE_KINDS = ("cpu", "cuda", "mps")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    device_kind: str
    memory_bytes: int
    reserved: float
    bf16: bool
    quant_bits: tuple[int, ...]
    unified_memory: bool = False
    source: str = ""

    @property
    def budget_bytes(self) -> int:
        return int(self.memory_bytes * (1.0 - self.reserved))


def profile_names() -> list[str]:
    return sorted(path.stem for path in _profile_dir().glob("*.yaml"))


def list_profiles() -> list[Profile]:
    return [load_profile(name) for name in profile_names()]


def load_profile(name: str) -> Profile:
    """A bundled profile by name, or a YAML file by path."""
    path = _profile_dir() / f"{name}.yaml"
    if not path.is_file():
        candidate = Path(name).expanduser()
        if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
            path = candidate
        else:
            raise UserError(f"unknown profile '{name}': use a YAML file or one of: {', '.join(profile_names())}")
    return _parse(path)


def _parse(path: Path) -> Profile:
    import yaml

    from lorasp_edge.plan.units import parse_memory

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UserError(f"{path}: not a readable YAML file ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a YAML mapping")
    problems = []
    kind = data.get("device_kind")
    if kind not in DEVICE_KINDS:
        problems.append(f"device_kind must be one of {', '.join(DEVICE_KINDS)}, not {kind!r}")
    memory_bytes = 0
    try:
        memory_bytes = parse_memory(str(data.get("memory", "")))
    except UserError as error:
        problems.append(f"memory: {error}")
    reserved = data.get("reserved", 0.0)
    if isinstance(reserved, bool) or not isinstance(reserved, (int, float)) or not 0 <= reserved < 1:
        problems.append(f"reserved must be a share in [0, 1), not {reserved!r}")
    if not isinstance(data.get("bf16", False), bool):
        problems.append(f"bf16 must be true or false, not {data.get('bf16')!r}")
    bits = data.get("quant_bits", [16])
    if not isinstance(bits, list) or not bits or any(b not in (4, 8, 16) for b in bits):
        problems.append(f"quant_bits must be a list drawn from 4, 8, 16, not {bits!r}")
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems))
    return Profile(
        name=str(data.get("name", path.stem)),
        description=str(data.get("description", "")),
        device_kind=kind,
        memory_bytes=memory_bytes,
        reserved=float(reserved),
        bf16=bool(data.get("bf16", False)),
        quant_bits=tuple(sorted(set(bits), reverse=True)),
        unified_memory=bool(data.get("unified_memory", False)),
        source=str(data.get("source", "")),
    )


def format_profiles(profiles: list[Profile]) -> str:
    rows = [("profile", "kind", "memory", "reserved", "budget", "bf16", "bits", "device")]
    for p in profiles:
        rows.append(
            (
                p.name,
                p.device_kind + (" (unified)" if p.unified_memory else ""),
                f"{p.memory_bytes / 2**30:.0f} GiB",
                f"{p.reserved:.0%}",
                f"{p.budget_bytes / 1e9:.2f} GB",
                "yes" if p.bf16 else "no",
                "/".join(str(b) for b in p.quant_bits),
                p.description,
            )
        )
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows)
