"""The seed notebook's own work as a plain script: load the balanced sample, train the 3-layer
and the 4-layer MLP for 20 epochs each, print per-epoch times. Transcribed from
../shared/seed/000_5aad04330264527e.txt (plots left out); the yardstick for bench/.

    python bench/seed_notebook.py --data_dir ../shared/datasets [--models mlp3]
"""

import argparse
import time

import torch
import torch.nn as nn
import torch.optim as optim
from torchvision.datasets import MNIST

LABELS = ["train", "test"]
CLASSES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)


def load_seed_data(root):
    dataset = {"train": MNIST(root=root, train=True, download=True),
               "test": MNIST(root=root, train=False, download=True)}
    X = {"train": [], "test": []}
    Y = {"train": [], "test": []}
    for label in LABELS:
        for c in CLASSES:
            subset_idx = torch.isin(dataset[label].targets, torch.as_tensor(c))
            X[label].append(dataset[label].data[subset_idx][:600].view(-1, 28 * 28).float())
            Y[label].append(dataset[label].targets[subset_idx][:600].long())
        X[label] = torch.cat(X[label], dim=0)
        Y[label] = torch.cat(Y[label], dim=0)
    return X, Y


class MLP3(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden1 = nn.Linear(784, 512)
        self.act1 = nn.ReLU()
        self.hidden2 = nn.Linear(512, 512)
        self.batchNorm2 = nn.BatchNorm1d(512)
        self.act2 = nn.ReLU()
        self.output = nn.Linear(512, 10)

    def forward(self, x):
        x = self.act1(self.hidden1(x))
        x = self.act2(self.batchNorm2(self.hidden2(x)))
        return self.output(x)


class MLP4(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden1 = nn.Linear(784, 512)
        self.act1 = nn.ReLU()
        self.hidden2 = nn.Linear(512, 512)
        self.batchNorm2 = nn.BatchNorm1d(512)
        self.act2 = nn.ReLU()
        self.hidden3 = nn.Linear(512, 512)
        self.batchNorm3 = nn.BatchNorm1d(512)
        self.act3 = nn.ReLU()
        self.output = nn.Linear(512, 10)

    def forward(self, x):
        x = self.act1(self.hidden1(x))
        x = self.act2(self.batchNorm2(self.hidden2(x)))
        x = self.act3(self.batchNorm3(self.hidden3(x)))
        return self.output(x)


def seed_epoch(model, loss_fn, optimizer, X, Y, accuracies, losses, batch_size=64):
    """One epoch exactly as the notebook's loop body; returns its elapsed time."""
    x = X["train"].float()
    y = Y["train"]
    model.train()
    start = time.time()
    perm_indices = torch.randperm(len(x))
    for i in range(0, len(x), batch_size):
        batch_indices = perm_indices[i:i + batch_size]
        x_batch = x[batch_indices]
        y_batch = y[batch_indices]
        y_pred = model(x_batch)
        loss = loss_fn(y_pred, y_batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    for label in LABELS:
        with torch.no_grad():
            y_pred = model(X[label].float())
            _, predicted = torch.max(y_pred, dim=1)
            accuracies[label].append((predicted == Y[label]).float().mean())
            losses[label].append(loss_fn(y_pred, Y[label]).item())
    end = time.time()
    return end - start


def train_seed_model(model_class, X, Y, n_epochs=20):
    model = model_class()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    accuracies = {"train": [], "test": []}
    losses = {"train": [], "test": []}
    for epoch in range(n_epochs):
        elapsed = seed_epoch(model, loss_fn, optimizer, X, Y, accuracies, losses)
        print(f"Epoch [{epoch + 1}/{n_epochs}], Time elapsed: {elapsed:.4f}s")
    return accuracies, losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/datasets")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--models", default="mlp3,mlp4",
                        help="which models, in order (one per process: how the notebook's "
                             "user runs it as a script per model)")
    args = parser.parse_args()
    X, Y = load_seed_data(args.data_dir)
    for model_class in ({"mlp3": MLP3, "mlp4": MLP4}[name] for name in args.models.split(",")):
        accuracies, _ = train_seed_model(model_class, X, Y, args.epochs)
        print(f"{model_class.__name__}: final test accuracy {float(accuracies['test'][-1]):.4f}")
