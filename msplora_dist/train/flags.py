"""launch/train.py's command line: one flag per TrainConfig field, --help grouped and documented from the
fields' docstrings, then --config YAML, then flags, in that order; a bad flag is a one-line ConfigError."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import itertools
import typing
from pathlib import Path

import yaml

from msplora_dist.errors import ConfigError
from msplora_dist.train.config import HELP_GROUPS, REPO_ROOT, TrainConfig, convert_field


def _field_docs() -> dict[str, str]:
    """The docstring under each field, for --help (parsed from the source: one place to document)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainConfig))
    docs, body = {}, tree.body[0].body
    for node, nxt in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help lines wrapped between words only (a long default path stays whole), the description as written."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False, break_on_hyphens=False)


def _shown_default(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "unset"
    if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(REPO_ROOT):
        return str(Path(value).relative_to(REPO_ROOT))  # the shipped assets and configs, as the README names them
    return str(value)


def _metavar(name: str, hint) -> str:
    if hint is bool:
        return "{true,false}"
    if typing.get_origin(hint) is tuple:
        return "A,B,C" if typing.get_args(hint)[-1] is not Ellipsis else "X,Y,..."
    return name.upper()


def close_match(name: str, known) -> str:
    """ "; did you mean X?" for the closest of `known` to a misspelt `name`, else "" (difflib's similarity)."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


class FlagParser(argparse.ArgumentParser):
    """argparse whose errors are one-line ConfigErrors (the entry point prints them and exits 2) instead of the whole
    usage block, with the closest flag for a misspelt one: `--lrr 1e-3` says "did you mean --lr?"."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            flags = self._option_string_actions
            unknown = [a.split("=", 1)[0] for a in message.removeprefix("unrecognized arguments: ").split() if a.startswith("-")]
            if unknown:
                raise ConfigError(f"unknown flag {unknown[0]}{close_match(unknown[0], flags) or ' (see --help)'}")
        raise ConfigError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        prog="deepspeed launch/train.py",
        description="Fine-tune a LLaMA-family model with MSPLoRA on DeepSpeed. Launch it with DeepSpeed's launcher:\n\n"
        "  deepspeed launch/train.py --ds_config ds_configs/zero3.json             # the embedded default, CPU or 1 GPU\n"
        "  deepspeed --num_gpus 8 launch/train.py --ds_config ds_configs/zero3.json --model DIR --data FILE\n\n"
        "With no flags it trains the embedded tiny model on the shipped data. Every flag takes a value (booleans:\n"
        "true or false) and can also come from --config run.yaml; flags override the file.",
        formatter_class=_HelpFormatter,
    )
    docs, hints = _field_docs(), typing.get_type_hints(TrainConfig)
    sections = {key: parser.add_argument_group(title) for key, title in HELP_GROUPS.items()}
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        section = sections.get(f.metadata.get("group"), parser)  # a field without a group lands in "options"
        text = f"{docs.get(f.name, '')} (default: {_shown_default(default)})"
        section.add_argument(f"--{f.name}", default=argparse.SUPPRESS, metavar=_metavar(f.name, hints[f.name]),
                             help=text.replace("%", "%%"))  # argparse %-formats help: a docstring's "4%" is text
    # DeepSpeed's launcher appends --local_rank; the rank is read from the environment instead.
    parser.add_argument("--local_rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    args.pop("local_rank", None)
    hints = typing.get_type_hints(TrainConfig)
    values: dict = {}
    if args.get("config"):
        path = Path(args["config"])
        if not path.is_file():
            raise ConfigError(f"--config {str(path)!r}: no such file; expected a YAML file of TrainConfig fields")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {str(path)!r} is not valid YAML ({err})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {str(path)!r}: expected a mapping of field: value, got {type(loaded).__name__}")
        unknown = sorted(set(loaded) - set(hints) - {"config"})
        if unknown:
            raise ConfigError(f"--config {str(path)!r}: unknown fields {unknown}; expected fields of TrainConfig (see --help)"
                              f"{close_match(unknown[0], hints)}")
        values.update(loaded)
    values.update(args)
    converted = {k: convert_field(k, v, hints[k]) for k, v in values.items()}
    return TrainConfig(**converted)
