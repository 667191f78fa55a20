"""Drawings the chapters reuse: where each PEFT method plugs into a transformer block, the taxonomy of
the field, and QLoRA's data flow.

Each function returns a matplotlib Figure made through pyplot (so a chapter shows it with `plt.show()`,
once) and never calls `plt.show()` itself. matplotlib is imported inside the functions, so
`import minipeft` stays light.

    fig = mp.figures.where_methods_plug("lora")     # LoRA in colour, the rest greyed
    fig = mp.figures.where_methods_plug()           # every family, with a legend
    fig = mp.figures.peft_taxonomy()                # bold + dot: implemented in minipeft (from REGISTRY)
    fig = mp.figures.qlora_dataflow()
"""
from __future__ import annotations

# One colour per family of the course (landscape chapter): additive, selective, reparameterization.
FAMILY_COLOURS = {"reparam": "#1f6fb4", "additive": "#1a9850", "selective": "#c2410c"}
_FROZEN_FILL, _FROZEN_EDGE = "#eeeeee", "#777777"   # the frozen base model
_OFF_FILL, _OFF_EDGE, _OFF_TEXT = "#f4f4f4", "#c4c4c4", "#b0b0b0"  # PEFT parts of other methods, greyed

# The mechanisms the block diagram can draw, and which family each belongs to.
_PARTS = {
    "lora": "reparam",      # a branch beside a projection (B A, P Λ Q, m with B A)
    "nf4": "reparam",       # the frozen projection stored in 4 bits (QLoRA)
    "adapter": "additive",  # a bottleneck after a sublayer
    "prompt": "additive",   # soft prompt tokens before the input embeddings
    "prefix": "additive",   # extra keys and values in attention
    "ia3": "additive",      # scaling vectors on keys, values, FFN activation
    "bias": "selective",    # bias terms (BitFit)
    "mask": "selective",    # chosen entries of a weight (FISH, PaFi, ID3)
}

# highlight name -> (parts drawn in colour, projections with a branch, branch label, title)
_ALL_LINEAR = ("q", "k", "v", "o", "up", "down")
_METHODS = {
    "lora": ({"lora"}, ("q", "v"), "BA",
             "LoRA: a low-rank branch $BA$ beside chosen projections (here $W_q$, $W_v$)"),
    "dora": ({"lora"}, ("q", "v"), "m,BA",
             "DoRA: a magnitude $m$ and a low-rank direction update $BA$ on chosen projections"),
    "adalora": ({"lora"}, _ALL_LINEAR, "PΛQ",
                "AdaLoRA: an SVD-shaped branch $P\\Lambda Q$ on every matrix, rank moved where it matters"),
    "melora": ({"lora"}, _ALL_LINEAR, "BA",
               "MELoRA: n mini-LoRAs on disjoint slices, a block-diagonal update on every matrix"),
    "moslora": ({"lora"}, _ALL_LINEAR, "BA",
                "MoSLoRA: a LoRA branch with a trainable $r \\times r$ mixer, $BMA$, on every matrix"),
    "monteclora": ({"lora"}, _ALL_LINEAR, "BA",
                   "MonteCLoRA: a LoRA branch whose $A$ is sampled around its mean while training"),
    "lora_fa": ({"lora"}, _ALL_LINEAR, "BA",
                "LoRA-FA: a LoRA branch $BA$ with $A$ frozen and random, only $B$ trains, on every matrix"),
    "vera": ({"lora"}, _ALL_LINEAR, "BA",
             "VeRA: one frozen random pair $B, A$ shared by all layers, scaled per layer by trained vectors"),
    "rocoft": ({"mask"}, _ALL_LINEAR, "BA",
               "RoCoFT: k chosen rows (or columns) of every linear weight train, nothing is added"),
    "propulsion": ({"lora"}, _ALL_LINEAR, "z^k",
                   "Propulsion: every output of every linear layer is rescaled by a trained $z^k$"),
    "qlora": ({"lora", "nf4"}, _ALL_LINEAR, "BA",
              "QLoRA: a 4-bit (NF4) frozen base, a LoRA branch $BA$ on every linear layer"),
    "adapter": ({"adapter"}, ("q", "v"), "BA",
                "Adapters (Houlsby): a trainable bottleneck after attention and after the MLP"),
    "prompt_tuning": ({"prompt"}, ("q", "v"), "BA",
                      "Prompt tuning: trainable vectors prepended to the input embeddings"),
    "p_tuning": ({"prompt"}, ("q", "v"), "BA",
                 "P-tuning: virtual tokens from a small prompt encoder, at the input embeddings"),
    "prefix_tuning": ({"prefix"}, ("q", "v"), "BA",
                      "Prefix tuning: trainable keys and values prepended in every attention layer"),
    "ia3": ({"ia3"}, ("q", "v"), "BA",
            "(IA)³: learned vectors rescale the keys, the values and the MLP activation"),
    "bitfit": ({"bias"}, ("q", "v"), "BA",
               "BitFit: only the bias terms of the base model train"),
    "sparse": ({"mask"}, ("q", "v"), "BA",
               "Sparse masks (FISH, PaFi, ID3): chosen entries of the weights train"),
    "fish": ({"mask"}, _ALL_LINEAR, "BA",
             "FISH: the entries with the largest Fisher information train, chosen once before training"),
    "pafi": ({"mask"}, _ALL_LINEAR, "BA",
             "PaFi: the entries of smallest magnitude train, chosen from the weights alone"),
    "random_mask": ({"mask"}, _ALL_LINEAR, "BA",
                    "A random mask: entries chosen uniformly at random train (the baseline to beat)"),
    "id3": ({"mask"}, _ALL_LINEAR, "BA",
            "ID3: entries are unmasked a few at a time while training, by gradient over magnitude"),
}
METHOD_NAMES = tuple(_METHODS)
_BRANCH_TEXT = {"BA": "$BA$", "m,BA": "$m, BA$", "PΛQ": "$P\\Lambda Q$", "z^k": "$\\odot z^k$"}


