"""compress.serve_device: cuda on a machine without a GPU is refused at once, with the fix; the
evaluation helpers move CPU-built batches to the model's device and bring logits back beside
the labels (issue 20, item 1)."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_kd.compress.kernel import require_device
from sparse_kd.compress.new_items import add_items_from_csv
from sparse_kd.compress.stage import compress_run
from sparse_kd.config import CompressConfig, ConfigError
from sparse_kd.metrics import module_device, predict_split, serving_forward
from sparse_kd.serve import ArtifactError

from serve_helpers import copy_artifact

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is visible")


@NO_GPU
def test_cuda_serving_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"compress.serve_device: 'cuda' needs a visible CUDA GPU.*docs/GPU.md"):
        require_device("cuda")
    require_device("cpu")
    # before the run folder is even read: a missing run gives the GPU error, not FileNotFoundError
    cfg = CompressConfig(serve_device="cuda", row_alignment=16)
    with pytest.raises(ConfigError, match="needs a visible CUDA GPU"):
        compress_run(tmp_path / "no-run", "distilled", cfg, tmp_path / "art")
    assert not (tmp_path / "art").exists()


@NO_GPU
def test_add_items_refuses_a_gpu_artifact_without_a_gpu(artifacts, tmp_path):
    art = copy_artifact(artifacts.a, tmp_path / "gpu_art")
    m = json.loads((art / "manifest.json").read_text())
    m["serving"] = {"kernel": "fbgemm_tbe", "device": "cuda"}
    (art / "manifest.json").write_text(json.dumps(m))
    items = tmp_path / "items.csv"
    items.write_text("item_id,text\nnew1,a new item\n")
    with pytest.raises(ArtifactError, match="GPU artifact.*needs a visible CUDA GPU"):
        add_items_from_csv(art, items)


class _OnMeta(torch.nn.Module):
    """A serving-shaped module whose tensors live on another device ('meta' stands in for a GPU)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.zeros(1, device="meta"))
        self.seen = []

    def forward(self, dense, values, lengths):
        self.seen += [dense.device, values.device, lengths.device]
        return torch.zeros(dense.shape[0])


def test_serving_forward_moves_batches_to_the_models_device():
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from sparse_kd.data.batching import KDBatch

    m = _OnMeta()
    assert module_device(m) == torch.device("meta") and module_device(torch.nn.Identity()) == torch.device("cpu")
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]))
    b = KDBatch(dense_features=torch.zeros(2, 3), sparse_features=kjt, labels=torch.zeros(2), user=torch.zeros(2),
                item=torch.zeros(2), teacher_logits=torch.zeros(2))
    logits = predict_split(serving_forward(m), [(b, 2)])
    assert m.seen == [torch.device("meta")] * 3
    assert logits.device == torch.device("cpu") and logits.shape == (2,)


@NO_GPU
def test_pipeline_refuses_a_gpu_artifact_before_training(tmp_path, capsys):
    from sparse_kd.cli import main

    rc = main(["pipeline", "configs/demo.yaml", "compress.serve_device=cuda", f"output_dir={tmp_path / 'run'}"])
    assert rc == 2 and "needs a visible CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
