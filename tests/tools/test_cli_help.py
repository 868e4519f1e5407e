"""`r2m train --help` and `r2m experiment --help`: a short help (the command's own options first,
then the TRL ones set most, and where the full list is) that does not import TRL; `--help-all`:
every option, the command's own groups first."""

import dataclasses
import subprocess
import sys

import pytest

pytest.importorskip("trl")

from trl import GRPOConfig, RLOOConfig  # noqa: E402

from r2m.cli import experiment, main, train  # noqa: E402
from r2m.config import R2MConfig  # noqa: E402
from r2m.experiment.settings import ExperimentArguments  # noqa: E402

COMMANDS = {"train": (train, train.TrainArguments, (GRPOConfig, RLOOConfig)),
            "experiment": (experiment, ExperimentArguments, (RLOOConfig,))}


def help_text(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


def options(*sections) -> list[str]:
    return [f"--{f.name}" for section in sections for f in dataclasses.fields(section) if f.init]


@pytest.mark.parametrize("command", COMMANDS)
def test_short_help_lists_r2ms_options_first_and_says_where_the_rest_are(command, capsys):
    module, own, trl_configs = COMMANDS[command]
    text = help_text(capsys, command, "--help")
    assert help_text(capsys, command, "-h") == text
    assert len(text.splitlines()) < 130
    assert f"r2m {command} --help-all" in text
    lines = text.splitlines()
    flag_lines = [line.split()[0] for line in lines if line.startswith("  --")]
    ours, trl_featured = options(own, R2MConfig), [f"--{name}" for name in module.TRL_OPTIONS]
    assert flag_lines == ["--help-all", "--config", *ours, *trl_featured]
    for config in trl_configs:  # each featured TRL option is one TRL's parser takes
        assert set(trl_featured) <= set(options(config)), config.__name__


@pytest.mark.parametrize("command", COMMANDS)
def test_help_all_lists_every_option_ours_first(command, capsys):
    module, own, trl_configs = COMMANDS[command]
    text = help_text(capsys, command, "--help-all")
    flags = {word.rstrip(",") for line in text.splitlines() if line.startswith("  -") for word in line.split()
             if word.startswith("--")}
    assert set(options(own, R2MConfig, trl_configs[-1])) <= flags
    titles = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert titles == [f"r2m {command}:", "R2M:", f"TRL's settings ({trl_configs[-1].__name__}, transformers' "
                                                    "TrainingArguments included):"]
    assert len(text.splitlines()) > 500


def test_short_help_does_not_import_trl():
    """The short help is quick: it imports neither TRL nor transformers (seconds of imports)."""
    code = ("import sys\nfrom r2m.cli import main\n"
            "for command in ('train', 'experiment'):\n"
            "    try:\n        main([command, '--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('trl', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
