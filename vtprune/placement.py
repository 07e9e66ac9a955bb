"""Where a plan prunes: one validated object, owned by the adapter, bounded by the model's config.

A strategy says *which* visual tokens to keep; the placement says *where* the kept set takes effect:

- ``pre_llm``: before the language model (the pre-LLM splice: a shorter sequence, original positions kept);
- ``in_llm``: after decoder layer ``layer`` = K (1-based): ``layers[:K]`` see every token, ``layers[K:]`` and
  their KV cache only the kept ones (fastv); or in several stages, ``layers: [K1, K2, ...]`` (PyramidDrop): from
  each K_s on, the layers see only what that stage kept of the previous stage's tokens;
- ``vision``: inside the vision tower, in every layer up to the one the projector reads, between its attention and
  MLP (``after: attention``, ToMe) or after the whole layer (``after: layer``, FlowCut); the LLM sees the survivors,
  each in its own slot;
- ``cross_attention`` (cross-attention models, mllama): the first cross-attention layer sees every visual token
  during prefill, the later ones only the kept; ``prune_first_layer_cache`` also cuts that layer's own cache;
  ``prune_first_layer: true`` gives the first layer only the kept tokens too (pruning before the LLM, for the
  strategies whose signals exist there; trimmed_llama still scores on every token, then runs the layer on the kept).

The settings come from ``pruning.placement`` over the strategy's defaults (``register_strategy(placement=...)``).
The same rule checks them at config load (``--dry-run``, from the model's config file alone) and in the adapter
once the model is loaded, so ``layer: 99`` fails before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from vtprune.errors import ConfigError

KEY = "pruning.placement"

#: the settings of each kind of placement, with their allowed values as error lines state them
SETTINGS = {
    "pre_llm": {},
    "in_llm": {"layer": "an integer in [1, decoder layers - 1]",
               "layers": "a list of increasing integers in [1, decoder layers - 1]"},
    "cross_attention": {"prune_first_layer_cache": "true or false", "prune_first_layer": "true or false"},
    "vision": {"after": "attention or layer"},
}
_SAYS = {"pre_llm": "before the LLM", "in_llm": "inside the LLM", "cross_attention": "at the cross-attention layers",
         "vision": "inside the vision tower"}


@dataclass(frozen=True)
class Placement:
    where: str = "pre_llm"
    #: in_llm: the stages' K (1-based, increasing); empty everywhere else (every layer sees only the kept tokens,
    #: or the family decides)
    layers: tuple[int, ...] = ()
    prune_first_layer_cache: bool = True  # cross_attention only
    prune_first_layer: bool = False  # cross_attention only: the first cross layer, too, sees only the kept tokens
    after: str = "attention"  # vision only: select between each layer's attention and MLP, or after the whole layer
    before_llm: bool = False  # in_llm only: a first selection before the LLM (VScan), as if a stage at layer 0

    @property
    def stage_layers(self) -> tuple[int, ...]:
        """Where each stage's kept set takes effect, a selection before the LLM at 0: what cost and kv count."""
        return ((0,) if self.before_llm else ()) + self.layers

    @property
    def layer(self) -> int:
        """The first stage's K (0: pruned before the LLM)."""
        return self.layers[0] if self.layers else 0

    def describe(self) -> str:
        if self.where == "in_llm":
            return (("before the LLM, then " if self.before_llm else "") +
                    f"inside the LLM after layer{'s' if len(self.layers) > 1 else ''} {', '.join(map(str, self.layers))}")
        if self.where == "cross_attention":
            if self.prune_first_layer:
                return "before the first cross-attention layer"
            return "after the first cross-attention layer" + ("" if self.prune_first_layer_cache else " (its cache kept whole)")
        if self.where == "vision":
            return "inside the vision tower, " + ("between each layer's attention and MLP" if self.after == "attention"
                                                  else "after each layer")
        return _SAYS[self.where]


