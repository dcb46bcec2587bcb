"""Options spelled both ways. The recipe's overrides are written `--max_steps` (HfArgumentParser's spelling) and
the commands' own options `--max-new-tokens`; people coming from `transformers` type underscores, people used to
Unix tools type dashes. Every long option of a parser built from this class answers to both."""

from __future__ import annotations

import argparse


def both_spellings(option_strings: tuple[str, ...]) -> list[str]:
    """The option strings with, after each `--some-option`, its `--some_option` (and the reverse), once each."""
    spelled: list[str] = []
    for option in option_strings:
        variants = [option]
        if option.startswith("--"):
            name = option[2:]
            variants += ["--" + name.replace("-", "_"), "--" + name.replace("_", "-")]
        for variant in variants:
            if variant not in spelled:
                spelled.append(variant)
    return spelled


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, each long option registered under both spellings (subcommands inherit it). An argument
    group's options go through `both_spellings` where they are added (argparse's groups are not this class)."""

    def add_argument(self, *names, **kwargs):
        return super().add_argument(*both_spellings(names), **kwargs)
