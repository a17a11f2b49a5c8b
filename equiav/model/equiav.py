"""The EquiAV pre-training model (method.md sections 2, 4, 5).

Per modality m ("audio" or "visual"), with h = Enc_m(x) and h' = Enc_m(x') the clean and
augmented output tokens (shared blocks, separate final norms):

======================  =================================  ==========================================
output key              embedding                          used by
======================  =================================  ==========================================
``{m}_aug``             z'   = P_intra(mean h')            intra-modal loss
``{m}_equi``            z^   = P_intra(u(h, t))            intra-modal loss (z = P_intra(mean h) when
                                                           ``intra="invariant"``)
``{m}_inter``           zbar = P_inter(u(h, {t_1..t_S}))   inter-modal loss (other sources: see
                                                           ``ModelConfig.inter_source``)
``{m}_pooled``          mean h (D)                         probing and monitoring, no loss
======================  =================================  ==========================================

Embeddings are returned un-normalised; the losses L2-normalise them. The S centroid parameter
vectors are sampled outside the model (by the augmentation module) and passed in, so the model
is deterministic given its inputs.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from equiav.model.encoders import AudioEncoder, VisualEncoder, ViTEncoder
from equiav.model.heads import ProjectionHead
from equiav.model.predictor import TransformationPredictor, build_predictor
from equiav.settings.model import ModelConfig

__all__ = ["EquiAV", "count_parameters"]


class EquiAV(nn.Module):
    """Two ViT towers, one transformation predictor per modality and four projection heads.

    Submodules (also the state-dict prefixes): ``audio_encoder``, ``visual_encoder``,
    ``audio_predictor``, ``visual_predictor``, ``audio_intra_head``, ``audio_inter_head``,
    ``visual_intra_head``, ``visual_inter_head``.

    Every parameter receives a gradient from the sum of the outputs of :meth:`forward` in every
    configuration, so DDP needs no ``find_unused_parameters``. The one ablation that needs no
    predictor (``intra="invariant"`` with ``inter_source`` "clean" or "augmented") does not
    build one: ``audio_predictor`` and ``visual_predictor`` are then ``None``.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ModelConfig.vit_base()
        self.audio_encoder = AudioEncoder(config)
        self.visual_encoder = VisualEncoder(config)
        self.audio_predictor = build_predictor(config, config.audio_param_dim) if config.uses_predictor else None
        self.visual_predictor = build_predictor(config, config.visual_param_dim) if config.uses_predictor else None

        def head() -> ProjectionHead:
            return ProjectionHead(config.embed_dim, config.proj_hidden, config.embed_out)

        self.audio_intra_head, self.audio_inter_head = head(), head()
        self.visual_intra_head, self.visual_inter_head = head(), head()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute encoder blocks in the backward pass (saves activation memory)."""
        self.audio_encoder.set_grad_checkpointing(enable)
        self.visual_encoder.set_grad_checkpointing(enable)

    def forward(
        self,
        audio: Tensor,
        visual: Tensor,
        audio_aug: Tensor,
        visual_aug: Tensor,
        audio_params: Tensor | None = None,
        visual_params: Tensor | None = None,
        audio_centroid_params: Tensor | None = None,
        visual_centroid_params: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """All embeddings of one pre-training step.

        Args:
            audio, audio_aug: clean and augmented spectrograms [B, T, F].
            visual, visual_aug: clean and augmented frames [B, 3, H, W].
            audio_params, visual_params: parameters of the applied augmentations, [B, 24] and
                [B, 18]; needed when ``intra="equivariant"`` or ``inter_source="equivariant"``.
            audio_centroid_params, visual_centroid_params: S random parameter vectors per
                sample, [B, S, 24] and [B, S, 18]; needed when ``inter_source="centroid"``.

        Returns:
            ``{m}_aug``, ``{m}_equi``, ``{m}_inter``: [B, E]; ``{m}_pooled``: [B, D];
            for m in ("audio", "visual"). See the module docstring.
        """
        inputs = {
            "audio": (audio, audio_aug, audio_params, audio_centroid_params),
            "visual": (visual, visual_aug, visual_params, visual_centroid_params),
        }
        out: dict[str, Tensor] = {}
        for modality, (clean, augmented, params, centroid_params) in inputs.items():
            out.update(self._embed_modality(modality, clean, augmented, params, centroid_params))
        return out

    def encode(
        self,
        audio: Tensor | None = None,
        visual: Tensor | None = None,
        audio_centroid_params: Tensor | None = None,
        visual_centroid_params: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Evaluation features of clean inputs; the augmented branch never runs.

        Returns ``{m}_pooled`` [B, D] and ``{m}_inter`` [B, E] for each modality given. The
        inter-modal embedding is the one retrieval compares: with ``inter_source`` "centroid"
        or "equivariant" it is the centroid P_inter(u(h, {t_1..t_S})) and needs
        ``{m}_centroid_params`` [B, S, d_t] (draw them from a fixed seed for reproducible
        retrieval); with "clean" or "augmented" it is P_inter(mean h) of the clean input.
        """
        if audio is None and visual is None:
            raise ValueError("encode() needs audio, visual or both")
        out: dict[str, Tensor] = {}
        for modality, x, centroid_params in (
            ("audio", audio, audio_centroid_params),
            ("visual", visual, visual_centroid_params),
        ):
            if x is None:
                continue
            tokens = self._encoder(modality)(x)
            pooled = tokens.mean(dim=1)
            if self.config.inter_source in ("centroid", "equivariant"):
                self._require(centroid_params, f"{modality}_centroid_params", "the inter-modal centroid")
                inter = self._predictor(modality)(tokens, centroid_params)
            else:
                inter = pooled
            out[f"{modality}_pooled"] = pooled
            out[f"{modality}_inter"] = self._head(modality, "inter")(inter)
        return out

    def _embed_modality(
        self,
        modality: str,
        clean: Tensor,
        augmented: Tensor,
        params: Tensor | None,
        centroid_params: Tensor | None,
    ) -> dict[str, Tensor]:
        config = self.config
        tokens, tokens_aug = self._encoder(modality).forward_views(clean, augmented)
        pooled, pooled_aug = tokens.mean(dim=1), tokens_aug.mean(dim=1)

        equivariant = None  # u(h, t), computed once when both paths need it
        if config.intra == "equivariant" or config.inter_source == "equivariant":
            self._require(params, f"{modality}_params", f"intra={config.intra!r}, inter_source={config.inter_source!r}")
            equivariant = self._predictor(modality)(tokens, params)

        if config.inter_source == "centroid":
            self._require(centroid_params, f"{modality}_centroid_params", "inter_source='centroid'")
            inter = self._predictor(modality)(tokens, centroid_params)
        else:
            inter = {"clean": pooled, "augmented": pooled_aug, "equivariant": equivariant}[config.inter_source]

        intra_head = self._head(modality, "intra")
        return {
            f"{modality}_aug": intra_head(pooled_aug),
            f"{modality}_equi": intra_head(equivariant if config.intra == "equivariant" else pooled),
            f"{modality}_inter": self._head(modality, "inter")(inter),
            f"{modality}_pooled": pooled,
        }

    def _encoder(self, modality: str) -> ViTEncoder:
        return getattr(self, f"{modality}_encoder")

    def _predictor(self, modality: str) -> TransformationPredictor:
        return getattr(self, f"{modality}_predictor")

    def _head(self, modality: str, kind: str) -> ProjectionHead:
        return getattr(self, f"{modality}_{kind}_head")

    @staticmethod
    def _require(value: Tensor | None, name: str, needed_for: str) -> None:
        if value is None:
            raise ValueError(f"{name} is required for {needed_for}; pass the augmentation parameters")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts per direct submodule, plus the module's own parameters (if any),
    ``total`` and ``trainable``. Buffers (e.g. the fixed positional embeddings) do not count."""

    def numel(parameters: Iterator[nn.Parameter]) -> int:
        return sum(p.numel() for p in parameters)

    counts = {name: numel(child.parameters()) for name, child in model.named_children()}
    own = numel(model.parameters(recurse=False))
    if own:
        counts["(own)"] = own
    counts["total"] = numel(model.parameters())
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts
