"""Name -> builder registries (models, switchers, datasets, methods); unknown names list the choices."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name no builder is registered under; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str, key: str) -> None:
        self.kind = kind  # e.g. "model"
        self.key = key  # the config key users set, named in errors, e.g. "model.name"
        self._items: dict[str, T] = {}
        self._traits: dict[str, dict] = {}

    def register(self, name: str, **traits) -> Callable[[T], T]:
        """Register under `name`; `traits` are facts other modules read about the entry (e.g. how a
        dataset is stored) instead of branching on its name."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            self._traits[name] = dict(traits)
            return obj

        return add

    def traits(self, name: str) -> dict:
        self.get(name)  # an unknown name fails listing the choices
        return self._traits[name]

    def get(self, name: str, key: str | None = None) -> T:
        """The builder registered as `name`; `key` names the config key in the error where the
        registry serves several (optim.tnn.name and optim.snn.name)."""
        if name not in self._items:
            raise UnknownNameError(
                f"{key or self.key}: unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
