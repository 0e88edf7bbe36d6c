"""Subcommands of the ``convzoo`` command, one module each (see ``convzoo.cli``)."""
