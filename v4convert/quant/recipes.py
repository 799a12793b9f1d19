"""Quantization recipes: a typed rule per tensor group (and optional per-role overrides).

A recipe says, for every ``Group`` of DESIGN §3 roles, which ``Codec`` its tensors get; per-name
patterns (``--keep``, ``--override``) then refine single tensors. Rules are exhaustive: a recipe
that leaves a group without a rule cannot be built, so a new role can never be quantized (or
skipped) by accident. MTP blocks use the ordinary roles and follow the same rules.

    recipe = preset(RecipeName.NVFP4_EXPERTS)
    rules = RuleSet(recipe, keep=["layers.0.*"], overrides=["attn.wo_*=nvfp4"])
    rules.codec_for(info)      # -> Codec.NVFP4 / Codec.KEEP / ...

Patterns are ``fnmatch`` patterns matched against the whole logical name or any dotted suffix of
it, so ``attn.wo_*`` matches ``layers.3.attn.wo_a.weight`` and ``layers.1.*`` matches
``model.layers.1.mlp.down_proj.weight`` but not layer 10. A pattern that matches nothing raises
(it is almost always a typo).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Iterable, Mapping, Protocol

from ..families.roles import Group, Role
from v4convert.errors import UserError


class RecipeError(UserError):
    """A recipe, pattern or codec request that cannot be applied; the message names the tensor."""


class Codec(enum.Enum):
    """What happens to one logical tensor."""
    KEEP = "keep"        # written as stored (bytes unchanged; container may rename scale tensors)
    NVFP4 = "nvfp4"      # E2M1 / 16-block E4M3 / FP32 global
    MXFP4 = "mxfp4"      # E2M1 / 32-block E8M0


class RecipeName(enum.Enum):
    NVFP4_EXPERTS = "nvfp4-experts"
    NVFP4_ALL_LINEAR = "nvfp4-all-linear"
    MXFP4_EXPERTS = "mxfp4-experts"


@dataclass(frozen=True)
class Recipe:
    """One rule per group; ``roles`` overrides a group rule for single roles."""
    name: RecipeName
    description: str
    groups: Mapping[Group, Codec]
    roles: Mapping[Role, Codec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [g.value for g in Group if g not in self.groups]
        if missing:
            raise RecipeError(f"recipe {self.name.value}: no rule for group(s) {', '.join(missing)}")
        for role, codec in self.roles.items():
            if codec is not Codec.KEEP and not role.is_linear:
                raise RecipeError(f"recipe {self.name.value}: {role.name} is not a linear weight; cannot be {codec.value}")

    def codec_for_role(self, role: Role) -> Codec:
        codec = self.roles.get(role, self.groups[role.group])
        # Non-linear tensors (norms, biases, tables, HC mixers) are never quantized by a group rule.
        return codec if role.is_linear else Codec.KEEP


def _rules(quantized: Iterable[Group], codec: Codec) -> dict[Group, Codec]:
    q = set(quantized)
    return {g: (codec if g in q else Codec.KEEP) for g in Group}


_FFN = (Group.EXPERT, Group.SHARED_EXPERT, Group.DENSE_MLP)
# Router, embed, head, norms, hash tables, compressor, indexer, hyper-connections stay as stored in
# every preset (DESIGN §3 / issue 4): they are small or precision-critical.
# Router is a linear: keep it explicitly so an "all linear" rule never touches it.
_ROLE_KEEP = {Role.ROUTER: Codec.KEEP, Role.HEAD: Codec.KEEP, Role.MTP_HEAD: Codec.KEEP}

PRESETS: dict[RecipeName, Recipe] = {
    RecipeName.NVFP4_EXPERTS: Recipe(
        RecipeName.NVFP4_EXPERTS,
        "NVFP4 routed + shared experts and dense MLPs; attention kept as stored (FP8 blocks)",
        _rules(_FFN, Codec.NVFP4), _ROLE_KEEP),
    RecipeName.NVFP4_ALL_LINEAR: Recipe(
        RecipeName.NVFP4_ALL_LINEAR,
        "NVFP4 on every attention, MLP and MTP projection (router/embed/head/indexer/compressor kept)",
        _rules(_FFN + (Group.ATTENTION, Group.MTP), Codec.NVFP4), _ROLE_KEEP),
    RecipeName.MXFP4_EXPERTS: Recipe(
        RecipeName.MXFP4_EXPERTS,
        "MXFP4 routed + shared experts and dense MLPs; attention kept as stored",
        _rules(_FFN, Codec.MXFP4), _ROLE_KEEP),
}


def preset(name: RecipeName | str) -> Recipe:
    try:
        return PRESETS[RecipeName(name)]
    except ValueError:
        raise RecipeError(f"unknown recipe {name!r}; choose from {', '.join(r.value for r in RecipeName)}") from None


class _HasRole(Protocol):
    name: str
    role: Role
    shape: tuple[int, ...]


def pattern_matches(pattern: str, name: str) -> bool:
    """``fnmatch`` on the whole name or any suffix starting after a dot."""
    if fnmatchcase(name, pattern):
        return True
    i = name.find(".")
    while i >= 0:
        if fnmatchcase(name[i + 1:], pattern):
            return True
        i = name.find(".", i + 1)
    return False


def parse_override(spec: str) -> tuple[str, Codec]:
    """``'PATTERN=codec'`` -> (pattern, Codec)."""
    pat, sep, codec = spec.rpartition("=")
    if not sep or not pat:
        raise RecipeError(f"--override {spec!r}: expected PATTERN=CODEC (codec: {', '.join(c.value for c in Codec)})")
    try:
        return pat, Codec(codec.strip().lower())
    except ValueError:
        raise RecipeError(f"--override {spec!r}: unknown codec {codec!r}; choose from "
                          f"{', '.join(c.value for c in Codec)}") from None


# Block size along K each codec needs (the logical in-features must be a multiple).
CODEC_BLOCK_K = {Codec.NVFP4: 16, Codec.MXFP4: 32}


class RuleSet:
    """A recipe plus ``--override`` and ``--keep`` patterns (applied in that order: keep wins)."""

    def __init__(self, recipe: Recipe, keep: Iterable[str] = (), overrides: Iterable[str] = ()):
        self.recipe = recipe
        self.keep = list(keep)
        self.overrides = [parse_override(o) for o in overrides]
        self._used: set[str] = set()

    def codec_for(self, t: _HasRole) -> Codec:
        codec = self.recipe.codec_for_role(t.role)
        for pat, c in self.overrides:
            if pattern_matches(pat, t.name):
                self._used.add(pat)
                if c is not Codec.KEEP and not (t.role.is_linear and len(t.shape) == 2):
                    raise RecipeError(f"tensor {t.name}: --override {pat}={c.value} targets a "
                                      f"{t.role.name} tensor, which is not a linear weight")
                codec = c
        for pat in self.keep:
            if pattern_matches(pat, t.name):
                self._used.add(pat)
                codec = Codec.KEEP
        if codec is not Codec.KEEP and t.shape[-1] % CODEC_BLOCK_K[codec]:
            raise RecipeError(f"tensor {t.name}: in-features {t.shape[-1]} is not a multiple of "
                              f"{CODEC_BLOCK_K[codec]} ({codec.value} block); add --keep for it")
        return codec

    def check_all_used(self) -> None:
        """Raise if a pattern matched no tensor (call after every tensor went through ``codec_for``)."""
        unused = [p for p in self.keep + [p for p, _ in self.overrides] if p not in self._used]
        if unused:
            raise RecipeError(f"pattern(s) {', '.join(repr(p) for p in unused)} matched no tensor of this checkpoint")

    def describe(self) -> dict:
        return {"recipe": self.recipe.name.value, "keep": self.keep,
                "override": [f"{p}={c.value}" for p, c in self.overrides]}
