"""The logic behind the Gradio app (``app.py`` only lays out components and wires events).

Everything here is plain Python over numpy/PIL/matplotlib and is unit-tested without a browser.
One module per tab plus the shared pieces; every public name is re-exported here, so
``from diffusion_core import ui; ui.stream(...)`` is how the app and the tests reach them.

* ``common``: the app's limits and labels, checkpoints on disk (``ModelInfo``,
  ``available_models``), menus, which controls apply, validation (``parse_settings`` turns raw
  control or API values into ``pipeline.Settings`` or raises ``ValueError`` with a message a
  person can act on), ``user_errors`` (those become ``gr.Error`` in Gradio handlers) and
  ``carry_forward`` (every streamed chunk repeats the outputs set so far);
* ``share``: Generate's share links (``share_query`` / ``settings_from_query``), which reproduce
  the identical image;
* ``render``: nearest-neighbour upscaling, image grids (``render_grid`` / ``split_grid``), live
  frames, the filmstrip, the animated GIF, the expert-usage chart of MCL, ``OutputFiles`` and
  ``png_files`` (the app hands Gradio its images as PNG files);
* ``generate_tab``: ``stream`` runs a trajectory and yields throttled frame updates, then the
  final results;
* ``compare_tab``: one seed, several samplers / routings / guidance scales / DDIM etas, as a grid of
  trajectories, with its settings JSON and share link;
* ``explore_tab``: the forward process, one-step denoising and SDEdit (numbers in ``diffusion_core.explore``);
* ``links``: a share link of any tab -> the tab and its validated settings;
* ``models_tab``: one card per checkpoint from its metadata.
"""
from __future__ import annotations

from ..pipeline import Settings
from .common import (APP_AUTOGUIDANCE, AUTOGUIDANCE_HELP, BACKGROUND, CARD_TITLES, COMPARE_AXES, DEFAULT_GUIDANCES, GAP, MAX_COMPARE_ROWS, MAX_IMAGES, MAX_VALUE_CHARS,
                     MENU_ROUTINGS, MODEL_BLURBS, MODEL_LABELS, ROUTING_LABELS, SAMPLER_LABELS, SCALE, SHARE_FIELDS, SHARE_VERSION, ModelInfo,
                     Visibility, available_models, carry_forward, default_autoguidance, default_guidance, digit_choices, guide_names, model_choices, model_info, model_label, parse_settings,
                     random_seed, routing_choices, routing_help, routing_label, sampler_choices, settings_from_json, user_errors, visibility)
from .compare_tab import (COMPARE_KIND, DEFAULT_AUTOGUIDANCES, DEFAULT_ETAS, ETA_NOTE, compare, compare_from_dict, compare_from_json, compare_json,
                          compare_meta, compare_share_query, default_compare_values, parse_compare, row_value)
from .explore_tab import (denoise, drawing_code, edit_from_json, edit_share_query, forward_view, input_digit, parse_edit,
                          region_choices, schedule_figure, sdedit_cli_command, sdedit_image, sdedit_stream, velocity_image)
from .generate_tab import Throttle, cli_command, generate_image, stream
from .models_tab import card_html, model_card, model_cards
from .render import (OutputFiles, Recording, decode_png, expert_borders, expert_chart, expert_usage, filmstrip, frame_scale,
                     gif_frames, grid_shape, hex_rgb, initial_noise, labelled_strip, mean_gate_probs, png_bytes, png_files, render_grid,
                     snapshot_indices, split_grid, upscale, vp_frame, write_gif)
from .links import Link, parse_link
from .share import settings_from_query, share_query

__all__ = [
    "APP_AUTOGUIDANCE", "AUTOGUIDANCE_HELP", "guide_names", "default_autoguidance", "default_guidance", "DEFAULT_AUTOGUIDANCES",
    "Settings", "BACKGROUND", "CARD_TITLES", "COMPARE_AXES", "DEFAULT_GUIDANCES", "GAP", "MAX_COMPARE_ROWS", "MAX_IMAGES",
    "MAX_VALUE_CHARS", "MENU_ROUTINGS", "MODEL_BLURBS", "MODEL_LABELS", "ROUTING_LABELS", "SAMPLER_LABELS", "SCALE", "SHARE_FIELDS",
    "SHARE_VERSION", "ModelInfo", "Visibility", "available_models", "carry_forward", "digit_choices", "model_choices", "model_info",
    "parse_settings", "random_seed", "routing_choices", "routing_help", "routing_label", "sampler_choices", "settings_from_json", "user_errors", "visibility",
    "compare", "default_compare_values", "parse_compare", "Throttle", "cli_command", "generate_image", "stream", "card_html",
    "model_card", "model_cards", "OutputFiles", "Recording", "decode_png", "expert_borders", "expert_chart", "expert_usage",
    "filmstrip", "frame_scale", "gif_frames", "grid_shape", "hex_rgb", "initial_noise", "labelled_strip", "mean_gate_probs",
    "png_bytes", "png_files", "render_grid", "snapshot_indices", "split_grid", "upscale", "vp_frame", "write_gif", "settings_from_query",
    "share_query", "model_label", "COMPARE_KIND", "DEFAULT_ETAS", "ETA_NOTE", "compare_from_dict", "compare_from_json",
    "compare_json", "compare_meta", "compare_share_query", "row_value", "denoise", "drawing_code", "edit_from_json",
    "edit_share_query", "forward_view", "input_digit", "parse_edit", "region_choices", "schedule_figure", "sdedit_cli_command",
    "sdedit_image", "sdedit_stream", "velocity_image", "Link", "parse_link",
]
