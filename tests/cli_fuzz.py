"""Helpers of the CLI fuzz test (tests/test_cli_fuzz.py): every subcommand and option of the
argparse parser, found by introspection, and the table of bad values each kind of option gets.

A new command is fuzzed by construction: its positionals and options are found in the parser.
An option whose kind is not known here fails the test until it is classified in KINDS (one line).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass
class Option:
    command: str
    dest: str
    flag: str | None  # None: a positional
    kind: str


# What each option (by dest) holds. Free text (a prompt, a table label) has no bad value.
KINDS = {
    "run": "run", "init": "run", "judge": "run", "baseline": "run",
    "config": "config", "overrides": "overrides",
    "source": "pairs_source",  # pairs; finetune's is "file_or_source" (below)
    "out": "out_file", "out_dir": "out_dir", "plots": "out_dir", "cache_dir": "out_dir",
    "text": "in_file", "pairs": "in_file", "data": "in_dir",
    "loops": "int_list", "steps": "int_list", "seeds": "int_list", "sweep_seeds": "int_list", "knob_seeds": "int_list", "taus": "float_list",
    "sets": "name_list", "tasks": "name_list", "arms": "name_list", "suites": "choice",
    "prompt": "free_text", "suffix": "free_text", "label": "free_text", "baseline_label": "free_text",
    "lm_eval_args": "passthrough", "plot": "out_file", "rules": "name_list", "scale": "choice",
    "loop_schedule": "loop_spec", "extend_from": "in_dir", "lrs_from": "in_dir",
}
# Where one dest means different things in different commands.
KIND_BY_COMMAND = {
    ("finetune", "source"): "file_or_source", ("sample", "loops"): "loop_spec", ("sample", "steps"): "int",
    ("analyze", "loops"): "int", ("sample-bench", "out"): "out_dir", ("downstream", "out"): "out_dir",
    ("experiment", "out"): "out_dir", ("zeroshot", "out"): "out_prefix",
}

BAD = {  # {placeholders} are filled by the test: files and folders in its temporary folder
    "int": ["", "abc", "1.5", "nan", "-7", "99999999999999999999"],
    "float": ["", "abc", "nan", "inf", "-1"],
    "int_list": ["", "abc", "-1", "0.5", "nan", ",", "99999999999999999999"],
    "loop_spec": ["", "abc", "0", "-1", "noise:5:x"],
    "float_list": ["", "abc", "nan", "-1", "inf"],
    "name_list": ["", "nosuch", ","],
    "choice": ["", "nosuch"],
    "run": ["", "{missing}", "{file}", "{empty_dir}", "{binary}"],
    "config": ["", "nosuch", "{empty_dir}", "{binary}", "{missing}.yaml"],
    "overrides": ["noequals", "model.colour=red", "train.lr=nan", "train.max_steps=-1"],
    "pairs_source": ["", "nosuch", "sudoku:abc", "gsm8k-aug:{missing}", "gsm8k-aug:{binary}"],
    "file_or_source": ["", "{missing}.jsonl", "{empty_dir}", "{binary}"],
    "in_file": ["", "{missing}", "{empty_dir}", "{binary}"],
    "in_dir": ["", "{missing}", "{file}", "{empty_dir}"],
    "out_file": ["", "{empty_dir}", "{file}/x", "{file}"],
    "out_dir": ["", "{file}", "{file}/x"],
    "out_prefix": ["", "{empty_dir}", "{file}/x"],  # OUT.json and OUT.md
}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(command: str, sub: argparse.ArgumentParser) -> list[Option]:
    """The options of `sub` that take a value, each with its kind (flags and help excluded)."""
    found = []
    for action in sub._actions:
        if isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction)):
            continue
        if action.choices is not None and action.dest not in KINDS:
            kind = "choice"
        elif action.type is int:
            kind = "int"
        elif action.type is float:
            kind = "float"
        else:
            kind = KIND_BY_COMMAND.get((command, action.dest), KINDS.get(action.dest, "unknown"))
        flag = action.option_strings[0] if action.option_strings else None
        found.append(Option(command, action.dest, flag, kind))
    return found


def base_argv(command: str, sub: argparse.ArgumentParser, fill: dict) -> dict[str, list[str]]:
    """A valid value for every positional and required option of `command`, by dest."""
    argv = {}
    for action in sub._actions:
        if action.option_strings and not action.required:
            continue
        if isinstance(action, argparse._HelpAction):
            continue
        dest = action.dest
        value = fill.get((command, dest), fill.get(dest))
        if value is None:
            continue
        argv[dest] = value if isinstance(value, list) else [value]
    return argv


def build(command: str, sub, base: dict, option: Option, value: str, extra: list[str]) -> list[str]:
    """argv of `command` with `option` set to `value`, everything else valid (`extra`: more valid
    options, before the bad one)."""
    argv = [command]
    for action in sub._actions:
        if action.option_strings:
            continue
        if action.dest == option.dest:
            argv += base.get("overrides", []) + [value] if option.dest == "overrides" else [value]
        elif action.dest in base:
            argv += base[action.dest]
    for action in sub._actions:
        if action.option_strings and action.required and action.dest != option.dest:
            argv += [action.option_strings[0], *base.get(action.dest, [])]
    argv += extra
    if option.flag:
        argv += [option.flag, value]
    return argv