def _check_highlight(highlight):
    if highlight is not None and highlight not in _METHODS:
        raise ValueError(f"highlight must be None (all families) or one of {sorted(_METHODS)}, got {highlight!r}")


def where_methods_plug(highlight: str | None = None):
    """One transformer block, drawn bottom to top, with every place a PEFT family plugs in.

    highlight: None draws all families in their colours with a legend; a method name (see METHOD_NAMES)
    draws that method's parts in colour, everything else greyed, with a title saying what it touches.
    """
    _check_highlight(highlight)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle, FancyBboxPatch, Patch, Polygon, Rectangle

    if highlight is None:
        on, branched, branch_label = set(_PARTS) - {"nf4"}, ("q", "v"), "BA"
        title = "Where PEFT methods plug into a transformer block"
    else:
        on, branched, branch_label, title = _METHODS[highlight]

    fig = plt.figure(figsize=(8, 6.2))
    ax = fig.add_axes([0, 0, 1, 0.93])
    ax.set_xlim(0, 16)
    ax.set_ylim(0, 12)
    ax.set_axis_off()
    fig.suptitle(title, fontsize=11.5, y=0.975)

    def style(part):
        """(fill, edge, text colour, line width) for a PEFT part: its family's colour if on, else greyed."""
        if part in on:
            c = FAMILY_COLOURS[_PARTS[part]]
            return c + "33", c, c, 1.6
        return _OFF_FILL, _OFF_EDGE, _OFF_TEXT, 0.9

    def box(x, y, w, h, text, fill=_FROZEN_FILL, edge=_FROZEN_EDGE, tc="#222222", lw=1.0, fs=9.5, hatch=None,
            z=2):
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.12",
                                    fc=fill, ec=edge, lw=lw, hatch=hatch, zorder=z))
        if text:
            ax.text(x, y, text, ha="center", va="center", fontsize=fs, color=tc, zorder=z + 1)

    def arrow(x0, y0, x1, y1, colour="#555555", lw=1.0, style_="-|>", ls="-"):
        ax.annotate("", (x1, y1), (x0, y0), zorder=1,
                    arrowprops=dict(arrowstyle=style_, color=colour, lw=lw, ls=ls, shrinkA=0, shrinkB=0))

    def line(xs, ys, colour="#555555", lw=1.0, ls="-", z=1):
        ax.add_line(Line2D(xs, ys, color=colour, lw=lw, ls=ls, zorder=z))

    def weight(x, y, w, label, key):
        """A frozen projection: its box, sparse entries (left), bias (right), LoRA-type branch beside it."""
        h = 0.62
        nf4 = "nf4" in on and key in branched
        fill, edge = ((FAMILY_COLOURS["reparam"] + "14", FAMILY_COLOURS["reparam"]) if nf4
                      else (_FROZEN_FILL, _FROZEN_EDGE))
        box(x, y, w, h, None, fill=fill, edge=edge, hatch="///" if nf4 else None)
        left, right = x - w / 2, x + w / 2
        ax.text((left + 0.5 + right - 0.4) / 2, y, label, ha="center", va="center", fontsize=9.5, color="#222222",
                zorder=5, bbox=dict(fc="white", ec="none", pad=1.2, alpha=0.9) if nf4 else None)
        # sparse mask: a few chosen entries, in the left end of the box
        e = style("mask")[1]
        for dx, dy in [(0.1, 0.12), (0.3, 0.4), (0.2, 0.28), (0.36, 0.1), (0.06, 0.42)]:
            ax.add_patch(Rectangle((left + dx, y - h / 2 + dy), 0.09, 0.09, fc=e, ec="none", zorder=4))
        # bias: a tab "b" at the right end
        f, e, t, lw = style("bias")
        ax.add_patch(Circle((right - 0.22, y), 0.17, fc="white" if "bias" not in on else f, ec=e, lw=lw,
                            zorder=4))
        ax.text(right - 0.22, y - 0.01, "b", ha="center", va="center", fontsize=8, color=t, zorder=5,
                style="italic")
        # LoRA-type branch beside the projection: forks off below, joins above
        if key in branched:
            f, e, t, lw = style("lora")
            bw = {"BA": 0.6}.get(branch_label, 0.9)
            bx = right + 0.15 + bw / 2
            box(bx, y, bw, h * 0.85, _BRANCH_TEXT[branch_label], fill=f, edge=e, tc=t, lw=lw, fs=8.5)
            lo, hi = y - h / 2 - 0.14, y + h / 2 + 0.14
            line([x, bx, bx], [lo, lo, y - h * 0.425], colour=e, lw=lw)
            line([bx, bx, x], [y + h * 0.425, hi, hi], colour=e, lw=lw)
            ax.add_patch(Circle((x, hi), 0.05, fc=e, ec=e, zorder=4))

    def ia3(x, y):
        f, e, t, lw = style("ia3")
        ax.add_patch(Circle((x, y), 0.2, fc="white" if "ia3" not in on else f, ec=e, lw=lw, zorder=4))
        ax.text(x, y, "$l$", ha="center", va="center", fontsize=8.5, color=t, zorder=5)

    def adder(x, y):
        ax.add_patch(Circle((x, y), 0.22, fc="white", ec="#555555", lw=1.0, zorder=3))
        ax.text(x, y - 0.02, "+", ha="center", va="center", fontsize=11, color="#333333", zorder=4)

    def layernorm(x, y):
        box(x, y, 2.9, 0.52, "LayerNorm", fs=9)
        f, e, t, lw = style("bias")
        ax.add_patch(Circle((x + 1.25, y), 0.15, fc="white" if "bias" not in on else f, ec=e, lw=lw, zorder=4))
        ax.text(x + 1.25, y - 0.01, "β", ha="center", va="center", fontsize=7.5, color=t, zorder=5)

    def adapter(x, y):
        f, e, t, lw = style("adapter")
        # a bottleneck: down-projection narrows, up-projection widens
        ax.add_patch(Polygon(
            [(x - 1.2, y - 0.32), (x + 1.2, y - 0.32), (x + 0.35, y), (x + 1.2, y + 0.32), (x - 1.2, y + 0.32),
             (x - 0.35, y)], closed=True, fc=f, ec=e, lw=lw, zorder=2))
        ax.text(x + 1.45, y, "adapter", ha="left", va="center", fontsize=9, color=t)

    cx = 4.9                 # the block's main column
    y_in, y_ln1, y_qkv, y_att, y_o, y_ad1, y_add1 = 0.55, 1.4, 2.6, 3.85, 4.85, 5.7, 6.4
    y_ln2, y_up, y_down, y_ad2, y_add2, y_out = 7.1, 8.05, 9.25, 10.1, 10.8, 11.6
    x_res = cx - 3.75        # the residual lines

    # --- input: soft prompt tokens, then the sequence's embeddings
    f, e, t, lw = style("prompt")
    xs = [cx - 2.2 + 0.62 * i for i in range(8)]
    for i, x in enumerate(xs):
        if i < 3:
            box(x, y_in, 0.5, 0.5, f"$p_{i + 1}$", fill=f, edge=e, tc=t, lw=lw, fs=9)
        else:
            box(x, y_in, 0.5, 0.5, f"$x_{i - 2}$", fs=9)
    ax.text(xs[0] - 0.4, y_in, "soft prompt", ha="right", va="center", fontsize=9, color=t)
    ax.text(xs[-1] + 0.4, y_in, "input embeddings", ha="left", va="center", fontsize=9, color="#444444")

    # --- sublayer 1: attention
    arrow(cx, y_in + 0.25, cx, y_ln1 - 0.26)
    layernorm(cx, y_ln1)
    line([cx, x_res, x_res], [y_in + 0.45, y_in + 0.45, y_add1])
    arrow(x_res, y_add1, cx - 0.22, y_add1)
    dx = 2.65
    bus = y_qkv - 0.62
    line([cx, cx], [y_ln1 + 0.26, bus])
    line([cx - dx, cx + dx], [bus, bus])
    for i, (key, label) in enumerate([("q", "$W_q$"), ("k", "$W_k$"), ("v", "$W_v$")]):
        x = cx + (i - 1) * dx
        arrow(x, bus, x, y_qkv - 0.31)
        weight(x, y_qkv, 1.4, label, key)
        arrow(x, y_qkv + 0.31, x, y_att - 0.3)
    ia3(cx, (y_qkv + y_att) / 2 + 0.05)         # l_k on the keys
    ia3(cx + dx, (y_qkv + y_att) / 2 + 0.05)    # l_v on the values
    box(cx, y_att, 6.2, 0.6, "softmax$(QK^\\top/\\sqrt{d_h})\\,V$", fs=9.5)
    # prefix tuning: extra keys and values enter attention from the side
    f, e, t, lw = style("prefix")
    for j, lab in enumerate(["$P_K$", "$P_V$"]):
        box(cx + 3.65 + 0.62 * j, y_att, 0.52, 0.5, lab, fill=f, edge=e, tc=t, lw=lw, fs=8.5)
    arrow(cx + 3.37, y_att, cx + 3.1, y_att, colour=e)
    ax.text(cx + 4.7, y_att, "prefix (keys, values)", ha="left", va="center", fontsize=9, color=t)
    arrow(cx, y_att + 0.3, cx, y_o - 0.31)
    weight(cx, y_o, 1.4, "$W_o$", "o")
    line([cx, cx], [y_o + 0.31, y_ad1 - 0.32])
    adapter(cx, y_ad1)
    arrow(cx, y_ad1 + 0.32, cx, y_add1 - 0.22)
    adder(cx, y_add1)

    # --- sublayer 2: MLP
    arrow(cx, y_add1 + 0.22, cx, y_ln2 - 0.26)
    layernorm(cx, y_ln2)
    line([cx, x_res, x_res], [y_add1 + 0.4, y_add1 + 0.4, y_add2])
    arrow(x_res, y_add2, cx - 0.22, y_add2)
    arrow(cx, y_ln2 + 0.26, cx, y_up - 0.31)
    weight(cx, y_up, 1.8, "$W_\\mathrm{up}$", "up")
    arrow(cx, y_up + 0.31, cx, y_down - 0.31)
    ax.text(cx - 0.35, (y_up + y_down) / 2, "σ", ha="right", va="center", fontsize=10, color="#444444")
    ia3(cx, (y_up + y_down) / 2)              # l_ff on the activation
    weight(cx, y_down, 1.8, "$W_\\mathrm{down}$", "down")
    line([cx, cx], [y_down + 0.31, y_ad2 - 0.32])
    adapter(cx, y_ad2)
    arrow(cx, y_ad2 + 0.32, cx, y_add2 - 0.22)
    adder(cx, y_add2)
    arrow(cx, y_add2 + 0.22, cx, y_out)
    ax.text(cx + 0.2, y_out - 0.05, "to the next block", ha="left", va="center", fontsize=9, color="#444444")
    for y0, y1 in [(y_in, y_add1), (y_add1, y_add2)]:
        ax.text(x_res - 0.15, (y0 + y1) / 2, "residual", rotation=90, ha="right", va="center", fontsize=8.5,
                color="#666666")

    # --- legend, on the right
    if highlight is None:
        c = FAMILY_COLOURS
        handles = [Patch(fc=_FROZEN_FILL, ec=_FROZEN_EDGE, label="frozen base model"),
                   Patch(fc="none", ec="none", label="reparameterization"),
                   Patch(fc=c["reparam"] + "33", ec=c["reparam"], label="$BA$ branch beside a projection:\n"
                                                                       "LoRA, DoRA, AdaLoRA, QLoRA"),
                   Patch(fc="none", ec="none", label="additive"),
                   Patch(fc=c["additive"] + "33", ec=c["additive"], label="adapter bottleneck (Houlsby)"),
                   Patch(fc=c["additive"] + "33", ec=c["additive"], label="soft prompt $p_i$: prompt tuning,\n"
                                                                         "P-tuning; prefix $P_K, P_V$"),
                   Line2D([], [], marker="o", ls="none", mfc=c["additive"] + "33", mec=c["additive"], ms=10,
                          label="$l$: (IA)³ scaling vectors"),
                   Patch(fc="none", ec="none", label="selective"),
                   Line2D([], [], marker="o", ls="none", mfc=c["selective"] + "33", mec=c["selective"], ms=10,
                          label="$b$, β: biases (BitFit)"),
                   Line2D([], [], marker="s", ls="none", mfc=c["selective"], mec=c["selective"], ms=5,
                          label="chosen entries of $W$:\nsparse masks (FISH, PaFi, ID3)")]
    else:
        col = FAMILY_COLOURS[_PARTS[sorted(on)[0]]]
        handles = [Patch(fc=col + "33", ec=col, label=f"trained ({_DISPLAY[highlight]})"),
                   Patch(fc=_FROZEN_FILL, ec=_FROZEN_EDGE, label="frozen base model"),
                   Patch(fc=_OFF_FILL, ec=_OFF_EDGE, label="other methods' parts\n(not used here)")]
        if "nf4" in on:
            handles.insert(1, Patch(fc=col + "14", ec=col, hatch="///", label="frozen, stored in 4 bits"))
    leg = ax.legend(handles=handles, loc="upper right", bbox_to_anchor=(1.0, 0.985), fontsize=8.5, frameon=False,
                    handlelength=1.6, labelspacing=0.75)
    if highlight is None:   # family headers: bold, no marker, in the family's colour
        for text, key in zip(leg.get_texts(), [None, "reparam", None, "additive", None, None, None, "selective",
                                               None, None]):
            if key:
                text.set_fontweight("bold")
                text.set_color(FAMILY_COLOURS[key])
    return fig


