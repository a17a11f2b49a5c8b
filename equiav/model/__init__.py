"""The EquiAV model: encoders, transformation predictor, heads, fine-tuning classifier,
MAE initialisation and the release checkpoint converter. See docs/model.md."""

from equiav.model.convert import convert_release_state_dict, to_release_state_dict
from equiav.model.encoders import AudioEncoder, VisualEncoder, ViTEncoder, sincos_pos_embed_2d
from equiav.model.equiav import EquiAV, count_parameters
from equiav.model.finetune import EquiAVClassifier
from equiav.model.heads import ProjectionHead
from equiav.model.predictor import (
    CrossAttentionPredictor,
    HypernetworkPredictor,
    LinearPredictor,
    TransformationPredictor,
    build_predictor,
)
from equiav.model.pretrained import MAELoadReport, load_mae_weights, read_mae_state_dict
from equiav.settings.model import ModelConfig

__all__ = [
    "AudioEncoder",
    "CrossAttentionPredictor",
    "EquiAV",
    "EquiAVClassifier",
    "HypernetworkPredictor",
    "LinearPredictor",
    "MAELoadReport",
    "ModelConfig",
    "ProjectionHead",
    "TransformationPredictor",
    "ViTEncoder",
    "VisualEncoder",
    "build_predictor",
    "convert_release_state_dict",
    "count_parameters",
    "load_mae_weights",
    "read_mae_state_dict",
    "sincos_pos_embed_2d",
    "to_release_state_dict",
]
