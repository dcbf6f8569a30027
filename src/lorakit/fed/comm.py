"""Communication accounting: payload bytes up and down, per round and per client.

A payload is counted as the tensors it carries (``numel × element size``), which is what any encoding
must move at least; Flower's own framing and the small config records are not counted.  Round 0 is
Fed-SB's one-time shared init: nothing with the default server-side init, one client's B, R, A with
``init_source = client``, every client's dense gradient sums with ``clients``.  Its B and A go down with
each client's first training message and are counted there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

INIT_ROUND = 0


def payload_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Bytes of the tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def core_upload_bytes(r: int, matrices: int, bytes_per_element: int = 4) -> int:
    """Fed-SB's upload per client per round without heads: ``r² × #matrices × bytes per element``."""
    return r * r * matrices * bytes_per_element


def lora_upload_bytes(r: int, shapes: list[tuple[int, int]], bytes_per_element: int = 4) -> int:
    """FedIT / FedEx-LoRA upload per client per round without heads: ``Σ r (d_in + d_out)`` elements."""
    return sum(r * (d_in + d_out) for d_out, d_in in shapes) * bytes_per_element


@dataclass
class CommLedger:
    """Every transfer as ``(round, client, direction, what, bytes)``; sums by round, client and direction."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def add(self, round_: int, client: int | str, up: int = 0, down: int = 0, what: str = "") -> None:
        self.entries.append({"round": round_, "client": str(client), "up": int(up), "down": int(down), "what": what})

    def per_round(self) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        for e in self.entries:
            row = out.setdefault(e["round"], {"up": 0, "down": 0})
            row["up"] += e["up"]
            row["down"] += e["down"]
        return dict(sorted(out.items()))

    def per_client(self, round_: int) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for e in self.entries:
            if e["round"] == round_:
                row = out.setdefault(e["client"], {"up": 0, "down": 0})
                row["up"] += e["up"]
                row["down"] += e["down"]
        return out

    def totals(self, through_round: int | None = None) -> dict[str, int]:
        rows = [e for e in self.entries if through_round is None or e["round"] <= through_round]
        return {"up": sum(e["up"] for e in rows), "down": sum(e["down"] for e in rows)}

    def to_json(self) -> list[dict[str, Any]]:
        return list(self.entries)

    @classmethod
    def from_json(cls, entries: list[dict[str, Any]]) -> CommLedger:
        return cls([dict(e) for e in entries])
