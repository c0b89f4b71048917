"""The controls on the left of the page, which every tab reads: model, digit, guidance,
autoguidance with its guide and what the guide is compared with, routing, sampler, steps, eta, seed and the number of images.

``build(registry, files)`` lays them out and returns ``Shared``: the components, the registry and
the output files, and the helpers every tab's handlers use (the model menu, settings from the
controls' values, the page's share link). ``wire(shared, flow_views)`` shows only the controls
that apply to the model and sampler.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import gradio as gr

from ..pipeline import (
    DEFAULT_GUIDES,
    MAX_AUTOGUIDANCE,
    MAX_GUIDANCE,
    MAX_STEPS,
    Settings,
)
from .common import (
    AUTOGUIDANCE_HELP,
    AUTOGUIDE_CHOICES,
    AUTOGUIDE_HELP,
    MAX_IMAGES,
    available_models,
    default_autoguidance,
    default_autoguide,
    default_guidance,
    digit_choices,
    guide_names,
    model_choices,
    parse_settings,
    random_seed,
    routing_choices,
    routing_help,
    sampler_choices,
    sampler_help,
    visibility,
)
from .files import OutputFiles

DEFAULTS = Settings()  # the app's starting settings (each model's guidance and autoguidance: common.default_*)
SAMPLING = "sampling"  # one concurrency group for every event that runs a model
CONCURRENCY = int(os.environ.get("APP_CONCURRENCY", "2"))  # sampling requests at once
SHARE_JS = """(q) => {
    if (!q) return '';
    try { window.history.replaceState(null, '', window.location.pathname + q); } catch (e) {}
    return window.location.origin + window.location.pathname + q;
}"""  # a result's share query -> the address bar and the full link


@dataclass
class Shared:
    """What every tab needs: the registry, the output files, the controls and the open tab."""

    registry: object
    files: OutputFiles
    model: gr.Radio
    digit: gr.Radio
    guidance: gr.Slider
    autoguidance: gr.Slider
    guide: gr.Dropdown
    autoguide: gr.Radio  # what autoguidance compares the guide with (an MCL on one network)
    routing: gr.Dropdown
    sampler: gr.Dropdown
    steps: gr.Slider
    eta: gr.Slider
    seed: gr.Textbox
    dice: gr.Button
    n: gr.Slider
    run: gr.Button
    active_tab: gr.State  # the open tab (Explore computes its view only while it is open)

    @property
    def controls(self) -> list:
        """The controls in the order of ``settings``' arguments."""
        return [self.model, self.digit, self.guidance, self.sampler, self.steps, self.eta, self.routing, self.seed, self.n,
                self.autoguidance, self.guide, self.autoguide]

    @property
    def edit_controls(self) -> list:
        """What Explore reads (it runs the model alone: no autoguidance)."""
        return self.controls[:9]

    def models(self):
        return available_models(self.registry)

    def default_model(self, models) -> str | None:
        return DEFAULTS.model if DEFAULTS.model in models else next(iter(models), None)

    def settings(self, models, model, digit, guidance, sampler, steps, eta, routing, seed, n, autoguidance=None, guide=None,
                 autoguide=None) -> Settings:
        return parse_settings(models, model=model, digit=digit, guidance=guidance, sampler=sampler, steps=steps, eta=eta,
                              routing=routing, seed=seed, n=n, autoguidance=autoguidance, guide=guide, autoguide=autoguide)

    def link(self, request):
        """The page's share link, parsed (``links.Link``; None when it is malformed: the page reports that)."""
        from .links import (
            parse_link,  # links reads every tab's fields; the tabs import this module
        )

        models = self.models()
        try:
            return parse_link(models, request.query_params if request else None, self.default_model(models))
        except ValueError:
            return None


def _shared_head(info) -> bool:
    return bool(info and info.shared)


