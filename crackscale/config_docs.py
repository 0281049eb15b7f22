"""Generate docs/configuration.md from the config dataclasses and their help texts.

    python -m crackscale.config_docs               # (re)write docs/configuration.md (= make docs)
    python -m crackscale.config_docs --check       # exit 1 if the committed page is stale
    python -m crackscale.config_docs --out PATH    # write elsewhere

The page is built from ``crackscale.config`` alone (field names, types, defaults, the ``help`` and
``group`` metadata of ``setting``, and the tuning constants), so it cannot drift from the code.
Only ``crackscale.config`` and the standard library are imported here.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any

from crackscale.config import loader, score, storage, train, tune

ROOT = Path(__file__).resolve().parent.parent
PAGE = Path("docs") / "configuration.md"
STALE = f"{PAGE.as_posix()} is stale: run make docs"

# Sections listed key by key (``storage.s3_endpoint``) in every table that has them; other sections
# (a TuneConfig's ``train``) are one row that points at their own table.
INLINE_SECTIONS: tuple[type, ...] = (storage.StorageConfig,)

TITLES = {
    train.TrainConfig: "TrainConfig: training",
    tune.TuneConfig: "TuneConfig: tuning",
    score.ScoreConfig: "ScoreConfig: scoring",
    storage.StorageConfig: "StorageConfig: S3 storage",
    train.SourceConfig: "SourceConfig: a training source",
}
CONFIGS = tuple(TITLES)

SPEC_FORMS = {  # how each kind of tune.SEARCH_SPECS is written and what it samples
    "loguniform": ("[low, high]", "a real number in [low, high), uniform on a log scale (low > 0); float keys only"),
    "uniform": ("[low, high]", "a real number in [low, high); float keys only"),
    "randint": ("[low, high]", "an integer from low to high - 1 (high excluded); integer bounds"),
    "choice": ("[v1, v2, ...]", "one of the listed values, for any key"),
}


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces → hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _link(cls: type) -> str:
    return f"[{cls.__name__}](#{_anchor(TITLES[cls])})"


def _intro(cls: type) -> str:
    storage_keys = ", ".join(f"`storage.{f.name}`" for f in dataclasses.fields(storage.StorageConfig))
    return {
        train.TrainConfig: (
            "Read by `jobs/train.py` and `crackscale train`: one distributed training run that writes a model "
            "artifact. The same keys form the `train:` section of a " + _link(tune.TuneConfig) + ". Examples: "
            "`jobs/configs/demo.yaml`, `jobs/configs/train.yaml`."
        ),
        tune.TuneConfig: (
            "Read by `jobs/tune.py` and `crackscale tune`: a hyperparameter search whose trials are training "
            "runs. Its `train:` section is a whole " + _link(train.TrainConfig) + " (keys written `train.<key>` "
            "in `--set`, e.g. `--set train.data=s3://bucket/crack`); every trial starts from it and changes "
            "only the searched keys. Example: `jobs/configs/tune.yaml`."
        ),
        score.ScoreConfig: (
            "Read by `jobs/score.py` and `crackscale score`: batch scoring of images into Parquet with a "
            "trained model artifact. `--model`, `--input` and `--output` on the command line are short for "
            "`--set model=...` and so on. Example: `jobs/configs/score.yaml`."
        ),
        train.SourceConfig: (
            "One entry of a " + _link(train.TrainConfig) + "'s `data:` list: a bare URI (`- ../data/site-a`) "
            "or a mapping with these keys (`- {uri: s3://bucket/walls, weight: 0.3}`). `--set data=a,b` gives "
            "a list of bare URIs. What a crop tree and a photo set are, how photos become labelled tiles and how "
            "each source is split: [training](training.md#sources)."
        ),
        storage.StorageConfig: (
            "The `storage:` section of every config above (" + storage_keys + "; in a TuneConfig "
            "`train.storage.*`): where S3-compatible storage lives. `crackscale query`, `crackscale report` "
            "and `crackscale doctor` read it from a scoring config (`--config`, `--set storage.…`); their "
            "`--s3-endpoint` is a shorthand for `--set storage.s3_endpoint=…`. Empty values fall back to the "
            "AWS variables as below."
        ),
    }[cls]


# ---- values as YAML shows them -----------------------------------------------------------------

_YAML_SPECIAL = re.compile(
    r"(?i:y|n|yes|no|on|off|true|false|null|~)|[-+]?(\d[\d_]*)?(\.\d*)?([eE][-+]?\d+)?|[-+]?\.(inf|nan)"
)
_YAML_PLAIN = re.compile(r"[\w./(\\<][\w./()\\<>+-]*")


def yaml_value(value: Any) -> str:
    """``value`` in YAML flow style, as ``yaml.safe_dump`` would read it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):  # PyYAML's float form: 1e-05 → 1.0e-05 (a bare 1e-05 loads as text)
        text = repr(value).lower()
        return text.replace("e", ".0e", 1) if "e" in text and "." not in text else text
    if isinstance(value, str):
        if _YAML_PLAIN.fullmatch(value) and not _YAML_SPECIAL.fullmatch(value):
            return value
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{yaml_value(k)}: {yaml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no YAML form for {value!r}")


def type_name(tp: Any) -> str:
    """A key's type as the page prints it: int, float, bool, str, list[str], mapping, section."""
    if dataclasses.is_dataclass(tp):
        return "section"
    origin = typing.get_origin(tp)
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        return f"list[{inner.__name__}]" if dataclasses.is_dataclass(inner) else f"list[{type_name(inner)}]"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


# ---- Markdown ------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"(?:[\w.:/-]|<\w+>)*<\w+>(?:[\w/-]|<\w+>|\.(?=\w))*")


def _cell(text: str) -> str:
    """Help text for a table cell: path templates like <storage_path>/<name> in code, | escaped."""
    parts = []
    for i, piece in enumerate(re.split(r"(`[^`]*`)", _PLACEHOLDER.sub(lambda m: f"`{m.group(0)}`", text))):
        parts.append(piece if i % 2 else piece.replace("<", "&lt;"))
    return "".join(parts).replace("|", r"\|")


def _code(text: str) -> str:
    return "`" + text.replace("|", r"\|") + "`"


def help_text(field: dataclasses.Field) -> str:
    return str(field.metadata.get("help", "")).strip()


def rows(cls: type, prefix: str = "") -> list[tuple[str, str, str, str, str]]:
    """(group, key, type, default, help) for every key of ``cls``, inline sections expanded."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    out = []
    for f in dataclasses.fields(cls):
        tp, key, group = hints[f.name], prefix + f.name, str(f.metadata.get("group", ""))
        if dataclasses.is_dataclass(tp):
            if tp in INLINE_SECTIONS:
                out.append((group, key, "section", "", f"{_cell(help_text(f))}: the keys below, see {_link(tp)}"))
                out += [(group, *row[1:]) for row in rows(tp, prefix=f"{key}.")]
            else:
                out.append((group, key, "section", "", f"{_cell(help_text(f))}. Keys: `{key}.<key>`, see {_link(tp)}"))
            continue
        text = _cell(help_text(f))
        if typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            text += f"; entry keys: {_link(typing.get_args(tp)[0])}"
        out.append((group, key, type_name(tp), _code(yaml_value(getattr(defaults, f.name))), text))
    return out


def render_config(cls: type) -> str:
    """The section of one config: heading, intro, then a key/type/default/help table per group."""
    lines = [f"## {TITLES[cls]}", "", _intro(cls), ""]
    group = None
    for g, key, tp, default, text in rows(cls):
        if g != group:
            if group is not None:
                lines.append("")
            if g:
                lines += [f"### {g}", ""]
            lines += ["| key | type | default | help |", "| --- | --- | --- | --- |"]
            group = g
        lines.append(f"| `{key}` | {tp} | {default or '-'} | {text} |")
    lines.append("")
    if cls is tune.TuneConfig:
        lines += _search_specs()
    return "\n".join(lines)


def _search_specs() -> list[str]:
    missing = [k for k in tune.SEARCH_SPECS if k not in SPEC_FORMS]
    if missing:
        raise KeyError(f"crackscale.config_docs.SPEC_FORMS does not describe search spec(s) {missing}")
    out = [
        "### Search specs",
        "",
        (
            "`search_space` and `pbt_mutations` map a training key to one spec, `{kind: args}`, e.g. "
            "`head_lr: {loguniform: [0.0001, 0.01]}`. Every value a spec can produce must make a valid "
            "TrainConfig: that is checked when the config loads, and a bad spec is an error naming it "
            "(`search_space.<key>`). Mapping keys are given in the YAML file (a `--set` value is text)."
        ),
        "",
        "| spec | samples |",
        "| --- | --- |",
    ]
    out += [f"| `{{{k}: {SPEC_FORMS[k][0]}}}` | {_cell(SPEC_FORMS[k][1])} |" for k in tune.SEARCH_SPECS]
    out += [
        "",
        (
            "Write small numbers in specs as `0.00001` or `1.0e-5`: YAML reads `1e-5` (no dot) as text, "
            "which a spec refuses. (Typed keys such as `head_lr: 1e-5` convert it.)"
        ),
        "",
        (
            "Keys that can be searched or mutated (data, split, cluster shape and outputs stay those of "
            "`train`): " + ", ".join(f"`{k}`" for k in tune.TUNABLE_KEYS) + "."
        ),
        "",
        "Metrics that `metric` can name (reported every epoch and in each trial's final result): "
        + ", ".join(f"`{m}`" for m in tune.TUNE_METRICS)
        + ".",
        "",
    ]
    return out


def _error(cls: type, override: str) -> str:
    """The exact one-line error ``load`` gives for ``override``."""
    try:
        loader.load(cls, None, [override])
    except loader.ConfigError as e:
        return str(e)
    raise AssertionError(f"override {override!r} was accepted")


def _how_configs_are_given() -> list[str]:
    return [
        "## How configs are given",
        "",
        "Every job reads one config: an optional YAML file, then `--set` overrides, then checks.",
        "",
        (
            "- `--config FILE`: a YAML mapping of keys to values. It is read as data only (YAML tags that would "
            "construct Python objects are refused as not valid YAML). Sections are nested mappings: `storage:`, "
            "and in a TuneConfig `train:`. Keys left out keep the defaults below."
        ),
        (
            "- `--set key=value` (repeatable) is applied after the file, in order. Dotted keys reach into "
            "sections: `--set storage.s3_endpoint=http://127.0.0.1:9000`, or in a TuneConfig "
            "`--set train.num_workers=2`. The value is text, converted to the key's type: `int` and `float` parse "
            "numbers, `bool` takes `true`, `false`, `yes`, `no`, `1` or `0`, `list[str]` takes a comma-separated "
            "list (`--set class_names=No,Yes`). `mapping` keys are given in the file."
        ),
        (
            "- Values in the file are checked and converted the same way, so `head_lr: 1e-4` (text to YAML) works "
            "and a number is accepted for a `str` key; a YAML `true`/`false` is not text, so quote it for a `str` "
            'key (`freeze_base: "false"`).'
        ),
        (
            "- An unknown key, a wrong type or an invalid value is a one-line error naming the key, and the "
            "command exits with status 2 before any work starts, e.g. "
            f"`{_error(train.TrainConfig, 'storage.endpoint=x')}`, "
            f"`{_error(train.TrainConfig, 'head_epochs=three')}`."
        ),
        (
            "- The resolved config (every key, defaults filled in) is saved as YAML next to what the job writes: "
            "`config.yaml` in every model artifact and in `<storage_path>/<name>/crackscale/` of a training run "
            "or tuning experiment, and `<output>/_runs/<run_id>.yaml` beside each scoring run's summary. It loads "
            "again with `--config`."
        ),
        (
            "- Credentials are never config keys: S3 access uses the standard AWS chain (environment, "
            "`~/.aws`, instance role)."
        ),
        "",
    ]


def render() -> str:
    """The whole of docs/configuration.md."""
    lines = [
        "# Configuration reference",
        "",
        (
            "> Generated by `make docs` from `crackscale/config/`; do not edit by hand. To change a key's "
            "text, edit its `help` there and run `make docs`."
        ),
        "",
        "Configs: " + ", ".join(_link(cls) for cls in CONFIGS) + ".",
        "",
    ]
    lines += _how_configs_are_given()
    text = "\n".join(lines) + "\n" + "\n".join(render_config(cls) for cls in CONFIGS)
    return text.rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crackscale.config_docs", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / PAGE), help=f"page to write or check (default: {PAGE.as_posix()})")
    p.add_argument("--check", action="store_true", help="exit 1 if the page differs from what would be written")
    args = p.parse_args(argv)
    out, text = Path(args.out), render()
    if args.check:
        current = out.read_text(encoding="utf-8") if out.is_file() else None
        if current != text:
            print(
                STALE if out.resolve() == (ROOT / PAGE).resolve() else f"{out} is stale: run make docs", file=sys.stderr
            )
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {out} ({len(text.encode())} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
