"""Dense storage: keys and values as the model produced them ([B, cap, d] each)."""

from __future__ import annotations

import torch

from .base import Payload, StorageFormat, gather_slots, grown


class Dense(StorageFormat):
    """Keys and values kept as they are (post-RoPE keys, the model's dtype)."""

    name = "dense"

    @property
    def payload_class(self):
        return DensePayload


class DensePayload(Payload):
    packable = True

    def __init__(self, fmt: Dense, keys: torch.Tensor, values: torch.Tensor, reserve: int):
        self.format = fmt
        B, k, d = keys.shape
        cap = k + max(0, reserve)
        self.keys = keys.new_empty(B, cap, d)
        self.values = values.new_empty(B, cap, values.shape[-1])
        self.keys[:, :k] = keys
        self.values[:, :k] = values

    @property
    def d(self) -> int:
        return self.keys.shape[-1]

    @property
    def dv(self) -> int:
        return self.values.shape[-1]

    @property
    def dtype(self):
        return self.keys.dtype

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    def append(self, keys, values, at: int) -> None:
        q = keys.shape[1]
        self.keys[:, at : at + q] = keys
        self.values[:, at : at + q] = values

    def move(self, dst: torch.Tensor, src: int) -> None:
        if dst.shape[0] == 1 and dst.device.type == "cpu":  # one row on the CPU: plain views, no index tensors
            s = int(dst)
            if s != src:
                self.keys[0, s] = self.keys[0, src]
                self.values[0, s] = self.values[0, src]
            return
        rows = torch.arange(dst.shape[0], device=dst.device)
        for t in (self.keys, self.values):
            t[rows, dst] = t[:, src].clone()

    def keep(self, slots: torch.Tensor, n: int):
        m = slots.shape[1]
        for t in (self.keys, self.values):
            t[:, :m] = gather_slots(t, slots)
        return None

    def grow(self, cap: int) -> None:
        n = self.keys.shape[1]
        self.keys, self.values = grown(self.keys, cap, n), grown(self.values, cap, n)

    def shrink(self, cap: int) -> None:
        self.keys, self.values = self.keys[:, :cap].clone(), self.values[:, :cap].clone()

    def select_batch(self, index: torch.Tensor) -> None:
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)

    def kv(self, n: int):
        return self.keys[:, :n], self.values[:, :n]

    def nbytes(self, n: int) -> int:
        return self.batch * n * (self.d * self.keys.element_size() + self.dv * self.values.element_size())

    def allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def dense_bytes_per_entry(self) -> int:
        return self.d * self.keys.element_size() + self.dv * self.values.element_size()

    def state(self, n: int):
        return {"keys": self.keys[:, :n], "values": self.values[:, :n]}, {}

    def restore(self, tensors, scalars, n: int, reserve: int) -> None:
        k, v = tensors["keys"], tensors["values"]
        self.keys = grown(k, n + reserve, n)
        self.values = grown(v, n + reserve, n)
