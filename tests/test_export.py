"""sona-shm export --peft: the directory PEFT loads, checked against the real peft package on a CPU torch."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sona_shm import Step, Trajectory
from sona_shm.cli import EXIT_CHECKPOINT, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, main
from sona_shm.export import ADAPTER_FILE, CONFIG_FILE, export_engine
from sona_shm.store.checkpoint import checkpoint_segment
from sona_shm.store.tensorfile import decode

H = 16
INSTALL_HINT = "pip install torch==2.13.0 peft (a CPU torch; `./scripts/test` installs both through the test extra)"


def _peft():
    """``(torch, peft)``, or skip with the install hint (fail under CI=true)."""
    try:
        import peft
        import torch
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"torch and peft are missing under CI=true ({exc}): {INSTALL_HINT}")
        pytest.skip(f"needs torch and peft: {INSTALL_HINT}")
    return torch, peft


@pytest.fixture
def trained(engine):
    """An engine (in-process flusher) that learned 300 trajectories: ``up`` is far from zero."""

    def make(rank: int = 2):
        flusher = engine(hidden_dim=H, rank=rank, lr=0.5, flush_threshold=10, lane_slots=64, capacity=8)
        client = engine.attach()
        rng = np.random.default_rng(rank)
        good = rng.standard_normal(H).astype(np.float32)
        for i in range(300):
            q = rng.standard_normal(H).astype(np.float32)
            steps = [Step(good + 0.1 * rng.standard_normal(H).astype(np.float32), None, 1.0 + i % 3)]
            assert client.record(Trajectory(q, steps, 0.9))
            if i % 50 == 49:
                flusher.scan()
        flusher.scan()
        assert client.statistics().adapter.up_norm > 0.1
        return flusher, client

    return make


def identity_model(torch, h: int, module: str = "adapter"):
    class Adapted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            setattr(self, module, torch.nn.Linear(h, h, bias=False))
            torch.nn.init.eye_(getattr(self, module).weight)

        def forward(self, x):
            return getattr(self, module)(x)

    return Adapted()


@pytest.mark.parametrize("rank", [1, 2])
def test_peft_loads_the_export_and_reproduces_forward(trained, name, tmp_path, capsys, rank):
    torch, peft = _peft()
    _, client = trained(rank)
    out = tmp_path / "adapter"
    assert main(["export", "--name", name, "--peft", str(out)]) == EXIT_OK
    assert f"exported engine {name!r} (rank {rank}, hidden_dim {H}" in capsys.readouterr().out

    x = np.random.default_rng(7).standard_normal((5, H)).astype(np.float32)
    expected = client.forward(x)
    assert np.abs(expected - x).max() > 1e-2  # the adapter changes the output: the comparison means something
    model = peft.PeftModel.from_pretrained(identity_model(torch, H), str(out))
    model.eval()
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
        with model.disable_adapter():
            np.testing.assert_array_equal(model(torch.from_numpy(x)).numpy(), x)  # the base is the identity
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    layer = model.base_model.model.adapter
    assert layer.scaling["default"] == pytest.approx(1 / np.sqrt(rank))


def test_set_peft_model_state_dict_takes_every_key(trained, name, tmp_path):
    torch, peft = _peft()
    _, client = trained()
    out = tmp_path / "adapter"
    export_engine(name, out, module="layers.0.proj")
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 1 and config["use_rslora"] is True
    assert config["target_modules"] == ["layers.0.proj"] and config["task_type"] is None

    class Deep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Module()])
            self.layers[0].proj = torch.nn.Linear(H, H, bias=False)
            torch.nn.init.eye_(self.layers[0].proj.weight)

        def forward(self, x):
            return self.layers[0].proj(x)

    model = peft.get_peft_model(
        Deep(), peft.LoraConfig(**{k: v for k, v in config.items() if k not in ("peft_type", "base_model_name_or_path")})
    )
    from safetensors.torch import load_file

    result = peft.set_peft_model_state_dict(model, load_file(str(out / ADAPTER_FILE)))
    assert not result.unexpected_keys  # the checkpoint's micro_lora names were all unexpected: these are not
    x = np.random.default_rng(3).standard_normal((4, H)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.from_numpy(x)).numpy(), client.forward(x), rtol=0, atol=1e-5)


def test_export_from_a_checkpoint_file_equals_the_live_export(trained, name, tmp_path, capsys):
    _, client = trained()
    ckpt = tmp_path / "engine.safetensors"
    checkpoint_segment(name, str(ckpt))
    assert main(["export", "--from-checkpoint", str(ckpt), "--peft", str(tmp_path / "a")]) == EXIT_OK
    assert main(["export", "--name", name, "--peft", str(tmp_path / "b")]) == EXIT_OK
    capsys.readouterr()
    a, meta_a = decode((tmp_path / "a" / ADAPTER_FILE).read_bytes(), "a")
    b, _ = decode((tmp_path / "b" / ADAPTER_FILE).read_bytes(), "b")
    assert a.keys() == b.keys() == {"base_model.model.adapter.lora_A.weight", "base_model.model.adapter.lora_B.weight"}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    stats = client.statistics()
    np.testing.assert_array_equal(a["base_model.model.adapter.lora_A.weight"], stats.adapter.down)
    np.testing.assert_array_equal(a["base_model.model.adapter.lora_B.weight"], stats.adapter.up.T)
    assert a["base_model.model.adapter.lora_B.weight"].shape == (H, 2) and a["base_model.model.adapter.lora_A.weight"].dtype == np.float32
    assert meta_a["format"] == "pt" and meta_a["sona_shm.trajectories_processed"] == "300"
    assert (tmp_path / "a" / CONFIG_FILE).read_text() == (tmp_path / "b" / CONFIG_FILE).read_text()
    for exported in (tmp_path / "a" / ADAPTER_FILE, tmp_path / "b" / CONFIG_FILE):  # as private as the engine and its checkpoint
        assert exported.stat().st_mode & 0o777 == 0o600
    # safetensors itself reads it
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(
        load_file(str(tmp_path / "a" / ADAPTER_FILE))["base_model.model.adapter.lora_A.weight"], stats.adapter.down
    )


@pytest.mark.parametrize(
    "argv, code, fragment",
    [
        (["--peft", "{tmp}/x"], EXIT_USAGE, None),  # argparse: one of --name / --from-checkpoint is required
        (["--name", "{name}", "--peft", "{tmp}/x"], EXIT_NOT_FOUND, "does not exist"),
        (["--from-checkpoint", "{tmp}/missing", "--peft", "{tmp}/x"], EXIT_CHECKPOINT, "cannot read it"),
        (["--name", "{name}", "--peft", "{tmp}/x", "--module", "1bad"], EXIT_USAGE, "module: expected a dotted module path"),
    ],
)
def test_export_refusals(capsys, name, tmp_path, argv, code, fragment):
    args = ["export", *(a.format(tmp=tmp_path, name=name) for a in argv)]
    if fragment is None:
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == code
        return
    assert main(args) == code and fragment in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written


def test_export_into_a_file_is_refused(trained, name, tmp_path, capsys):
    trained()
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["export", "--name", name, "--peft", str(target)]) == EXIT_USAGE
    assert "peft: expected a directory" in capsys.readouterr().err and target.read_text() == "x"
