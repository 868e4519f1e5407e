"""The settings layer every `r2m` command shares: TRL's parser (TrlParser) over the command's
dataclasses, with defaults under a YAML file (--config) and the flags, flags last, and every bad
value reported as one UsageError line naming the field (exit status 2). `--help` is short (the
command's own options and the TRL ones set most, without importing TRL); `--help-all` is
TrlParser's list of every option, the command's own first."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import types
import typing
import warnings

from ..config import DEVICES, UsageError, message_line

__all__ = ["DEVICES", "HELP_ALL", "UsageError", "check_backend_runs", "check_finite", "check_yaml", "choice",
           "help_requested", "make_parser", "prescan", "runs_on_cpu", "short_help"]

HELP_ALL = "--help-all"  # every option; -h/--help is the short help (GLib's convention)


def make_parser(dataclass_types, defaults: dict, prog: str, description: str):
    """TRL's TrlParser, with `defaults` under the YAML file and the flags, and errors raised as
    UsageError (one line; argparse's usage dump would bury the message), a dataclass's own
    check (__post_init__) included."""
    from trl import TrlParser

    class OneLineErrors(TrlParser):
        def error(self, message):
            raise UsageError(message)

        def parse_args_and_config(self, *args, **kwargs):
            with warnings.catch_warnings():
                # TRL's configs set transformers' deprecated name `gradient_checkpointing` by
                # default: a FutureWarning at every parse that the user can do nothing about.
                warnings.filterwarnings("ignore", message="`gradient_checkpointing", category=FutureWarning)
                try:
                    parsed = super().parse_args_and_config(*args, **kwargs)
                except (ValueError, TypeError) as e:
                    raise UsageError(message_line(e)) from None
            for section in parsed:
                check_finite(section)
            return parsed

    parser = OneLineErrors(dataclass_types, prog=prog, description=description,
                           usage=f"{prog} [--config FILE] [OPTIONS]")  # argparse's own: 165 lines of flags
    parser.set_defaults(**defaults)
    # The full help (--help-all) lists the command's own groups first: TRL's config has no group
    # name, so its ~300 options are argparse's untitled "options" group, printed first otherwise.
    trl_options = parser._optionals
    trl_options.title = f"TRL's settings ({dataclass_types[-1].__name__}, transformers' TrainingArguments included)"
    parser._action_groups.remove(trl_options)
    parser._action_groups.append(trl_options)
    return parser


def help_requested(argv: list[str]) -> str | None:
    """"all" for --help-all, "short" for -h or --help, None otherwise."""
    if HELP_ALL in argv:
        return "all"
    return "short" if "-h" in argv or "--help" in argv else None


def short_help(prog: str, description: str, sections, defaults: dict, trl_options: dict[str, str]) -> str:
    """The short help: every option of the command's own `sections` (dataclasses with an
    `_argument_group_name`: each field's help, choices and default, `defaults` overriding it),
    then the TRL options set most, `trl_options` (name: what it is), with the command's default
    where it sets one; and where the full list is. Built from the dataclasses alone, so that
    `--help` does not import TRL (seconds: it imports transformers)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, add_help=False,
                                     usage=f"{prog} [--config FILE] [OPTIONS]   (every option: {prog} {HELP_ALL})")
    parser.add_argument("-h", "--help", action="store_true", help="this help")
    parser.add_argument(HELP_ALL, action="store_true", help="every option, TRL's included")
    parser.add_argument("--config", metavar="FILE", help="a YAML file of settings (flags override it)")
    for section in sections:
        group = parser.add_argument_group(section._argument_group_name)
        for f in dataclasses.fields(section):
            if not f.init:
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            default = defaults.get(f.name, default)
            text = f.metadata.get("help", "").replace("%", "%%")
            choices = f.metadata.get("choices")
            group.add_argument(f"--{f.name}", metavar=None if choices else f.name.upper(), choices=choices,
                               help=f"{text} (default: {default})" if default is not None else text)
    group = parser.add_argument_group(
        "TRL's settings set most", f"{prog} {HELP_ALL} lists every one, with TRL's defaults")
    for name, text in trl_options.items():
        shown = f"{text} (default: {defaults[name]})" if name in defaults else text
        group.add_argument(f"--{name}", metavar=name.upper(), help=shown.replace("%", "%%"))
    return parser.format_help()


