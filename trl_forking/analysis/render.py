"""``render``: completions with each token shaded by its entropy and the top-rho tokens marked (the paper's Fig. 1),
as a standalone HTML page (inline CSS, no external assets) and as a PNG."""

from __future__ import annotations

import html
import os

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..defaults import DEFAULT_RHO, DEFAULT_WIDTH
from ..selection import check_quantile, forking_mask
from .pipeline import score_inputs
from .plots import save_figure
from .tokens import display_token, token_strings

__all__ = ["HTML_FILE", "PNG_FILE", "render", "render_html", "render_png", "shade"]

HTML_FILE, PNG_FILE = "forking_tokens.html", "forking_tokens_render.png"
SHADE_RGB = (255, 140, 0)  # orange; alpha carries the entropy
MARK_RGB = (200, 0, 0)  # the underline of a top-rho token


def shade(entropies: list[float]) -> tuple[list[float], float, float]:
    """Returns ``(alphas, low, high)``: each entropy mapped linearly from [low, high] (the min and max of all
    rendered tokens) to an opacity in [0, 1], so that the colour range always spans the tokens on the page."""
    low, high = (min(entropies), max(entropies)) if entropies else (0.0, 0.0)
    span = high - low
    return [(h - low) / span if span > 0 else 0.0 for h in entropies], low, high


def _items_alphas(items: list[dict]):
    flat = [h for item in items for h in item["entropies"]]
    alphas, low, high = shade(flat)
    out, start = [], 0
    for item in items:
        out.append(alphas[start : start + len(item["entropies"])])
        start += len(item["entropies"])
    return out, low, high


_CSS = (
    "body { font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; color: #222; }\n"
    ".legend { color: #555; }\n"
    ".prompt { color: #666; white-space: pre-wrap; font-family: monospace; border-left: 3px solid #ddd; "
    "padding-left: .5em; }\n"
    ".tokens { white-space: pre-wrap; font-family: monospace; font-size: 15px; line-height: 1.9; }\n"
    ".tok { border-radius: 2px; }\n"
    f".fork {{ border-bottom: 2px solid rgb{MARK_RGB}; font-weight: bold; }}\n"
)


def render_html(items: list[dict], rho: float, title: str = "Forking tokens") -> str:
    """Returns a standalone HTML page of ``items``, one section per completion.

    Each item is ``{"prompt": str, "tokens": [str], "entropies": [float], "selected": [bool]}``. Every token is one
    ``<span class="tok">`` (``tok fork`` when selected) whose text is the token (control characters escaped) and
    whose background opacity is ``shade``'s alpha; its tooltip gives H.
    """
    alphas, low, high = _items_alphas(items)
    r, g, b = SHADE_RGB
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="legend">Background: token entropy H from {low:.4g} (white) to {high:.4g} (darkest). '
        f"<b>Bold, underlined</b>: the top-{rho:g} highest-entropy tokens (forking tokens).</p>",
    ]
    for index, (item, item_alphas) in enumerate(zip(items, alphas, strict=True)):
        parts.append(f'<section class="completion"><h2>Completion {index}</h2>')
        parts.append(f'<div class="prompt">{html.escape(item["prompt"])}</div>')
        spans = []
        for token, h, alpha, fork in zip(item["tokens"], item["entropies"], item_alphas, item["selected"], strict=True):
            spans.append(
                f'<span class="tok{" fork" if fork else ""}" style="background: rgba({r}, {g}, {b}, {alpha:.3f})" '
                f'title="H = {h:.4f}">{html.escape(display_token(token))}</span>'
            )
        parts.append('<div class="tokens">' + "".join(spans) + "</div></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _layout(tokens: list[str], width: int) -> list[tuple[int, int, int, str]]:
    """Returns ``(token_index, line, column, text)`` pieces that place ``tokens`` on lines of ``width`` characters.

    A token wraps to the next line when it does not fit, a newline inside a token ends the line, and a token longer
    than a whole line is cut across lines.
    """
    pieces, line, column = [], 0, 0
    for index, token in enumerate(tokens):
        for part_index, part in enumerate(display_token(token).replace("\t", "    ").split("\n")):
            if part_index > 0:
                line, column = line + 1, 0
            if column + len(part) > width and column > 0:
                line, column = line + 1, 0
            while len(part) > width:
                pieces.append((index, line, column, part[:width]))
                part, line, column = part[width:], line + 1, 0
            if part:
                pieces.append((index, line, column, part))
                column += len(part)
    return pieces


def render_png(items: list[dict], path: str, rho: float, width: int = DEFAULT_WIDTH, font_size: float = 9.0) -> str:
    """Returns ``path`` after drawing ``items`` (as in ``render_html``) as a PNG: monospace text on lines of
    ``width`` characters, each token on a background of ``shade``'s opacity, forking tokens bold and underlined."""
    char_w, line_h = 0.6 * font_size, 1.7 * font_size  # points; DejaVu Sans Mono advances 0.6 em per character
    alphas, low, high = _items_alphas(items)
    blocks, total_lines = [], 1  # the legend line
    for item in items:
        pieces = _layout(item["tokens"], width)
        lines = (pieces[-1][1] + 1) if pieces else 1
        blocks.append((pieces, lines))
        total_lines += lines + 2  # a header line and a gap
    margin = 2 * font_size
    fig_w, fig_h = width * char_w + 2 * margin, total_lines * line_h + 2 * margin
    figure = Figure(figsize=(fig_w / 72, fig_h / 72))
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, fig_w)
    axes.set_ylim(fig_h, 0)
    axes.axis("off")
    text_style = {"family": "monospace", "fontsize": font_size, "va": "center", "parse_math": False}
    y = margin
    axes.text(
        margin,
        y + line_h / 2,
        f"shade: H from {low:.4g} (white) to {high:.4g} (darkest); bold underlined: top-{rho:g} forking tokens",
        color="#555555",
        **text_style,
    )
    y += line_h
    r, g, b = (c / 255 for c in SHADE_RGB)
    mark = tuple(c / 255 for c in MARK_RGB)
    for index, (item, item_alphas, (pieces, lines)) in enumerate(zip(items, alphas, blocks, strict=True)):
        y += line_h / 2
        prompt = item["prompt"].replace("\n", " ")
        header = f"Completion {index}: {prompt[: width - 20]}{'...' if len(prompt) > width - 20 else ''}"
        axes.text(margin, y + line_h / 2, header, color="#666666", **text_style)
        y += line_h
        for token_index, line, column, text in pieces:
            x0, y0 = margin + column * char_w, y + line * line_h
            fork = item["selected"][token_index]
            axes.add_patch(
                Rectangle((x0, y0 + 1), len(text) * char_w, line_h - 2, color=(r, g, b, item_alphas[token_index]), lw=0)
            )
            if fork:
                axes.plot([x0, x0 + len(text) * char_w], [y0 + line_h - 1.5] * 2, color=mark, lw=1.5)
            axes.text(x0, y0 + line_h / 2, text, weight="bold" if fork else "normal", **text_style)
        y += lines * line_h + line_h / 2
    return save_figure(figure, path, tight=False)


