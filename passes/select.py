"""Which linears a quantize pass touches: roles chosen by the recipe, minus the user's exclusions."""

from __future__ import annotations

from ..ir.passes import PassContext
from ..ir.structure import Structure

__all__ = ["selected_linears"]

ALL_ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "fc1", "fc2", "lm_head", "unknown")


def selected_linears(structure: Structure, ctx: PassContext, pass_name: str, roles: tuple, target: str,
                     rescales_input: bool = False) -> list:
    """Linears whose role is in ``roles``, that no ``--exclude`` pattern names and whose ``target``
    (``"weight"`` or ``"activation"``) is not quantized yet; declines the rest with the reason.
    ``rescales_input``: the pass rescales, permutes or splits the linear's input channels, which a range
    split (its clip threshold is fixed) does not allow."""
    chosen = []
    for lin in structure.linears:
        if lin.role not in roles:
            if lin.role == "unknown":
                ctx.decline(pass_name, lin.name, "linear not classified; left in float (add 'unknown' to roles to force)")
            continue
        if (lin.weight.quantized if target == "weight" else lin.act_quantized):
            ctx.decline(pass_name, lin.name, f"{target} already quantized")
            continue
        if rescales_input and lin.range_split:
            ctx.decline(pass_name, lin.name, f"its input is split by range; run {pass_name} before split-range")
            continue
        if ctx.exclude(lin.name, lin.node.name):
            ctx.decline(pass_name, lin.name, "excluded by --exclude")
            continue
        if target == "activation" and lin.name in ctx.float_activations:
            ctx.decline(pass_name, lin.name, ctx.float_activations[lin.name])
            continue
        chosen.append(lin)
    return chosen
