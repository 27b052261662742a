"""FSDP on CPU: what runs here and what does not (issue 25; docs/performance.md#fsdp).

accelerate does not start FSDP without a GPU, so the Trainer cannot be run under FSDP here. torch's own FSDP2
(``fully_shard``) does run on CPU over gloo: the classifier, sharded at the encoder-layer class that
recipes/accelerate/fsdp.yaml names, gives the loss and the gradients of the unsharded model on the whole batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "recipes" / "accelerate" / "fsdp.yaml"

SCRIPT = r"""
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import transformers.models.clip.modeling_clip as clip_modeling
sys.path.insert(0, {tests!r})
from _builders import tiny_clip
from hf_cfft import classifier_from_clip

dist.init_process_group("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
clip = tiny_clip()
model = classifier_from_clip(clip, torch.randn(3, clip.config.projection_dim), ["a", "b", "c"]).train()
reference = classifier_from_clip(clip, model.classifier.weight.detach().clone(), ["a", "b", "c"]).train()
reference.load_state_dict(model.state_dict())
layer = getattr(clip_modeling, {layer!r})
wrapped = [m for m in model.modules() if isinstance(m, layer)]
assert wrapped, "no " + {layer!r} + " in the classifier"
for m in wrapped:
    fully_shard(m)
fully_shard(model)
pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
labels = torch.tensor([0, 1, 2, 0])
share = slice(2 * rank, 2 * rank + 2)
loss = model(pixel_values=pixels[share], labels=labels[share]).loss
loss.backward()  # FSDP2 averages the gradients over the processes (reduce-scatter)
whole = reference(pixel_values=pixels, labels=labels).loss
whole.backward()
losses = [torch.zeros(1) for _ in range(size)]
dist.all_gather(losses, loss.detach().view(1))
assert torch.allclose(torch.cat(losses).mean(), whole.detach(), atol=1e-5), (losses, whole)
sharded = dict(model.named_parameters())
worst = 0.0
for name, p in reference.named_parameters():
    full = sharded[name].grad.full_tensor()
    worst = max(worst, (full - p.grad).abs().max().item())
    assert type(sharded[name]).__name__ == "DTensor"
assert worst < 1e-5, worst
if rank == 0:
    print("FSDP2 ok", len(wrapped), "layers, worst gradient difference", worst)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_fsdp_config_is_valid_for_accelerate_and_names_a_tower_layer():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(FSDP_CONFIG))  # refuses unknown keys
    assert config.distributed_type == DistributedType.FSDP and config.fsdp_config["fsdp_version"] == 2
    # FULL_STATE_DICT: the saved model.safetensors is whole, so from_pretrained reads it as any other run's
    assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    import transformers.models.clip.modeling_clip as clip_modeling

    assert hasattr(clip_modeling, config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])


@pytest.mark.skipif(sys.platform != "linux", reason="two CPU processes over gloo")
def test_fsdp2_on_two_cpu_processes_gives_the_unsharded_loss_and_gradients(tmp_path):
    layer = yaml.safe_load(FSDP_CONFIG.read_text())["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
    script = tmp_path / "fsdp_step.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests"), layer=layer))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(script),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP2 ok 2 layers" in done.stdout, done.stdout
