"""A pytorch-metric-learning script runs with only its import lines changed to dml_bias and prints PML's values.

The script is PML's ``TripletMarginLossMNIST`` notebook (its model, train and test functions, the same distance,
reducer, miner, loss and AccuracyCalculator) on synthetic tensors instead of MNIST, followed by everyday calls of
the other names. It runs twice in fresh interpreters, once as written and once with ``pytorch_metric_learning``
replaced by ``dml_bias``; every number printed must agree (counts exactly, values to float32 round-off).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytorch_metric_learning")

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import torch
import torch.nn as nn
import torch.optim as optim

from pytorch_metric_learning import distances, losses, miners, reducers, samplers, testers
from pytorch_metric_learning.utils import distributed as pml_dist
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

torch.manual_seed(0)
torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def synthetic(n, generator):
    labels = torch.randint(0, 10, (n,), generator=generator)
    centres = torch.randn(10, 32, generator=torch.Generator().manual_seed(42))
    return torch.utils.data.TensorDataset(centres[labels] + 1.5 * torch.randn(n, 32, generator=generator), labels)


### MNIST code originally from https://github.com/pytorch/examples/blob/master/mnist/main.py ###
def train(model, loss_func, mining_func, device, train_loader, optimizer, epoch):
    model.train()
    for batch_idx, (data, labels) in enumerate(train_loader):
        data, labels = data.to(device), labels.to(device)
        optimizer.zero_grad()
        embeddings = model(data)
        indices_tuple = mining_func(embeddings, labels)
        loss = loss_func(embeddings, labels, indices_tuple)
        loss.backward()
        optimizer.step()
        print(
            "Epoch {} Iteration {}: Loss = {:.6f}, Number of mined triplets = {}".format(
                epoch, batch_idx, loss.item(), mining_func.num_triplets
            )
        )


### convenient function from pytorch-metric-learning ###
def get_all_embeddings(dataset, model):
    tester = testers.BaseTester(dataloader_num_workers=0)
    return tester.get_all_embeddings(dataset, model)


### compute accuracy using AccuracyCalculator from pytorch-metric-learning ###
def test(train_set, test_set, model, accuracy_calculator):
    train_embeddings, train_labels = get_all_embeddings(train_set, model)
    test_embeddings, test_labels = get_all_embeddings(test_set, model)
    train_labels = train_labels.squeeze(1)
    test_labels = test_labels.squeeze(1)
    print("Computing accuracy")
    accuracies = accuracy_calculator.get_accuracy(
        test_embeddings, test_labels, train_embeddings, train_labels, False
    )
    print("Test set accuracy (Precision@1) = {}".format(accuracies["precision_at_1"]))


device = torch.device("cpu")
g = torch.Generator().manual_seed(1)
dataset1 = synthetic(512, g)
dataset2 = synthetic(200, g)
train_loader = torch.utils.data.DataLoader(dataset1, batch_size=128, shuffle=True)
model = Net().to(device)
optimizer = optim.Adam(model.parameters(), lr=0.01)
num_epochs = 2

### pytorch-metric-learning stuff ###
distance = distances.CosineSimilarity()
reducer = reducers.ThresholdReducer(low=0)
loss_func = losses.TripletMarginLoss(margin=0.2, distance=distance, reducer=reducer)
mining_func = miners.TripletMarginMiner(margin=0.2, distance=distance, type_of_triplets="semihard")
accuracy_calculator = AccuracyCalculator(include=("precision_at_1",), k=1)
### pytorch-metric-learning stuff ###

for epoch in range(1, num_epochs + 1):
    train(model, loss_func, mining_func, device, train_loader, optimizer, epoch)
    test(dataset1, dataset2, model, accuracy_calculator)

### everyday calls ###
with torch.no_grad():
    emb, labels = get_all_embeddings(dataset2, model)
labels = labels.squeeze(1)
raw = dataset2.tensors[0][:64, :16]
lab = labels[:64]
print("lp", distances.LpDistance()(raw)[0, :3].tolist())
print("lp p1", distances.LpDistance(p=1, normalize_embeddings=False)(raw[:4], raw[4:8]).sum().item())
print("dot", distances.DotProductSimilarity()(raw)[1, :3].tolist())
print("contrastive", losses.ContrastiveLoss()(raw, lab).item())
cos_contrastive = losses.ContrastiveLoss(pos_margin=1, neg_margin=0, distance=distances.CosineSimilarity())
print("contrastive cos", cos_contrastive(raw, lab).item())
ms_miner = miners.MultiSimilarityMiner(epsilon=0.1)
pairs = ms_miner(raw, lab)
print("ms", losses.MultiSimilarityLoss()(raw, lab, pairs).item(), ms_miner.num_pos_pairs, ms_miner.num_neg_pairs)
pm = miners.PairMarginMiner(pos_margin=0.3, neg_margin=0.9)
pm_pairs = pm(raw, lab)
print("pair margin", pm.num_pos_pairs, pm.num_neg_pairs, losses.ContrastiveLoss()(raw, lab, pm_pairs).item())
for kind in ("all", "hard", "semihard", "easy"):
    tm = miners.TripletMarginMiner(margin=0.1, type_of_triplets=kind)
    trip = tm(raw, lab)
    print("triplets", kind, tm.num_triplets, losses.TripletMarginLoss(margin=0.1)(raw, lab, trip).item())
bh = miners.BatchHardMiner()
print("batch hard", losses.TripletMarginLoss()(raw, lab, bh(raw, lab)).item(), bh.num_triplets)
for red in (
    reducers.MeanReducer(), reducers.SumReducer(), reducers.AvgNonZeroReducer(), reducers.ThresholdReducer(0.1, 0.5)
):
    print("reducer", type(red).__name__, losses.TripletMarginLoss(reducer=red)(raw, lab).item())
print("ntxent", losses.NTXentLoss(temperature=0.1)(raw, lab).item())
print("supcon", losses.SupConLoss(temperature=0.1)(raw, lab).item())
torch.manual_seed(3)
pa = losses.ProxyAnchorLoss(10, 16)
print("proxy anchor", pa(raw, lab).item())
torch.manual_seed(4)
arc = losses.ArcFaceLoss(10, 16, margin=28.6, scale=64)
print("arcface", arc(raw, lab).item(), list(arc.W.shape), arc.get_logits(raw[:2])[0, :2].tolist())
xbm = losses.CrossBatchMemory(losses.ContrastiveLoss(), 16, memory_size=48, miner=miners.MultiSimilarityMiner())
for start in range(0, 64, 16):
    print("xbm", start, xbm(raw[start:start + 16], lab[start:start + 16]).item())
ssl = losses.SelfSupervisedLoss(losses.NTXentLoss(temperature=0.2))
print("self supervised", ssl(raw[:8], raw[:8] + 0.1).item())
print("wrapped", pml_dist.DistributedLossWrapper(losses.MultiSimilarityLoss())(raw, lab).item())
calc = AccuracyCalculator(exclude=("NMI", "AMI"), k="max_bin_count")
acc = calc.get_accuracy(emb, labels)
print("accuracy", [(key, round(acc[key], 6)) for key in sorted(acc)])
acc = AccuracyCalculator(k=None, avg_of_avgs=True).get_accuracy(emb, labels)
print("accuracy all", [(key, round(acc[key], 6)) for key in sorted(acc)])
per_class = AccuracyCalculator(include=("r_precision",), k=5, return_per_class=True)
acc = per_class.get_accuracy(emb[:100], labels[:100], emb[100:], labels[100:])
print("per class", [round(v, 6) for v in acc["r_precision"]])
sampler = samplers.MPerClassSampler(labels, m=4, batch_size=40, length_before_new_iter=1000)
print("sampler", len(sampler), len(list(iter(sampler))))
"""

NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def run(script: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_script_gives_pml_values_with_only_the_import_changed() -> None:
    ours_script = SCRIPT.replace("pytorch_metric_learning", "dml_bias")
    assert ours_script.count("dml_bias") == 3  # only the three import lines changed
    theirs = run(SCRIPT).splitlines()
    ours = run(ours_script).splitlines()
    assert len(ours) == len(theirs) > 30
    for a, b in zip(ours, theirs, strict=True):
        assert NUMBER.sub("#", a) == NUMBER.sub("#", b), (a, b)
        for x, y in zip(NUMBER.findall(a), NUMBER.findall(b), strict=True):
            if "." in x or "e" in x:
                assert float(x) == pytest.approx(float(y), rel=2e-4, abs=2e-6), (a, b)
            else:
                assert x == y, (a, b)
