"""The EquiAV model: configs, towers, predictor variants, ablation switches, MAE loading and the
fine-tuning classifier. Everything runs on the tiny config except the ViT-B tests (the MAE
file is ViT-B by nature; the full forward/backward is marked ``slow``)."""

from __future__ import annotations

import itertools
import math

import pytest
import timm
import torch
from safetensors.torch import save_file

from equiav.model import (
    EquiAV,
    EquiAVClassifier,
    ModelConfig,
    build_predictor,
    count_parameters,
    load_mae_weights,
)
from equiav.settings.model import INTER_SOURCES, INTRA_MODES, PREDICTORS

B = 2
S = 16


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny tensors: intra-op threads cost more than they save (and on a shared 2-core
    machine they contend), so tests run single-threaded, except the ViT-B ones (``slow``)."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(config: ModelConfig, batch: int = B, samples: int = S, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    audio_shape = (batch, config.audio_frames, config.audio_freq_bins)
    visual_shape = (batch, 3, config.image_size, config.image_size)
    return {
        "audio": torch.randn(audio_shape, generator=g),
        "visual": torch.randn(visual_shape, generator=g),
        "audio_aug": torch.randn(audio_shape, generator=g),
        "visual_aug": torch.randn(visual_shape, generator=g),
        "audio_params": torch.rand(batch, config.audio_param_dim, generator=g),
        "visual_params": torch.rand(batch, config.visual_param_dim, generator=g),
        "audio_centroid_params": torch.rand(batch, samples, config.audio_param_dim, generator=g),
        "visual_centroid_params": torch.rand(batch, samples, config.visual_param_dim, generator=g),
    }


