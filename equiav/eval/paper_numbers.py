"""The numbers printed in the EquiAV paper (ICML 2024), Tables 1 to 8, in percent.

Only what the paper text gives is here. ``None`` marks a value the paper does not report
(a ``-`` in its table) or that was lost from the text this project reproduces from; every
such gap is listed in docs/tables.md. Table 2 survives only as the EquiAV row quoted in the
project's spec (method.md section 9); Table 8's values are not in the text at all.

Each entry is ``row label -> values in the order of the table's columns``; the paper's own
EquiAV rows (``PAPER_EQUIAV``: the method and its ablation variants) are the ones our runs are
compared with, the others (``REFERENCE``) are the methods the authors compare against, kept as
reference rows.
"""

from __future__ import annotations

from typing import Final

__all__ = ["ABLATION_COLUMNS", "COLUMNS", "PAPER_EQUIAV", "PRETRAIN_OF", "REFERENCE", "Values"]

Values = tuple["float | None", ...]

_ = None  # a cell the paper does not give

# Ablation tables (4, 5, 7, 8): zero-shot retrieval R@1 on AudioSet, AudioSet-20K fine-tuning mAP.
ABLATION_COLUMNS: Final = ("V2A R@1", "A2V R@1", "A mAP", "V mAP", "A-V mAP")

COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "table1": tuple(
        f"{data} {modality}" for data in ("AudioSet-20K", "AudioSet-2M", "VGGSound") for modality in ("A", "V", "A-V")
    ),
    "table2": ("ESC-50", "SPC-v1"),
    "table3": tuple(f"{direction} R@{k}" for direction in ("V2A", "A2V") for k in (1, 5, 10)),
    "table4": ABLATION_COLUMNS,
    "table5": ABLATION_COLUMNS,
    "table6": ("Similarity A", "Similarity V", *ABLATION_COLUMNS),
    "table7": ABLATION_COLUMNS,
    "table8": ABLATION_COLUMNS,
}

# Table 3 has one block per data set; its rows are keyed "<data set> / <method>".
PAPER_EQUIAV: Final[dict[str, dict[str, Values]]] = {
    "table1": {"EquiAV": (42.4, 25.7, 46.6, 49.1, 30.1, 54.6, 61.0, 50.7, 67.1)},
    "table2": {"EquiAV": (96.0, 97.8)},
    "table3": {
        "MSR-VTT / EquiAV": (13.8, 31.4, 43.0, 14.4, 33.3, 43.0),
        "AudioSet / EquiAV": (30.1, 53.3, 62.9, 29.6, 53.7, 63.1),
        "VGGSound / EquiAV": (28.5, 51.5, 61.7, 28.4, 51.8, 62.3),
    },
    "table4": {
        "invariant intra / clean inter": (25.2, 24.3, 40.1, 22.9, 42.3),
        "equivariant intra / clean inter": (28.7, 28.5, 41.9, 24.8, 44.9),
        "equivariant intra / augmented inter": (28.1, 27.5, 41.5, 24.2, 43.9),
        "equivariant intra / equivariant inter": (27.8, 27.4, 41.2, 23.6, 43.4),
        "equivariant intra / centroid inter": (30.1, 29.6, 42.4, 25.7, 46.6),
    },
    "table5": {
        "S = 1": (27.8, 27.4, 41.2, 23.6, 43.4),
        "S = 4": (28.3, 29.0, 41.4, 24.4, 44.9),
        "S = 8": (29.4, 29.2, 41.9, 24.9, 45.5),
        "S = 16": (30.1, 29.6, 42.4, 25.7, 46.6),
    },
    "table6": {
        # The similarity columns are cosine similarities (0-1), not percentages.
        "Linear (EquiMod)": (0.85, 0.87, 28.2, 27.5, 41.5, 24.1, 43.8),
        "Hypernetwork (SIE)": (0.87, 0.90, 29.6, 29.6, 42.0, 25.2, 44.5),
        "Cross-attention (MHA)": (0.90, 0.92, 30.1, 29.6, 42.4, 25.7, 46.6),
    },
    "table7": {
        "Two-stage": (27.0, 25.6, 41.0, 23.1, 43.8),
        "Alternating iterative": (28.5, 29.0, 41.6, 24.8, 44.7),
        "Joint": (30.1, 29.6, 42.4, 25.7, 46.6),
    },
    "table8": {
        "positive excluded (EquiMod, Eq. A)": (_, _, _, _, _),
        "positive included (EquiAV, Eq. 9)": (_, _, _, _, _),
    },
}

REFERENCE: Final[dict[str, dict[str, Values]]] = {
    "table1": {
        "GBlend (Wang et al., 2020)": (29.1, 22.1, 37.8, 32.4, 18.8, 41.8, _, _, _),
        "Perceiver (Jaegle et al., 2021)": (_, _, _, 38.4, 25.8, 44.2, _, _, _),
        "Attn AV (Fayek & Kumar, 2020)": (_, _, _, 38.4, 25.7, 46.2, _, _, _),
        "MBT (Nagrani et al., 2021)": (31.3, 27.7, 43.9, 41.5, 31.3, 49.6, 52.3, 51.2, 64.1),
        "CAV-MAE (Gong et al., 2023)": (37.7, 19.8, 42.0, 46.6, 26.2, 51.2, 59.5, 47.0, 65.5),
        "AudiovisualMAE (Georgescu et al., 2023)": (_, _, _, 46.6, 31.1, 51.8, 57.2, 50.3, 65.0),
        "MAViL (Huang et al., 2023)": (41.8, 24.8, 44.9, 48.7, 30.3, 53.3, 60.8, 50.9, 67.1),
    },
    "table3": {
        "MSR-VTT / Boggust": (9.3, 20.7, 28.8, 7.6, 21.1, 28.3),
        "MSR-VTT / Aranjelovic": (11.9, 25.9, 34.7, 12.6, 26.3, 33.7),
        "MSR-VTT / AVLnet": (17.2, 26.6, 46.6, 17.8, 35.5, 43.6),
        "MSR-VTT / CAV-MAE": (13.3, 29.0, 40.5, 7.6, 19.8, 30.2),
        "AudioSet / CAV-MAE-Scale++": (16.6, 37.0, 45.9, 14.3, 32.0, 40.7),
        "AudioSet / CAV-MAE": (18.8, 39.5, 50.1, 15.1, 34.0, 43.0),
        "VGGSound / CAV-MAE-Scale++": (15.5, 35.3, 45.1, 16.4, 35.0, 44.7),
        "VGGSound / CAV-MAE": (14.8, 34.2, 44.0, 12.8, 30.4, 40.3),
    },
}

# Table 1's "Pretrain" column for the reference rows ("-": none given).
PRETRAIN_OF: Final[dict[str, str]] = {
    "GBlend (Wang et al., 2020)": "-",
    "Perceiver (Jaegle et al., 2021)": "-",
    "Attn AV (Fayek & Kumar, 2020)": "IN SL",
    "MBT (Nagrani et al., 2021)": "IN21K SL",
    "CAV-MAE (Gong et al., 2023)": "SSL",
    "AudiovisualMAE (Georgescu et al., 2023)": "SSL",
    "MAViL (Huang et al., 2023)": "SSL",
}


def _check() -> None:
    for group in (PAPER_EQUIAV, REFERENCE):
        for table, rows in group.items():
            for label, values in rows.items():
                if len(values) != len(COLUMNS[table]):
                    raise AssertionError(
                        f"{table} row {label!r}: {len(values)} values for {len(COLUMNS[table])} columns"
                    )


_check()
