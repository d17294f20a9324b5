"""Model families as data.

One table keyed by ``config.model_type`` says which linears of each decoder layer are
compression targets, which of them are attention and which MLP, and what is never
factorized. Target discovery, allocation multipliers, learning-rate groups and the exported
modeling code all read from here; nothing in VAC matches on module-name substrings.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vac.errors import VacError

ATTENTION = "attention"
MLP = "mlp"


@dataclass(frozen=True)
class Family:
    model_type: str
    #: dotted path from the *ForCausalLM to the ModuleList of decoder layers
    layers_path: str = "model.layers"
    #: the final norm and the LM head: a layer-streamed pass computes logits as head(norm(h_L))
    norm_path: str = "model.norm"
    head_path: str = "lm_head"
    #: target linears inside one decoder layer, by component
    attention: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    mlp: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    #: never factorized (checked when the table is built: no target may be, or end in, one of these)
    never: tuple[str, ...] = ("model.embed_tokens", "lm_head", "norm", "q_norm", "k_norm")
    #: the targets in the order a token flows through the layer, grouped by shared input: the
    #: linears of one stage read the very same tensor, so compressing one of them cannot change
    #: what the others see, and per-matrix sequential compression may treat a stage as one step
    stages: tuple[tuple[str, ...], ...] = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                           ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"),
                                           ("mlp.down_proj",))
    #: fused projections: a target linear whose output rows hold several logical projections, e.g.
    #: Phi-3's qkv_proj (rows of q, then k, then v) and gate_up_proj. A fused linear is factorized
    #: whole, as one matrix (one shared ``down`` basis for its parts, which read the same input);
    #: allocation and learning-rate groups see it as one target of its component
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: module-name prefix -> the prefix published checkpoints store it under, where they differ (Gemma 3's
    #: multimodal checkpoints keep the layout of older transformers: language_model.model.layers...)
    stored_as: tuple[tuple[str, str], ...] = ()
    #: what else about the family a reader should know (shown by ``python -m vac.families``)
    notes: str = ""

    def __post_init__(self):
        staged = [p for stage in self.stages for p in stage]
        if sorted(staged) != sorted(self.attention + self.mlp):
            raise ValueError(f"{self.model_type}: stages {self.stages} must list every target exactly once")
        never = {n.rsplit(".", 1)[-1] for n in self.never}
        clash = [p for p in staged if p in self.never or p.rsplit(".", 1)[-1] in never]
        if clash:
            raise ValueError(f"{self.model_type}: targets {clash} are listed in never (never factorized)")
        unknown = [p for p, _ in self.fused if p not in staged]
        if unknown:
            raise ValueError(f"{self.model_type}: fused projections {unknown} are not targets")

    def stage_of(self, sub: str) -> int:
        """Index of the stage (shared-input group) of a target's sub-module path."""
        return next(i for i, stage in enumerate(self.stages) if sub in stage)

    def components(self) -> dict[str, str]:
        """Sub-module path inside a decoder layer -> component name."""
        return {**{p: ATTENTION for p in self.attention}, **{p: MLP for p in self.mlp}}


_LLAMA_LIKE = dict(layers_path="model.layers")
_GEMMA3 = ("sandwich norms (before and after attention and MLP), embeddings scaled by sqrt(hidden), sliding-window "
           "and full-attention layers with their own masks and rotary embeddings (captured per attention kind)")

