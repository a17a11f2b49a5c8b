"""The release checkpoint converter: key layout, round trip, errors, and equality of our forward
with an independent re-implementation of the release's forward on converted weights."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from equiav.model import EquiAV, ModelConfig, convert_release_state_dict, to_release_state_dict

B, S = 2, 5
# The release's values for the tiny sizes (its MainModel takes them as arguments).
CONFIG = ModelConfig.tiny()
HEADS, CROSS_HEADS, CROSS_HEAD_DIM = CONFIG.num_heads, CONFIG.cross_heads, CONFIG.cross_head_dim


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def release_pos_embed(embed_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """The release's positional table, following its numpy steps: a (w, h) meshgrid whose
    first component (the column) fills the first half of the channels."""
    w, h = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))

    def one_axis(positions: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([one_axis(w), one_axis(h)], axis=1)
    return torch.from_numpy(table).float().unsqueeze(0)


def release_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the release's saved pre-training state dict with its shape, written out
    from models/pt_EquiAV.py (MainModel under the training wrapper's ``__M__``)."""
    D, A, E, H = config.embed_dim, config.aug_hidden, config.embed_out, config.proj_hidden
    inner, hidden, p = config.cross_heads * config.cross_head_dim, int(D * config.mlp_ratio), config.patch_size
    audio_tokens = config.audio_frames * config.audio_freq_bins // (p * p)
    shapes: dict[str, tuple[int, ...]] = {}
    for m, param_dim, tokens in (("a", config.audio_param_dim, audio_tokens), ("v", config.visual_param_dim, 196)):
        shapes[f"patch_embed_{m}.proj.weight"] = (D, 3, p, p)
        shapes[f"patch_embed_{m}.proj.bias"] = (D,)
        shapes[f"modality_{m}"] = (1, 1, D)
        shapes[f"pos_embed_{m}"] = (1, tokens, D)
        for i in range(config.depth):
            for norm in ("norm1", "norm1_a", "norm1_v", "norm2", "norm2_a", "norm2_v"):
                shapes[f"blocks_{m}.{i}.{norm}.weight"] = shapes[f"blocks_{m}.{i}.{norm}.bias"] = (D,)
            shapes[f"blocks_{m}.{i}.attn.qkv.weight"], shapes[f"blocks_{m}.{i}.attn.qkv.bias"] = (3 * D, D), (3 * D,)
            shapes[f"blocks_{m}.{i}.attn.proj.weight"], shapes[f"blocks_{m}.{i}.attn.proj.bias"] = (D, D), (D,)
            shapes[f"blocks_{m}.{i}.mlp.fc1.weight"], shapes[f"blocks_{m}.{i}.mlp.fc1.bias"] = (hidden, D), (hidden,)
            shapes[f"blocks_{m}.{i}.mlp.fc2.weight"], shapes[f"blocks_{m}.{i}.mlp.fc2.bias"] = (D, hidden), (D,)
        for norm in (f"norm_{m}", f"norm_{m}_aug"):
            shapes[f"{norm}.weight"] = shapes[f"{norm}.bias"] = (D,)
        for index, fan_in in ((0, param_dim), (2, A), (4, A)):
            shapes[f"aug_encoder_{m}.{index}.weight"], shapes[f"aug_encoder_{m}.{index}.bias"] = (A, fan_in), (A,)
        cross = f"cross_attn_{m}"
        shapes[f"{cross}.norm_aug.weight"] = shapes[f"{cross}.norm_aug.bias"] = (A,)
        shapes[f"{cross}.attn.to_q.weight"], shapes[f"{cross}.attn.to_q.bias"] = (inner, A), (inner,)
        for kv in ("to_k", "to_v"):
            shapes[f"{cross}.attn.{kv}.weight"], shapes[f"{cross}.attn.{kv}.bias"] = (inner, D), (inner,)
        shapes[f"{cross}.attn.to_out.weight"] = (D, inner)
        shapes[f"{cross}.norm.weight"] = shapes[f"{cross}.norm.bias"] = (D,)
        shapes[f"{cross}.mlp.fc1.weight"], shapes[f"{cross}.mlp.fc1.bias"] = (hidden, D), (hidden,)
        shapes[f"{cross}.mlp.fc2.weight"], shapes[f"{cross}.mlp.fc2.bias"] = (D, hidden), (D,)
        for kind in ("intra", "inter"):
            head = f"pred_{m}_{kind}"
            for layer, shape in (("fc1", (H, D)), ("fc2", (H, H)), ("fc3", (E, H))):
                shapes[f"{head}.{layer}.weight"], shapes[f"{head}.{layer}.bias"] = shape, shape[:1]
            for layer, width in (("norm1", H), ("norm2", H), ("norm3", E)):
                shapes[f"{head}.{layer}.weight"] = shapes[f"{head}.{layer}.bias"] = (width,)
    return {f"__M__.{key}": shape for key, shape in shapes.items()}


