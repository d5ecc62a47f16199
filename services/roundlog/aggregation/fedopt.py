"""Server optimizers: FedAvgM (Hsu et al. 2019) and FedAdam, FedYogi, FedAdagrad (Reddi et al. 2021).

Each folds the example-weighted mean of the client models exactly like FedAvg, then
takes one optimizer step at ``finalize`` with the pseudo-gradient Δ = mean - x
(x = the round's base model). With m₀ = 0 and t the step count (1 on the first step):

- FedAvgM:    m ← μ·m + Δ;                 x ← x + η·m
- m (FedOpt): m ← β₁·m + (1-β₁)·Δ
- FedAdam:    v ← β₂·v + (1-β₂)·Δ²
- FedYogi:    v ← v - (1-β₂)·Δ²·sign(v - Δ²)
- FedAdagrad: v ← v + Δ²
- FedOpt:     x ← x + η·m / (√v + τ), with η·√(1-β₂ᵗ)/(1-β₁ᵗ) instead of η when ``bias_correction``

Defaults are those of Flower's current strategies (``flwr.serverapp.strategy``, 2025):

==========  ==========================================================================
fedavgm     server_learning_rate=1.0, server_momentum=0.0 (a plain step to the weighted
            mean, i.e. FedAvg up to rounding, until configured)
fedadam     eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3
fedyogi     eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3
fedadagrad  eta=0.1, tau=1e-3, beta_1=0.0 (Flower fixes beta_1 at 0; Reddi et al.'s
            algorithm has momentum, so it is a kwarg here)
==========  ==========================================================================

Older Flower versions used tau=1e-9; FEDn's fedopt uses eta=1e-3, beta_1=0.9,
beta_2=0.99, tau=1e-4.

``bias_correction`` (fedadam, fedyogi) defaults to False, as in Reddi et al.'s
algorithm and FEDn; Flower's FedAdam always applies it, with exponent server_round + 1
where we use the step count t, as Kingma & Ba do. ``initial_v`` is ``zeros`` (Flower)
or ``tau_squared`` (FEDn starts v at τ²); it applies when a session starts without state.

The state carried to the next round is float64 named arrays ``m/<name>``, ``v/<name>``
(not for FedAvgM) and ``t`` (a 0-d array): exact, so a session's chain of rounds
replays bit for bit.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from roundlog.aggregation.base import (
    BLOCK,
    F64,
    AggregateResult,
    AggregatorConfigError,
    BaseModel,
    Builder,
    Params,
)
from roundlog.aggregation.fedavg import FedAvg
from roundlog.arrays import NamedArrays

Moments = dict[str, list[NDArray[np.float64]]]


def _power(base: float, exponent: int) -> float:
    """base**exponent by repeated multiplication: exact IEEE steps, unlike libm's pow, on every platform."""
    result = 1.0
    for _ in range(exponent):
        result *= base
    return result


def load_state(
    aggregator: str, state: NamedArrays | None, base: BaseModel, initial: dict[str, float]
) -> tuple[Moments, int]:
    """The moments (one float64 copy per base array) and step count carried from the previous round.

    Without ``state`` the moments start at ``initial`` (moment name → value) and t at 0.
    """
    if state is None:
        return {
            key: [np.full(len(flat), value, dtype=F64) for flat in base.flat]
            for key, value in initial.items()
        }, 0
    given = dict(state)
    expected = [f"{key}/{name}" for key in initial for name in base.names] + ["t"]
    missing = [name for name in expected if name not in given]
    unexpected = sorted(set(given) - set(expected))
    duplicates = len(state) - len(given)
    if missing or unexpected or duplicates:
        problems = [f"missing {missing}"] if missing else []
        problems += [f"unexpected {unexpected}"] if unexpected else []
        problems += [f"{duplicates} duplicate names"] if duplicates else []
        raise AggregatorConfigError(
            f"{aggregator}: optimizer state does not fit the model: {'; '.join(problems)}"
        )
    moments: Moments = {}
    for key in initial:
        moments[key] = []
        for name, shape in zip(base.names, base.shapes, strict=True):
            array = given[f"{key}/{name}"]
            if array.shape != shape or array.dtype.kind != "f" or array.dtype.itemsize != 8:
                raise AggregatorConfigError(
                    f"{aggregator}: state {key}/{name} is {array.dtype}{list(array.shape)}, "
                    f"expected float64{list(shape)}"
                )
            if not np.isfinite(array).all():
                raise AggregatorConfigError(f"{aggregator}: state {key}/{name} has non-finite values")
            moments[key].append(np.array(array, dtype=F64).reshape(-1))
    t = given["t"]
    if t.shape != () or t.dtype.kind not in "fiu" or not (np.isfinite(t) and t >= 0 and t == np.floor(t)):
        raise AggregatorConfigError(f"{aggregator}: state t must be a 0-d count >= 0, got {t!r}")
    return moments, int(t)


