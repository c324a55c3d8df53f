"""Models built from experiments/*.yaml (pipeline.core.config, pipeline.core.models)."""

from __future__ import annotations

import re
import sys

import pytest
import torch
import yaml
from conftest import REPO_ROOT
from torch import nn

from pipeline.core.config import load_model_config, resolve_config_path
from pipeline.core.models import Scale, build_model, count_parameters
from pipeline.errors import PipelineError


# The notebook's own MLP classes, transcribed once in bench/seed_notebook.py.
sys.path.insert(0, str(REPO_ROOT / "bench"))
from seed_notebook import MLP3 as SeedMLP3, MLP4 as SeedMLP4  # noqa: E402


def model_from(name: str, normalize: bool = False) -> nn.Sequential:
    return build_model(load_model_config(name).model, normalize=normalize)


def describe(model: nn.Module) -> list[tuple]:
    """Each layer's type and sizes, in order."""
    out = []
    for layer in model:
        if isinstance(layer, nn.Linear):
            out.append(("Linear", layer.in_features, layer.out_features))
        elif isinstance(layer, nn.BatchNorm1d):
            out.append(("BatchNorm1d", layer.num_features))
        else:
            out.append((type(layer).__name__,))
    return out


MLP3_LAYERS = [
    ("Linear", 784, 512), ("ReLU",),
    ("Linear", 512, 512), ("BatchNorm1d", 512), ("ReLU",),
    ("Linear", 512, 10),
]
MLP4_LAYERS = MLP3_LAYERS[:5] + [("Linear", 512, 512), ("BatchNorm1d", 512), ("ReLU",)] + [
    ("Linear", 512, 10)
]


@pytest.mark.parametrize(
    "name, params, layers",
    [("mlp3", 670_730, MLP3_LAYERS), ("mlp4", 934_410, MLP4_LAYERS)],
)
def test_seed_mlps_have_the_seeds_layers_and_parameter_counts(name, params, layers):
    model = model_from(name)
    assert count_parameters(model) == params
    assert describe(model) == layers


@pytest.mark.parametrize("name, seed_class", [("mlp3", SeedMLP3), ("mlp4", SeedMLP4)])
def test_seed_mlps_compute_the_same_function_as_the_notebooks(name, seed_class):
    torch.manual_seed(0)
    ours, seed = model_from(name), seed_class()
    ours_state, seed_state = ours.state_dict(), seed.state_dict()
    assert [v.shape for v in ours_state.values()] == [v.shape for v in seed_state.values()]
    seed.load_state_dict(dict(zip(seed_state, ours_state.values())))
    x = torch.rand(16, 784) * 255
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        getattr(seed, mode)()
        torch.testing.assert_close(ours(x), seed(x), rtol=0, atol=0)


def test_vgg11_parameter_count_and_output_shape():
    model = model_from("vgg11")
    assert count_parameters(model) == 28_148_362
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8 and all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model) == 8
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == 5
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 784) * 255)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["mlp3", "mlp4"])
def test_models_map_flat_pixels_to_ten_logits(name):
    model = model_from(name).eval()
    with torch.no_grad():
        assert model(torch.rand(3, 784) * 255).shape == (3, 10)


def test_normalize_scales_pixels_inside_the_model():
    torch.manual_seed(0)
    plain = model_from("mlp3")
    torch.manual_seed(0)
    scaled = model_from("mlp3", normalize=True)
    assert isinstance(scaled[0], Scale)
    assert count_parameters(scaled) == count_parameters(plain) == 670_730
    x = torch.rand(8, 784) * 255
    plain.eval()
    scaled.eval()
    with torch.no_grad():
        torch.testing.assert_close(scaled(x), plain(x / 255))


def test_a_new_variant_is_a_new_yaml_file(tmp_path):
    path = tmp_path / "wide2.yaml"
    path.write_text(
        "name: wide2\nmodel:\n  type: mlp\n  hidden:\n"
        "    - {units: 64, batch_norm: true}\n    - {units: 32}\n"
    )
    config = load_model_config(str(path))
    assert config.name == "wide2"
    model = build_model(config.model)
    assert describe(model) == [
        ("Linear", 784, 64), ("BatchNorm1d", 64), ("ReLU",),
        ("Linear", 64, 32), ("ReLU",), ("Linear", 32, 10),
    ]


