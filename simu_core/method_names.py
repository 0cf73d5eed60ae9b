"""A method is a loss x an optimizer x a trainable scope; its name says all three.

Pure Python (no torch): :mod:`simu_core.config` reads it to validate and canonicalise
``unlearn.method`` / ``unlearn.loss`` / ``unlearn.optimizer`` / ``unlearn.scope``.

Names. The eight names of version 1 keep their meaning (and so their cache keys):

| name          | loss     | optimizer | scope |
|---------------|----------|-----------|-------|
| ``ga``        | ga       | adamw     | all   |
| ``fo_graddiff``| graddiff| adamw     | all   |
| ``so_graddiff``| graddiff| sophia    | all   |
| ``simu``      | graddiff | sophia    | simu  |
| ``npo``       | npo      | adamw     | all   |
| ``so_npo``    | npo      | sophia    | all   |
| ``simu_npo``  | npo      | sophia    | simu  |
| ``simnpo``    | simnpo   | adamw     | all   |

Every other combination is named by the same pattern: ``<loss>`` (AdamW, all parameters),
``so_<loss>`` (Sophia, all), ``simu_<loss>`` (Sophia, SIMU's scope), ``fo_simu_<loss>`` (AdamW,
SIMU's scope), and for RMU's published layer set ``<loss>_layers`` / ``so_<loss>_layers``; RMU
itself, AdamW on its published layers, is ``rmu`` (its name in the field) and ``rmu_all`` trains
every parameter with the RMU loss.

Scopes: ``all`` (every parameter), ``simu`` (every attention projection + the critical neurons'
down-projection columns; ``unlearn.train_attention=false`` drops the attention), ``critical`` (a
spelling of ``simu`` without attention), ``layers`` (RMU's published set: the MLP down projections
of ``rmu_layer`` and the two layers below it; only with the RMU loss, the one loss that names a
layer).
"""

from __future__ import annotations

from dataclasses import dataclass

LOSSES = ("ga", "graddiff", "npo", "simnpo", "dpo", "idk_dpo", "rmu", "undial", "wga", "satimp", "ceu", "pdu",
          "altpo")
OPTIMIZERS = ("adamw", "sophia")
SCOPES = ("all", "simu", "layers")
SCOPE_SPELLINGS = (*SCOPES, "critical")  # critical = simu without attention (unlearn.train_attention=false)

# The unlearn.* settings only one loss reads: in the unlearn stage's key only when the method's loss is that
# one (so that settings added after version 1 leave version 1's keys as they were).
LOSS_SETTINGS: dict[str, tuple[str, ...]] = {
    "dpo": ("dpo_beta", "preferred_source"),
    "idk_dpo": ("dpo_beta", "idk_source"),
    "altpo": ("dpo_beta", "altpo_alternates", "altpo_max_new_tokens", "altpo_temperature"),
    "undial": ("undial_beta",),
    "wga": ("wga_beta",),
    "satimp": ("satimp_beta1", "satimp_beta2"),
    "ceu": ("ceu_ignore_first",),
    "pdu": ("pdu_retain_eps", "pdu_dual_step"),
    "rmu": ("rmu_layer", "rmu_steering_coeff", "rmu_alpha"),
}
# Losses that pair each forget answer with a preferred answer (simu_core/preferred.py).
PREFERENCE_LOSSES = ("dpo", "idk_dpo", "altpo")
# Losses without a retain term, as published and as open-unlearning runs them (UNDIAL.yaml: alpha 0; ceu.py:
# forget term only); every other loss adds unlearn.retain_weight x a retain term.
FORGET_ONLY_LOSSES = ("ga", "undial", "ceu")
# Fields folded into unlearn.method by the config (always None once validated).
METHOD_PARTS = ("loss", "optimizer", "scope")

LEGACY_METHODS: dict[str, tuple[str, str, str]] = {
    "ga": ("ga", "adamw", "all"),
    "fo_graddiff": ("graddiff", "adamw", "all"),
    "so_graddiff": ("graddiff", "sophia", "all"),
    "simu": ("graddiff", "sophia", "simu"),
    "npo": ("npo", "adamw", "all"),
    "so_npo": ("npo", "sophia", "all"),
    "simu_npo": ("npo", "sophia", "simu"),
    "simnpo": ("simnpo", "adamw", "all"),
}