class ServerOptimizer(FedAvg):
    """FedAvg's fold, then one optimizer step per array block at ``finalize``."""

    def __init__(self, base: BaseModel, moments: Moments, t: int) -> None:
        super().__init__(base)
        self._moments = moments
        self._t = t
        self._scratch2 = np.empty(BLOCK, dtype=F64)

    def _finalize(self) -> AggregateResult:
        t = self._t + 1
        mean = self._weighted_mean()
        for i, (acc, x) in enumerate(zip(mean, self.base.flat, strict=True)):
            np.subtract(acc, x, out=acc, dtype=F64)  # Δ, in place of the mean
            for lo in range(0, len(acc), BLOCK):
                hi = min(lo + BLOCK, len(acc))
                self._step(i, lo, hi, acc[lo:hi], x[lo:hi], t)
        state = [
            (f"{key}/{name}", arrays[i].reshape(self.base.shapes[i]))
            for key, arrays in self._moments.items()
            for i, name in enumerate(self.base.names)
        ]
        return AggregateResult(
            arrays=[
                (name, self.base.emit(i, acc))
                for i, (name, acc) in enumerate(zip(self.base.names, mean, strict=True))
            ],
            state=[*state, ("t", np.array(float(t), dtype=F64))],
            updates=self.updates,
            total_weight=self.total_weight,
        )

    @abstractmethod
    def _step(self, i: int, lo: int, hi: int, delta: NDArray[np.float64], x: NDArray[Any], t: int) -> None:
        """Update the moments of elements lo:hi of array i and overwrite ``delta`` with the new x."""


class FedAvgM(ServerOptimizer):
    """Server momentum: m ← μ·m + Δ; x ← x + η·m."""

    def __init__(
        self, base: BaseModel, state: NamedArrays | None, *, learning_rate: float, momentum: float
    ) -> None:
        super().__init__(base, *load_state("fedavgm", state, base, {"m": 0.0}))
        self._eta, self._mu = learning_rate, momentum

    def _step(self, i: int, lo: int, hi: int, delta: NDArray[np.float64], x: NDArray[Any], t: int) -> None:
        m, s = self._moments["m"][i][lo:hi], self._scratch[: hi - lo]
        np.multiply(m, self._mu, out=m)
        np.add(m, delta, out=m)
        np.multiply(m, self._eta, out=s)
        np.add(s, x, out=delta, dtype=F64)


@dataclass(frozen=True)
class Hyper:
    """FedOpt hyperparameters, validated (defaults and sources in the module docstring)."""

    eta: float
    beta_1: float
    beta_2: float
    tau: float
    initial_v: str
    bias_correction: bool