_DISPLAY = {"lora": "LoRA", "dora": "DoRA", "adalora": "AdaLoRA", "qlora": "QLoRA", "lora_fa": "LoRA-FA",
            "vera": "VeRA", "melora": "MELoRA", "moslora": "MoSLoRA", "monteclora": "MonteCLoRA", "rocoft": "RoCoFT",
            "propulsion": "Propulsion", "adapter": "adapters", "prompt_tuning": "prompt tuning", "p_tuning": "P-tuning",
            "prefix_tuning": "prefix tuning", "ia3": "(IA)³", "bitfit": "BitFit", "sparse": "sparse masks",
            "fish": "FISH", "pafi": "PaFi", "id3": "ID3", "random_mask": "random mask"}


# ---- the taxonomy ----------------------------------------------------------------------------------
# family -> [(group, [(method, registry key or None)])]; the keys say which are implemented.
_TAXONOMY = [
    ("additive", "new modules or vectors", [
        ("adapters", [("Houlsby adapter", "adapter"), ("parallel / scaled adapter", "parallel_adapter")]),
        ("soft prompts", [("prompt tuning", "prompt_tuning"), ("prefix tuning", "prefix_tuning"),
                          ("P-tuning", "p_tuning")]),
        ("scaling vectors", [("(IA)³", "ia3")]),
    ]),
    ("selective", "a subset of the weights", [
        ("structured", [("BitFit (biases)", "bitfit"), ("RoCoFT (rows, columns)", "rocoft")]),
        ("unstructured", [("sparse masks (generic)", "sparse"), ("random mask (baseline)", "random_mask"),
                          ("FISH mask", "fish"), ("diff pruning", "diff_pruning"), ("PaFi", "pafi"), ("ID3", "id3")]),
    ]),
    ("reparameterization", "a compact form of ΔW", [
        ("low rank: LoRA and family", [("LoRA", "lora"), ("LoRA+", "loraplus"), ("rsLoRA", "rslora"),
                                       ("DoRA", "dora"), ("AdaLoRA", "adalora"),
                                       ("QLoRA (LoRA on a 4-bit base)", "qlora"), ("LoRA-FA", "lora_fa"),
                                       ("VeRA", "vera"), ("MELoRA", "melora"), ("MoSLoRA", "moslora"),
                                       ("MonteCLoRA", "monteclora")]),
        ("scaling", [("Propulsion", "propulsion")]),
    ]),
    ("hybrid", "several families at once", [
        ("combinations", [("UniPELT", "unipelt"), ("MAM adapter", "mam_adapter")]),
    ]),
]


