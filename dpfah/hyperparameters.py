"""The methods' names and hyper-parameters, without torch: the registry of :mod:`dpfah.methods`.

Per method: its hyper-parameters' defaults, the ones worth searching, the allowed values of
the categorical ones and lower bounds. The classes take these declarations
(:class:`dpfah.methods.base.Declared`), so a knob and its default are written here once; each
class's docstring says where a default comes from (the paper's, or the code zoo's). A
pipeline checks its parameters against them without importing torch (about 1.3 s on 2 cores).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PAIR_SETS", "Declaration", "REGISTRY"]

#: Which pairs a pairwise objective sees (every method's ``pairs`` hyper-parameter):
#: ``batch``: the (global) mini-batch, ordered pairs i != j; ``memory``: the batch against
#: every row of a :class:`dpfah.objective.Memory`, rows not written yet included (zero codes,
#: no label: they count as dissimilar pairs with theta = 0; DeepHash-pytorch's U, DPSH style);
#: ``bank``: the batch against only the rows written so far.
PAIR_SETS = ("batch", "memory", "bank")


@dataclass(frozen=True)
class Declaration:
    """A method's hyper-parameters."""

    defaults: dict[str, Any]
    tunable: tuple[str, ...] = ()
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=lambda: {"pairs": PAIR_SETS})
    at_least: Mapping[str, float] = field(default_factory=dict)


#: name -> declaration, in the registry's order: DPFAH, then the paper's Table 6.
REGISTRY: dict[str, Declaration] = {
    # The paper's best weights eta = 10 and zeta = 0.1 (its Tables 3 and 4, Eq. 15), the band
    # delta = 1.1, in-batch pairs (the paper does not say which pairs; ``bank``: this project's
    # memory choice for DPFAH). dpfah.loss.DPFAHLoss reads these too.
    "dpfah": Declaration(
        {"eta": 10.0, "zeta": 0.1, "delta": 1.1, "pairs": "batch"},
        tunable=("eta", "zeta"),
        at_least={"eta": 0.0, "zeta": 0.0, "delta": 0.0},
    ),
    "dpsh": Declaration({"eta": 10.0, "pairs": "memory"}, tunable=("eta",)),
    "dsh": Declaration({"margin": None, "alpha": 0.01, "pairs": "batch"}, tunable=("alpha",)),
    "dhn": Declaration({"lam": 0.1, "pairs": "batch"}, tunable=("lam",)),
    "hashnet": Declaration(
        {
            "alpha": None,
            "schedule": "iteration",
            "gamma": 0.005,
            "power": 0.5,
            "step_size": 200,
            "label_cosine": True,
            "pairs": "batch",
        },
        tunable=("alpha", "gamma"),
        choices={"pairs": PAIR_SETS, "schedule": ("iteration", "epoch"), "label_cosine": (True, False)},
    ),
    "dsdh": Declaration(
        {"mu": 1.0, "nu": 0.1, "eta": 55.0, "dcc_iter": 10, "seed": 0, "pairs": "memory"},
        tunable=("mu", "nu", "eta"),
        choices={"pairs": ("memory",)},
    ),
    "dfh": Declaration(
        {
            "mu": 1.0,
            "vul": 1.0,
            "nta": 1.0,
            "eta": 0.5,
            "margin": 3.0,
            "center_steps": 200,
            "center_lr": 0.03,
            "center_milestones": (150, 180),
            "seed": 0,
            "pairs": "memory",
        },
        tunable=("mu", "eta", "margin"),
    ),
    "idhn": Declaration({"beta": 5.0, "gamma": 0.1, "lam": 0.1, "pairs": "batch"}, tunable=("gamma", "lam")),
    "dbdh": Declaration({"alpha": 0.1, "p": 2, "pairs": "memory"}, tunable=("alpha",)),
    "lcdsh": Declaration({"lam": 3.0, "pairs": "batch"}, tunable=("lam",)),
}
