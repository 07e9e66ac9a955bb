"""Name → object registries. A name can be registered once; an unknown name lists the known ones."""

from __future__ import annotations

from typing import Generic, TypeVar

from vtprune.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, key: str):
        self.kind = kind  # "strategy", used in messages
        self.key = key  # the config key that names one, e.g. "pruning.strategy"
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(f"{self.key}: unknown {self.kind} '{name}' (allowed: {', '.join(self.names())})")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def in_order(self) -> list[str]:
        """The names in the order they were registered."""
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __contains__(self, name: str) -> bool:
        return name in self._items
