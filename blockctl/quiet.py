"""Silencing the libraries' own chatter (loading bars, fallback warnings), which would
interleave with blockctl's output on the same terminal."""

from __future__ import annotations


def quiet_libraries() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
