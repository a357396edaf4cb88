"""Targets as data: one JSON file per target in compiler/targets/, validated against a JSON Schema at load."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema

from compiler.errors import TargetError

TARGETS_DIR = Path(__file__).resolve().parent / "targets"


@dataclass(frozen=True)
class Target:
    """A deployment target: precision, what DRP-AI runs (with constraints), memory area, speed facts."""

    name: str
    description: str
    soc: str
    accelerator: str
    precision: str
    quantization: dict | None
    accelerator_ops: dict[str, dict]
    cpu_ops: tuple[str, ...]
    float_ops: tuple[str, ...]
    memory_base: int
    memory_size: int
    alignment: int
    channel_round_to: int
    sparsity: dict
    dense_tops: float
    efficiency: float
    clock_mhz: float
    dma_gbps: float
    transfer_overhead_us: float
    cpu: dict
    default_prune_mode: str
    default_pipeline: str

    def to_summary(self) -> dict[str, Any]:
        """The key facts, JSON-ready (for `drpc targets` and deploy.json)."""
        return {
            "name": self.name, "description": self.description, "soc": self.soc, "accelerator": self.accelerator,
            "precision": self.precision, "quantization": self.quantization,
            "memory": {"base": self.memory_base, "size": self.memory_size, "alignment": self.alignment},
            "channel_round_to": self.channel_round_to, "sparsity": self.sparsity, "dense_tops": self.dense_tops,
            "cpu": self.cpu, "default_prune_mode": self.default_prune_mode, "default_pipeline": self.default_pipeline,
            "accelerator_ops": sorted(self.accelerator_ops), "float_ops": list(self.float_ops),
        }


def target_names() -> list[str]:
    """Names of every shipped target."""
    folder = TARGETS_DIR
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json") and p.name != "target.schema.json")


def load_target(name: str) -> Target:
    """Load and validate the target `name`; TargetError names the known targets or the bad field."""
    if name not in target_names():
        raise TargetError(f"unknown target '{name}' (known: {', '.join(target_names())})")
    return _load(name)


def list_targets() -> list[Target]:
    """Every shipped target, by name."""
    return [load_target(n) for n in target_names()]


@lru_cache(maxsize=None)
def _load(name: str) -> Target:
    folder = TARGETS_DIR
    filename = f"{name}.json"
    try:
        data = json.loads((folder / filename).read_text())
    except json.JSONDecodeError as exc:
        raise TargetError(f"target file {filename} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    schema = json.loads((folder / "target.schema.json").read_text())
    error = next(iter(jsonschema.Draft202012Validator(schema).iter_errors(data)), None)
    if error is not None:
        where = "/".join(map(str, error.absolute_path)) or "(root)"
        raise TargetError(f"target file {filename}: {where}: {error.message}")
    mem = data["memory"]
    return Target(
        name=data["name"], description=data["description"], soc=data["soc"], accelerator=data["accelerator"],
        precision=data["precision"], quantization=data.get("quantization"), accelerator_ops=data["accelerator_ops"],
        cpu_ops=tuple(data["cpu_ops"]), float_ops=tuple(data["float_ops"]), memory_base=int(mem["base"], 16),
        memory_size=int(mem["size"]), alignment=int(mem["alignment"]), channel_round_to=int(data["channel_round_to"]),
        sparsity=data["sparsity"], dense_tops=float(data["dense_tops"]), efficiency=float(data["efficiency"]),
        clock_mhz=float(data.get("clock_mhz", 0)), dma_gbps=float(data["dma_gbps"]),
        transfer_overhead_us=float(data["transfer_overhead_us"]), cpu=data["cpu"],
        default_prune_mode=data["default_prune_mode"], default_pipeline=data["default_pipeline"])
