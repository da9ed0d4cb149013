"""Condition adapters: SPADE layers retrained for one downsample factor, how they are trained
(train_diffusion --trainable spade), found and applied, and how the receiver serves with them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gesco.v1 import gesco_pb2
from receiver_service.grpc_server import queue_transmission
from receiver_service.store import TransmissionStore
from receiver_service.worker import GenerationWorker
from shared.limits import SamplingOptions
from shared.semantic.checkpoints import save_checkpoint
from shared.semantic.diffusion.adapters import (
    adapted_generators,
    adapter_parameter_names,
    adapter_path,
    adapter_paths,
    base_fingerprint,
    save_adapter,
    with_adapter,
)
from shared.semantic.diffusion.generator import CHECKPOINT_KIND, SemanticDiffusionConfig, SemanticImageGenerator
from shared.semantic.diffusion.unet import UNetConfig
from tests.receiver_helpers import TINY, conditions, tiny_generator
from tests.receiver_helpers import decode_png, make_settings, transmission, wait_for_status
from tests.training_helpers import train_args, train_log
from training import train_diffusion

SAMPLING = SamplingOptions(sampler="ddim", steps=3, guidance=1.5)


def shipped_base(folder: Path) -> Path:
    """A random tiny generator written as a shipped checkpoint (fp16, as every shipped model)."""
    generator = tiny_generator()
    path = folder / "base.pt"
    save_checkpoint(path, CHECKPOINT_KIND, generator.config, generator.network.state_dict(), {"name": "tiny", "step": 7})
    return path


def write_adapter(base: Path, factor: int, seed: int = 1) -> Path:
    """An adapter for `factor` beside `base`: its SPADE weights redrawn at random."""
    generator = SemanticImageGenerator.load(base, "cpu")
    names = set(adapter_parameter_names(generator.network))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in generator.network.named_parameters():
            if name in names:
                torch.nn.init.normal_(parameter, std=0.05)
    path = adapter_path(base, factor)
    save_adapter(path, generator.network, generator.config, {"name": f"tiny-f{factor}", "step": 9})
    return path


def test_an_adapter_replaces_only_the_spade_weights(tmp_path: Path) -> None:
    base_path = shipped_base(tmp_path)
    adapter = write_adapter(base_path, 4)
    base = SemanticImageGenerator.load(base_path, "cpu")
    before = {name: t.clone() for name, t in base.network.state_dict().items()}
    adapted = with_adapter(base, adapter)
    names = set(adapter_parameter_names(base.network))
    assert 0 < len(names) < len(before)
    for name, value in adapted.network.state_dict().items():
        torch.testing.assert_close(base.network.state_dict()[name], before[name])  # the base is untouched
        assert torch.equal(value, before[name]) != (name in names), name
    assert adapted.info.name == "tiny-f4" and adapted.info.adapter == str(adapter) and adapted.info.training_steps == 9
    assert base.info.adapter is None
    cond = conditions(2)
    assert not np.array_equal(base.generate(cond, SAMPLING, [1, 2]), adapted.generate(cond, SAMPLING, [1, 2]))


def test_adapters_are_found_beside_their_checkpoint_only(tmp_path: Path) -> None:
    base_path = shipped_base(tmp_path)
    assert adapter_path(base_path, 8) == tmp_path / "base.f8.adapter.pt"
    paths = {factor: write_adapter(base_path, factor) for factor in (8, 2)}
    (tmp_path / "other.f4.adapter.pt").write_bytes(b"another checkpoint's")
    (tmp_path / "base.fx.adapter.pt").write_bytes(b"not a factor")
    assert adapter_paths(base_path) == {2: paths[2], 8: paths[8]}
    generators = adapted_generators(SemanticImageGenerator.load(base_path, "cpu"))
    assert sorted(generators) == [2, 8] and generators[8].info.name == "tiny-f8"
    untrained = SemanticImageGenerator.load(tmp_path / "missing.pt", "cpu",
                                            untrained_config=SemanticDiffusionConfig(unet=TINY))
    assert adapted_generators(untrained) == {}


def test_an_adapter_refuses_other_base_weights_or_another_network(tmp_path: Path) -> None:
    base_path = shipped_base(tmp_path)
    adapter = write_adapter(base_path, 4)
    base = SemanticImageGenerator.load(base_path, "cpu")
    fingerprint = base_fingerprint(base.network)
    with torch.no_grad():
        base.network.input_conv.bias[0] = 0.0
        zero = base_fingerprint(base.network)
        base.network.input_conv.bias[0] = -0.0  # the same weight (the EMA update of training makes -0 +0)
        assert base_fingerprint(base.network) == zero
        base.network.input_conv.bias.copy_(SemanticImageGenerator.load(base_path, "cpu").network.input_conv.bias)
    assert base_fingerprint(base.network) == fingerprint
    with torch.no_grad():
        base.network.input_conv.weight[0, 0, 0, 0] += 1.0
    assert base_fingerprint(base.network) != fingerprint
    with pytest.raises(ValueError, match="other base weights"):
        with_adapter(base, adapter)
    other = SemanticImageGenerator.load(None, "cpu", untrained_config=SemanticDiffusionConfig(
        unet=UNetConfig(num_classes=TINY.num_classes, image_height=8, image_width=16, model_channels=16,
                        channel_mult=(1, 2), attention_downsample=(2,), head_channels=16, spade_hidden=8)))
    with pytest.raises(ValueError, match="another network configuration"):
        with_adapter(other, adapter)


def test_training_the_spade_layers_exports_an_adapter_of_its_base(tmp_path: Path) -> None:
    assert train_diffusion.main(train_args(tmp_path, "base", "--max-steps", "2")) == "max_steps"
    base_path = tmp_path / "base" / "export.pt"
    argv = train_args(tmp_path, "f2", "--max-steps", "6", "--init-from", str(base_path), "--trainable", "spade",
                 "--downsample-factor", "2", "--lr", "1e-2", "--rewarm-steps", "2", "--model-name", "tiny-f2")
    assert train_diffusion.main(argv) == "max_steps"
    log = train_log(tmp_path, "f2")
    assert log[0]["resumed"] == "init"
    assert [r["lr"] for r in log if "lr" in r][:2] == pytest.approx([5e-3, 1e-2])  # a new optimiser warms up again
    base = SemanticImageGenerator.load(base_path, "cpu")
    adapted = with_adapter(base, tmp_path / "f2" / "export.pt")  # the fingerprint matches the base
    names = set(adapter_parameter_names(base.network))
    changed = {name for name, value in adapted.network.state_dict().items()
               if not torch.equal(value, base.network.state_dict()[name])}
    assert changed and changed <= names
    assert adapted.info.name == "tiny-f2" and adapted.info.training_steps == 6
    # the fp16 parts of a (GPU) call export as an adapter of the same base too
    parts = tmp_path / "parts"
    assert train_diffusion.main(train_args(tmp_path, "f2-parts", "--max-steps", "4", "--init-from", str(base_path),
                                      "--trainable", "spade", "--downsample-factor", "2", "--save-parts",
                                      str(parts))) == "max_steps"
    train_diffusion.main(["--export-parts", str(parts), "--export-path", str(tmp_path / "from-parts.pt")])
    assert with_adapter(base, tmp_path / "from-parts.pt").info.training_steps == 4  # the base's 2, then 2 more
    for bad in (["--trainable", "spade"], ["--trainable", "decoder", "--init-from", str(base_path)]):
        with pytest.raises(SystemExit):
            train_diffusion.parse_config(bad)


# ------------------------------------------------------------------ the receiver serves with them


def serve(tmp_path: Path, base: Path, jobs, **overrides) -> dict[str, tuple[dict, np.ndarray]]:
    """Submit every (header, symbols) to a worker on `base`; the status record and image of each."""
    store = TransmissionStore(tmp_path / "store", max_items=50, max_age_s=3600)
    store.open()
    worker = GenerationWorker(make_settings(tmp_path, queue_size=8, checkpoint=base, **overrides), store)
    worker.load_model()
    assert worker.ready, worker.load_error
    try:
        for header, symbols in jobs:
            queue_transmission(worker, header, symbols, "req")
        out = {}
        for header, _ in jobs:
            record = wait_for_status(store, header.transmission_id, {"done", "failed"})
            assert record["status"] == "done", record
            out[header.transmission_id] = (record, decode_png(store.artifact_path(header.transmission_id, "image").read_bytes()))
        return out
    finally:
        worker.stop(5)


@pytest.mark.parametrize("batching", ["request", "continuous"])
def test_the_receiver_samples_each_factor_with_its_adapter(tmp_path: Path, batching: str) -> None:
    base = shipped_base(tmp_path)
    adapter = write_adapter(base, 2)
    sampling = {"sampler": "ddim", "steps": 3, "guidance": 1.5, "seed": 5, "use_fds": True}
    jobs = [transmission(sampling=gesco_pb2.SamplingRequest(**sampling), factor=factor) for factor in (2, 1, 2)]
    served = {"with": serve(tmp_path / "with", base, jobs, batching=batching, max_batch_size=3),
              "without": serve(tmp_path / "without", base, jobs, batching=batching, max_batch_size=3, adapters=False)}
    for (header, _), factor in zip(jobs, (2, 1, 2)):
        record, image = served["with"][header.transmission_id]
        plain_record, plain = served["without"][header.transmission_id]
        assert plain_record["model"]["adapter"] is None and plain_record["model"]["name"] == "tiny"
        if factor == 2:
            assert record["model"]["adapter"] == str(adapter) and record["model"]["name"] == "tiny-f2"
            assert not np.array_equal(image, plain)
        else:
            assert record["model"]["adapter"] is None
            np.testing.assert_array_equal(image, plain)


def test_an_adapter_of_other_weights_fails_the_model_load(tmp_path: Path) -> None:
    base = shipped_base(tmp_path)
    write_adapter(base, 2)
    generator = SemanticImageGenerator.load(base, "cpu")
    with torch.no_grad():
        generator.network.out[2].weight.add_(0.5)
    save_checkpoint(base, CHECKPOINT_KIND, generator.config, generator.network.state_dict(), {"name": "retrained"})
    store = TransmissionStore(tmp_path / "store", max_items=5, max_age_s=3600)
    store.open()
    worker = GenerationWorker(make_settings(tmp_path, checkpoint=base), store)
    worker.load_model()
    assert not worker.ready and "other base weights" in worker.load_error and "base.f2.adapter.pt" in worker.load_error
