"""Recipes: YAML files naming a pipeline of passes and their options.

A recipe has ``name``, ``description``, ``opset``, optional ``calibration`` (``samples``, ``seq_len``, ``propagate``: quantized | float),
optional ``exclude`` (glob patterns over layer names like ``layers.3.mlp.down`` or ONNX node names),
optional ``backends`` (the backends that can run what the recipe emits; default all), optional ``verify``
(the bound the compiled model must meet against the input model on held-out windows: ``max_kl`` for
language-model outputs, ``max_rel_error`` for others, ``windows``; see :mod:`llmq.verify`) and
``passes``: a list whose items are a pass name or ``{pass-name: {option: value}}``. Unknown keys are an
error, never ignored. Built-in recipes ship in ``llmq/recipes/``; a path to a ``.yaml`` file gives a
user's own.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources

import yaml

from ..backends.registry import BACKENDS
from ..ir.errors import LlmqError
from ..passes import REGISTRY
from ..verify import Bound

__all__ = ["Recipe", "list_recipes", "load_recipe"]

TOP_KEYS = {"name", "description", "opset", "calibration", "exclude", "passes", "backends", "verify"}
VERIFY_KEYS = {"max_kl", "max_rel_error", "windows"}
ALL_BACKENDS = tuple(BACKENDS)  # the backends, as defined once in backends/registry.py
CALIB_KEYS = {"samples", "seq_len", "propagate"}
PROPAGATE = ("quantized", "float")  # what each block is calibrated on, compiling block by block


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    opset: int
    passes: tuple  # ((pass_name, {options}), ...)
    calib_samples: int = 16
    calib_seq_len: int = 512
    # block by block, block i is calibrated on the outputs of blocks < i as compiled (quantized: GPTQ's order,
    # each block fitted to what the deployed model really feeds it) or as given (float)
    calib_propagate: str = "quantized"
    exclude: tuple = ()
    backends: tuple = ALL_BACKENDS  # the backends whose runtime can execute what this recipe emits
    bound: Bound = Bound()  # what the compiled model promises against the input model
    source_text: str = field(default="", compare=False)

    def build(self) -> list:
        return [REGISTRY[name](**dict(options)) for name, options in self.passes]

    @property
    def needs_calibration(self) -> bool:
        return any(getattr(REGISTRY[name], "requires_stats", False) for name, _ in self.passes)

    @property
    def int8_activations(self) -> bool:
        """Whether the recipe quantizes activations to INT8 (static or dynamic; FP8 activations are not)."""
        return any(name == "quantize-activations-dynamic"
                   or name == "quantize-activations" and dict(options).get("format", "int") == "int"
                   for name, options in self.passes)

    def with_loss_budget(self, max_kl: float) -> "Recipe":
        """This recipe with its sensitivity pass budgeted by ``max_kl`` (joint KL, nats/token) instead of a
        count; the YAML text is rewritten to match, so ``recipe.yaml`` reproduces the compile."""
        if not any(name == "sensitivity" for name, _ in self.passes):
            raise LlmqError(f"recipe '{self.name}' has no sensitivity pass, so --max-loss has nothing to budget",
                            "use a recipe with a 'sensitivity' pass (e.g. w8a8) or add one to yours")
        data = yaml.safe_load(self.source_text)
        for i, item in enumerate(data["passes"]):
            name = item if isinstance(item, str) else next(iter(item))
            if name == "sensitivity":
                options = {} if isinstance(item, str) else dict(item[name] or {})
                options.update(max_kl=float(max_kl), keep_float=0)
                data["passes"][i] = {"sensitivity": options}
        return parse_recipe(yaml.safe_dump(data, sort_keys=False), f"recipe '{self.name}' with --max-loss")

    def with_asymmetric_weights(self) -> "Recipe":
        """This recipe with zero-point (unsigned) weights in every weight quantizer (``awq``, ``gptq``,
        ``quantize-weights``, ``quantize-weights-lowrank``); ONNX Runtime only — TensorRT takes symmetric weights — so the backends narrow to it."""
        weight_passes = ("awq", "gptq", "quantize-weights", "quantize-weights-lowrank")
        if not any(name in weight_passes for name, _ in self.passes):
            raise LlmqError(f"recipe '{self.name}' quantizes no weights, so --asym changes nothing",
                            "use a weight-quantizing recipe (e.g. w4a16)")
        if "onnxruntime" not in self.backends:
            raise LlmqError(f"recipe '{self.name}' cannot run on ONNX Runtime, the only backend for asymmetric weights")
        data = yaml.safe_load(self.source_text)
        for i, item in enumerate(data["passes"]):
            name = item if isinstance(item, str) else next(iter(item))
            if name in weight_passes:
                options = {} if isinstance(item, str) else dict(item[name] or {})
                options["symmetric"] = False
                data["passes"][i] = {name: options}
        data["backends"] = ["onnxruntime"]
        data["name"] = f"{self.name}-asym"
        return parse_recipe(yaml.safe_dump(data, sort_keys=False), f"recipe '{self.name}' with --asym")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source_text")
        d["passes"] = [{name: dict(options)} for name, options in self.passes]
        d["exclude"] = list(self.exclude)
        d["backends"] = list(self.backends)
        d["verify"] = dataclasses.asdict(self.bound)
        d.pop("bound")
        return d


def _builtin_dir():
    return resources.files("llmq.recipes")


def list_recipes() -> dict:
    """name -> description of every built-in recipe."""
    out = {}
    for entry in sorted(_builtin_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            data = yaml.safe_load(entry.read_text(encoding="utf-8"))
            out[data["name"]] = " ".join(str(data.get("description", "")).split())
    return out


def load_recipe(spec: str) -> Recipe:
    """A built-in recipe by name, or a user's recipe from a ``.yaml`` path."""
    if spec.endswith((".yaml", ".yml")) or os.sep in spec:
        if not os.path.isfile(spec):
            raise LlmqError(f"recipe file not found: {spec}", "check the path")
        with open(spec, encoding="utf-8") as fh:
            text, origin = fh.read(), spec
    else:
        entry = _builtin_dir() / f"{spec}.yaml"
        if not entry.is_file():
            raise LlmqError(f"unknown recipe '{spec}'",
                            f"choose one of {', '.join(list_recipes())} (llmq-compile --list-recipes) or give a .yaml path")
        text, origin = entry.read_text(encoding="utf-8"), f"built-in recipe {spec}"
    return parse_recipe(text, origin)


