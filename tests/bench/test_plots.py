import torch

from hfguard.bench.plots import _plt, roc_grid


def test_every_detector_gets_a_roc_curve_even_past_the_colour_cycle(tmp_path, monkeypatch):
    """Defect: zip(detectors, colour cycle) dropped every detector past the tenth from the ROC plots."""
    gen = torch.Generator().manual_seed(0)
    dets = {f"det{i}": {"_clean_scores": torch.randn(50, generator=gen), "clean_fpr": 0.05,
                        "attacks": {"a": {"_scores": torch.randn(30, generator=gen) + 1, "auroc": 0.7, "tpr": 0.3}}} for i in range(13)}
    run = {"attacks": {"a": {"success_rate": 1.0, "n_successful": 30}}, "detectors": dets}
    plt = _plt()
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig: figs.append(fig))
    roc_grid(run, str(tmp_path / "roc.png"), "t")
    ax = figs[0].axes[0]
    labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert [lab.split(" ")[0] for lab in labels] == list(dets)
    colours = {tuple(plt.matplotlib.colors.to_rgba(line.get_color())) for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert len(colours) == len(dets)  # told apart
    assert (tmp_path / "roc.png").exists()