def resolve_placement(strategy, settings: dict, *, cross_attention: bool | None, decoder_layers: int | None = None,
                      model: str = "") -> Placement | None:
    """The placement of ``strategy`` with ``settings`` on a model that has (or lacks) cross-attention layers and
    ``decoder_layers`` LLM layers (None: unknown, the bound is checked once the model is loaded).

    ``cross_attention=None`` (the family is not known without the model): the settings are checked against every
    placement the strategy may get, and None is returned.
    """
    wheres = ("cross_attention", strategy.stage) if cross_attention is None else (
        "cross_attention" if cross_attention else strategy.stage,)
    allowed = {key: says for where in wheres for key, says in SETTINGS[where].items()}
    for key, value in settings.items():
        if key not in allowed:
            where = " or ".join(dict.fromkeys(_SAYS[w] for w in wheres))
            raise ConfigError(f"{KEY}.{key}: not a setting of '{strategy.name}', which prunes {where} "
                              f"(allowed: {', '.join(allowed) or 'none'})")
    if "layer" in settings and "layers" in settings:
        raise ConfigError(f"{KEY}: give layer (one stage) or layers (several), not both")
    values = {**{k: v for k, v in strategy.placement.items() if k in allowed}, **settings}
    for key in ("prune_first_layer_cache", "prune_first_layer"):
        if key in values and not isinstance(values[key], bool):
            raise ConfigError(f"{KEY}.{key}: {values[key]!r} is not allowed (allowed: true or false)")
    if values.get("after", "attention") not in ("attention", "layer"):
        raise ConfigError(f"{KEY}.after: {values['after']!r} is not allowed (allowed: {SETTINGS['vision']['after']})")
    layers = _stage_layers(values, settings, decoder_layers, model)
    if cross_attention is None:
        return None
    if wheres[0] == "in_llm":
        if not layers:
            raise ValueError(f"strategy '{strategy.name}' prunes inside the LLM but declares no default placement layer")
        return Placement("in_llm", layers=layers, before_llm=strategy.before_llm)
    return Placement(wheres[0], **{k: v for k, v in values.items() if k not in ("layer", "layers")})


def _stage_layers(values: dict, settings: dict, decoder_layers: int | None, model: str) -> tuple[int, ...]:
    """The in-LLM stages' K from ``layer`` or ``layers``. A strategy's default ``layers`` may be fractions of the
    decoder depth (PyramidDrop's 8, 16, 24 of 32 layers are 0.25, 0.5, 0.75), resolved once the depth is known."""
    if "layer" in settings or ("layer" in values and "layers" not in settings):
        check_layer(values["layer"], decoder_layers, model)
        return (values["layer"],)
    if "layers" not in values:
        return ()
    layers = values["layers"]
    if "layers" not in settings:  # the strategy's default: fractions of the depth, or "all" (every layer, FitPrune)
        if decoder_layers is None:
            return ()
        if layers == "all":
            return tuple(range(1, decoder_layers))
        # on a shallow model two fractions may round to one layer: each stage at least one layer after the last
        resolved: list[int] = []
        for f in layers:
            resolved.append(max(1, round(f * decoder_layers), resolved[-1] + 1 if resolved else 1))
        layers = resolved
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ConfigError(f"{KEY}.layers: {layers!r} is not allowed (allowed: {SETTINGS['in_llm']['layers']})")
    for k in layers:
        check_layer(k, decoder_layers, model, key=f"{KEY}.layers")
    if any(a >= b for a, b in zip(layers, layers[1:])):
        raise ConfigError(f"{KEY}.layers: {list(layers)} must be increasing (allowed: {SETTINGS['in_llm']['layers']})")
    return tuple(layers)


def check_layer(k, decoder_layers: int | None, model: str = "", key: str = f"{KEY}.layer") -> None:
    """An in-LLM K: ``layers[:K]`` see every token, so 1 <= K < decoder layers (when they are known)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise ConfigError(f"{key}: {k!r} is not allowed (allowed: {SETTINGS['in_llm']['layer']})")
    if not 1 <= k < (decoder_layers or float("inf")):
        upper = decoder_layers - 1 if decoder_layers else "decoder layers - 1"
        where = f" for {model} ({decoder_layers} decoder layers)" if decoder_layers and model else ""
        raise ConfigError(f"{key}: {k} is outside the allowed range [1, {upper}]{where}")


def placement_for_config(strategy, settings: dict, hf_config) -> Placement:
    """The placement on a model known only by its transformers config (``cost``, ``kv``)."""
    text = hf_config.get_text_config(decoder=True)
    return resolve_placement(strategy, settings, cross_attention=bool(getattr(text, "cross_attention_layers", None)),
                             decoder_layers=text.num_hidden_layers)