def parse_recipe(text: str, origin: str) -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LlmqError(f"{origin}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise LlmqError(f"{origin}: a recipe must be a YAML mapping")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise LlmqError(f"{origin}: unknown recipe key(s) {', '.join(unknown)}", f"allowed keys: {', '.join(sorted(TOP_KEYS))}")
    for key in ("name", "passes"):
        if key not in data:
            raise LlmqError(f"{origin}: recipe has no '{key}'")
    calib = data.get("calibration") or {}
    if not isinstance(calib, dict) or set(calib) - CALIB_KEYS:
        raise LlmqError(f"{origin}: unknown calibration key(s) {', '.join(sorted(set(calib) - CALIB_KEYS))}",
                        f"allowed: {', '.join(sorted(CALIB_KEYS))}")
    if calib.get("propagate", PROPAGATE[0]) not in PROPAGATE:
        raise LlmqError(f"{origin}: calibration.propagate must be one of {', '.join(PROPAGATE)}, not {calib['propagate']!r}")
    passes = []
    for item in data["passes"] or []:
        if isinstance(item, str):
            name, options = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, options = next(iter(item.items()))
            options = options or {}
        else:
            raise LlmqError(f"{origin}: each pass is a name or a one-key mapping {{name: {{options}}}}, got {item!r}")
        if name not in REGISTRY:
            raise LlmqError(f"{origin}: unknown pass '{name}'", f"known passes: {', '.join(sorted(REGISTRY))}")
        if not isinstance(options, dict):
            raise LlmqError(f"{origin}: options of pass '{name}' must be a mapping")
        passes.append((name, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))))
    backends = tuple(data.get("backends") or ALL_BACKENDS)
    if set(backends) - set(ALL_BACKENDS):
        raise LlmqError(f"{origin}: unknown backend(s) {', '.join(sorted(set(backends) - set(ALL_BACKENDS)))}",
                        f"choose from {', '.join(ALL_BACKENDS)}")
    verify = data.get("verify") or {}
    if not isinstance(verify, dict) or set(verify) - VERIFY_KEYS:
        raise LlmqError(f"{origin}: unknown verify key(s) {', '.join(sorted(set(verify) - VERIFY_KEYS)) if isinstance(verify, dict) else verify!r}",
                        f"allowed: {', '.join(sorted(VERIFY_KEYS))}")
    try:
        bound = Bound(**{k: (int(v) if k == "windows" else float(v)) for k, v in verify.items()})
    except (TypeError, ValueError) as exc:
        raise LlmqError(f"{origin}: verify values must be numbers ({exc})") from exc
    if bound.windows < 1:
        raise LlmqError(f"{origin}: verify.windows must be ≥ 1")
    exclude = data.get("exclude") or []
    if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
        raise LlmqError(f"{origin}: 'exclude' must be a list of patterns")
    recipe = Recipe(name=str(data["name"]), description=" ".join(str(data.get("description", "")).split()),
                    opset=int(data.get("opset", 21)), passes=tuple(passes),
                    calib_samples=int(calib.get("samples", 16)), calib_seq_len=int(calib.get("seq_len", 512)),
                    calib_propagate=str(calib.get("propagate", PROPAGATE[0])),
                    exclude=tuple(exclude), backends=backends, bound=bound, source_text=text)
    options = [dict(o) for _, o in passes]
    names = [n for n, _ in passes]
    for i, name in enumerate(names):
        if name == "sensitivity" and options[i].get("action") == "per-token" and not any(
                n == "quantize-activations-dynamic" and options[j].get("only_switched") for j, n in enumerate(names) if j > i):
            raise LlmqError(f"{origin}: the sensitivity pass switches groups to per-token, but no later "
                            "'quantize-activations-dynamic' with only_switched: true quantizes them",
                            "add that pass after quantize-activations, or use action: float")
    if recipe.opset < 21:
        raise LlmqError(f"{origin}: opset {recipe.opset} is below 21, which llmq's Q/DQ output needs")
    try:
        recipe.build()  # option errors surface now, naming the pass
    except LlmqError as exc:
        raise LlmqError(f"{origin}: {exc.message}", exc.hint) from exc
    return recipe