def expected_sincos(embed_dim: int, rows: int, cols: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table written out element by element: column in the first half,
    row in the second, each [sin, cos] with frequencies 10000^(-k / (D/4))."""
    quarter = embed_dim // 4
    table = torch.empty(rows * cols, embed_dim, dtype=torch.float64)
    for index in range(rows * cols):
        row, col = divmod(index, cols)
        for k in range(quarter):
            omega = 10000.0 ** (-k / quarter)
            table[index, k] = math.sin(col * omega)
            table[index, quarter + k] = math.cos(col * omega)
            table[index, 2 * quarter + k] = math.sin(row * omega)
            table[index, 3 * quarter + k] = math.cos(row * omega)
    return table.float()


# ---- config ---------------------------------------------------------------------------------


def test_config_round_trips_through_dict():
    config = ModelConfig.tiny(predictor="hypernetwork", intra="invariant")
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.vit_base() == ModelConfig()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"audio_frames": 300}, "audio_frames=300 is not a multiple of patch_size=16"),
        ({"num_heads": 5}, "embed_dim=64 is not divisible by num_heads=5"),
        ({"predictor": "mlp"}, "predictor='mlp' is not one of"),
        ({"inter_source": "mean"}, "inter_source='mean' is not one of"),
        ({"depth": 0}, "depth must be a positive integer"),
        ({"drop_path": 1.0}, "drop_path must be in [0, 1)"),
    ],
)
def test_config_rejects_bad_values(changes, message):
    with pytest.raises(ValueError) as error:
        ModelConfig.tiny(**changes)
    assert message in str(error.value)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown ModelConfig key.*'embed_dims'"):
        ModelConfig.from_dict({**ModelConfig.tiny().to_dict(), "embed_dims": 64})


def test_parameter_counts_match_the_method_dimensions():
    # Built on the meta device: the counts need shapes only.
    with torch.device("meta"):
        counts = count_parameters(EquiAV(ModelConfig.vit_base()))
    D, hidden = 768, 3072
    block = 2 * (2 * D) + (D * 3 * D + 3 * D) + (D * D + D) + (D * hidden + hidden) + (hidden * D + D)
    tower = 12 * block + D + 2 * (2 * D)  # blocks, modality embedding, norm and norm_aug
    A, inner = 256, 512

    def predictor(param_dim: int) -> int:
        augmentation = (param_dim * A + A) + 2 * (A * A + A)
        attention = (A * inner + inner) + 2 * (D * inner + inner) + inner * D
        return augmentation + 2 * A + attention + 2 * D + (D * hidden + hidden) + (hidden * D + D)

    head = (D * 2048 + 2048) + 2 * 2048 + (2048 * 2048 + 2048) + 2 * 2048 + (2048 * 512 + 512) + 2 * 512
    assert counts == {
        "audio_encoder": tower + D * 1 * 16 * 16 + D,
        "visual_encoder": tower + D * 3 * 16 * 16 + D,
        "audio_predictor": predictor(24),
        "visual_predictor": predictor(18),
        "audio_intra_head": head,
        "audio_inter_head": head,
        "visual_intra_head": head,
        "visual_inter_head": head,
        "total": 210_570_752,
        "trainable": 210_570_752,
    }


# ---- encoders -------------------------------------------------------------------------------


def test_positional_embeddings_are_fixed_sincos_and_not_trainable():
    config = ModelConfig.tiny()
    model = EquiAV(config)
    for encoder, (rows, cols) in ((model.audio_encoder, (8, 19)), (model.visual_encoder, (14, 14))):
        assert encoder.grid == (rows, cols)
        torch.testing.assert_close(encoder.pos_embed[0], expected_sincos(config.embed_dim, rows, cols))
        assert not encoder.pos_embed.requires_grad
    names = {name for name, _ in model.named_parameters()} | set(model.state_dict())
    assert not any("pos_embed" in name for name in names)


def test_audio_is_taken_as_time_by_frequency_and_transposed():
    config = ModelConfig.tiny()
    encoder = EquiAV(config).audio_encoder
    spectrogram = torch.randn(B, config.audio_frames, config.audio_freq_bins)
    tokens = encoder(spectrogram)
    assert tokens.shape == (B, 8 * 19, config.embed_dim)
    image = spectrogram.transpose(1, 2).unsqueeze(1)  # [B, 1, F, T]
    torch.testing.assert_close(tokens, encoder.norm(encoder.forward_image(image)))
    with pytest.raises(ValueError, match=r"looks like \[B, F, T\]"):
        encoder(spectrogram.transpose(1, 2))


def test_both_views_in_one_pass_equal_separate_passes():
    config = ModelConfig.tiny()
    encoder = EquiAV(config).visual_encoder
    clean, augmented = torch.randn(2, B, 3, 224, 224).unbind(0)
    tokens, tokens_aug = encoder.forward_views(clean, augmented)
    torch.testing.assert_close(tokens, encoder(clean, view="clean"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens_aug, encoder(augmented, view="augmented"), atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_changes_nothing_but_memory():
    config = ModelConfig.tiny()
    torch.manual_seed(0)
    model = EquiAV(config)
    inputs = make_inputs(config)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = sum(value.square().sum() for value in model(**inputs).values())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = run()
    model.set_grad_checkpointing(True)
    loss_ckpt, grads_ckpt = run()
    torch.testing.assert_close(loss_ckpt, loss)
    for grad, grad_ckpt in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(grad_ckpt, grad)


# ---- EquiAV forward -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("predictor", "intra", "inter_source"), list(itertools.product(PREDICTORS, INTRA_MODES, INTER_SOURCES))
)
def test_forward_shapes_and_every_parameter_gets_a_gradient(predictor, intra, inter_source):
    config = ModelConfig.tiny(predictor=predictor, intra=intra, inter_source=inter_source)
    model = EquiAV(config)
    out = model(**make_inputs(config))
    E, D = config.embed_out, config.embed_dim
    assert {key: tuple(value.shape) for key, value in out.items()} == {
        f"{m}_{kind}": (B, D if kind == "pooled" else E)
        for m in ("audio", "visual")
        for kind in ("aug", "equi", "inter", "pooled")
    }
    assert (model.audio_predictor is None) == (not config.uses_predictor)
    sum(value.sum() for value in out.values()).backward()
    without_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert without_grad == []


def test_invariant_intra_embedding_is_the_clean_pooled_feature():
    config = ModelConfig.tiny(intra="invariant", inter_source="clean")
    model = EquiAV(config)
    inputs = make_inputs(config)
    # No predictor: the augmentation parameters are not needed at all.
    out = model(inputs["audio"], inputs["visual"], inputs["audio_aug"], inputs["visual_aug"])
    torch.testing.assert_close(out["audio_equi"], model.audio_intra_head(out["audio_pooled"]))
    torch.testing.assert_close(out["visual_inter"], model.visual_inter_head(out["visual_pooled"]))


def test_missing_parameters_are_named():
    config = ModelConfig.tiny()
    inputs = make_inputs(config)
    del inputs["visual_centroid_params"]
    with pytest.raises(ValueError, match="visual_centroid_params is required"):
        EquiAV(config)(**inputs)


def test_encode_matches_the_training_forward_on_clean_inputs():
    config = ModelConfig.tiny()
    model = EquiAV(config).eval()
    inputs = make_inputs(config)
    with torch.no_grad():
        full = model(**inputs)
        features = model.encode(
            audio=inputs["audio"],
            visual=inputs["visual"],
            audio_centroid_params=inputs["audio_centroid_params"],
            visual_centroid_params=inputs["visual_centroid_params"],
        )
        audio_only = model.encode(audio=inputs["audio"], audio_centroid_params=inputs["audio_centroid_params"])
    assert set(features) == {"audio_pooled", "audio_inter", "visual_pooled", "visual_inter"}
    assert set(audio_only) == {"audio_pooled", "audio_inter"}
    for key, value in features.items():
        torch.testing.assert_close(value, full[key], atol=1e-5, rtol=1e-5)


# ---- predictor ------------------------------------------------------------------------------


@pytest.mark.parametrize("predictor", PREDICTORS)
def test_centroid_is_the_mean_of_single_slot_predictions(predictor):
    config = ModelConfig.tiny(predictor=predictor)
    torch.manual_seed(0)
    module = build_predictor(config, config.audio_param_dim)
    tokens = torch.randn(B, 37, config.embed_dim)
    params = torch.rand(B, S, config.audio_param_dim)
    centroid = module(tokens, params)
    assert centroid.shape == (B, config.embed_dim)
    singles = torch.stack([module(tokens, params[:, s]) for s in range(S)], dim=1)
    torch.testing.assert_close(centroid, singles.mean(dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module(tokens, params[:, :1]), singles[:, 0])  # [B, d_t] == [B, 1, d_t]


@pytest.mark.parametrize("predictor", PREDICTORS)
def test_predictor_variants_learn_a_transformation_dependent_target(predictor):
    """Toy equivariance task: tokens are fixed positional patterns plus per-sample content, the
    parameter vector names one of 4 windows of 4 tokens (one-hot, plus noise slots), and the
    target is the mean of the tokens in that window."""
    config = ModelConfig.tiny(predictor=predictor)
    torch.manual_seed(0)
    module = build_predictor(config, config.audio_param_dim)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    tokens_per_window, windows, batch = 4, 4, 32
    positions = torch.randn(windows * tokens_per_window, config.embed_dim)
    losses = []
    for _ in range(100):
        tokens = positions + 0.3 * torch.randn(batch, *positions.shape)
        window = torch.randint(0, windows, (batch,))
        params = 0.1 * torch.randn(batch, config.audio_param_dim)
        params[:, :windows] = torch.nn.functional.one_hot(window, windows).float()
        target = tokens.unflatten(1, (windows, tokens_per_window))[torch.arange(batch), window].mean(dim=1)
        loss = (module(tokens, params) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first / 4, f"{predictor}: loss {first:.4f} -> {last:.4f}"


def test_predictor_rejects_parameters_of_the_wrong_length():
    config = ModelConfig.tiny()
    module = build_predictor(config, config.visual_param_dim)
    with pytest.raises(ValueError, match=r"\[B=2, 18\] or \[B=2, S, 18\], got \(2, 16, 24\)"):
        module(torch.randn(B, 5, config.embed_dim), torch.rand(B, S, 24))


# ---- MAE initialisation ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def mae_files(tmp_path_factory):
    """A randomly initialised timm ``vit_base_patch16_224.mae`` saved as .pth and .safetensors."""
    torch.manual_seed(0)
    state = timm.create_model("vit_base_patch16_224.mae", pretrained=False).state_dict()
    directory = tmp_path_factory.mktemp("mae")
    torch.save(state, directory / "mae.pth")
    save_file(state, directory / "mae.safetensors")
    return state, {"pth": directory / "mae.pth", "safetensors": directory / "mae.safetensors"}


@pytest.fixture(scope="module")
def vit_base_model():
    torch.manual_seed(0)
    return EquiAV(ModelConfig.vit_base())


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_mae_weights_land_in_both_towers(mae_files, vit_base_model, suffix):
    mae, paths = mae_files
    model = vit_base_model
    report = load_mae_weights(model, paths[suffix])
    for tower in (model.audio_encoder, model.visual_encoder):
        tower_state = tower.state_dict()
        for key, value in mae.items():
            if key.startswith("blocks."):
                assert torch.equal(tower_state[key], value), key
        for norm in ("norm", "norm_aug"):
            assert torch.equal(tower_state[f"{norm}.weight"], mae["norm.weight"])
            assert torch.equal(tower_state[f"{norm}.bias"], mae["norm.bias"])
        assert torch.equal(tower.patch_embed.proj.bias, mae["patch_embed.proj.bias"])
    kernel = mae["patch_embed.proj.weight"]
    assert torch.equal(model.visual_encoder.patch_embed.proj.weight, kernel)
    torch.testing.assert_close(model.audio_encoder.patch_embed.proj.weight, kernel.sum(dim=1, keepdim=True))
    assert report.ignored == ["cls_token", "pos_embed"]
    assert report.missing == ["audio_encoder.modality_embed", "visual_encoder.modality_embed"]
    assert len(report.loaded) == 2 * (len(mae) - 2 + 2)  # minus cls/pos, plus norm_aug's 2 tensors


def test_mae_weights_in_a_tiny_model_fail_naming_the_key(mae_files):
    _, paths = mae_files
    with pytest.raises(ValueError) as error:
        load_mae_weights(EquiAV(ModelConfig.tiny()), paths["pth"])
    message = str(error.value)
    assert "'patch_embed.proj.weight' has shape (768, 3, 16, 16)" in message
    assert "audio_encoder.patch_embed.proj.weight has shape (64, 1, 16, 16)" in message


def test_missing_weight_file_is_reported():
    with pytest.raises(FileNotFoundError, match="MAE weights not found at /nonexistent/mae.pth"):
        load_mae_weights(EquiAV(ModelConfig.tiny()), "/nonexistent/mae.pth")


@pytest.mark.slow
def test_vit_base_forward_and_backward(vit_base_model):
    model = vit_base_model
    out = model(**make_inputs(model.config))
    assert out["audio_inter"].shape == (B, 512) and out["visual_pooled"].shape == (B, 768)
    sum(value.sum() for value in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


# ---- fine-tuning classifier -----------------------------------------------------------------


@pytest.mark.parametrize("modality", ["audio", "visual", "audiovisual"])
def test_classifier_from_pretrained(modality):
    config = ModelConfig.tiny()
    pretrained = EquiAV(config)
    classifier = EquiAVClassifier.from_pretrained(pretrained, num_classes=7, modality=modality)
    assert classifier.config.drop_path == 0.1
    inputs = make_inputs(config)
    frames = torch.randn(B, 3, 3, config.image_size, config.image_size)
    logits = classifier(audio=inputs["audio"], visual=frames)
    assert logits.shape == (B, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in classifier.parameters())

    pretrained_state = pretrained.state_dict()
    for name in ("audio_encoder", "visual_encoder"):
        encoder = getattr(classifier, name)
        if name.split("_")[0] not in modality:
            assert encoder is None
            continue
        state = encoder.state_dict()
        assert "norm_aug.weight" not in state
        for key, value in state.items():
            assert torch.equal(value, pretrained_state[f"{name}.{key}"]), key


def test_classifier_averages_frames_and_needs_a_config_with_a_state_dict():
    config = ModelConfig.tiny()
    pretrained = EquiAV(config)
    with pytest.raises(ValueError, match="without config="):
        EquiAVClassifier.from_pretrained(pretrained.state_dict(), num_classes=3, modality="visual")
    classifier = EquiAVClassifier.from_pretrained(
        pretrained.state_dict(), num_classes=3, modality="visual", config=config
    ).eval()  # eval: no drop-path, so each frame gives the same output twice
    frames = torch.randn(B, 4, 3, config.image_size, config.image_size)
    with torch.no_grad():
        per_frame = torch.stack([classifier(visual=frames[:, i]) for i in range(4)], dim=1)
        torch.testing.assert_close(classifier(visual=frames), per_frame.mean(dim=1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="modality='visual' needs visual"):
        classifier(audio=torch.randn(B, config.audio_frames, 128))