def render(
    model,
    output_dir: str,
    *,
    tokenizer=None,
    rho: float = DEFAULT_RHO,
    per_sequence: bool = False,
    width: int = DEFAULT_WIDTH,
    **options,
) -> dict:
    """Returns ``{"html": path, "png": path}`` (and ``"completions"`` when sampled) after rendering completions with
    their token entropies into ``output_dir``.

    Forking tokens are the top ``ceil(rho * N)`` of the N tokens of all rendered completions pooled (as training
    selects over a batch), or of each completion on its own with ``per_sequence``.

    Args:
        model: a model name or path, or a loaded causal LM (then pass ``tokenizer``).
        output_dir: created if needed.
        tokenizer: the tokenizer of a loaded ``model``.
        rho: share of tokens marked, in (0, 1].
        per_sequence: select the top-rho within each completion.
        width: characters per line in the PNG.
        **options: the input, sampling and compute options of ``pipeline.score_inputs``, as in ``analyze``;
            ``indices`` picks the completions to render (0-based, after ``num_samples``).
    """
    rho = check_quantile(rho, "rho")
    scored = score_inputs([model], output_dir, [tokenizer], **options)
    (scores,), (tokenizer,) = scored.scores, scored.tokenizers
    _, entropies, mask = scores.padded()  # (B, T)
    selected = forking_mask(entropies, mask, rho, per_sequence=per_sequence)  # (B, T)
    items = []
    for row, (record, ids) in enumerate(zip(scores.records, scores.token_ids, strict=True)):
        n = ids.numel()
        prompt = (
            record["prompt"]
            if isinstance(record["prompt"], str)
            else tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True, tokenize=False)
        )
        items.append(
            {
                "prompt": prompt,
                "tokens": token_strings(tokenizer, ids.tolist()),
                "entropies": entropies[row, :n].tolist(),
                "selected": selected[row, :n].tolist(),
            }
        )
    files = dict(scored.files)
    files["html"] = os.path.join(scored.output_dir, HTML_FILE)
    with open(files["html"], "w", encoding="utf-8") as f:
        f.write(render_html(items, rho))
    files["png"] = render_png(items, os.path.join(scored.output_dir, PNG_FILE), rho, width)
    return files
