"""End to end: SSF and ZeroI2V checkpoints, in each format, compile to verified ONNX artifacts.

Each artifact is checked again here against ``reparam_models``'s reference eager implementations
(the official code's arithmetic; PEFT has neither method) through ``peftc.load``: fp32, ≤ 1e-5 relative.
The SSF official checkpoint goes through the command line and the ``timm:`` loader; the rest through
``peftc.compile``. The ``timm:`` loader's refusals are checked here too.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import onnx
import pytest
import reparam_models as rm
import torch
from conftest import assert_outputs_close
from safetensors.torch import save_file

import peftc
from peftc.backends.tensorrt import install as trt_install
from peftc.cli import main
from peftc.errors import InputError, UnsupportedError
from peftc.loaders import load_model


def _check(artifact, reference_model, inputs):
    runner = peftc.load(artifact)
    for x in inputs:
        with torch.no_grad():
            assert_outputs_close({"output": runner(x=x)["output"]}, {"output": reference_model(x)})


def _fold_stats(manifest, name):
    return next(p["stats"] for p in manifest.pipeline if p["name"] == name)


def test_ssf_official_checkpoint_through_the_cli_and_timm_loader(tmp_path, capsys):
    model, _ = rm.exported("vit")
    weights = rm.save_weights(model, tmp_path / "vit.safetensors")
    ssf = rm.ssf_tensors(model, "vit")
    full = {**model.state_dict(), **ssf}  # the whole fine-tuned model, as the official code saves it
    full["head.bias"] = full["head.bias"] + 0.3
    save_file({k: v.contiguous() for k, v in full.items()}, str(tmp_path / "ssf_vit.safetensors"))
    out = tmp_path / "out"
    code = main(
        ["compile", rm.timm_spec("vit", weights), "--adapter", str(tmp_path / "ssf_vit.safetensors"), "-o", str(out)]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    manifest = peftc.load(out).manifest
    # a timm ViT is built with dynamic_img_size=True: any multiple of its patch size (loaders/vision.py)
    assert manifest.model["kind"] == "timm" and manifest.target["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert _fold_stats(manifest, "fold-ssf") == {"folded": 14, "folded_into_consumer": 0, "kept": 0, "untied": 0}
    assert manifest.not_run == [
        {"what": "peft oracle", "reason": "PEFT does not implement SSF (the eager reference program is the oracle)"}
    ]
    assert manifest.adapters[0]["replacements"] == [
        {"param": "head.bias", "key": "head.bias", "reason": "fine-tuned value of head.bias in the SSF state dict"}
    ]
    assert manifest.verification["adapter_effect"]["output"] > 0.1
    head = rm.ssf_reference(model, "vit", ssf)
    with torch.no_grad():
        head.head.bias += 0.3
    _check(out, head, [rm.images(1, seed=5), rm.images(3, seed=6)])
    # the artifact can be verified again from its manifest: timm spec and checkpoint are rebuilt
    assert main(["verify", str(out)]) == 0, capsys.readouterr().err


def test_ssf_vector_fitting_no_channel_is_a_one_line_cli_error(tmp_path, capsys):
    model, _ = rm.exported("vit")
    weights = rm.save_weights(model, tmp_path / "vit.safetensors")
    save_file(
        {"blocks.1.mlp.ssf_scale_1": torch.ones(7), "blocks.1.mlp.ssf_shift_1": torch.ones(7)},
        str(tmp_path / "bad.safetensors"),
    )
    code = main(
        [
            "compile",
            rm.timm_spec("vit", weights),
            "--adapter",
            str(tmp_path / "bad.safetensors"),
            "-o",
            str(tmp_path / "o"),
        ]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[peftc")]
    assert code == 2 and len(err) == 1
    assert "bad.safetensors:blocks.1.mlp.ssf_scale_1: SSF vector of length 7 matches no channel axis" in err[0]
    assert not (tmp_path / "o").exists()


def test_ssf_native_directory_on_a_conv_net(tmp_path):
    model, _ = rm.exported("resnet")
    tensors = rm.native_ssf(model, {**rm.RESNET_SSF, **rm.RESNET_KEPT})
    path = rm.write_native(tmp_path / "ssf", {"peft_type": "SSF"}, tensors)
    artifact = peftc.compile(model, path, out=tmp_path / "out", inputs=rm.RESNET_INPUTS)
    stats = _fold_stats(artifact.manifest, "fold-ssf")
    assert stats == {"folded": 4, "folded_into_consumer": 2, "kept": 1, "untied": 0}
    reference = rm.native_ssf_reference(model, tensors)
    _check(artifact.path, reference, [rm.images(1, size=6, seed=1), rm.images(4, size=6, seed=2)])


def _runtime_ops(path):
    """ONNX op types of the nodes that do not compute constants (onnxruntime folds those at load)."""
    model = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    initializers = {i.name for i in model.graph.initializer}

    def constant(name):
        node = producer.get(name)
        if name in initializers or (node is not None and node.op_type == "Constant"):
            return True
        return node is not None and node.op_type != "Shape" and all(constant(i) for i in node.input if i)

    return Counter(n.op_type for n in model.graph.node if not all(constant(o) for o in n.output))


def test_zeroi2v_official_checkpoint_with_stdha(tmp_path):
    model, base = rm.exported("video")
    adapters = rm.zeroi2v_adapters(model)
    config = {"peft_type": "ZEROI2V", "scale": 0.5, "num_frames": rm.FRAMES, "stdha": {"shift_div": 12}}
    path = rm.write_native(tmp_path / "zeroi2v", config, rm.zeroi2v_official_tensors(adapters))
    artifact = peftc.compile(model, path, out=tmp_path / "out", inputs=rm.VIDEO_INPUTS)
    assert _fold_stats(artifact.manifest, "fold-linear-adapters")["kept"] == 0
    reference = rm.zeroi2v_reference(model, adapters, config["stdha"])
    _check(artifact.path, reference, [rm.video(1, seed=1), rm.video(2, seed=2)])
    # STDHA adds one Gather (with a constant index) and its Reshapes per block to what runs (one copy of
    # the QKV activation); in the fused ONNX one of the two Reshapes folds into the block's own
    from peftc.backends import LowerRequest, get_backend
    from peftc.loaders import parse_inputs

    (tmp_path / "base").mkdir()
    get_backend("onnx").lower(LowerRequest(base, parse_inputs(rm.VIDEO_INPUTS)), tmp_path / "base", print)
    added = _runtime_ops(artifact.path / "model.onnx") - _runtime_ops(tmp_path / "base" / "model.onnx")
    assert added == Counter({"Gather": 2, "Reshape": 2}), added


@pytest.mark.skipif(
    trt_install.find_module() is None, reason="TensorRT ONNX parser not installed (extra peftc[tensorrt])"
)
def test_zeroi2v_with_stdha_parses_in_tensorrt(tmp_path):
    """The STDHA gather and the video model's mean over frames (a ReduceMean whose axes the exporter
    computes from Constant nodes, which TensorRT's parser needs folded) both reach the network."""
    model, _ = rm.exported("video")
    config = {"peft_type": "ZEROI2V", "scale": 0.5, "num_frames": rm.FRAMES, "stdha": {"shift_div": 12}}
    path = rm.write_native(tmp_path / "zeroi2v", config, rm.zeroi2v_official_tensors(rm.zeroi2v_adapters(model)))
    artifact = peftc.compile(model, path, out=tmp_path / "out", inputs=rm.VIDEO_INPUTS, target="trt")
    report = artifact.manifest.target["tensorrt"]["parse"]
    assert report["layer_types"].get("GATHER", 0) >= 2, report["layer_types"]