@pytest.mark.parametrize("spelling", ["mlp4", "mlp4.yaml", "experiments/mlp4.yaml"])
def test_config_names_resolve_to_the_experiment_file(spelling, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    assert resolve_config_path(spelling).resolve() == REPO_ROOT / "experiments" / "mlp4.yaml"
    assert load_model_config(spelling).name == "mlp4"


def test_config_names_resolve_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_model_config("experiments/mlp3.yaml").name == "mlp3"


def test_config_digest_changes_when_the_file_changes(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("model: {type: mlp, hidden: [{units: 8}]}\n")
    before = load_model_config(str(path)).digest
    path.write_text("model: {type: mlp, hidden: [{units: 9}]}\n")
    assert load_model_config(str(path)).digest != before


# ---------------------------------------------------------------------------------------------
# Bad configs
# ---------------------------------------------------------------------------------------------


def test_unknown_config_name_lists_the_available_ones():
    with pytest.raises(PipelineError) as info:
        load_model_config("mlp99")
    message = str(info.value)
    assert "'mlp99' not found" in message
    for name in ("mlp3", "mlp4", "vgg11"):
        assert name in message


def test_unknown_model_type_names_the_known_ones(tmp_path):
    path = tmp_path / "resnet.yaml"
    path.write_text("name: resnet\nmodel: {type: resnet, depth: 18}\n")
    with pytest.raises(PipelineError) as info:
        build_model(load_model_config(str(path)).model)
    assert "unknown model type 'resnet'" in str(info.value)
    assert "mlp" in str(info.value) and "vgg" in str(info.value)


@pytest.mark.parametrize(
    "text, match",
    [
        ("name: x\n", "no `model:` mapping"),
        ("- just\n- a list\n", "must hold a YAML mapping"),
        ("model: {type: mlp\n", "not valid YAML"),
    ],
    ids=["no model block", "not a mapping", "broken YAML"],
)
def test_malformed_config_files_are_rejected(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError, match=match):
        load_model_config(str(path))


def test_hidden_layer_without_units_is_rejected():
    with pytest.raises(PipelineError, match=r"model.hidden\[1\]: unknown key\(s\) width; missing key\(s\) units"):
        build_model({"type": "mlp", "hidden": [{"units": 8}, {"width": 8}]})


def test_vgg_config_without_conv_is_rejected():
    with pytest.raises(PipelineError, match="conv"):
        build_model({"type": "vgg", "convs": [64, "M"], "classifier": [32]})


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "mlp", "hidden": [{"units": 512}, {"units": 512, "batchnorm": True}]},
        {"type": "mlp", "hiden": [{"units": 512}]},
    ],
    ids=["batchnorm", "hiden"],
)
def test_misspelt_model_keys_are_rejected(spec):
    with pytest.raises(PipelineError):
        build_model(spec)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"type": "mlp", "hidden": [{"units": -5}]},
         "model.hidden[0].units must be a positive whole number, got -5"),
        ({"type": "mlp", "hidden": [{"units": 0}]},
         "model.hidden[0].units must be a positive whole number, got 0"),
        ({"type": "mlp", "hidden": [{"units": 12.5}]},
         "model.hidden[0].units must be a positive whole number, got 12.5"),
        ({"type": "mlp", "hidden": [{"units": "512"}]},
         "model.hidden[0].units must be a positive whole number, got '512'"),
        ({"type": "mlp", "hidden": [{"units": True}]},
         "model.hidden[0].units must be a positive whole number, got True"),
        ({"type": "mlp", "hidden": 5}, "model.hidden must be a YAML list"),
        ({"type": "mlp", "hidden": [512]}, "model.hidden[0] must be a mapping"),
        ({"type": "mlp", "hidden": [{"units": 8, "batch_norm": "yes"}]},
         "model.hidden[0].batch_norm must be true or false, got 'yes'"),
        ({"type": "vgg", "conv": 64}, "model.conv must be a YAML list"),
        ({"type": "vgg", "conv": ["M"]}, "model.conv must hold at least one convolution width"),
        ({"type": "vgg", "conv": [8, -1]}, "model.conv[1] (a width or M) must be a positive whole"),
        ({"type": "vgg", "input_size": 4, "conv": [8, "M", "M", "M"]},
         "model.conv[3]: too many max-pools (M) for input_size 4"),
        ({"type": "vgg", "conv": [8], "classifier": [0]}, "model.classifier[0] must be a positive"),
        ({"type": "vgg", "conv": [8], "dropout": 1.5}, "model.dropout must be a number in [0, 1)"),
    ],
)
def test_malformed_model_values_get_one_line_naming_the_key(tmp_path, spec, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "model": spec}))
    with pytest.raises(PipelineError) as info:
        load_model_config(str(path))
    assert str(info.value).startswith(f"{path}: {message}")
    assert "\n" not in str(info.value)
    with pytest.raises(PipelineError, match=re.escape(message)):
        build_model(spec)
