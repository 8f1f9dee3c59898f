"""The `pipelines.yaml` schema: one validated config per stage, composed per pipeline.

Every stage owns its config model (`compsae/<stage>/config.py`); this module only composes them,
reads YAML safely, applies `--set key.path=value` overrides and turns validation errors into
one line that names the key path, what was wrong and what is allowed.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compsae.analysis.config import AnalyzeConfig
from compsae.durable import check_url
from compsae.errors import UserError
from compsae.evaluation.comparison.config import EvaluateConfig
from compsae.evaluation.ground_truth.config import GroundTruthConfig
from compsae.evaluation.probes.config import ProbeConfig
from compsae.harvest.config import HarvestConfig
from compsae.train.config import MODEL_CONFIGS, TrainStageConfig, split_seed_name

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
DEFAULT_CONFIG = "pipelines.yaml"


class PipelineConfig(BaseModel):
    """One pipeline: the stages it runs, in data-flow order."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    harvest: HarvestConfig | None = Field(
        None, description="run a language model and store its activations"
    )
    ground_truth: GroundTruthConfig | None = Field(
        None,
        description="instead of harvest: synthetic activations with known features and pairs",
    )
    train: TrainStageConfig | None = None
    analyze: AnalyzeConfig | None = None
    evaluate: EvaluateConfig | None = Field(
        None, description="ground-truth scores (needs ground_truth)"
    )
    probe: ProbeConfig | None = Field(
        None,
        description="task probes: the LM's behaviour and k-sparse probes of latents (needs "
        "harvest, train)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> PipelineConfig:
        if (self.harvest is None) == (self.ground_truth is None):
            raise ValueError(
                "give exactly one of 'harvest' (a language model) or 'ground_truth' (synthetic "
                "data)"
            )
        for stage in ("analyze", "evaluate", "probe"):
            if getattr(self, stage) is not None and self.train is None:
                raise ValueError(f"'{stage}' works on trained models: it needs a 'train' section")
        if self.evaluate is not None and self.ground_truth is None:
            raise ValueError(
                "'evaluate' scores against known features: it needs a 'ground_truth' section"
            )
        if self.probe is not None and (self.harvest is None or self.train is None):
            raise ValueError(
                "'probe' reruns the harvested LM on task prompts: it needs 'harvest' and 'train' "
                "sections"
            )
        return self

    @property
    def source(self) -> HarvestConfig | GroundTruthConfig:
        """The config of the first stage, whichever kind it is."""
        return self.harvest if self.harvest is not None else self.ground_truth  # type: ignore[return-value]


class PipelinesFile(BaseModel):
    """The whole `pipelines.yaml`."""

    model_config = ConfigDict(extra="forbid")

    runs_root: str = Field(
        "runs", description="where stage folders go: a local path or an fsspec URL"
    )
    pipelines: dict[str, PipelineConfig]

    @field_validator("runs_root")
    @classmethod
    def _usable_root(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("runs_root is empty: give a folder (e.g. runs) or an fsspec URL")
        if not v.rstrip("/"):
            raise ValueError("runs_root is the file-system root: give a folder (e.g. runs)")
        check_url(v)
        return v

    @field_validator("pipelines")
    @classmethod
    def _safe_names(cls, v: dict[str, PipelineConfig]) -> dict[str, PipelineConfig]:
        for name in v:
            # fullmatch: `$` would accept a name ending in a newline
            if not re.fullmatch(NAME_PATTERN, name) or ".." in name:
                raise ValueError(
                    f"pipeline name {name!r} must be letters, digits, '_', '-', '.' (no '..', no "
                    "'/')"
                )
        return v


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line: where (key path), what was wrong, what is allowed; '(+N more)' when several."""
    errors = err.errors(include_url=False)
    first = errors[0]
    parts = [str(p) for p in first["loc"]]
    # a model config is a union tagged by its type: pydantic puts the tag in the path; leave it out
    parts = [
        p
        for i, p in enumerate(parts)
        if not (i >= 2 and parts[i - 2] == "models" and p in MODEL_CONFIGS)
    ]
    loc = ".".join(p for p in (prefix.split(".") if prefix else []) + parts if p)
    msg = first["msg"].replace("\n", " ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see pipelines.yaml for the allowed keys)"
        if (
            len(parts) >= 3 and parts[-3] == "models"
        ):  # a setting of another kind of model, most likely
            msg = (
                "unknown key for this model type (each type has only its own settings: "
                "compsae / topk / relu; see pipelines.yaml)"
            )
    got = first.get("input")
    got_txt = (
        ""
        if first["type"] in ("missing", "extra_forbidden") or isinstance(got, (dict, list))
        else f" (got {got!r:.60})"
    )
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"config error at {loc or '<top>'}: {msg}{got_txt}{more}"


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping (almost always a mistake:
    PyYAML would keep the last one silently)."""


def _no_duplicate_keys(
    loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        if (
            key_node.tag == "tag:yaml.org,2002:merge"
        ):  # `<<: *defaults`: its keys may be overridden here
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} is given twice in one mapping (line {seen[key] + 1} and line "
                f"{mark.line + 1}); keep one",
                mark,
            )
        seen[key] = key_node.start_mark.line
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)
MAX_YAML_BYTES = 10 * 2**20  # a pipelines file is a few kB; this bounds what a mistaken path costs


def safe_yaml(text: str, where: str) -> Any:
    """Parse YAML `text` safely (no tags that build objects, no duplicate keys), as a one-line
    UserError naming `where` when it cannot be parsed."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"config error: {where} is not valid YAML ({at}: {problem})") from None
    except RecursionError:
        raise UserError(
            f"config error: {where} is nested too deeply to be a pipelines file"
        ) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as a YAML scalar or flow list/map)."""
    if "=" not in text:
        raise UserError(
            f"--set {text!r} needs the form key.path=value, e.g. --set train.models.compsae.k=16"
        )
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(p and re.fullmatch(r"[A-Za-z0-9_\-]+", p) for p in parts):
        raise UserError(f"--set key {key!r} is not a dotted key path like train.models.compsae.k")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else ""  # noqa: S506 - a SafeLoader
    except yaml.YAMLError:
        value = raw  # not YAML: the text itself
    except RecursionError:
        raise UserError(f"--set {key}: the value is nested too deeply") from None
    return parts, value


def _apply(doc: dict[str, Any], path: list[str], value: Any, shown: str) -> None:
    node: Any = doc
    for i, part in enumerate(path[:-1]):
        if not isinstance(node, dict):
            raise UserError(
                f"--set {shown}: {'.'.join(path[:i])} is not a mapping, cannot set a key inside it"
            )
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    if not isinstance(node, dict):
        raise UserError(
            f"--set {shown}: {'.'.join(path[:-1])} is not a mapping, cannot set a key inside it"
        )
    node[path[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with `yaml.safe_load`, as a one-line UserError when it is not one."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"config file {p} not found; run from the project folder or pass --config FILE"
        )
    if p.stat().st_size > MAX_YAML_BYTES:
        raise UserError(
            f"config error: {p} is {p.stat().st_size / 2**20:.0f} MiB, not a pipelines file; check "
            "--config"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"config error: {p} is not UTF-8 text") from None
    doc = safe_yaml(text, str(p))
    if not isinstance(doc, dict):
        raise UserError(
            f"config error: {p} must be a mapping with a 'pipelines' key, got {type(doc).__name__}"
        )
    return doc


def ignored_override(pipe: PipelineConfig, path: list[str], shown: str) -> str | None:
    """The warning for `--set shown` (path relative to the pipeline) when it sets a model setting
    the model does not read (`train.models.compsae.n_heads` with the pair composer); None when it
    has an effect, or is not a model setting."""
    if pipe.train is None or len(path) != 4 or path[:2] != ["train", "models"]:
        return None
    name, field = path[2], path[3]
    # with train.seeds a model trains once per seed, as <name>__s<seed>
    models = [m for n, m in pipe.train.models.items() if n == name or split_seed_name(n)[0] == name]
    why = models[0].ignored_because(field) if models else None
    return f"warning: --set {shown} has no effect {why}; the run goes on" if why else None


def load_pipeline(
    pipeline: str,
    config_path: str | Path = DEFAULT_CONFIG,
    overrides: list[str] | None = None,
    warn: Callable[[str], Any] | None = None,
) -> tuple[PipelinesFile, PipelineConfig]:
    """Load `config_path`, apply `overrides` to pipeline `pipeline`, validate, return both levels.

    An override path starting with `runs_root` or `pipelines` is taken from the file's top level;
    any other path is relative to the chosen pipeline (`train.models.compsae.k=16`).  An override
    of a setting the model ignores (another composer's) gives one line to `warn` (default:
    stderr)."""
    doc = read_yaml(config_path)
    pipes = doc.get("pipelines")
    if not isinstance(pipes, dict) or not pipes:
        raise UserError(
            f"config error at pipelines: {config_path} declares no pipelines (a mapping name -> "
            "stages)"
        )
    if pipeline not in pipes:
        raise UserError(
            f"no pipeline {pipeline!r} in {config_path}; choose one of: "
            f"{', '.join(map(str, pipes))}"
        )
    applied: list[tuple[list[str], str]] = []
    for text in overrides or []:
        path, value = parse_override(text)
        if path[0] not in ("runs_root", "pipelines"):
            path = ["pipelines", pipeline, *path]
        _apply(doc, path, value, text)
        applied.append((path, text))
    try:
        whole = PipelinesFile.model_validate(doc)
    except ValidationError as e:
        raise UserError(format_validation_error(e)) from None
    pipe = whole.pipelines[pipeline]
    for path, text in applied:
        if path[:2] == ["pipelines", pipeline]:
            line = ignored_override(pipe, path[2:], text)
            if line is not None:
                (warn or _to_stderr)(line)
    return whole, pipe


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)
