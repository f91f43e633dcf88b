"""The help formatter every subcommand's parser shares (`pdiff COMMAND --help`)."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and each option's default at the end of its help (when it has a
    default worth showing and its help does not name one already)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        shown = action.option_strings and not (default is None or default is False or default == []
                                                or default is argparse.SUPPRESS)
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text
