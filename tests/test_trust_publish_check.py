"""Every publish path checks a model with the runtime the device will load it with.

How to break it: `sre-hub publish` loaded a model in ONNX Runtime before signing it, but the hub's
Python API (``HubRepository.publish``, what the hub's own promotion and any tooling call) defaulted to
``check_model=False``: any bytes were signed as a managed model and shipped to the fleet, to fail
there. The check is now decided by the manifest (what the device does with the artifact), not by a
caller's flag.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deployment.manifest import GoldenSpec, GoldenVector, ModuleManifest
from deployment.sample_models import linear_classifier
from hub.repository import HubRepository
from sre_core.clock import FakeClock
from sre_core.errors import InputError


def test_the_api_refuses_what_the_device_could_not_load_and_signs_what_it_will_not(tmp_path: Path) -> None:
    repo = HubRepository.init(tmp_path / "repo", channels=("stable", "beta"), clock=FakeClock())
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(4096))
    # A managed model (the agent loads it into ONNX Runtime): junk is refused before anything is signed.
    with pytest.raises(InputError, match="onnxruntime cannot load"):
        repo.publish("stable", junk, ModuleManifest(name="clf", version="1.0"))
    assert repo.channel_targets("stable") == {}
    # A declared output the model lacks: refused too.
    model = tmp_path / "clf.onnx"
    model.write_bytes(linear_classifier(seed=1))
    wrong = ModuleManifest.model_validate({"name": "clf", "version": "1.0", "runtime": {"output_name": "p"}})
    with pytest.raises(InputError, match="'p'"):
        repo.publish("stable", model, wrong)
    # Golden vectors mean the device runs it, even in file mode: checked.
    golden = GoldenSpec(
        vectors=[GoldenVector(inputs={"pixels": [[0.0] * 16]}, expected={"probabilities": [[0.25] * 4]})]
    )
    with pytest.raises(InputError, match="pixels"):
        repo.publish("stable", model, ModuleManifest(name="clf", version="1.0", mode="file", golden=golden))
    # A file-mode module is a file handed to an application the agent never loads: not checked.
    repo.publish("stable", junk, ModuleManifest(name="app", version="1.0", mode="file", filename="m.bin"))
    pub = repo.publish("stable", model, ModuleManifest(name="clf", version="1.0"))
    assert pub.target in repo.channel_targets("stable")
