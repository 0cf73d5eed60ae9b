"""The critical-neuron mask: which down-projection columns SIMU may update, per layer.

Produced by thresholding attribution scores (``simu_core.thresholding``), consumed by the
unlearning engine, which turns it into per-parameter column masks for masked Sophia. Serialises
to a Parquet table ``(layer, neuron, critical_forget, critical_retain, dual, in_mask)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

MASK_COLUMNS = ("layer", "neuron", "critical_forget", "critical_retain", "dual", "in_mask")


@dataclass(frozen=True)
class NeuronMask:
    """Per layer, the sorted indices of neurons in the mask, and each layer's neuron count."""

    neurons: tuple[tuple[int, ...], ...]
    num_neurons: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.neurons) != len(self.num_neurons):
            raise ValueError(f"mask has {len(self.neurons)} layers of indices but {len(self.num_neurons)} layer sizes")
        for layer, (indices, size) in enumerate(zip(self.neurons, self.num_neurons)):
            if any(not 0 <= index < size for index in indices):
                raise ValueError(f"mask layer {layer}: neuron index out of range [0, {size})")
            if list(indices) != sorted(set(indices)):
                raise ValueError(f"mask layer {layer}: indices must be sorted and unique")

    @classmethod
    def from_boolean(cls, per_layer: Sequence[np.ndarray | torch.Tensor]) -> "NeuronMask":
        """Build from one boolean vector per layer."""
        arrays = [np.asarray(vector, dtype=bool) for vector in per_layer]
        return cls(
            neurons=tuple(tuple(int(i) for i in np.flatnonzero(array)) for array in arrays),
            num_neurons=tuple(len(array) for array in arrays),
        )

    @property
    def num_layers(self) -> int:
        return len(self.num_neurons)

    def layer_indices(self, layer: int) -> torch.Tensor:
        """Neuron indices of ``layer`` as a LongTensor (the trainable down-projection columns)."""
        return torch.tensor(self.neurons[layer], dtype=torch.long)

    def counts(self) -> list[int]:
        """Number of masked neurons per layer."""
        return [len(indices) for indices in self.neurons]

    def total(self) -> int:
        """Number of masked neurons over all layers."""
        return sum(self.counts())

    def fraction(self) -> float:
        """Masked neurons / all neurons."""
        return self.total() / max(1, sum(self.num_neurons))

    def check_matches(self, neurons_per_layer: Sequence[int]) -> None:
        """Raise ValueError unless the mask has the model's layer count and neuron counts."""
        if list(neurons_per_layer) != list(self.num_neurons):
            raise ValueError(
                f"mask shape does not match the model: mask has {self.num_layers} layers with neuron counts "
                f"{list(self.num_neurons)[:4]}{'...' if self.num_layers > 4 else ''}, the model has "
                f"{len(neurons_per_layer)} layers with {list(neurons_per_layer)[:4]}"
                f"{'...' if len(neurons_per_layer) > 4 else ''}"
            )

    def to_table(
        self,
        critical_forget: NeuronMask | None = None,
        critical_retain: NeuronMask | None = None,
    ) -> pd.DataFrame:
        """The mask table: one row per neuron of every layer."""
        rows = []
        for layer, size in enumerate(self.num_neurons):
            in_mask = np.zeros(size, dtype=bool)
            in_mask[list(self.neurons[layer])] = True
            forget = _as_bool(critical_forget, layer, size)
            retain = _as_bool(critical_retain, layer, size)
            rows.append(
                pd.DataFrame(
                    {
                        "layer": np.full(size, layer, dtype=np.int32),
                        "neuron": np.arange(size, dtype=np.int32),
                        "critical_forget": forget,
                        "critical_retain": retain,
                        "dual": forget & retain,
                        "in_mask": in_mask,
                    }
                )
            )
        return pd.concat(rows, ignore_index=True)

    @classmethod
    def from_table(cls, table: pd.DataFrame) -> "NeuronMask":
        """Rebuild the mask from its table (``in_mask`` column)."""
        missing = [column for column in ("layer", "neuron", "in_mask") if column not in table.columns]
        if missing:
            raise ValueError(f"mask table lacks columns {missing}")
        per_layer = []
        for layer in range(int(table["layer"].max()) + 1):
            rows = table[table["layer"] == layer].sort_values("neuron")
            per_layer.append(rows["in_mask"].to_numpy(dtype=bool))
        return cls.from_boolean(per_layer)

    def save(self, path: str | Path, **tables: NeuronMask | None) -> None:
        """Write :meth:`to_table` as Parquet."""
        self.to_table(**tables).to_parquet(path, index=False)

    @classmethod
    def load(cls, path: str | Path) -> "NeuronMask":
        """Read a mask table written by :meth:`save`."""
        return cls.from_table(pd.read_parquet(path))


def random_neurons(counts: Sequence[int], widths: Sequence[int], rng: np.random.Generator) -> NeuronMask:
    """``counts[l]`` neurons of layer l (of ``widths[l]``) drawn uniformly without replacement, layer by layer."""
    if len(counts) != len(widths):
        raise ValueError(f"random set: {len(counts)} per-layer counts for a model with {len(widths)} layers")
    per_layer = []
    for layer, (count, width) in enumerate(zip(counts, widths)):
        if not 0 <= count <= width:
            raise ValueError(f"random set: {count} neurons asked in layer {layer}, which has {width}")
        chosen = np.zeros(width, dtype=bool)
        chosen[rng.choice(width, size=count, replace=False)] = True
        per_layer.append(chosen)
    return NeuronMask.from_boolean(per_layer)


def _as_bool(mask: NeuronMask | None, layer: int, size: int) -> np.ndarray:
    vector = np.zeros(size, dtype=bool)
    if mask is not None:
        vector[list(mask.neurons[layer])] = True
    return vector
