"""Gradio glue: how a handler's results and errors reach the browser. ``user_errors`` turns bad
input into a message, ``carry_forward`` and ``streamed`` make every streamed chunk complete, and
``final_image`` runs a tab's stream to its end (the API's one-shot endpoints)."""
from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterable, Iterator

from .files import OutputFiles, png_files

log = logging.getLogger(__name__)


def final_image(updates, what: str):
    """The ``final`` image (a numpy array) among a tab's stream of updates, run to its end."""
    for update in updates:
        if "final" in update:
            return update["final"]
    raise RuntimeError(f"{what} ended without a final image")


def carry_forward(updates: Iterable[dict]) -> Iterator[dict]:
    """Yield each update of a streaming handler together with the latest value of every output an
    earlier update set, so no chunk leaves out an output that already has a value.

    Why: Gradio's browser client (6.x) sends each streamed chunk as a diff against the previous
    chunk and applies it in place, to the very objects it handed to the components. A component
    that is not mounted yet (its tab is still opening) keeps a reference to its pending value, and
    a later chunk that skips that output rewrites the object into a skip marker before the
    component reads it: the image comes up empty although the status says Done. A value repeated
    unchanged diffs to nothing and is left alone (tests/test_stream_browser.py shows both).
    """
    held: dict = {}
    for update in updates:
        held.update(update)
        yield dict(held)


def streamed(updates: Iterable[dict], files: OutputFiles) -> Iterator[dict]:
    """A streaming handler's updates as Gradio should get them: every chunk repeats the outputs set
    so far (``carry_forward``) and images go out as PNG files (``files.png_files``)."""
    return carry_forward(png_files(u, files) for u in updates)


def user_errors(fn):
    """Decorate a Gradio handler (function or generator): ``ValueError`` (bad input, bad or
    missing checkpoint) becomes ``gr.Error`` with its message; anything else is logged and
    reported as an internal error, so the request fails cleanly and the queue moves on."""
    import gradio as gr

    def convert(e: Exception) -> Exception:
        if isinstance(e, gr.Error):
            return e
        if isinstance(e, (ValueError, TypeError, OverflowError)):
            return gr.Error(str(e), print_exception=False)
        log.exception("internal error in %s", fn.__name__)
        return gr.Error(f"internal error ({type(e).__name__}: {e})", print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                raise convert(e) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise convert(e) from None
    return wrapper
