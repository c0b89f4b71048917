"""The page around the tabs: its text and style, and what a share link opens when the page loads
(the controls, the tab and its fields filled from the link, then the tab's result)."""
from __future__ import annotations

import gradio as gr

from ..pipeline import DEFAULT_GUIDES, Settings
from .common import default_autoguidance, default_autoguide, default_guidance, model_choices
from .compare_tab import rows_autoguide
from .controls import Shared, control_updates, visibility_outputs
from .glue import user_errors
from .links import Link, parse_link
from .models_tab import model_cards

TITLE = "Diffusion on MNIST"

INTRO = """
# Diffusion models on MNIST
Watch a handwritten digit emerge from pure noise. Pick a model and a sampler, press **Generate**,
and follow the current noisy image and the model's guess of the clean image at every step.
**CFG** draws the digit you ask for (guidance sets how strongly); **Flow** does the same with
rectified flow; **MCL** is an ensemble of expert denoisers, and the chart shows which expert worked
at each step. The unconditional **DDPM** and **MCL** have no digit to steer by: *guidance without
labels* steers them away from a weaker version of themselves (autoguidance). **Explore** shows how a digit dissolves into noise, what the
model makes of it in one step, and carries your own digit back from noise (SDEdit).
Every image comes back from its settings: share the link to show someone exactly the same thing.
"""

CSS = """
.pixelated img { image-rendering: pixelated; object-fit: contain; max-width: 100%; max-height: 100%; }
#status { min-height: 1.8em; }
.model-cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 14px; }
.model-card { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 12px 16px;
              background: var(--block-background-fill); }
.model-card h3 { margin: 0 0 4px 0; }
.model-card h4 { margin: 10px 0 2px 0; font-size: 0.9em; color: var(--body-text-color-subdued); }
.model-card .blurb { margin: 0 0 6px 0; font-size: 0.9em; }
.model-card table { width: 100%; font-size: 0.88em; border-collapse: collapse; margin: 0; }
.model-card table, .model-card tr, .model-card th, .model-card td { border: none !important; background: none !important; }
.model-card th { text-align: left; font-weight: normal; color: var(--body-text-color-subdued); width: 40%; padding: 1px 6px 1px 0 !important; }
.model-card td { padding: 1px 0 !important; }
.model-card .none { font-size: 0.88em; color: var(--body-text-color-subdued); margin: 0; }
#ex_sketch { max-width: 320px; }
.model-card .history { display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-end; }
.model-card .history-grid { margin: 0; text-align: center; font-size: 0.8em; color: var(--body-text-color-subdued); }
.model-card .history-grid img { width: 140px; image-rendering: pixelated; }
"""


def wire_load(demo: gr.Blocks, shared: Shared, tabs: gr.Tabs, generate: dict, compare: dict, explore: dict, cards: gr.HTML) -> None:
    """On page load: the model menu and cards, and for a share link the controls, its tab and the
    tab's fields; a malformed link is reported (``check_link``), then each tab shows its result."""
    s = shared

    def on_load(request: gr.Request):
        """Never fails (an error would mark every control as failed): check_link reports a bad link."""
        models = s.models()
        m = s.default_model(models)
        link = s.link(request) or Link()
        st = link.settings or Settings(model=m or Settings().model)
        plain = link.settings is None  # a plain visit: the app's defaults for the model; a link: its own values
        ag = default_autoguidance(models.get(st.model)) if plain else st.autoguidance
        g = default_guidance(models.get(st.model)) if plain else st.guidance
        of = default_autoguide(models.get(st.model)) if plain else st.autoguide
        if link.tab == "compare":  # an autoguidance comparison from weight 1 says apart what its rows compare the guide with
            of = rows_autoguide(st, link.axis, link.rows) or of
        upd = [gr.update(choices=model_choices(models), value=st.model if st.model in models else m),
               "any" if st.digit is None else str(st.digit), g, st.sampler, st.steps, st.eta, st.routing, str(st.seed), st.n,
               ag, st.guide or DEFAULT_GUIDES["ddpm"], of]
        upd += list(control_updates(s, st.model, st.sampler, st.routing)) + [model_cards(s.registry)]
        ax, vals = compare["axis_updates"](st.model, link.axis or "sampler")
        upd += [ax, ", ".join(link.values) if link.tab == "compare" else vals]
        es = link.edit
        if es is not None:
            upd += ["drawing" if es.drawing is not None else "mnist", es.index if es.index is not None else 0, es.drawing or "", es.level, es.region]
        else:
            upd += [gr.skip()] * 5
        if link.is_plain:  # leave the tab alone: a visitor may already have opened another one while the page loaded
            return upd + [gr.skip(), gr.skip()]
        tab = "explore" if link.tab == "cold" else link.tab  # the cold panel is in Explore
        return upd + [gr.Tabs(selected=tab), tab]

    @user_errors
    def check_link(request: gr.Request):
        """A malformed share link: an error message (and no generation); unknown parameters: a warning."""
        models = s.models()
        for note in parse_link(models, request.query_params if request else None, s.default_model(models)).notes:
            gr.Warning(note)

    outputs = (s.controls + visibility_outputs(s, generate["velocity"]) + [cards, compare["axis"], compare["values"]] + explore["inputs"]
               + [tabs, s.active_tab])
    loaded = demo.load(on_load, None, outputs, api_visibility="private").then(check_link, None, None, api_visibility="private")
    for tab in (generate, compare, explore):
        tab["on_page_load"](loaded)
