"""A pool replica's adapters: one base model in memory, LoRA adapters loaded into it by name.

Ray Serve's model multiplexing decides *which* variants a replica holds (``@serve.multiplexed``:
an LRU of ``max_models_per_replica`` per replica, and routing that prefers a replica already
holding the requested variant); this module does the holding. Every change to the model's
modules runs on the engine core's decoding thread between two steps (``EngineLoop.call``), and an
evicted adapter stays until no waiting or running sequence needs it, so an eviction never
breaks a request in flight.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from modelfleet.models import lora

logger = logging.getLogger("ray.serve")


def variant_id(name: str, artifact: str) -> str:
    """The multiplexed model id of a variant: its name and artifact, so a variant removed and added
    again with other weights is a new id (never the old adapter from a replica's cache)."""
    return f"{name}={artifact}"


def parse_variant_id(model_id: str) -> tuple[str, str]:
    name, sep, artifact = model_id.partition("=")
    if not sep or not name or not artifact:
        raise ValueError(f"multiplexed model id {model_id!r} is not <variant>=<artifact>")
    return name, artifact


def adapter_key(model_id: str) -> str:
    """The adapter's name inside peft (module keys allow no '.', artifact paths have them)."""
    return "v" + hashlib.sha1(model_id.encode()).hexdigest()[:16]


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (what the weights hold, not process RSS)."""
    seen: dict[int, int] = {}
    for t in (*module.parameters(), *module.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


@dataclass
class AdapterPool:
    """The adapters loaded into one base model (``family`` says where peft wraps it)."""

    model: nn.Module
    family: Any
    device: Any = None
    loaded: dict[str, str] = field(default_factory=dict)
    """adapter name -> the local directory it was loaded from."""
    evicted: set[str] = field(default_factory=set)
    """Loaded adapters to delete once no sequence uses them."""
    nbytes: int = 0
    """``tensor_bytes`` of the model with its adapters, as of the last load or unload."""

    def __post_init__(self) -> None:
        self.nbytes = tensor_bytes(self.model)

    # All methods below run on the decoding thread (EngineLoop.call, Engine.step).
    def load(self, name: str, local_dir: str) -> float:
        """Load (or keep) adapter ``name``; returns the seconds the load took (0 when present)."""
        self.evicted.discard(name)
        if name in self.loaded:
            return 0.0
        t0 = time.perf_counter()
        root = self.family.peft_root(self.model)
        # Checked against the base before anything touches it; the load itself is all or nothing.
        conf = json.loads((Path(local_dir) / lora.ADAPTER_CONFIG).read_text())
        lora.check_adapter_config(conf, getattr(self.family, "lora_targets", None), name)
        lora.check_adapter_tensors(str(Path(local_dir) / lora.ADAPTER_WEIGHTS), root, conf, name)
        kw = {"torch_device": str(self.device)} if self.device is not None else {}
        if isinstance(root, lora.peft().PeftModel):
            try:
                root.load_adapter(local_dir, adapter_name=name, **kw)
            except Exception:
                if name in root.peft_config:
                    root.delete_adapter(name)
                raise
        else:
            try:
                root = lora.peft().PeftModel.from_pretrained(root, local_dir, adapter_name=name, **kw)
            except Exception:
                lora.uninject(root)
                raise
            self.model = self.family.set_peft_root(self.model, root)
        root.eval()
        lora.install_row_hooks(root)
        self.loaded[name] = local_dir
        self.nbytes = tensor_bytes(self.model)
        return time.perf_counter() - t0

    def evict(self, name: str) -> None:
        if name in self.loaded:
            self.evicted.add(name)

    def collect(self, in_use: set[str]) -> None:
        """Delete evicted adapters that no sequence needs any more."""
        for name in [n for n in self.evicted if n not in in_use]:
            self.evicted.discard(name)
            self.family.peft_root(self.model).delete_adapter(name)
            self.loaded.pop(name, None)
            self.nbytes = tensor_bytes(self.model)
            logger.info("adapter %s unloaded", name)

    def stats(self) -> dict[str, Any]:
        """Safe from any thread: copies, no walk over the modules."""
        return {"adapters_loaded": len(set(self.loaded) - set(self.evicted)), "tensor_bytes": self.nbytes}


@dataclass(eq=False)
class Variant:
    """What the multiplexed loader hands Serve's LRU for one variant. Serve calls ``__del__`` when
    it evicts the variant; the adapter then leaves the pool once unused."""

    name: str
    key: str
    """The adapter's name in the pool (``adapter_key``)."""
    local_dir: str
    loaded_at: float
    load_s: float
    release: Any = None
    _released: bool = False

    def __del__(self) -> None:
        # Serve calls this on eviction, and Python again at garbage collection: act once.
        if not self._released and self.release is not None:
            self._released = True
            try:
                self.release(self)
            except Exception:  # noqa: BLE001 - the replica may be shutting down
                pass
