import torch
from torch import nn
import hptune
def model(input_shape, num_classes, width=64):  # its keyword arguments are the model's hyperparameters
    return nn.Sequential(nn.Linear(input_shape[0], width), nn.ReLU(), nn.Linear(width, num_classes))

def data():  # the train and test splits, each (inputs, labels)
    x = torch.randn(3000, 10, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > x[:, 1]).long() + (x[:, 2] > 0).long()
    return (x[:2400], y[:2400]), (x[2400:], y[2400:])

if __name__ == "__main__":
    space = {"lr": {"low": 1e-3, "high": 0.3, "log": True}, "model.width": [16, 64, 256], "epochs": 8}
    experiment = hptune.search(model=model, data=data, space=space, samples=8, name="quickstart")
    print(experiment.best_config, experiment.trials_dataframe()[["number", "lr", "model.width", "test_accuracy"]])