_PATTERNS = {
    ("adamw", "all"): "{loss}",
    ("sophia", "all"): "so_{loss}",
    ("sophia", "simu"): "simu_{loss}",
    ("adamw", "simu"): "fo_simu_{loss}",
    ("adamw", "layers"): "{loss}_layers",
    ("sophia", "layers"): "so_{loss}_layers",
}
_SPECIAL_NAMES = {("rmu", "adamw", "layers"): "rmu", ("rmu", "adamw", "all"): "rmu_all"}


@dataclass(frozen=True)
class MethodName:
    """What a method name means."""

    name: str
    loss: str
    optimizer: str
    scope: str

    @property
    def needs_mask(self) -> bool:
        """Whether the method reads the critical-neuron mask (SIMU's scope)."""
        return self.scope == "simu"

    @property
    def uses_retain(self) -> bool:
        """Whether the loss has a retain term (all but :data:`FORGET_ONLY_LOSSES`)."""
        return self.loss not in FORGET_ONLY_LOSSES


def settings_outside_key(loss: str) -> tuple[str, ...]:
    """The unlearn.* fields a method with ``loss`` does not read (left out of its stage key)."""
    read = set(LOSS_SETTINGS.get(loss, ()))
    return METHOD_PARTS + tuple(field for fields in LOSS_SETTINGS.values() for field in fields
                                if field not in read)


def combination_problem(loss: str, optimizer: str, scope: str) -> str | None:
    """Why a combination cannot run (None when it can)."""
    if loss not in LOSSES:
        return f"unknown loss {loss!r}; known: {list(LOSSES)}"
    if optimizer not in OPTIMIZERS:
        return f"unknown optimizer {optimizer!r}; known: {list(OPTIMIZERS)}"
    if scope not in SCOPES:
        return f"unknown scope {scope!r}; known: {list(SCOPE_SPELLINGS)}"
    if scope == "layers" and loss != "rmu":
        return (f"scope 'layers' is RMU's published layer set (the layers below unlearn.rmu_layer); the {loss!r} "
                "loss names no layer: use scope all, simu or critical")
    return None


def method_name(loss: str, optimizer: str, scope: str) -> str:
    """The canonical name of a combination (ValueError naming the problem when it cannot run)."""
    problem = combination_problem(loss, optimizer, scope)
    if problem:
        raise ValueError(problem)
    for name, combination in LEGACY_METHODS.items():
        if combination == (loss, optimizer, scope):
            return name
    return _SPECIAL_NAMES.get((loss, optimizer, scope)) or _PATTERNS[(optimizer, scope)].format(loss=loss)


def _all_methods() -> dict[str, MethodName]:
    names: dict[str, MethodName] = {}
    for loss in LOSSES:
        for optimizer in OPTIMIZERS:
            for scope in SCOPES:
                if combination_problem(loss, optimizer, scope) is None:
                    name = method_name(loss, optimizer, scope)
                    if name in names:  # the naming must be one-to-one
                        raise AssertionError(f"method name {name!r} is given to two combinations")
                    names[name] = MethodName(name, loss, optimizer, scope)
    return names


ALL_METHODS: dict[str, MethodName] = _all_methods()


def parse_method(name: str) -> MethodName:
    """What a method name means (ValueError listing the patterns for an unknown one)."""
    if name not in ALL_METHODS:
        raise ValueError(
            f"unknown unlearning method {name!r}; the version-1 names are {sorted(LEGACY_METHODS)}, and any "
            f"loss in {list(LOSSES)} can be named <loss>, so_<loss>, simu_<loss>, fo_simu_<loss> (or set "
            "unlearn.loss / unlearn.optimizer / unlearn.scope)"
        )
    return ALL_METHODS[name]


def is_masked(name: object) -> bool:
    """Whether the method named ``name`` trains SIMU's scope (reads the mask); False for unknown names."""
    return isinstance(name, str) and name in ALL_METHODS and ALL_METHODS[name].needs_mask


def resolve_method(method: str, loss: str | None = None, optimizer: str | None = None,
                   scope: str | None = None) -> MethodName:
    """``method`` with any of its loss, optimizer and scope replaced (None keeps the method's)."""
    base = parse_method(method)
    return parse_method(method_name(loss or base.loss, optimizer or base.optimizer, scope or base.scope))