def build(registry, files: OutputFiles) -> Shared:
    """The left column's components (inside the caller's column)."""
    models = available_models(registry)
    m0 = DEFAULTS.model if DEFAULTS.model in models else next(iter(models), None)
    info0 = models.get(m0)
    v0 = visibility(info0, DEFAULTS.sampler)
    d = DEFAULTS
    model = gr.Radio(model_choices(models), value=m0, label="Model", elem_id="model")
    digit = gr.Radio(digit_choices(), value="any", label="Digit", info="'any' cycles 0-9 over the images", visible=v0.digit, elem_id="digit")
    guidance = gr.Slider(0, MAX_GUIDANCE, value=default_guidance(info0), step=0.1, label="Guidance scale",
                         info="0 unconditional, 1 conditional, >1 guided", visible=v0.guidance, elem_id="guidance")
    autoguidance = gr.Slider(0, MAX_AUTOGUIDANCE, value=default_autoguidance(info0), step=0.1, label="Guidance without labels (autoguidance)",
                             info=AUTOGUIDANCE_HELP, visible=v0.autoguidance, elem_id="autoguidance")
    guide = gr.Dropdown(guide_names(models), value=DEFAULT_GUIDES["ddpm"], label="Weak model (the guide)",
                        visible=v0.autoguidance, elem_id="guide", allow_custom_value=True)  # parse_settings validates it
    autoguide = gr.Radio(AUTOGUIDE_CHOICES, value=default_autoguide(info0), label="Autoguidance acts on", info=AUTOGUIDE_HELP,
                         visible=v0.autoguidance and v0.autoguide, elem_id="autoguide")
    routing = gr.Dropdown(routing_choices(v0.num_experts), value=d.routing, label="Routing (which expert denoises)",
                          info=routing_help(d.routing, _shared_head(info0)), visible=v0.routing, elem_id="routing",
                          allow_custom_value=True)  # any routing by name (API, links); parse_settings validates it
    sampler = gr.Dropdown(sampler_choices(), value=d.sampler, label="Sampler", elem_id="sampler")
    steps = gr.Slider(1, MAX_STEPS, value=d.steps, step=1, label="Steps", elem_id="steps")
    eta = gr.Slider(0, 1, value=d.eta, step=0.05, label="DDIM eta", info="0 deterministic, 1 like DDPM", visible=v0.eta, elem_id="eta")
    with gr.Row(equal_height=True):
        seed = gr.Textbox(value=str(d.seed), label="Seed", scale=4, max_lines=1, elem_id="seed")
        dice = gr.Button("Random", scale=1, min_width=70, size="lg", elem_id="dice")
    n = gr.Slider(1, MAX_IMAGES, value=d.n, step=1, label="Number of images", elem_id="n")
    run = gr.Button("Generate", variant="primary", size="lg", elem_id="run")
    active_tab = gr.State("generate")
    return Shared(registry, files, model, digit, guidance, autoguidance, guide, autoguide, routing, sampler, steps, eta, seed, dice, n, run, active_tab)


def control_updates(shared: Shared, model_name, sampler_name, routing_value=None) -> tuple:
    """Show only the controls that apply to the model and sampler: digit, guidance, routing, eta,
    the flow views' visibility, autoguidance, the guide and what it is compared with (reset to the
    output where the model has no experts' mixture, so a hidden value never refuses a request)."""
    models = shared.models()
    info = models.get(model_name)
    v = visibility(info, sampler_name)
    choices = routing_choices(v.num_experts, keep=routing_value)
    values = [c[1] for c in choices]
    routing_value = routing_value if routing_value in values else DEFAULTS.routing
    return (gr.update(visible=v.digit), gr.update(visible=v.guidance),
            gr.update(visible=v.routing, choices=choices, value=routing_value, info=routing_help(routing_value, _shared_head(info))),
            gr.update(visible=v.eta), gr.update(visible=bool(info and info.is_flow)),
            gr.update(visible=v.autoguidance), gr.update(visible=v.autoguidance, choices=guide_names(models)),
            gr.update(visible=v.autoguidance and v.autoguide) if v.autoguide else gr.update(visible=False, value=DEFAULTS.autoguide))


def visibility_outputs(shared: Shared, flow_view) -> list:
    """The components ``control_updates`` sets, in its order (``flow_view``: Generate's velocity image)."""
    return [shared.digit, shared.guidance, shared.routing, shared.eta, flow_view, shared.autoguidance, shared.guide, shared.autoguide]


def wire(shared: Shared, flow_views: list) -> None:
    """The controls' own events: visibility on a model or sampler change (``flow_views``: every
    tab's velocity image, shown for a rectified-flow model), each model's own defaults when one
    is picked by hand, the routing's and the sampler's notes, and the random seed."""
    s = shared
    outputs = visibility_outputs(s, flow_views[0]) + flow_views[1:]

    def updates(model_name, sampler_name, routing_value=None):
        upd = control_updates(s, model_name, sampler_name, routing_value)
        return (*upd, *[upd[4]] * (len(flow_views) - 1))

    s.model.change(updates, [s.model, s.sampler, s.routing], outputs, api_visibility="private", queue=False)
    s.sampler.change(updates, [s.model, s.sampler, s.routing], outputs, api_visibility="private", queue=False)
    def model_defaults(m):
        info = s.models().get(m)  # one look at the checkpoint folder
        return default_guidance(info), default_autoguidance(info), default_autoguide(info)

    s.model.input(model_defaults, s.model, [s.guidance, s.autoguidance, s.autoguide], api_visibility="private",
                  queue=False)  # a model picked by hand starts from its own defaults
    s.dice.click(random_seed, None, s.seed, api_visibility="private", queue=False)
    s.routing.change(lambda r, m: gr.update(info=routing_help(r, _shared_head(s.models().get(m)))), [s.routing, s.model], s.routing,
                     api_visibility="private", queue=False)
    s.sampler.change(lambda name: gr.update(info=sampler_help(name) or ""), s.sampler, s.sampler, api_visibility="private", queue=False)