class Adaptive(ServerOptimizer):
    """The FedOpt step shared by FedAdam, FedYogi and FedAdagrad; subclasses update v."""

    family: ClassVar[str]

    def __init__(self, base: BaseModel, state: NamedArrays | None, hyper: Hyper) -> None:
        v0 = hyper.tau * hyper.tau if hyper.initial_v == "tau_squared" else 0.0
        super().__init__(base, *load_state(self.family, state, base, {"m": 0.0, "v": v0}))
        self._eta, self._beta_1, self._beta_2, self._tau = hyper.eta, hyper.beta_1, hyper.beta_2, hyper.tau
        self._bias_correction = hyper.bias_correction
        self._eta_t = hyper.eta

    def _finalize(self) -> AggregateResult:
        if self._bias_correction:
            t = self._t + 1
            self._eta_t = (
                self._eta * math.sqrt(1.0 - _power(self._beta_2, t)) / (1.0 - _power(self._beta_1, t))
            )
        return super()._finalize()

    def _step(self, i: int, lo: int, hi: int, delta: NDArray[np.float64], x: NDArray[Any], t: int) -> None:
        m, v = self._moments["m"][i][lo:hi], self._moments["v"][i][lo:hi]
        s1, s2 = self._scratch[: hi - lo], self._scratch2[: hi - lo]
        np.multiply(m, self._beta_1, out=m)
        np.multiply(delta, 1.0 - self._beta_1, out=s1)
        np.add(m, s1, out=m)
        np.multiply(delta, delta, out=s1)  # Δ²
        self._second_moment(v, s1, s2)
        np.multiply(m, self._eta_t, out=s1)
        np.sqrt(v, out=s2)
        np.add(s2, self._tau, out=s2)
        np.divide(s1, s2, out=s1)
        np.add(s1, x, out=delta, dtype=F64)

    @abstractmethod
    def _second_moment(
        self, v: NDArray[np.float64], delta2: NDArray[np.float64], s: NDArray[np.float64]
    ) -> None:
        """Update v in place from Δ² (``delta2`` and ``s`` are scratch the method may overwrite)."""


class FedAdam(Adaptive):
    family = "fedadam"

    def _second_moment(
        self, v: NDArray[np.float64], delta2: NDArray[np.float64], s: NDArray[np.float64]
    ) -> None:
        np.multiply(v, self._beta_2, out=v)
        np.multiply(delta2, 1.0 - self._beta_2, out=delta2)
        np.add(v, delta2, out=v)


class FedYogi(Adaptive):
    family = "fedyogi"

    def _second_moment(
        self, v: NDArray[np.float64], delta2: NDArray[np.float64], s: NDArray[np.float64]
    ) -> None:
        np.subtract(v, delta2, out=s)
        np.sign(s, out=s)
        np.multiply(delta2, 1.0 - self._beta_2, out=delta2)
        np.multiply(delta2, s, out=delta2)
        np.subtract(v, delta2, out=v)


class FedAdagrad(Adaptive):
    family = "fedadagrad"

    def _second_moment(
        self, v: NDArray[np.float64], delta2: NDArray[np.float64], s: NDArray[np.float64]
    ) -> None:
        np.add(v, delta2, out=v)


_INITIAL_V = ("zeros", "tau_squared")


def fedavgm(params: Params) -> Builder:
    learning_rate = params.number("server_learning_rate", 1.0, low=0.0, low_open=True)
    momentum = params.number("server_momentum", 0.0, low=0.0, high=1.0, high_open=True)
    return lambda base, state: FedAvgM(base, state, learning_rate=learning_rate, momentum=momentum)


def fedadam(params: Params) -> Builder:
    hyper = _adaptive(params, eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    return lambda base, state: FedAdam(base, state, hyper)


def fedyogi(params: Params) -> Builder:
    hyper = _adaptive(params, eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3)
    return lambda base, state: FedYogi(base, state, hyper)


def fedadagrad(params: Params) -> Builder:
    hyper = Hyper(
        eta=params.number("eta", 0.1, low=0.0, low_open=True),
        beta_1=params.number("beta_1", 0.0, low=0.0, high=1.0, high_open=True),
        beta_2=0.0,
        tau=params.number("tau", 1e-3, low=0.0, low_open=True),
        initial_v=params.choice("initial_v", "zeros", _INITIAL_V),
        bias_correction=False,
    )
    return lambda base, state: FedAdagrad(base, state, hyper)


def _adaptive(params: Params, *, eta: float, beta_1: float, beta_2: float, tau: float) -> Hyper:
    return Hyper(
        eta=params.number("eta", eta, low=0.0, low_open=True),
        beta_1=params.number("beta_1", beta_1, low=0.0, high=1.0, high_open=True),
        beta_2=params.number("beta_2", beta_2, low=0.0, high=1.0, high_open=True),
        tau=params.number("tau", tau, low=0.0, low_open=True),
        initial_v=params.choice("initial_v", "zeros", _INITIAL_V),
        bias_correction=params.flag("bias_correction", False),
    )
