"""The evaluation layer (`vitmpp.evaluate`): how an encoder is scored, for both stages.

Fine-tuning (`vitmpp.finetune`) and pretraining's online evaluation (`vitmpp.pretrain`) import
these; neither stage imports the other (the contracts in pyproject.toml).

* heads.py: pooled features of a frozen encoder, MAE's linear probe, a classifier with a new head;
* knn.py: k-nearest-neighbour classification on frozen features (DINO's protocol);
* accuracy.py: top-1/top-5 of a classifier over a split, each sample counted once across ranks;
* online.py: the online evaluation while pretraining (kNN on validation against a training-split
  memory bank, and the objective's validation loss).
"""
