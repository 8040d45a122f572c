"""The file names of the stages' outputs that other stages, the run report, the summary and Kubeflow read.

Plain constants, importable without the stages (or torch): one spelling per file.
"""

TRAIN_ROWS = "train.jsonl"  # dataset
EVAL_ROWS = "eval.jsonl"  # dataset; copied into the train output
DATASET_RECORD = "dataset.json"  # dataset; copied into the train output
ADAPTER = "adapter"  # train: the adapter's folder
METRICS = "metrics.json"  # train
LOSS_CHART = "loss_chart.html"  # train
EVAL_RESULTS = "eval_results.json"  # eval
REGISTRATION = "registration.json"  # register