def test_zeroi2v_native_keys_unmerged(tmp_path):
    model, _ = rm.exported("video")
    adapters = rm.zeroi2v_adapters(model, seed=2)
    config = {"peft_type": "ZEROI2V", "scale": 0.5, "num_frames": rm.FRAMES, "stdha": {"shift_div": 6}}
    path = rm.write_native(tmp_path / "zeroi2v", config, rm.zeroi2v_native_tensors(adapters))
    artifact = peftc.compile(model, path, out=tmp_path / "out", inputs=rm.VIDEO_INPUTS, merge=False)
    assert not [p for p in artifact.manifest.pipeline if p["name"] == "fold-linear-adapters"]
    assert len(artifact.manifest.target["adapter_initializers"]) == 2 * 4 * 4
    _check(artifact.path, rm.zeroi2v_reference(model, adapters, config["stdha"]), [rm.video(2, seed=3)])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("timm:vit_tiny_patch16_224", "no weights; peftc never downloads models"),
        ("timm:,depth=2@w.safetensors", "expected timm:NAME[,KEY=VALUE...]@WEIGHTS"),
        ("timm:vit_tiny_patch16_224,depth@w.safetensors", "'depth' is not KEY=VALUE"),
        ("timm:vit_tiny_patch16_224@missing.safetensors", "weights file missing.safetensors does not exist"),
    ],
    ids=["no-weights", "no-name", "not-key-value", "missing-file"],
)
def test_timm_spec_errors(spec, expected):
    with pytest.raises(InputError) as error:
        load_model(spec)
    assert expected in str(error.value)


def test_timm_loader_refusals(tmp_path, monkeypatch):
    model, _ = rm.exported("vit")
    weights = rm.save_weights(model, tmp_path / "vit.safetensors")
    with pytest.raises(
        InputError, match=r"timm has no model 'vit_tiny_patch16_244'; did you mean 'vit_tiny_patch16_224'\?"
    ):
        load_model(f"timm:vit_tiny_patch16_244@{weights}")
    with pytest.raises(InputError, match=r"does not fit timm:vit_tiny_patch16_224,depth=1: 12 unexpected keys"):
        load_model(f"timm:vit_tiny_patch16_224,depth=1@{weights}")
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(InputError, match="pickled weights are refused"):
        load_model(f"timm:vit_tiny_patch16_224@{tmp_path / 'vit.pth'}")
    name, kwargs = rm.TIMM["vit"]
    args = ",".join(f"{k}={json.dumps(v)}" for k, v in kwargs.items())
    loaded = load_model(f"timm:{name},{args}@{tmp_path / 'vit.pth'}", allow_pickle=True)
    assert loaded.kind == "timm" and loaded.files == {"vit.pth": peftc.hashing.sha256_file(tmp_path / "vit.pth")}
    monkeypatch.setitem(sys.modules, "timm", None)  # timm (or its torchvision) not importable
    with pytest.raises(UnsupportedError, match=r"timm cannot be imported .*pip install 'peftc\[timm\]'.*torchvision"):
        load_model(f"timm:{name}@{weights}")