def _implemented_now() -> set[str]:
    """Registry names, plus LoRA options that are features of LoRAConfig rather than methods of their own."""
    import dataclasses

    from .config import REGISTRY
    from . import reparam

    done = set(REGISTRY)
    if "lora" in REGISTRY:
        fields = {f.name for f in dataclasses.fields(REGISTRY["lora"])}
        if "rslora" in fields:
            done.add("rslora")
        if hasattr(reparam, "loraplus_param_groups"):
            done.add("loraplus")
    if "adapter" in REGISTRY and "form" in {f.name for f in dataclasses.fields(REGISTRY["adapter"])}:
        done.add("parallel_adapter")  # AdapterConfig(form="parallel")
    return done


def peft_taxonomy(implemented=None):
    """The course's map of PEFT: additive, selective, reparameterization (+ hybrids), methods under each.

    implemented: names (registry keys: "lora", "bitfit", ...) to mark as implemented in minipeft; None reads
    `minipeft.REGISTRY` at draw time (plus the LoRA options rsLoRA and LoRA+).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    done = _implemented_now() if implemented is None else set(implemented)
    colours = dict(FAMILY_COLOURS, reparameterization=FAMILY_COLOURS["reparam"], hybrid="#6b6b6b")

    fig = plt.figure(figsize=(9, 5.0))
    ax = fig.add_axes([0, 0, 1, 1])
    W, H = 18.0, 10.0
    ax.set_xlim(0, W)
    ax.set_ylim(0, H)
    ax.set_axis_off()

    def box(x, y, w, h, text, ec, fc, fs, weight="normal", ls="-", tc="#222222"):
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.15",
                                    fc=fc, ec=ec, lw=1.3, ls=ls, zorder=2))
        ax.text(x, y, text, ha="center", va="center", fontsize=fs, fontweight=weight, color=tc, zorder=3)

    root = (W / 2, H - 0.6)
    box(*root, 7.0, 0.75, "PEFT: train a small set of parameters", "#333333", "#f2f2f2", 10.5, "bold")
    xs = [2.3, 6.6, 11.6, 16.1]
    y_fam = H - 2.0
    for (fam, what, groups), x in zip(_TAXONOMY, xs):
        c = colours[fam]
        ls = "--" if fam == "hybrid" else "-"
        ax.plot([root[0], root[0], x, x], [root[1] - 0.38, H - 1.3, H - 1.3, y_fam + 0.45], color="#888888",
                lw=1.0, ls=ls, zorder=1)
        box(x, y_fam, 3.6, 0.9, f"{fam}\n", c, c + "22", 10.5, "bold", ls=ls, tc=c)
        ax.text(x, y_fam - 0.2, what, ha="center", va="center", fontsize=8.5, color=c, zorder=3)
        y = y_fam - 0.95
        x0 = x - 1.6
        for group, methods in groups:
            ax.text(x0, y, group, ha="left", va="center", fontsize=9, style="italic", color=c)
            y_top = y - 0.2
            y -= 0.5
            for name, key in methods:
                is_done = key in done
                ax.text(x0 + 0.45, y, name, ha="left", va="center", fontsize=9,
                        fontweight="bold" if is_done else "normal", color="#111111" if is_done else "#555555")
                ax.plot([x0 + 0.12, x0 + 0.3], [y, y], color=c, lw=0.9)
                if is_done:
                    ax.plot([x0 + 0.3], [y], marker="o", ms=5.5, color=c, zorder=4)
                y_last = y
                y -= 0.42
            ax.plot([x0 + 0.12, x0 + 0.12], [y_top, y_last], color=c, lw=0.9)
            y -= 0.18
    ax.plot([0.6], [0.45], marker="o", ms=5.5, color="#333333")
    ax.text(0.85, 0.45, "bold with a dot: implemented in minipeft.   Dashed: hybrids, which combine the three "
            "families (Lialin et al. 2023)", ha="left", va="center", fontsize=8.5, color="#333333")
    return fig


# ---- QLoRA's data flow -----------------------------------------------------------------------------
def qlora_dataflow():
    """One QLoRA linear layer: the frozen 4-bit path (dequantized to bf16 for the matmul) and the trainable
    LoRA path, summed; the gradients reach only A and B.

    Notation as in the QLoRA chapter: W0^NF4 the 4-bit codes, c2 the 8-bit absmax per block of 64 weights,
    c1 the fp32 constant per block of 256 of those; Y = X dequant(dequant(c1, c2), W0^NF4)^T + s X A^T B^T.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    frozen, frozen_edge = "#ececec", "#6b6b6b"
    train = FAMILY_COLOURS["reparam"]
    grad = "#c2410c"

    fig = plt.figure(figsize=(8, 4.6))
    ax = fig.add_axes([0, 0, 1, 0.92])
    ax.set_xlim(0, 16)
    ax.set_ylim(0, 8.6)
    ax.set_axis_off()
    fig.suptitle("QLoRA, one linear layer: a frozen 4-bit path and a trainable LoRA path",
                 fontsize=11.5, y=0.975)

    def box(x, y, w, h, text, fc=frozen, ec=frozen_edge, fs=9, tc="#222222", lw=1.1, ls="-"):
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.12",
                                    fc=fc, ec=ec, lw=lw, ls=ls, zorder=2))
        ax.text(x, y, text, ha="center", va="center", fontsize=fs, color=tc, zorder=3)

    def arrow(x0, y0, x1, y1, colour="#444444", lw=1.2, ls="-", rad=0.0):
        ax.annotate("", (x1, y1), (x0, y0), zorder=1,
                    arrowprops=dict(arrowstyle="-|>", color=colour, lw=lw, ls=ls, shrinkA=0, shrinkB=0,
                                    connectionstyle=f"arc3,rad={rad}"))

    # storage: what sits in memory (frozen)
    ax.add_patch(FancyBboxPatch((0.25, 5.05), 5.7, 3.3, boxstyle="round,pad=0,rounding_size=0.15",
                                fc="white", ec=frozen_edge, lw=1.0, ls="--", zorder=1))
    ax.text(3.1, 8.0, "stored, frozen (≈ 4.127 bits per weight)", ha="center", va="center", fontsize=8.5,
            color="#444444")
    box(3.1, 7.3, 5.3, 0.6, "$W_0^{\\mathrm{NF4}}$: 4-bit codes, one per weight", fs=8.8)
    box(3.1, 6.45, 5.3, 0.6, "$c_2$: 8-bit absmax, one per 64 weights", fs=8.8)
    box(3.1, 5.6, 5.3, 0.6, "$c_1$: fp32, one per 256 of the $c_2$", fs=8.8)

    # dequantize, then the frozen matmul
    box(8.55, 6.45, 4.2, 1.0,
        "dequantize to bf16\n$\\mathrm{dequant}(\\mathrm{dequant}(c_1, c_2),\\ W_0^{\\mathrm{NF4}})$", fs=8.5)
    arrow(5.95, 6.45, 6.45, 6.45)
    ax.text(8.55, 5.55, "$W_0$ in bf16, one layer at a time,\nthen freed", ha="center", va="center", fontsize=8,
            color="#555555")
    box(12.6, 6.45, 2.3, 0.8, "$X W_0^\\top$\nbf16 matmul", fs=9)
    arrow(10.65, 6.45, 11.45, 6.45)
    ax.text(12.6, 7.55, "frozen: no gradient, no optimizer state\n($\\partial L/\\partial X$ still flows back "
            "through $W_0$)", ha="center", va="center", fontsize=8, color=grad)

    # the input and the trainable LoRA path
    box(1.0, 3.4, 1.2, 0.8, "$X$\nbf16", fc="white", ec="#444444", fs=9)
    ax.plot([1.6, 12.6], [3.4, 3.4], color="#444444", lw=1.2, zorder=1)   # X to the frozen matmul
    arrow(12.6, 3.4, 12.6, 6.05)
    ax.plot([2.3, 2.3], [3.4, 1.7], color=train, lw=1.4, zorder=1)
    arrow(2.3, 1.7, 3.6, 1.7, colour=train)
    box(4.6, 1.7, 2.0, 0.8, "$\\cdot A^\\top$\n$A$: $r \\times d_\\mathrm{in}$", fc=train + "22", ec=train, tc=train,
        lw=1.6)
    arrow(5.6, 1.7, 6.6, 1.7, colour=train)
    box(7.6, 1.7, 2.0, 0.8, "$\\cdot B^\\top$\n$B$: $d_\\mathrm{out} \\times r$", fc=train + "22", ec=train,
        tc=train, lw=1.6)
    arrow(8.6, 1.7, 9.5, 1.7, colour=train)
    box(10.4, 1.7, 1.8, 0.8, "$\\cdot\\, s$\n$s = \\alpha / r$", fc="white", ec=train, tc=train)
    ax.text(7.6, 2.55, "LoRA branch, bf16, trainable", ha="center", va="center", fontsize=9, color=train,
            fontweight="bold")

    # the sum and the output
    ax.add_patch(plt.Circle((14.4, 4.2), 0.3, fc="white", ec="#333333", lw=1.2, zorder=3))
    ax.text(14.4, 4.18, "+", ha="center", va="center", fontsize=13, zorder=4)
    ax.annotate("", (14.4, 4.5), (13.75, 6.45), zorder=1,
                arrowprops=dict(arrowstyle="-|>", color="#444444", lw=1.2, shrinkA=0, shrinkB=0,
                                connectionstyle="angle,angleA=0,angleB=90,rad=0"))
    ax.annotate("", (14.4, 3.9), (11.3, 1.7), zorder=1,
                arrowprops=dict(arrowstyle="-|>", color=train, lw=1.2, shrinkA=0, shrinkB=0,
                                connectionstyle="angle,angleA=0,angleB=-90,rad=0"))
    arrow(14.7, 4.2, 15.2, 4.2)
    ax.text(15.3, 4.2, "$Y$", ha="left", va="center", fontsize=11)

    # gradients: into A and B only
    ax.annotate("", (7.6, 1.3), (12.6, 0.55), zorder=1,
                arrowprops=dict(arrowstyle="-|>", color=grad, lw=1.3, ls="--", shrinkA=0, shrinkB=0,
                                connectionstyle="angle,angleA=180,angleB=90,rad=0"))
    ax.annotate("", (4.6, 1.3), (7.6, 0.55), zorder=1,
                arrowprops=dict(arrowstyle="-|>", color=grad, lw=1.3, ls="--", shrinkA=0, shrinkB=0,
                                connectionstyle="angle,angleA=180,angleB=90,rad=0"))
    ax.text(12.75, 0.55, "gradients: $\\partial L/\\partial B$, $\\partial L/\\partial A$", ha="left", va="center",
            fontsize=9, color=grad)
    return fig


__all__ = ["where_methods_plug", "peft_taxonomy", "qlora_dataflow", "METHOD_NAMES", "FAMILY_COLOURS"]