def synthetic_release_state(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A release state dict with random values everywhere (LayerNorm scales around 1) except the
    fixed positional tables. The audio kernel differs per input channel: summing it is still
    exact, because the release feeds the spectrogram as 3 equal channels."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in release_shapes(config).items():
        if key.endswith("pos_embed_a"):
            state[key] = release_pos_embed(config.embed_dim, 8, shape[1] // 8)
        elif key.endswith("pos_embed_v"):
            state[key] = release_pos_embed(config.embed_dim, 14, 14)
        elif ".norm" in key and key.endswith(".weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2 and not key.endswith(("modality_a", "modality_v")):
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=g) / fan_in**0.5
        else:
            state[key] = 0.1 * torch.randn(shape, generator=g)
    return state


# ---- an independent re-implementation of the release's forward (pt_EquiAV.MainModel) ----------


def _layer_norm(x, state, name):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)


def _linear(x, state, name):
    return F.linear(x, state[f"{name}.weight"], state.get(f"{name}.bias"))


def _attention(q, k, v, heads):
    """Explicit softmax(q k^T / sqrt(d)) v over [B, N, heads * d] inputs."""
    batch, d = q.shape[0], q.shape[-1] // heads
    q, k, v = (x.reshape(batch, x.shape[1], heads, d).transpose(1, 2) for x in (q, k, v))
    weights = (q @ k.transpose(-2, -1) * d**-0.5).softmax(dim=-1)
    return (weights @ v).transpose(1, 2).reshape(batch, -1, heads * d)


def release_tower(state, m, image, norm):
    x = F.conv2d(image, state[f"patch_embed_{m}.proj.weight"], state[f"patch_embed_{m}.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2) + state[f"pos_embed_{m}"] + state[f"modality_{m}"]
    depth = len({key.split(".")[1] for key in state if key.startswith(f"blocks_{m}.")})
    for i in range(depth):
        block = f"blocks_{m}.{i}"
        y = _layer_norm(x, state, f"{block}.norm1")  # modality=None: the plain norms
        q, k, v = _linear(y, state, f"{block}.attn.qkv").chunk(3, dim=-1)
        x = x + _linear(_attention(q, k, v, HEADS), state, f"{block}.attn.proj")
        y = _layer_norm(x, state, f"{block}.norm2")
        x = x + _linear(F.gelu(_linear(y, state, f"{block}.mlp.fc1")), state, f"{block}.mlp.fc2")
    return _layer_norm(x, state, norm)


def release_cross_attention(state, m, tokens, params):
    def quick_gelu(x):
        return x * torch.sigmoid(1.702 * x)

    e = quick_gelu(_linear(params, state, f"aug_encoder_{m}.0"))
    e = quick_gelu(_linear(e, state, f"aug_encoder_{m}.2"))
    e = _linear(e, state, f"aug_encoder_{m}.4")
    block = f"cross_attn_{m}"
    query = _layer_norm(e, state, f"{block}.norm_aug")
    attended = _attention(
        _linear(query, state, f"{block}.attn.to_q"),
        _linear(tokens, state, f"{block}.attn.to_k"),
        _linear(tokens, state, f"{block}.attn.to_v"),
        CROSS_HEADS,
    )
    base = tokens.mean(dim=1, keepdim=True).repeat(1, params.shape[1], 1)
    u = base + _linear(attended, state, f"{block}.attn.to_out")
    y = _layer_norm(u, state, f"{block}.norm")
    u = u + _linear(F.gelu(_linear(y, state, f"{block}.mlp.fc1")), state, f"{block}.mlp.fc2")
    return u.mean(dim=1)


def release_head(state, name, x):
    x = F.relu(_layer_norm(_linear(x, state, f"{name}.fc1"), state, f"{name}.norm1"))
    x = F.relu(_layer_norm(_linear(x, state, f"{name}.fc2"), state, f"{name}.norm2"))
    return _layer_norm(_linear(x, state, f"{name}.fc3"), state, f"{name}.norm3")


def release_forward(state, inputs):
    """The release's forward with cen_mean=True: audio arrives as [B, T, F], repeated to the 3
    equal channels its data set produces, and is transposed to [B, 3, F, T]."""
    state = {key.removeprefix("__M__."): value for key, value in state.items()}
    out = {}
    for m, name in (("a", "audio"), ("v", "visual")):
        clean, augmented = inputs[name], inputs[f"{name}_aug"]
        if m == "a":
            clean, augmented = (x.unsqueeze(1).repeat(1, 3, 1, 1).transpose(2, 3) for x in (clean, augmented))
        h = release_tower(state, m, clean, f"norm_{m}")
        h_aug = release_tower(state, m, augmented, f"norm_{m}_aug")
        centroid = release_cross_attention(state, m, h, inputs[f"{name}_centroid_params"])
        equivariant = release_cross_attention(state, m, h, inputs[f"{name}_params"].unsqueeze(1))
        out[f"{name}_inter"] = release_head(state, f"pred_{m}_inter", centroid)
        out[f"{name}_equi"] = release_head(state, f"pred_{m}_intra", equivariant)
        out[f"{name}_aug"] = release_head(state, f"pred_{m}_intra", h_aug.mean(dim=1))
    return out


def make_inputs(config: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    audio = (B, config.audio_frames, config.audio_freq_bins)
    visual = (B, 3, config.image_size, config.image_size)
    return {
        "audio": torch.randn(audio, generator=g),
        "visual": torch.randn(visual, generator=g),
        "audio_aug": torch.randn(audio, generator=g),
        "visual_aug": torch.randn(visual, generator=g),
        "audio_params": torch.rand(B, config.audio_param_dim, generator=g),
        "visual_params": torch.rand(B, config.visual_param_dim, generator=g),
        "audio_centroid_params": torch.rand(B, S, config.audio_param_dim, generator=g),
        "visual_centroid_params": torch.rand(B, S, config.visual_param_dim, generator=g),
    }


# ---- tests ------------------------------------------------------------------------------------


def test_release_key_list_converts_with_nothing_missing_or_unexpected(caplog):
    release = synthetic_release_state(CONFIG)
    with caplog.at_level(logging.INFO, logger="equiav.model.convert"):
        converted = convert_release_state_dict(release)
    model = EquiAV(CONFIG)
    missing, unexpected = model.load_state_dict(converted, strict=True)
    assert missing == [] and unexpected == []
    # Dropped: 2 positional tables and 4 unused norms (weight + bias) per block per tower.
    dropped = 2 + 2 * CONFIG.depth * 4 * 2
    assert len(release) - len(converted) == dropped
    assert f"dropped {dropped} key(s)" in caplog.text and "__M__.blocks_a.*.norm1_a.weight" in caplog.text


def test_round_trip_ours_to_release_to_ours():
    torch.manual_seed(0)
    ours = EquiAV(CONFIG).state_dict()
    release = to_release_state_dict(ours, CONFIG)
    assert {key: tuple(value.shape) for key, value in release.items()} == release_shapes(CONFIG)
    back = convert_release_state_dict(release)
    assert back.keys() == ours.keys()
    for key, value in ours.items():
        if key == "audio_encoder.patch_embed.proj.weight":
            torch.testing.assert_close(back[key], value)  # summed thirds: equal up to rounding
        else:
            assert torch.equal(back[key], value), key


def test_prefixes_of_saved_checkpoints_are_understood():
    release = synthetic_release_state(CONFIG)
    bare = {key.removeprefix("__M__."): value for key, value in release.items()}
    ddp = {f"module.{key}": value for key, value in release.items()}
    ddp["module.__L_inter__.tau"] = torch.tensor(0.07)  # learnable temperature variant
    reference = convert_release_state_dict(release)
    for variant in (bare, ddp):
        converted = convert_release_state_dict(variant)
        assert converted.keys() == reference.keys()


def test_unknown_keys_raise():
    release = synthetic_release_state(CONFIG)
    release["__M__.mlp_head.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"__M__\.mlp_head\.0\.weight"):
        convert_release_state_dict(release)


def test_learned_positional_embeddings_are_refused():
    release = synthetic_release_state(CONFIG)
    release["__M__.pos_embed_v"] = release["__M__.pos_embed_v"] + 0.01
    with pytest.raises(ValueError, match="pos_embed_v is not the fixed 2-D sin-cos"):
        convert_release_state_dict(release)


def test_other_predictors_have_no_release_layout():
    config = ModelConfig.tiny(predictor="linear")
    with pytest.raises(ValueError, match="audio_predictor.proj.weight"):
        to_release_state_dict(EquiAV(config).state_dict(), config)


def test_forward_equals_the_release_forward_on_converted_weights():
    release = synthetic_release_state(CONFIG)
    model = EquiAV(CONFIG)
    model.load_state_dict(convert_release_state_dict(release))
    inputs = make_inputs(CONFIG)
    with torch.no_grad():
        ours = model(**inputs)
        theirs = release_forward(release, inputs)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=1e-5, msg=key)
