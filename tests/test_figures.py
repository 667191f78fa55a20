"""The course's drawings: every highlight draws, an unknown one is refused with the valid names."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from minipeft import figures  # noqa: E402


@pytest.mark.parametrize("highlight", [None, *figures.METHOD_NAMES])
def test_where_methods_plug_draws_every_highlight(highlight):
    fig = figures.where_methods_plug(highlight)
    assert isinstance(fig, matplotlib.figure.Figure)
    plt.close(fig)


def test_the_course_methods_have_a_highlight():
    for name in ["lora", "dora", "qlora", "adalora", "adapter", "prompt_tuning", "prefix_tuning", "bitfit",
                 "sparse", "ia3"]:
        assert name in figures.METHOD_NAMES
    from minipeft import REGISTRY
    assert set(REGISTRY) <= set(figures.METHOD_NAMES), "a registered method has no highlight in where_methods_plug"


def test_unknown_highlight_lists_the_names():
    with pytest.raises(ValueError) as err:
        figures.where_methods_plug("lorra")
    for name in figures.METHOD_NAMES:
        assert repr(name) in str(err.value)


def test_taxonomy_and_dataflow_draw():
    for fig in [figures.peft_taxonomy(), figures.peft_taxonomy(implemented=["lora"]), figures.qlora_dataflow()]:
        assert isinstance(fig, matplotlib.figure.Figure)
        plt.close(fig)
