"""Kubeflow: the KFP pipeline and components (`lora-pipeline compile`) and multi-node TrainJobs.

parameters.py  KFP inputs generated from the config's `kfp` / `component` metadata
components.py  one KFP component per stage of the stage table (generated signature, one-line body)
runtime.py     what a component runs in its pod: the stage's CLI command, then its KFP artifacts
pipeline.py    the four components wired in order; secrets from Kubernetes secrets; compile to IR YAML
trainjob.py    a Kubeflow Trainer TrainJob (torch-distributed) from the train options
trainjob_run.py  the training component with num_workers > 1: the TrainJob run to its end on the cluster
command.py     the `compile` subcommand (argparse only; kfp loads when it runs)
"""
