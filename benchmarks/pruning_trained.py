"""The pruning study without the full reproduction's cost, on better-trained Fashion-MNIST networks.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/pruning_trained.py OUT.json [RATIOS [NETWORKS]]

RATIOS: comma-separated shares per layer, default 0.1,0.2,0.3 (the study's seven:
0.1,0.2,0.3,0.4,0.5,0.6,0.7). NETWORKS: ``inception,resnet`` (default) or one of them.

Trains (or loads from the cache) the Inception-style network with the full reproduction's settings
(60,000 images, 3 epochs) and the ResNet-style network on 20,000 images for 2 epochs, then runs
:func:`conductance.experiments.pruning.study_network` at 10, 20 and 30% per layer (256 calibration
images, 16 intervals, 2,000 test images, one fine-tuning epoch on 2,000 images, random with 3
seeds). About 25 minutes on one core, training included. Numbers in docs/pruning.md.
"""

import json
import sys
import time

import torch

from conductance.experiments import fashion_inception as fi
from conductance.experiments import pruning as study
from conductance.experiments.report import to_jsonable


def main(path: str, ratios: str = "0.1,0.2,0.3", networks: str = "inception,resnet") -> None:
    torch.set_num_threads(1)
    settings = dict(ratios=[float(r) for r in ratios.split(",")], n_cal=256, n_test=2000, n_ft=2000, seeds=3,
                    n_steps=16)
    out: dict = {"settings": settings}
    inception = fi.load_or_train(fi.FULL_CONFIG, log=print)
    resnet_config = study.ResNetConfig(n_train=20000, epochs=2, batch_size=128)
    resnet = study.load_or_train_resnet(resnet_config, log=print)
    out["train"] = {"inception": [inception.test_accuracy, inception.train_seconds, str(inception.config)],
                    "resnet": [resnet.test_accuracy, resnet.train_seconds, str(resnet_config)]}
    for name, model in (("inception", inception.model), ("resnet", resnet.model)):
        if name not in networks.split(","):
            continue
        start = time.perf_counter()
        out[name] = study.study_network(name, model, settings, print)
        out[name]["seconds"] = time.perf_counter() - start
        with open(path, "w") as f:
            json.dump(to_jsonable(out), f, indent=1)


if __name__ == "__main__":
    main(*(sys.argv[1:] or ["pruning-trained.json"]))