FAMILIES: dict[str, Family] = {
    **{name: Family(model_type=name, **_LLAMA_LIKE)
       for name in ("olmo3", "olmo2", "olmo", "llama", "qwen2", "qwen3", "mistral")},
    "gemma3_text": Family(model_type="gemma3_text", notes=_GEMMA3),
    # the text decoder under the multimodal wrapper (Gemma3ForConditionalGeneration); the vision tower and
    # its projector are not decoder layers, so never targets
    "gemma3": Family(model_type="gemma3", layers_path="model.language_model.layers",
                     norm_path="model.language_model.norm",
                     never=("model.language_model.embed_tokens", "lm_head", "norm", "q_norm", "k_norm"),
                     stored_as=(("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                                ("model.vision_tower.", "vision_tower."),
                                ("model.multi_modal_projector.", "multi_modal_projector.")),
                     notes=_GEMMA3 + "; text decoder of the multimodal wrapper, vision tower left dense"),
    "phi3": Family(model_type="phi3",
                   attention=("self_attn.qkv_proj", "self_attn.o_proj"), mlp=("mlp.gate_up_proj", "mlp.down_proj"),
                   stages=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
                   fused=(("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                          ("mlp.gate_up_proj", ("gate_proj", "up_proj")))),
}


def kinds() -> tuple[str, ...]:
    """Matrix kinds (q_proj, ..., down_proj) of every family's targets, in declared order: the
    names a per-kind budget multiplier may use."""
    seen: dict[str, None] = {}
    for family in FAMILIES.values():
        for path in family.attention + family.mlp:
            seen.setdefault(path.rsplit(".", 1)[-1], None)
    return tuple(seen)


def supported() -> list[str]:
    return sorted(FAMILIES)


def get_family(model_or_config) -> Family:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise VacError(
            f"model family {model_type!r} is not supported; supported families: {', '.join(supported())} "
            "(`python -m vac.families` lists their targets). Add an entry to vac/families.py:FAMILIES if its "
            "decoder layers use the same linear names.")
    return FAMILIES[model_type]


@dataclass(frozen=True)
class Target:
    """One compressible linear: its full module name, decoder layer, component and kind."""

    name: str  # e.g. "model.layers.3.self_attn.q_proj"
    layer: int
    component: str  # ATTENTION or MLP
    kind: str  # e.g. "q_proj"
    out_features: int
    in_features: int

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    family = get_family(model)
    return model.get_submodule(family.layers_path)


def find_targets(model: nn.Module) -> list[Target]:
    """All target linears in layer order, then in the family's declared order within a layer."""
    family = get_family(model)
    layers = decoder_layers(model)
    targets: list[Target] = []
    for i, layer in enumerate(layers):
        for sub, component in family.components().items():
            try:
                module = layer.get_submodule(sub)
            except AttributeError as e:
                raise VacError(f"{family.model_type}: decoder layer {i} has no {sub!r}; the family table in "
                               "vac/families.py does not match this model") from e
            w = _weight_of(module)
            targets.append(Target(name=f"{family.layers_path}.{i}.{sub}", layer=i, component=component,
                                  kind=sub.rsplit(".", 1)[-1], out_features=w[0], in_features=w[1]))
    return targets


def _weight_of(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if hasattr(module, "out_features") and hasattr(module, "in_features"):  # FactorizedLinear
        return module.out_features, module.in_features
    raise VacError(f"target {type(module).__name__} is not a linear layer")


def describe() -> list[dict]:
    """One row per family: its targets by component, the shared-input stages and what stays dense."""
    short = lambda paths: [p.rsplit(".", 1)[-1] for p in paths]  # noqa: E731
    return [{"model_type": f.model_type, "layers": f.layers_path, "attention": short(f.attention),
             "mlp": short(f.mlp), "stages": [short(s) for s in f.stages], "dense": list(f.never),
             "fused": {p.rsplit(".", 1)[-1]: list(parts) for p, parts in f.fused}, "notes": f.notes}
            for f in (FAMILIES[name] for name in supported())]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m vac.families",
                                description="The model families VAC compresses (config.model_type), their "
                                            "target linears, shared-input stages and what stays dense.")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    args = p.parse_args(argv)
    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{len(rows)} supported families (config.model_type), one table in vac/families.py:")
    for r in rows:
        print(f"\n{r['model_type']}  (decoder layers at {r['layers']})\n"
              f"  attention targets: {', '.join(r['attention'])}\n"
              f"  MLP targets:       {', '.join(r['mlp'])}\n"
              f"  stages:            {' -> '.join('+'.join(s) for s in r['stages'])}  (one input per stage)\n"
              f"  never factorized:  {', '.join(r['dense'])}")
        for name, parts in r["fused"].items():
            print(f"  fused:             {name} = {' + '.join(parts)} (rows), factorized whole")
        if r["notes"]:
            print(f"  notes:             {r['notes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