def check_finite(section) -> None:
    """A UsageError naming the first float setting of a parsed dataclass that is inf or nan:
    argparse's float() accepts both, and no setting of r2m's or TRL's means anything with them
    (an infinite learning rate trains to NaN rewards and still exits 0)."""
    if not dataclasses.is_dataclass(section):
        return
    for f in dataclasses.fields(section):
        value = getattr(section, f.name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{f.name}: {value} is not a finite number")


def prescan(argv: list[str], names: tuple[str, ...], switches: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(the YAML file's mapping, the settings that pick defaults: `names`, and `switches`, boolean
    flags that may stand bare, as "true"), read before the full parse; flags win over the file."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    for name in names:
        pre.add_argument(f"--{name}")
    for name in switches:
        pre.add_argument(f"--{name}", nargs="?", const="true")
    known, _ = pre.parse_known_args(argv)
    from_yaml = {}
    if known.config is not None:
        import yaml

        try:
            with open(known.config, encoding="utf-8") as f:
                from_yaml = yaml.safe_load(f)
        except OSError as e:
            raise UsageError(f"--config: cannot read {known.config}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"--config: {known.config} is not UTF-8 text (byte {e.start})") from None
        except yaml.YAMLError as e:
            first = message_line(e)
            raise UsageError(f"--config: {known.config} is not valid YAML ({first})") from None
        if not isinstance(from_yaml, dict):
            raise UsageError(f"--config: {known.config} must hold a mapping of settings, "
                             f"not {type(from_yaml).__name__}")
    picked = {name: getattr(known, name) if getattr(known, name) is not None else from_yaml.get(name)
              for name in (*names, *switches)}
    return from_yaml, picked


def _value_fits(hint, value) -> bool:
    """Whether a YAML value fits a field's type. Strings are left to argparse, which converts
    them with the field's type and reports what does not convert."""
    if isinstance(value, str):
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_value_fits(a, value) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str or (isinstance(hint, type) and issubclass(hint, enum.Enum)):
        return False  # a non-string where a string is expected
    if origin is list or hint is list:
        return isinstance(value, list)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True  # Any and the like


def check_yaml(from_yaml: dict, dataclass_types) -> None:
    hints, choices = {}, {}
    for cls in dataclass_types:
        cls_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                hints[f.name] = cls_hints[f.name]
                if "choices" in f.metadata:
                    choices[f.name] = f.metadata["choices"]
    for key, value in from_yaml.items():
        if key == "env":
            continue
        if key not in hints:
            raise UsageError(f"{key}: unknown setting in the config file")
        if not _value_fits(hints[key], value):
            raise UsageError(f"{key}: {value!r} is not a valid {_type_name(hints[key])}")
        if key in choices and value not in choices[key]:
            raise UsageError(f"{key}: {value!r} is not one of {', '.join(map(str, choices[key]))}")


def _type_name(hint) -> str:
    names = [getattr(a, "__name__", str(a)) for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
    return " or ".join(names)


def choice(name: str, value: str | None, choices) -> str:
    """`value` (the first of `choices` when not given), or a UsageError naming the field."""
    value = value or choices[0]
    if value not in choices:
        raise UsageError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return value


def check_backend_runs(r2m_config, on_cpu: bool) -> None:
    """A UsageError, before any model is loaded, when the head's backend cannot run on the
    run's device (the CPU, or the GPU)."""
    import r2m_kernels

    from ..head import check_head_backend

    try:
        check_head_backend(r2m_config.head_backend, "cpu" if on_cpu else "cuda")
    except r2m_kernels.BackendUnavailableError as e:
        raise UsageError(str(e)) from None


def runs_on_cpu(device: str | None) -> bool:
    """Whether the --device value (auto when not given) means the CPU; a UsageError for a bad
    value or for cuda without a CUDA device."""
    import torch

    device = choice("device", device, DEVICES)
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device: cuda was asked for, but torch sees no CUDA device here")
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())
